"""Blocking wrappers around one VDDK connection and disk handle.

Concurrency: nothing here is thread-safe on its own. `worker.py` calls `open`/`close` and the
access functions on the single control thread, and the reads of one `DiskHandle` on that handle's
own I/O thread, which is what VDDK's threading rules ask for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ivdfs.config import Secret
from ivdfs.vddk import _cdefs
from ivdfs.vddk.library import VddkLibrary, ffi

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerTarget:
    """Where VDDK connects: the vCenter/ESXi that ivdfs logged in to."""

    host: str
    port: int
    user: str
    password: Secret
    thumbprint: str  # SHA-1 of the certificate ivdfs saw, 'AA:BB:...'


@dataclass(frozen=True)
class DiskTarget:
    ivd_id: str
    datastore_moref: str
    snapshot_id: str | None = None

    def describe(self) -> str:
        snap = f" snapshot {self.snapshot_id}" if self.snapshot_id else ""
        return f"IVD {self.ivd_id}{snap} on {self.datastore_moref}"


class ConnectParams:
    """A VixDiskLibConnectParams from AllocateConnectParams, filled for one IVD.

    The strings belong to us; they are cleared before FreeConnectParams so the library never
    frees memory it did not allocate.
    """

    def __init__(self, lib: VddkLibrary, server: ServerTarget | None, target: DiskTarget) -> None:
        self._lib = lib
        self._keep: list[Any] = []
        p = lib.lib.VixDiskLib_AllocateConnectParams()
        if p == ffi.NULL:
            raise MemoryError("VixDiskLib_AllocateConnectParams returned NULL")
        self.ptr: Any = p
        if server is not None:
            p.serverName = self._str(server.host)
            p.thumbPrint = self._str(server.thumbprint)
            p.port = server.port
            p.credType = _cdefs.VIXDISKLIB_CRED_UID
            p.creds.uid.userName = self._str(server.user)
            p.creds.uid.password = self._str(server.password.reveal())
        p.specType = _cdefs.VIXDISKLIB_SPEC_VSTORAGE_OBJECT
        spec = p.spec.vStorageObjSpec
        spec.id = self._str(target.ivd_id)
        spec.datastoreMoRef = self._str(target.datastore_moref)
        spec.ssId = self._str(target.snapshot_id) if target.snapshot_id else ffi.NULL

    def _str(self, s: str) -> Any:
        c = ffi.new("char[]", s.encode())
        self._keep.append(c)
        return c

    def free(self) -> None:
        if self.ptr is None:
            return
        p = self.ptr
        p.serverName = p.thumbPrint = p.vmxSpec = ffi.NULL
        p.creds.uid.userName = p.creds.uid.password = ffi.NULL
        spec = p.spec.vStorageObjSpec
        spec.id = spec.datastoreMoRef = spec.ssId = ffi.NULL
        self._lib.lib.VixDiskLib_FreeConnectParams(p)
        self.ptr = None
        # Overwrite our copy of the password before letting go of it.
        for c in self._keep:
            ffi.memmove(c, b"\0" * len(c), len(c))
        self._keep.clear()


class Access:
    """PrepareForAccess/EndAccess for one IVD: EndAccess always follows a Prepare attempt."""

    def __init__(
        self, lib: VddkLibrary, server: ServerTarget, target: DiskTarget, identity: str
    ) -> None:
        self._lib = lib
        self._identity = identity.encode()
        self._params = ConnectParams(lib, server, DiskTarget(target.ivd_id, target.datastore_moref))
        self.target = target
        self._attempted = False

    def prepare(self) -> None:
        self._attempted = True
        self._lib.call(
            "VixDiskLib_PrepareForAccess",
            self._params.ptr,
            self._identity,
            context=self.target.describe(),
        )

    def end(self) -> None:
        try:
            if self._attempted:
                self._attempted = False
                self._lib.call(
                    "VixDiskLib_EndAccess",
                    self._params.ptr,
                    self._identity,
                    context=self.target.describe(),
                )
        finally:
            self._params.free()


class DiskHandle:
    """One ConnectEx + Open of a snapshot, read-only."""

    def __init__(
        self,
        lib: VddkLibrary,
        server: ServerTarget | None,
        target: DiskTarget,
        transport_modes: str | None = None,
        path: str | None = None,
    ) -> None:
        self._lib = lib
        self.target = target
        self._path = path
        self._transport_modes = transport_modes
        self._conn: Any = None
        self._handle: Any = None
        self._params = ConnectParams(lib, server, target)
        self.capacity_sectors = 0
        self.transport = ""

    def open(self) -> None:
        lib, ctx = self._lib, self.target.describe()
        conn = ffi.new("VixDiskLibConnection *")
        modes = self._transport_modes.encode() if self._transport_modes else ffi.NULL
        lib.call(
            "VixDiskLib_ConnectEx", self._params.ptr, b"\x01", ffi.NULL, modes, conn, context=ctx
        )
        self._conn = conn[0]
        handle = ffi.new("VixDiskLibHandle *")
        # For an IVD the path may be NULL or the IVD id; naming the id reads better in VDDK's logs.
        path = (self._path or self.target.ivd_id).encode()
        lib.call(
            "VixDiskLib_Open",
            self._conn,
            path,
            _cdefs.VIXDISKLIB_FLAG_OPEN_READ_ONLY,
            handle,
            context=ctx,
        )
        self._handle = handle[0]
        info = ffi.new("VixDiskLibInfo **")
        lib.call("VixDiskLib_GetInfo", self._handle, info, context=ctx)
        try:
            self.capacity_sectors = int(info[0].capacity)
        finally:
            lib.lib.VixDiskLib_FreeInfo(info[0])
        if "VixDiskLib_GetTransportMode" in lib.optional:
            mode = lib.lib.VixDiskLib_GetTransportMode(self._handle)
            self.transport = ffi.string(mode).decode() if mode != ffi.NULL else ""
        log.debug(
            "opened %s: %d sectors, transport %s", ctx, self.capacity_sectors, self.transport or "?"
        )

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_sectors * _cdefs.SECTOR_SIZE

    def read_into(self, start_sector: int, buf: bytearray | memoryview) -> None:
        """Fill `buf` (a whole number of sectors, at most 2 MiB) from `start_sector`."""
        n = len(buf) // _cdefs.SECTOR_SIZE
        cbuf = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        self._lib.call(
            "VixDiskLib_Read",
            self._handle,
            start_sector,
            n,
            cbuf,
            context=self.target.describe(),
            nbytes=len(buf),
        )

    def close(self) -> None:
        lib = self._lib
        try:
            if self._handle is not None:
                h, self._handle = self._handle, None
                lib.call("VixDiskLib_Close", h, context=self.target.describe())
        finally:
            try:
                if self._conn is not None:
                    c, self._conn = self._conn, None
                    lib.call("VixDiskLib_Disconnect", c, context=self.target.describe())
            finally:
                self._params.free()
