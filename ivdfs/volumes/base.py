"""What the tree asks of a volume backend, and what a backend promises.

Role: the seam between `tree` (which knows the snapshot, its ``disk.raw`` path inside our mount,
its partitions and LVM logical volumes) and the backends that attach volumes (`kernel`,
`fuse`, `guestfs`, `vixmntapi`). Pure types. A backend that works in the background (`guestfs`:
helpers' events, idle appliances) also has `run`, which the mount starts in its nursery, and
`report` for ``/.ivdfs/stats`` (`Background`).

A volume is named by `Candidate.volume_name`: the partition number (0: a filesystem spanning the
whole disk), or for an LVM logical volume its device-mapper style name ``<vg>-<lv>`` (hyphens
inside either doubled, `ivdfs.formats.lvm_map.LogicalVolume.dm_name`), read from ``lv-<name>.raw``.
`VolumeAnswer` says, for every candidate, where it is mounted or why it is not: the tree shows
the first as the symlink ``volumes/<name>`` and the second as ``volumes/<name>.error`` (one line
of text), so no volume is ever silently absent.

Concurrency contract for backends: `attach` and `aclose` run on the trio thread and must never
block it (loop devices read through our own FUSE mount: a blocking call there deadlocks);
`close_blocking` runs on the main thread after the trio loop has ended and finishes whatever
`aclose` did not. Both close calls are idempotent, and no `attach` succeeds after a close began.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import trio

from ivdfs.inventory.model import Ivd, Snapshot

# A filesystem spanning the whole disk (no partition table) is volume 0.
WHOLE_DISK = 0


# volumes/<name> + ERROR_SUFFIX holds the reason a volume is not mounted.
ERROR_SUFFIX = ".error"
# The name whose .error (volumes/.error) says why the disk shows no volume at all.
DISK_ERROR_NAME = ""
# Why some recognised things are not mounted at all.
NOT_MOUNTED = {
    "LVM2_member": "an LVM2 physical volume: its logical volumes are lv-<vg>-<lv>.raw and "
    "volumes/<vg>-<lv>",
    "swap": "swap space holds no files",
    # The host never assembles guest arrays or opens guest encryption: libguestfs's appliance
    # does both, with its own kernel (--volumes guestfs keeps its own words for these).
    "linux_raid_member": "an md RAID member: its array is assembled only by --volumes guestfs",
    "LDM_member": "a Windows dynamic disk (LDM) partition: its volumes are assembled only by "
    "--volumes guestfs",
    "crypto_LUKS": "an encrypted (LUKS) volume: only --volumes guestfs opens it "
    "(with --volume-key-file)",
    "BitLocker": "an encrypted (BitLocker) volume: only --volumes guestfs opens it "
    "(with --volume-key-file)",
}


@dataclass(frozen=True)
class Candidate:
    """A window that may hold a filesystem: partition `number` (0: whole disk) of the disk, or
    (with `path`) a whole file of our mount such as ``lv-<vg>-<lv>.raw``."""

    number: int
    start: int  # byte offset in `path` (default: the request's disk_path)
    length: int
    fs: str | None  # as formats.filesystems.detect_filesystem names it; None = not recognised
    name: str = ""  # volumes/<name>; "" means str(number)
    path: Path | None = None  # the file to attach, inside the ivdfs mount

    @property
    def volume_name(self) -> str:
        return self.name or str(self.number)


@dataclass(frozen=True)
class VolumeAnswer:
    """Every candidate of a request, either mounted (name -> absolute path of its mount) or
    refused (name -> one line saying why: no filesystem, no driver, what the mount said).

    `wake`, if set, is awaited before each use of a mounted path (every read of a
    ``volumes/<name>`` link): a backend that stops idle volumes starts them again there."""

    mounted: dict[str, str]
    refused: dict[str, str]
    wake: Callable[[], Awaitable[None]] | None = None


@dataclass(frozen=True)
class VolumeRequest:
    ivd: Ivd
    snapshot: Snapshot
    disk_path: Path  # disk.raw inside the ivdfs mount
    candidates: tuple[Candidate, ...]


class VolumeBackend(Protocol):
    async def attach(self, request: VolumeRequest) -> VolumeAnswer:
        """Mount what can be mounted and say why the rest is not; one failure is logged and
        leaves the others."""
        ...

    async def aclose(self) -> None: ...

    def close_blocking(self) -> None: ...


@runtime_checkable
class Background(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    def report(self) -> dict[str, Any]: ...
