"""Blocking wrappers around one VDDK connection and disk handle.

Concurrency: nothing here is thread-safe on its own, except the ReadAsync completion path.
`worker.py` calls `open`/`close` and the access functions on the single control thread, and the
reads (Read, ReadAsync, Wait, QueryAllocatedBlocks) of one `DiskHandle` on that handle's own I/O
thread, which is what VDDK's threading rules ask for. A ReadAsync completion callback runs on a
library thread, possibly before ReadAsync has returned: it touches only `_pending` (under its
lock) and the request it completes, and hands the result on through the request's `on_done`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ivdfs.config import Secret, ServerConfig
from ivdfs.inventory.model import DiskTarget as DiskTarget  # where VDDK's calls point
from ivdfs.units import SECTOR_SIZE
from ivdfs.vddk import _cdefs
from ivdfs.vddk.errors import VddkError
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
    nfc_host_port: int = 0  # ESXi's NFC port for NBD/NBDSSL; 0: VDDK's default (902)

    @classmethod
    def of(cls, server: ServerConfig, thumbprint: str, nfc_host_port: int) -> ServerTarget:
        """The server ivdfs logged in to, with the certificate it saw there."""
        s = server
        return cls(s.host, s.port, s.user, s.password, thumbprint, nfc_host_port)


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
            p.nfcHostPort = server.nfc_host_port
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

    def recover(self) -> None:
        """EndAccess with no Prepare in this process: undoes one that a crashed ivdfs left
        behind (`ivdfs end-access`). The identity must be the one the crashed process used."""
        self._attempted = True
        self.end()


@dataclass(eq=False)
class AsyncRead:
    """One ReadAsync in flight. `buf` and `cbuf` stay referenced (through the handle's pending
    table) until the library has called back, even when the waiting task gave up."""

    start_sector: int
    buf: bytearray
    on_done: Callable[[AsyncRead], None]
    cbuf: Any = None
    t0_ns: int = field(default_factory=time.perf_counter_ns)
    error: BaseException | None = None


# Sector sizes a guest can see; anything else (0 from a library that leaves it unset) means 512.
_LOGICAL_SECTOR_SIZES = frozenset({512, 1024, 2048, 4096})

# Network transports are the only ones where VDDK serves ReadAsync in the background.
ASYNC_TRANSPORTS = frozenset({"nbd", "nbdssl"})


class Connection:
    """One read-only ConnectEx/Disconnect of a snapshot: under every DiskHandle, and alone for
    libraries that open the disk themselves (VixMntapi_OpenDisks). Control thread only."""

    def __init__(
        self,
        lib: VddkLibrary,
        server: ServerTarget | None,
        target: DiskTarget,
        transport_modes: str | None = None,
    ) -> None:
        """`server` None: VDDK's local-file mode (Open then names a file)."""
        self._lib = lib
        self.target = target
        self._transport_modes = transport_modes
        self._params = ConnectParams(lib, server, target)
        self.conn: Any = None

    def open(self) -> None:
        conn = ffi.new("VixDiskLibConnection *")
        modes = self._transport_modes.encode() if self._transport_modes else ffi.NULL
        self._lib.call(
            "VixDiskLib_ConnectEx",
            self._params.ptr,
            b"\x01",
            ffi.NULL,
            modes,
            conn,
            context=self.target.describe(),
        )
        self.conn = conn[0]

    def close(self) -> None:
        try:
            if self.conn is not None:
                c, self.conn = self.conn, None
                self._lib.call("VixDiskLib_Disconnect", c, context=self.target.describe())
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
        self._connection = Connection(lib, server, target, transport_modes)
        self._handle: Any = None
        self.capacity_sectors = 0
        # The disk's logical sector size as the guest sees it (4096: a 4Kn disk). VDDK's own
        # unit stays VIXDISKLIB_SECTOR_SIZE (512) for capacity and every read whatever this is.
        self.sector_size = SECTOR_SIZE
        self.transport = ""
        # ReadAsync bookkeeping: cbData is a small integer naming the request, so no Python
        # object has to be kept alive through a void pointer.
        self._pending: dict[int, AsyncRead] = {}
        self._pending_lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._callback: Any = None
        self.async_used = False

    def open(self) -> None:
        lib, ctx = self._lib, self.target.describe()
        self._connection.open()
        handle = ffi.new("VixDiskLibHandle *")
        # For an IVD the path may be NULL or the IVD id; naming the id reads better in VDDK's logs.
        path = (self._path or self.target.ivd_id).encode()
        lib.call(
            "VixDiskLib_Open",
            self._connection.conn,
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
            # logicalSectorSize exists from VDDK 7 on; reading it from 6.x reads past the struct.
            if lib.soversion >= 7 and int(info[0].logicalSectorSize) in _LOGICAL_SECTOR_SIZES:
                self.sector_size = int(info[0].logicalSectorSize)
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
        return self.capacity_sectors * SECTOR_SIZE

    def read_into(self, start_sector: int, buf: bytearray | memoryview) -> None:
        """Fill `buf` (a whole number of sectors, at most 2 MiB) from `start_sector`."""
        n = len(buf) // SECTOR_SIZE
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

    @property
    def can_query_allocated(self) -> bool:
        return self._lib.has_query_allocated

    @property
    def truly_async(self) -> bool:
        """Whether ReadAsync overlaps requests on this handle (VDDK does so only over NBD)."""
        return self._lib.has_async and self.transport in ASYNC_TRANSPORTS

    def read_async(self, req: AsyncRead) -> None:
        """Start `req`; `req.on_done(req)` runs exactly once, on the library's thread or this
        one, with `req.error` set on failure. Never raises."""
        if self._callback is None:
            self._callback = ffi.callback("void(void *, VixError)", self._on_complete)
        token = next(self._tokens)
        try:
            req.cbuf = ffi.from_buffer("uint8_t[]", req.buf, require_writable=True)
            with self._pending_lock:
                self._pending[token] = req
            self.async_used = True
            err = self._lib.lib.VixDiskLib_ReadAsync(
                self._handle,
                req.start_sector,
                len(req.buf) // SECTOR_SIZE,
                req.cbuf,
                self._callback,
                ffi.cast("void *", token),
            )
        except BaseException as e:  # handed to the waiter, never lost
            err, req.error = _cdefs.VIX_E_FAIL, e
        if err == _cdefs.VIX_ASYNC:
            return  # the callback completes it (it may already have)
        # Anything else: VDDK will not call back, so this thread completes the request.
        with self._pending_lock:
            mine = self._pending.pop(token, None) is not None
        if mine:
            self._finish(req, err)

    def _on_complete(self, data: Any, err: int) -> None:
        # A library thread: no exception may escape into C, and nothing here may block.
        try:
            token = int(ffi.cast("uintptr_t", data))
            with self._pending_lock:
                req = self._pending.pop(token, None)
            if req is not None:
                self._finish(req, int(err))
        except BaseException:
            log.exception("ReadAsync completion")

    def _finish(self, req: AsyncRead, err: int) -> None:
        micros = (time.perf_counter_ns() - req.t0_ns) // 1000
        self._lib.stats.add("VixDiskLib_ReadAsync", micros, len(req.buf), err != _cdefs.VIX_OK)
        if err != _cdefs.VIX_OK and req.error is None:
            req.error = VddkError(
                err, "VixDiskLib_ReadAsync", self._lib.error_text(err), self.target.describe()
            )
        req.cbuf = None
        req.on_done(req)

    def wait(self) -> None:
        """Block until every ReadAsync of this handle has called back."""
        if self._handle is not None and self.async_used:
            self._lib.call("VixDiskLib_Wait", self._handle, context=self.target.describe())

    def query_allocated(
        self, start_sector: int, num_sectors: int, chunk_sectors: int
    ) -> list[tuple[int, int]]:
        """Allocated (start, length) runs in sectors, chunk-aligned, within the range."""
        out = ffi.new("VixDiskLibBlockList **")
        self._lib.call(
            "VixDiskLib_QueryAllocatedBlocks",
            self._handle,
            start_sector,
            num_sectors,
            chunk_sectors,
            out,
            context=self.target.describe(),
        )
        try:
            bl = out[0]
            # `blocks[1]` is a C flexible array: index it through a plain pointer, as cffi
            # bounds-checks fixed-size arrays.
            blocks = ffi.cast("VixDiskLibBlock *", bl.blocks)
            return [(int(blocks[i].offset), int(blocks[i].length)) for i in range(bl.numBlocks)]
        finally:
            self._lib.lib.VixDiskLib_FreeBlockList(out[0])

    def close(self) -> None:
        try:
            if self._handle is not None:
                h, self._handle = self._handle, None
                self._lib.call("VixDiskLib_Close", h, context=self.target.describe())
        finally:
            self._connection.close()
