"""VixMntapi: VMware's library that mounts the guest volumes of a disk on this machine.

Role: find ``libvixMntapi.so.1`` (VMware's name in every VDDK release, whatever the disk
library's version) beside libvixDiskLib in ``<libdir>/lib64``, Init it once, and
for one snapshot run OpenDisks -> GetVolumeHandles -> MountVolume(read-only) -> GetVolumeInfo,
undoing it with DismountVolume -> FreeVolumeHandles -> CloseDiskSet (then Exit once) on every
path. OpenDisks always gets the IVD id as its one disk name: a NULL name array crashes real VDDK.
The library needs libfuse2 (``libfuse.so.2``) on the host: without it, it does not load.

Concurrency contract: nothing here is thread-safe. Every call after `__init__` (Init included)
runs on the VDDK control thread (`DiskService.run_on_control`), which also owns the connection
that OpenDisks uses. Errors become `VddkError` through the disk library's error text.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi

from ivdfs.vddk import _cdefs, _mntapi_cdefs
from ivdfs.vddk.errors import VddkLoadError
from ivdfs.vddk.library import VddkLibrary, has_symbol, log_callbacks
from ivdfs.vddk.library import ffi as disklib_ffi

log = logging.getLogger(__name__)
mntapi_log = logging.getLogger("ivdfs.vddk.mntapi_messages")

_SONAME_RE = re.compile(r"^libvixMntapi\.so\.(\d+)$")
SONAME = "libvixMntapi.so.1"

ffi = cffi.FFI()
ffi.include(disklib_ffi)
ffi.cdef(_mntapi_cdefs.CDEFS)


def find_mntapi(libdir: Path) -> Path:
    """``libvixMntapi.so.1`` in ``libdir/lib64``; failing that, the newest ``.so.N``."""
    lib64 = libdir / "lib64"
    found: dict[int, Path] = {}
    if lib64.is_dir():
        for p in lib64.iterdir():
            m = _SONAME_RE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    if not found:
        raise VddkLoadError(
            f"--volumes vixmntapi needs {SONAME} in {lib64} (it ships with VDDK); "
            "use --volumes kernel without it"
        )
    return found.get(1) or found[max(found)]


@dataclass(frozen=True)
class MountedVolume:
    index: int  # position in GetVolumeHandles' array
    type: str
    path: str  # symbolicLink: where the library mounted it


class Mntapi:
    """A loaded libvixMntapi; `init` once, `exit` once, both on the control thread."""

    def __init__(self, disklib: VddkLibrary) -> None:
        self.disklib = disklib
        self.path = find_mntapi(disklib.libdir)
        try:
            self.lib: Any = ffi.dlopen(str(self.path))
        except OSError as e:
            if "libfuse.so.2" in str(e):
                raise VddkLoadError(
                    f"cannot load {self.path}: VixMntapi needs libfuse2 (FUSE 2's library, "
                    f"libfuse.so.2) on this machine; install it (Debian/Ubuntu: apt-get install "
                    f"libfuse2, RHEL: dnf install fuse-libs) or use --volumes kernel ({e})"
                ) from None
            raise VddkLoadError(f"cannot load {self.path}: {e}") from None
        missing = [n for n in _mntapi_cdefs.REQUIRED if not has_symbol(self.lib, n)]
        if missing:
            raise VddkLoadError(f"{self.path} is not VixMntapi: it lacks {', '.join(missing)}")
        self._callbacks: list[Any] = []
        self.initialised = False

    def call(self, function: str, *args: Any, context: str = "") -> None:
        self.disklib.call(function, *args, context=context, lib=self.lib)

    def init(self) -> None:
        if self.initialised:
            return

        # The library may call these until Exit: keep them alive.
        self._callbacks = log_callbacks(mntapi_log)
        self.call(
            "VixMntapi_Init",
            _mntapi_cdefs.VIXMNTAPI_MAJOR_VERSION,
            _mntapi_cdefs.VIXMNTAPI_MINOR_VERSION,
            *self._callbacks,
            str(self.disklib.libdir).encode(),
            ffi.NULL,
        )
        self.initialised = True

    def exit(self) -> None:
        if self.initialised:
            self.initialised = False
            self.lib.VixMntapi_Exit()


class DiskSet:
    """One snapshot opened through VixMntapi, its volumes mounted read-only.

    `close` undoes exactly what succeeded, in VMware's order, and is safe to call after any
    partial `open`/`mount_all`.
    """

    def __init__(self, mnt: Mntapi, connection: Any, ivd_id: str, context: str) -> None:
        self._mnt = mnt
        self._conn = connection
        self._ivd_id = ivd_id
        self._ctx = context
        self._set: Any = None
        self._handles: Any = None  # VixVolumeHandle * from GetVolumeHandles
        self._count = 0
        self._mounted: list[int] = []

    def open(self) -> None:
        name = ffi.new("char[]", self._ivd_id.encode())
        names = ffi.new("const char *[1]", [name])  # never NULL: real VDDK would crash
        out = ffi.new("VixDiskSetHandle *")
        conn = ffi.cast("VixDiskLibConnection", self._conn)
        self._mnt.call(
            "VixMntapi_OpenDisks",
            conn,
            names,
            1,
            _cdefs.VIXDISKLIB_FLAG_OPEN_READ_ONLY,
            out,
            context=self._ctx,
        )
        self._set = out[0]
        count = ffi.new("size_t *")
        handles = ffi.new("VixVolumeHandle **")
        self._mnt.call("VixMntapi_GetVolumeHandles", self._set, count, handles, context=self._ctx)
        self._handles, self._count = handles[0], int(count[0])

    def mount_all(self) -> list[MountedVolume]:
        """Mount every volume read-only; one that fails is logged and skipped."""
        out = []
        for i in range(self._count):
            vh = self._handles[i]
            try:
                self._mnt.call("VixMntapi_MountVolume", vh, b"\x01", context=self._ctx)
            except Exception as e:
                log.warning("%s: volume %d not mounted: %s", self._ctx, i + 1, e)
                continue
            self._mounted.append(i)
            info = ffi.new("VixVolumeInfo **")
            try:
                self._mnt.call("VixMntapi_GetVolumeInfo", vh, info, context=self._ctx)
            except Exception as e:
                log.warning("%s: volume %d: no volume info: %s", self._ctx, i + 1, e)
                continue
            try:
                vi = info[0]
                link = ffi.string(vi.symbolicLink).decode() if vi.symbolicLink else ""
                kind = _mntapi_cdefs.VOLUME_TYPES.get(int(vi.type), str(int(vi.type)))
                mounted = (
                    bool(ord(vi.isMounted))
                    if isinstance(vi.isMounted, bytes)
                    else bool(vi.isMounted)
                )
            finally:
                self._mnt.lib.VixMntapi_FreeVolumeInfo(info[0])
            if not link or not mounted:
                log.warning("%s: volume %d reports no mount path", self._ctx, i + 1)
                continue
            out.append(MountedVolume(i, kind, link))
        return out

    def close(self) -> None:
        errors: list[str] = []
        for i in reversed(self._mounted):
            try:
                # force: at unmount a shell sitting in the volume must not keep it (and the
                # VDDK connection under it) alive.
                self._mnt.call("VixMntapi_DismountVolume", self._handles[i], b"\x01",
                               context=self._ctx)  # fmt: skip
            except Exception as e:
                errors.append(f"dismount of volume {i + 1}: {e}")
        self._mounted.clear()
        if self._handles is not None:
            h, self._handles = self._handles, None
            self._mnt.lib.VixMntapi_FreeVolumeHandles(h)
        if self._set is not None:
            s, self._set = self._set, None
            try:
                self._mnt.call("VixMntapi_CloseDiskSet", s, context=self._ctx)
            except Exception as e:
                errors.append(str(e))
        for text in errors:
            log.warning("%s: %s", self._ctx, text)
