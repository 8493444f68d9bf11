"""--volumes vixmntapi: VMware's VixMntapi mounts each snapshot's volumes.

Role: per snapshot, a read-only ConnectEx of its own, OpenDisks(IVD id), every volume mounted
read-only; ``volumes/<n>`` links to the path VixMntapi reports (n = 1, 2, ... in the order the
library lists the volumes). Teardown per snapshot: Dismount, FreeVolumeHandles, CloseDiskSet,
Disconnect; VixMntapi_Exit once at the very end. The volumes do not read through our FUSE
mount, so `fusermount3 -u` works and teardown may run after the FUSE loop has ended.

Concurrency contract: `attach`/`aclose` run on the trio thread and hand every library call to
the VDDK control thread (VDDK's threading rule, and the connection lives there); the per-mount
list of open disk sets is only touched on that thread. `close_blocking` runs on the main thread
after trio, before `VddkService.close_all` stops the control thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ivdfs.errors import BackendError
from ivdfs.vddk.connection import Connection, DiskTarget
from ivdfs.vddk.mntapi import DiskSet, Mntapi
from ivdfs.vddk.worker import VddkService
from ivdfs.volumes.base import VolumeRequest

log = logging.getLogger(__name__)


@dataclass
class _Open:
    connection: Connection
    disk_set: DiskSet


class MntapiVolumes:
    def __init__(self, mntapi: Mntapi, service: VddkService) -> None:
        self.mntapi = mntapi
        self.service = service
        self._open: list[_Open] = []  # control thread only
        self._closed = False

    async def attach(self, request: VolumeRequest) -> dict[int, str]:
        if self._closed:
            raise BackendError("shutting down")
        return await self.service.run_on_control(lambda: self._attach_blocking(request))

    def _attach_blocking(self, request: VolumeRequest) -> dict[int, str]:
        if self._closed:
            raise BackendError("shutting down")
        ivd, snap = request.ivd, request.snapshot
        target = DiskTarget(ivd.id, ivd.datastore.moref, snap.id)
        ctx = target.describe()
        self.mntapi.init()
        conn = Connection(self.mntapi.disklib, self.service.server, target,
                          self.service.transport_modes)  # fmt: skip
        try:
            conn.open()
        except BaseException:
            conn.close()
            raise
        ds = DiskSet(self.mntapi, conn.conn, ivd.id, ctx)
        # Registered before OpenDisks so that teardown undoes whatever part succeeded.
        self._open.append(_Open(conn, ds))
        ds.open()
        mounted = ds.mount_all()
        for v in mounted:
            log.info("%s: volume %d (%s) mounted read-only at %s", ctx, v.index + 1, v.type, v.path)
        return {v.index + 1: v.path for v in mounted}

    def _close_on_control(self) -> None:
        self._closed = True
        opened, self._open = self._open, []
        for o in reversed(opened):
            try:
                o.disk_set.close()
            finally:
                try:
                    o.connection.close()
                except BackendError as e:
                    log.warning("%s: %s", o.connection.target.describe(), e)
        # After every disk set is closed, before VixDiskLib_Exit (mount.py's teardown order).
        self.mntapi.exit()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.service.run_on_control(self._close_on_control)

    def close_blocking(self) -> None:
        if self._open or self.mntapi.initialised:
            self.service.run_on_control_blocking(self._close_on_control)
        self._closed = True
