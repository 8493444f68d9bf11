"""What the tree asks of a volume backend, and what a backend promises.

Role: the seam between `tree` (which knows the snapshot, its ``disk.raw`` path inside our mount
and its partitions) and the backends that attach volumes (`kernel`, `vixmntapi`). Pure types.

Concurrency contract for backends: `attach` and `aclose` run on the trio thread and must never
block it (loop devices read through our own FUSE mount: a blocking call there deadlocks);
`close_blocking` runs on the main thread after the trio loop has ended and finishes whatever
`aclose` did not. Both close calls are idempotent, and no `attach` succeeds after a close began.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ivdfs.inventory.model import Ivd, Snapshot

# A filesystem spanning the whole disk (no partition table) is volume 0.
WHOLE_DISK = 0


@dataclass(frozen=True)
class Candidate:
    """A window of the disk that may hold a filesystem: partition `number` (0: whole disk)."""

    number: int
    start: int
    length: int
    fs: str | None  # as io.partitions.detect_filesystem names it; None = not recognised


@dataclass(frozen=True)
class VolumeRequest:
    ivd: Ivd
    snapshot: Snapshot
    disk_path: Path  # disk.raw inside the ivdfs mount
    candidates: tuple[Candidate, ...]


class VolumeBackend(Protocol):
    async def attach(self, request: VolumeRequest) -> dict[int, str]:
        """Mount what can be mounted; volume number -> absolute path. One failure is logged and
        leaves the others."""
        ...

    async def aclose(self) -> None: ...

    def close_blocking(self) -> None: ...
