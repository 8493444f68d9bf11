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
from ivdfs.errors import BackendError
from ivdfs.inventory.model import DiskTarget
from ivdfs.vddk.connection import DiskHandle, ServerTarget
from ivdfs.vddk.disk import OpenDisk
from ivdfs.vddk.library import VddkLibrary

log = logging.getLogger(__name__)


class Opener(Protocol):
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
