"""VixMntapi: VMware's library that mounts the guest volumes of a disk on this machine.

Role: find ``libvixMntapi.so.1`` (VMware's name in every VDDK release, whatever the disk
library's version) beside libvixDiskLib in ``<libdir>/lib64``, Init it once (with the disk
library's configuration file: the same private tmpDirectory), and for one snapshot run
OpenDisks -> GetVolumeHandles -> MountVolume(read-only) -> GetVolumeInfo, undoing it with
DismountVolume -> FreeVolumeHandles -> CloseDiskSet (then Exit once) on every path. OpenDisks
always gets the IVD id as its one disk name: a NULL name array crashes real VDDK. The library
needs libfuse2 (``libfuse.so.2``) on the host: without it, it does not load.

What the real library does beyond its documentation (VDDK 7.0.2, measured; DESIGN.md): OpenDisks
FUSE-mounts the disk's flat image at ``/run/vmware/fuse/<n>/flat``, served by a forked copy of
the calling process, and describes it in ``<n>.info``; when CloseDiskSet cannot unmount it (24009,
"The umount command failed") it stays mounted after VixMntapi_Exit too, and its server keeps
running. `DiskSet` notes the mounts that appear during its OpenDisks so that the caller can
unmount what is left (`unmount_fuse`), and `fuse_mounts_of` finds them again from the ``.info``
files after a crash. MountVolume's failures (24010 on kernels it does not know) are returned per
volume, with VixMntapi's code and text, for the caller to show.

Concurrency contract: nothing here is thread-safe. Every call after `__init__` (Init included)
runs on the VDDK control thread (`DiskService.run_on_control`), which also owns the connection
that OpenDisks uses. Errors become `VddkError` through the disk library's error text. The
module-level helpers (`fuse_mounts`, `fuse_mounts_of`, `unmount_fuse`) block (they read
mountinfo, run umount) and may run on any thread but the trio one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi

from ivdfs import mountinfo
from ivdfs.vddk import _cdefs, _mntapi_cdefs
from ivdfs.vddk.errors import VddkError, VddkLoadError
from ivdfs.vddk.library import VddkLibrary, has_symbol, log_callbacks
from ivdfs.vddk.library import ffi as disklib_ffi

log = logging.getLogger(__name__)
mntapi_log = logging.getLogger("ivdfs.vddk.mntapi_messages")

_SONAME_RE = re.compile(r"^libvixMntapi\.so\.(\d+)$")
SONAME = "libvixMntapi.so.1"

# Where VixMntapi FUSE-mounts the disks it opens (measured; its error 24016 names it too).
FUSE_ROOT = Path("/run/vmware/fuse")
UMOUNT_TIMEOUT = 60.0
# VixMntapi's warnings about what ivdfs then reports (or cleans up) itself, in its own words:
# a volume it could not mount (shown as volumes/<n>.error) and a FUSE mount it could not
# unmount (unmounted by ivdfs, or an error naming it). Logged at INFO, not as warnings twice.
_HANDLED_RE = re.compile(
    r"Failed to mount partition|Error unmounting disk|Failed to unmount disk|Cannot unmount "
    r"disk|clean up mountless disks|Another process is performing an operation",
    re.IGNORECASE,
)

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

        def level_of(msg: str, level: int) -> int:
            return logging.INFO if level == logging.WARNING and _HANDLED_RE.search(msg) else level

        # The library may call these until Exit: keep them alive.
        self._callbacks = log_callbacks(mntapi_log, level_of)
        config = self.disklib.config_file
        # The disk library's configuration: VixMntapi works in its tmpDirectory (else in a
        # shared /tmp/vmware-<user>), and --vddk-config applies to both libraries.
        self.call(
            "VixMntapi_Init",
            _mntapi_cdefs.VIXMNTAPI_MAJOR_VERSION,
            _mntapi_cdefs.VIXMNTAPI_MINOR_VERSION,
            *self._callbacks,
            str(self.disklib.libdir).encode(),
            str(config).encode() if config is not None else ffi.NULL,
        )
        self.initialised = True

    def exit(self) -> None:
        if self.initialised:
            self.initialised = False
            self.lib.VixMntapi_Exit()


class DiskSet:
    """One snapshot opened through VixMntapi, its volumes mounted read-only.

    `close` undoes exactly what succeeded, in VMware's order, and is safe to call after any
    partial `open`/`mount_all`. `fuse` lists the FUSE mounts VixMntapi made during OpenDisks
    (also when it failed): whatever is still mounted after CloseDiskSet and VixMntapi_Exit is
    the caller's to unmount (`unmount_fuse`).
    """

    def __init__(self, mnt: Mntapi, connection: Any, ivd_id: str, context: str) -> None:
        self._mnt = mnt
        self._conn = connection
        self._ivd_id = ivd_id
        self._ctx = context
        self._set: Any = None
        self._handles: Any = None  # VixVolumeHandle * from GetVolumeHandles
        self.count = 0  # volumes VixMntapi lists
        self._mounted: list[int] = []
        self.fuse: list[str] = []

    def open(self) -> None:
        name = ffi.new("char[]", self._ivd_id.encode())
        names = ffi.new("const char *[1]", [name])  # never NULL: real VDDK would crash
        out = ffi.new("VixDiskSetHandle *")
        conn = ffi.cast("VixDiskLibConnection", self._conn)
        # Calls on the control thread are serialised, so a mount appearing under FUSE_ROOT
        # during this call is this OpenDisks' (another process's VixMntapi could add one at
        # the same moment: unmounting it would be wrong, hence the .info check at recovery).
        before = fuse_mounts()
        try:
            self._mnt.call(
                "VixMntapi_OpenDisks",
                conn,
                names,
                1,
                _cdefs.VIXDISKLIB_FLAG_OPEN_READ_ONLY,
                out,
                context=self._ctx,
            )
        finally:
            self.fuse = sorted(fuse_mounts() - before)
        self._set = out[0]
        count = ffi.new("size_t *")
        handles = ffi.new("VixVolumeHandle **")
        self._mnt.call("VixMntapi_GetVolumeHandles", self._set, count, handles, context=self._ctx)
        self._handles, self.count = handles[0], int(count[0])

    def mount_all(self) -> tuple[list[MountedVolume], dict[int, str]]:
        """Mount every volume read-only: those mounted, and for each volume not mounted (by
        its index) why, in VixMntapi's own words and code."""
        out: list[MountedVolume] = []
        refused: dict[int, str] = {}
        for i in range(self.count):
            vh = self._handles[i]
            try:
                self._mnt.call("VixMntapi_MountVolume", vh, b"\x01", context=self._ctx)
            except VddkError as e:
                refused[i] = f"VixMntapi could not mount it: {e.text} [VixError {e.code}]"
                continue
            self._mounted.append(i)
            info = ffi.new("VixVolumeInfo **")
            try:
                self._mnt.call("VixMntapi_GetVolumeInfo", vh, info, context=self._ctx)
            except VddkError as e:
                refused[i] = f"VixMntapi mounted it but gives no volume information: {e.text}"
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
                refused[i] = "VixMntapi reports it mounted but gives no mount path"
                continue
            out.append(MountedVolume(i, kind, link))
        return out, refused

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
            except VddkError as e:
                if self.fuse and e.code == UMOUNT_FAILED:
                    # Its own FUSE mount stays; the caller unmounts it after VixMntapi_Exit.
                    log.info("%s: VixMntapi could not unmount %s (%s)", self._ctx,
                             ", ".join(self.fuse), e.text)  # fmt: skip
                else:
                    errors.append(str(e))
        for text in errors:
            log.warning("%s: %s", self._ctx, text)


# VixMntapi's "The umount command failed".
UMOUNT_FAILED = 24009


def fuse_mounts() -> set[str]:
    """VixMntapi's disk mounts (``FUSE_ROOT/<n>``) in this mount namespace."""
    root = str(FUSE_ROOT) + "/"
    return {
        e.mountpoint
        for e in mountinfo.entries()
        if e.mountpoint.startswith(root) and "/" not in e.mountpoint[len(root) :]
    }


def _names(disk_field: str, disk_name: str) -> bool:
    # For an IVD the real library (7.0.2) writes "<user>@<server>:[<datastore>]
    # VStorageObject:<id>", not the name OpenDisks got; for a local file, the name itself.
    return disk_field == disk_name or disk_field.endswith(f"VStorageObject:{disk_name}")


def fuse_mounts_of(disk_name: str) -> list[str]:
    """The mounted ``FUSE_ROOT/<n>`` whose ``<n>.info`` names `disk_name` (an IVD id): for a
    process killed during OpenDisks, before it noted what the call mounted."""
    mounted = fuse_mounts()
    out = []
    with contextlib.suppress(OSError):
        for info in sorted(FUSE_ROOT.glob("*.info")):
            fields: dict[str, str] = {}
            with contextlib.suppress(OSError, UnicodeDecodeError):
                for line in info.read_text(encoding="utf-8").splitlines():
                    key, sep, value = line.partition("=")
                    if sep:
                        fields[key.strip()] = value.strip().strip('"')
            path = fields.get("mountPath") or str(info.with_suffix(""))
            if _names(fields.get("diskName", ""), disk_name) and path in mounted:
                out.append(path)
    return out


def unmount_fuse(path: str) -> str | None:
    """Unmount one of VixMntapi's disk mounts (its forked server then exits); lazily if
    something still holds it. None when it is gone, else why not."""
    reason = None
    for argv in (["umount", path], ["umount", "--lazy", path]):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=UMOUNT_TIMEOUT, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            reason = str(e)
            continue
        if r.returncode == 0 or path not in fuse_mounts():
            return None
        reason = (r.stderr.strip().splitlines() or [f"umount exit status {r.returncode}"])[-1]
    return reason
