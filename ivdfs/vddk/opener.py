"""How the disk service opens a snapshot's disk: one way per kind of access to the bytes.

Role: an `Opener` says, for a snapshot, how many VDDK connections its disk counts against the
cap (NFC sessions on an ESXi host), whether its IVD needs PrepareForAccess while it is open,
and opens it (`OpenDisk`). `NetworkOpener` is the way every disk opens today: ConnectEx to the
vCenter/ESXi ivdfs logged in to and Open of the IVD snapshot, one connection per handle, with
the IVD prepared. A second way (VDDK's local-file mode for a snapshot whose VMDK chain lies on
a datastore mounted here: Open of a path, no server, no NFC session, no PrepareForAccess) is
another Opener, and the service needs nothing else to serve it.

Concurrency: `open` runs on the VDDK control thread (VDDK wants a handle opened and closed on
one thread); the rest is pure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from ivdfs.config import Limits
from ivdfs.datastore.access import DirectFile
from ivdfs.datastore.reads import DirectReads
from ivdfs.errors import BackendError
from ivdfs.inventory.model import DiskTarget
from ivdfs.vddk._cdefs import VIXDISKLIB_MIN_CHUNK_SIZE
from ivdfs.vddk.allocation import MAX_CHUNKS_PER_QUERY
from ivdfs.vddk.connection import DiskHandle, ServerTarget
from ivdfs.vddk.disk import OpenDisk
from ivdfs.vddk.library import VddkLibrary

log = logging.getLogger(__name__)


class Opener(Protocol):
    async def choose(self, target: DiskTarget) -> None:
        """Decide how the disk opens, before `connections`, `needs_access` and `open` are
        asked (trio thread; may ask vCenter); BackendError fails the open."""
        ...

    def origin(self, target: DiskTarget) -> tuple[str, str | None] | None:
        """How its bytes are read, once decided: ("network", None) or ("direct", file)."""
        ...

    def connections(self, target: DiskTarget) -> int:
        """VDDK connections the disk holds against --max-connections while open."""
        ...

    def needs_access(self, target: DiskTarget) -> bool:
        """Whether the IVD must be prepared (PrepareForAccess) while its disk is open."""
        ...

    def open(self, target: DiskTarget) -> OpenDisk:
        """Open the disk, read-only (control thread); BackendError when it cannot."""
        ...


def open_handles(make: Callable[[], DiskHandle], n: int, limits: Limits) -> OpenDisk:
    """`n` handles of one snapshot, each made and opened, as one disk; whatever opened is
    closed again when one fails."""
    handles: list[DiskHandle] = []
    try:
        for _ in range(n):
            handle = make()
            handles.append(handle)
            handle.open()
    except BaseException:
        for h in handles:
            try:
                h.close()
            except BackendError as e:
                log.debug("closing after a failed open: %s", e)
        raise
    return OpenDisk(handles, limits.use_async, limits.in_flight_bytes, limits.block_size)


class NetworkOpener:
    """ConnectEx to the server ivdfs logged in to, Open of the IVD snapshot: a connection (an
    NFC session) per handle, the IVD prepared while its disk is open."""

    def __init__(
        self,
        lib: VddkLibrary,
        server: ServerTarget,
        transport_modes: str | None,
        limits: Limits,
    ) -> None:
        self.lib = lib
        self.server = server
        self.transport_modes = transport_modes
        self.limits = limits

    async def choose(self, target: DiskTarget) -> None:
        pass

    def origin(self, target: DiskTarget) -> tuple[str, str | None] | None:
        return ("network", None)

    def connections(self, target: DiskTarget) -> int:
        return self.limits.handles_per_disk

    def needs_access(self, target: DiskTarget) -> bool:
        return True

    def open(self, target: DiskTarget) -> OpenDisk:
        def make() -> DiskHandle:
            return DiskHandle(self.lib, self.server, target, self.transport_modes)

        disk = open_handles(make, self.limits.handles_per_disk, self.limits)
        if self.limits.use_async and self.lib.has_async and not disk.use_async:
            log.debug(
                "transport %s serves ReadAsync inline; --vddk-handles gives parallel reads",
                disk.handle.transport or "?",
            )
        return disk


# Handles of a disk read directly (at least; --vddk-handles may ask more). In local-file mode
# VDDK serves each request inline on the calling thread, so one handle reads one block at a
# time; several let a reader's read-ahead overlap (1.5x on the bench's 1 GiB chain). They cost
# no NFC session: each is an open of the chain's files (and an I/O thread).
DIRECT_HANDLES = 4


class DirectOpener:
    """Snapshots whose VMDK chain lies under a --datastore-path: VDDK's local-file mode
    (ConnectEx with no server, Open of the snapshot's file, read-only), no NFC session, no
    PrepareForAccess, each read confirmed against the chain's recorded identity
    (`ivdfs.datastore.reads`); every other snapshot through `network`."""

    def __init__(
        self, lib: VddkLibrary, network: Opener, reads: DirectReads, limits: Limits
    ) -> None:
        self.lib = lib
        self.network = network
        self.reads = reads
        self.limits = limits

    def _direct(self, target: DiskTarget) -> DirectFile | None:
        mode = self.reads.mode(target)
        return mode if isinstance(mode, DirectFile) else None

    async def choose(self, target: DiskTarget) -> None:
        if await self.reads.plan(target) is None:
            await self.network.choose(target)

    def origin(self, target: DiskTarget) -> tuple[str, str | None] | None:
        mode = self.reads.mode(target)
        if isinstance(mode, DirectFile):
            return ("direct", str(mode.file))
        return ("network", None) if mode == "network" else None

    def connections(self, target: DiskTarget) -> int:
        return 0 if self._direct(target) else self.network.connections(target)

    def needs_access(self, target: DiskTarget) -> bool:
        return self._direct(target) is None and self.network.needs_access(target)

    def open(self, target: DiskTarget) -> OpenDisk:
        plan = self._direct(target)
        if plan is None:
            return self.network.open(target)

        def make() -> DiskHandle:
            return DiskHandle(self.lib, None, target, path=str(plan.file))

        disk = open_handles(make, max(self.limits.handles_per_disk, DIRECT_HANDLES), self.limits)
        disk.after_read = self.reads.confirmer(target, plan)
        self.reads.opened()
        log.debug("%s: opened %s in VDDK's local-file mode", target.describe(), plan.file)
        return disk

    def link_grains(self, target: DiskTarget, file: str) -> list[tuple[int, int]]:
        """The runs of sectors written in the link `file` itself, not its parents (control
        thread): QueryAllocatedBlocks of a single-link open, at the smallest chunk VDDK allows
        (64 KiB, the default grain), over the link's whole capacity."""
        handle = DiskHandle(self.lib, None, target, path=file, single_link=True)
        try:
            handle.open()
            total = handle.capacity_sectors
            chunk = VIXDISKLIB_MIN_CHUNK_SIZE
            step = MAX_CHUNKS_PER_QUERY * chunk
            runs: list[tuple[int, int]] = []
            whole = total // chunk * chunk  # VDDK refuses a range that is not whole chunks
            for start in range(0, whole, step):
                runs += handle.query_allocated(start, min(step, whole - start), chunk)
            if whole < total:
                runs.append((whole, total - whole))  # the tail: counted as changed
            return runs
        finally:
            handle.close()
