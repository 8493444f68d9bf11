"""--volumes vixmntapi: VMware's VixMntapi mounts each snapshot's volumes.

Role: per snapshot, a read-only ConnectEx of its own, OpenDisks(IVD id), every volume mounted
read-only; ``volumes/<n>`` links to the path VixMntapi reports (n = 1, 2, ... in the order the
library lists the volumes), and every volume it lists but cannot mount is ``volumes/<n>.error``
with VixMntapi's code and text; a disk on which it lists none says so in ``volumes/.error``.
Teardown per snapshot: Dismount, FreeVolumeHandles, CloseDiskSet, Disconnect; VixMntapi_Exit
once at the very end; then whatever FUSE mount VixMntapi made for a disk and left behind (the
real library's CloseDiskSet fails to unmount it on some hosts) is unmounted here. Each of those
mounts is journaled (before OpenDisks as an intent, after it with the paths) so that the
recovery of a killed mount finds them; one that cannot be unmounted stays in the journal, and
the mount exits non-zero naming it. The volumes do not read through our FUSE mount, so
`fusermount3 -u` works and teardown may run after the FUSE loop has ended.

Concurrency contract: `attach`/`aclose` run on the trio thread and hand every library call to
the VDDK control thread (VDDK's threading rule, and the connection lives there); the per-mount
list of open disk sets is only touched on that thread. `close_blocking` runs on the main thread
after trio, before `DiskService.close_all` stops the control thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from ivdfs.errors import BackendError
from ivdfs.inventory.model import DiskTarget
from ivdfs.vddk import mntapi as mntapi_mod
from ivdfs.vddk.connection import Connection
from ivdfs.vddk.mntapi import DiskSet, Mntapi
from ivdfs.vddk.service import DiskService
from ivdfs.volumes.base import DISK_ERROR_NAME, VolumeAnswer, VolumeRequest

log = logging.getLogger(__name__)

# The journal's kind for VixMntapi's disk mounts.
JOURNAL_KIND = "vixmntapi"


class MountJournal(Protocol):
    """Where the mount records what it holds (`ivdfs.journal.Journal`)."""

    def add(self, kind: str, entry: dict[str, Any]) -> None: ...

    def update(self, kind: str, match: dict[str, Any], **fields: Any) -> None: ...

    def drop(self, kind: str, match: dict[str, Any]) -> None: ...


@dataclass
class _Open:
    connection: Connection
    target: DiskTarget
    disk_set: DiskSet | None = None
    fuse: list[str] = field(default_factory=list)

    @property
    def key(self) -> dict[str, Any]:
        return {"ivd": self.target.ivd_id, "snapshot": self.target.snapshot_id}


class MntapiVolumes:
    def __init__(
        self, mntapi: Mntapi, service: DiskService, journal: MountJournal | None = None
    ) -> None:
        self.mntapi = mntapi
        self.service = service
        self.journal = journal
        self._open: list[_Open] = []  # control thread only
        self._connections = 0  # counted against --max-connections (trio thread)
        self._closed = False

    async def attach(self, request: VolumeRequest) -> VolumeAnswer:
        if self._closed:
            raise BackendError("shutting down")
        # A mounted volume holds its connection for as long as it is mounted: it counts
        # against the mount's cap like an open disk that never idles out.
        await self.service.pin_connection()
        self._connections += 1
        return await self.service.run_on_control(lambda: self._attach_blocking(request))

    def _attach_blocking(self, request: VolumeRequest) -> VolumeAnswer:
        if self._closed:
            raise BackendError("shutting down")
        ivd, snap = request.ivd, request.snapshot
        target = DiskTarget.of(ivd, snap)
        ctx = target.describe()
        self.mntapi.init()
        # PrepareForAccess for the IVD while its volumes are mounted (EndAccess at close).
        self.service.pin_access_on_control(target)
        conn = Connection(self.mntapi.disklib, self.service.server, target,
                          self.service.transport_modes)  # fmt: skip
        # Registered before ConnectEx so that teardown undoes whatever part succeeded.
        record = _Open(conn, target)
        self._open.append(record)
        conn.open()
        ds = record.disk_set = DiskSet(self.mntapi, conn.conn, ivd.id, ctx)
        # Journaled before OpenDisks: a kill during the call leaves an entry whose mounts
        # recovery finds by the disk name in VixMntapi's .info files.
        if self.journal is not None:
            self.journal.add(JOURNAL_KIND, {**record.key, "name": ivd.id, "fuse": []})
        try:
            ds.open()
        finally:
            record.fuse = list(ds.fuse)
            if self.journal is not None and record.fuse:
                self.journal.update(JOURNAL_KIND, record.key, fuse=record.fuse)
        mounted, refused = ds.mount_all()
        for v in mounted:
            log.info("%s: volume %d (%s) mounted read-only at %s", ctx, v.index + 1, v.type, v.path)
        for i, why in sorted(refused.items()):
            log.info("%s: volume %d not mounted: %s", ctx, i + 1, why)
        reasons = {str(i + 1): why for i, why in refused.items()}
        if ds.count == 0:
            reasons[DISK_ERROR_NAME] = (
                "VixMntapi lists no volume on this disk (it finds no partition table it knows)"
            )
        return VolumeAnswer({str(v.index + 1): v.path for v in mounted}, reasons)

    def _close_on_control(self) -> None:
        self._closed = True
        opened, self._open = self._open, []
        for o in reversed(opened):
            try:
                if o.disk_set is not None:
                    o.disk_set.close()
            finally:
                try:
                    o.connection.close()
                except BackendError as e:
                    log.warning("%s: %s", o.connection.target.describe(), e)
                finally:
                    self.service.unpin_access_on_control(o.target)
        # After every disk set is closed, before VixDiskLib_Exit (mount.py's teardown order).
        self.mntapi.exit()
        for o in opened:
            self._unmount_leftovers(o)

    def _unmount_leftovers(self, o: _Open) -> None:
        """Unmount the FUSE mounts VixMntapi made for this disk and left behind (its
        CloseDiskSet fails with 24009 on some hosts and Exit leaves them too)."""
        ctx = o.target.describe()
        left = []
        for path in o.fuse:
            if path not in mntapi_mod.fuse_mounts():
                continue
            why = mntapi_mod.unmount_fuse(path)
            if why is None:
                log.info("%s: unmounted %s, which VixMntapi left mounted", ctx, path)
            else:
                log.error("%s: VixMntapi left %s mounted and it cannot be unmounted: %s; "
                          "`umount %s` undoes it", ctx, path, why, path)  # fmt: skip
                left.append(path)
        if self.journal is None:
            return
        if left:
            self.journal.update(JOURNAL_KIND, o.key, fuse=left)
        else:
            self.journal.drop(JOURNAL_KIND, o.key)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.service.run_on_control(self._close_on_control)
            for _ in range(self._connections):
                self.service.unpin_connection()
            self._connections = 0

    def close_blocking(self) -> None:
        if self._open or self.mntapi.initialised:
            self.service.run_on_control_blocking(self._close_on_control)
        self._closed = True
