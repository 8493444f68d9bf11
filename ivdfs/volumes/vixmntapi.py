"""--volumes vixmntapi: VMware's VixMntapi mounts each snapshot's volumes.

Role: per snapshot, a read-only ConnectEx of its own, OpenDisks(IVD id), every volume mounted
read-only; ``volumes/<n>`` links to the path VixMntapi reports (n = 1, 2, ... in the order the
library lists the volumes). Teardown per snapshot: Dismount, FreeVolumeHandles, CloseDiskSet,
Disconnect; VixMntapi_Exit once at the very end. The volumes do not read through our FUSE
mount, so `fusermount3 -u` works and teardown may run after the FUSE loop has ended.

Concurrency contract: `attach`/`aclose` run on the trio thread and hand every library call to
the VDDK control thread (VDDK's threading rule, and the connection lives there); the per-mount
list of open disk sets is only touched on that thread. `close_blocking` runs on the main thread
after trio, before `DiskService.close_all` stops the control thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ivdfs.errors import BackendError
from ivdfs.vddk.connection import Connection, DiskTarget
from ivdfs.vddk.mntapi import DiskSet, Mntapi
from ivdfs.vddk.service import DiskService
from ivdfs.volumes.base import VolumeAnswer, VolumeRequest

log = logging.getLogger(__name__)


@dataclass
class _Open:
    connection: Connection
    target: DiskTarget
    disk_set: DiskSet | None = None


class MntapiVolumes:
    def __init__(self, mntapi: Mntapi, service: DiskService) -> None:
        self.mntapi = mntapi
        self.service = service
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
        target = DiskTarget(ivd.id, ivd.datastore.moref, snap.id)
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
        ds.open()
        mounted = ds.mount_all()
        for v in mounted:
            log.info("%s: volume %d (%s) mounted read-only at %s", ctx, v.index + 1, v.type, v.path)
        # VixMntapi lists the volumes it mounted; what it could not is only in its log.
        return VolumeAnswer({str(v.index + 1): v.path for v in mounted}, {})

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
