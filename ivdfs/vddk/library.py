"""Finding, loading and initialising libvixDiskLib.

InitEx gets a VDDK config file: the caller's, or by default one ivdfs writes that gives VDDK a
private `tmpDirectory` (a 0700 directory removed at `exit`), as nbdkit does, so VDDK's temporary
and log files neither land in a shared /tmp nor outlive the process. A plugin that VDDK could
not load during InitEx (libvddkVimAccess.so, found only through LD_LIBRARY_PATH, see
`reexec.py`) is reported by VDDK only through its log callback while InitEx succeeds; `init`
recognises that message and fails with `VddkPluginError` instead of letting every later call
fail with 16053.

Concurrency: `load_library` and `VddkLibrary.init`/`exit` run on the main thread (VDDK wants
InitEx once per process, from the main thread, after any fork). Every other method may be called
from any thread; the log callbacks may be called by the library on its own threads.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi

from ivdfs.rundirs import remove_tree
from ivdfs.vddk import _cdefs
from ivdfs.vddk.errors import VddkError, VddkLoadError, VddkPluginError, code_of

log = logging.getLogger(__name__)
vddk_log = logging.getLogger("ivdfs.vddk.library_messages")

_SONAME_RE = re.compile(r"^libvixDiskLib\.so\.(\d+)$")
# Messages VDDK prints on every run that say nothing about the user's disks.
_NOISE_RE = re.compile(r"CEIP|phone.?home|VMware Customer Experience", re.IGNORECASE)
# VDDK's report of a plugin it could not load, e.g. "Failed to load libvddkVimAccess.so : Error =
# ..." (the stand-in's wording, modelled on VDDK's but not verified against it): matched
# loosely, by the plugin's name and a word of failure.
_PLUGIN_FAILED_RE = re.compile(r"VimAccess.*(fail|error|cannot|unable)|(fail|error|cannot|unable)"
                               r".*VimAccess", re.IGNORECASE)  # fmt: skip

ffi = cffi.FFI()
ffi.cdef(_cdefs.CDEFS)
_libc: Any = ffi.dlopen(None)


@dataclass
class CallStat:
    calls: int = 0
    errors: int = 0
    micros: int = 0
    bytes: int = 0


class Stats:
    """Per-function call counters, updated from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, CallStat] = {}

    def add(self, function: str, micros: int, nbytes: int = 0, failed: bool = False) -> None:
        with self._lock:
            st = self._stats.get(function)
            if st is None:
                st = self._stats[function] = CallStat()
            st.calls += 1
            st.micros += micros
            st.bytes += nbytes
            st.errors += failed

    def snapshot(self) -> dict[str, CallStat]:
        with self._lock:
            return {
                k: CallStat(v.calls, v.errors, v.micros, v.bytes) for k, v in self._stats.items()
            }


def has_symbol(lib: Any, name: str) -> bool:
    """Whether a cffi-dlopened library exports `name` (cffi resolves symbols lazily)."""
    try:
        getattr(lib, name)
    except (AttributeError, NotImplementedError):
        return False
    return True


def find_library(libdir: Path) -> Path:
    """The newest `libvixDiskLib.so.N` under `libdir/lib64`."""
    if not libdir.is_dir():
        raise VddkLoadError(f"VDDK directory {libdir} does not exist or is not a directory")
    lib64 = libdir / "lib64"
    candidates: list[tuple[int, Path]] = []
    if lib64.is_dir():
        for p in lib64.iterdir():
            m = _SONAME_RE.match(p.name)
            if m:
                candidates.append((int(m.group(1)), p))
    if not candidates:
        raise VddkLoadError(
            f"no libvixDiskLib.so.N in {lib64}; --vddk-libdir must name the directory where "
            "VMware's VDDK (vmware-vix-disklib-distrib) was unpacked"
        )
    return max(candidates)[1]


def log_callbacks(
    logger: logging.Logger, level_of: Callable[[str, int], int] | None = None
) -> list[Any]:
    """VDDK's log, warning and panic callbacks for InitEx (VixDiskLib's and VixMntapi's): the
    library passes a printf format and a va_list, formatted here with libc's vsnprintf.
    `level_of(message, default level)` may pick another level (and see every message). May be
    called on any library thread: nothing here blocks or raises into C."""

    def make(level: int) -> Any:
        def cb(fmt: Any, args: Any) -> None:
            buf = ffi.new("char[]", 4096)
            _libc.vsnprintf(buf, 4096, fmt, args)
            msg = ffi.string(buf).decode("utf-8", "replace").rstrip()
            logger.log(level if level_of is None else level_of(msg, level), "%s", msg)

        return ffi.callback("VixDiskLibGenericLogFunc", cb)

    return [make(logging.DEBUG), make(logging.WARNING), make(logging.CRITICAL)]


class VddkLibrary:
    """A loaded libvixDiskLib: symbol probe, InitEx/Exit, checked and timed calls."""

    def __init__(self, libdir: Path) -> None:
        self.libdir = libdir
        self.path = find_library(libdir)
        self.soversion = int(_SONAME_RE.match(self.path.name).group(1))  # type: ignore[union-attr]
        try:
            self.lib: Any = ffi.dlopen(str(self.path))
        except OSError as e:
            raise VddkLoadError(f"cannot load {self.path}: {e}") from None
        missing = [name for name in _cdefs.REQUIRED if not self._has(name)]
        if missing:
            raise VddkLoadError(
                f"{self.path} is too old or not VDDK: it lacks {', '.join(missing)}; "
                f"ivdfs needs VDDK {_cdefs.MINIMUM_VDDK} or later to open IVDs"
            )
        self.optional = frozenset(name for name in _cdefs.OPTIONAL if self._has(name))
        self.stats = Stats()
        self._callbacks: list[Any] = []
        self._initialised = False
        self._private_dir: Path | None = None
        self._plugin_messages: list[str] = []
        # What InitEx got; VixMntapi_Init must get the same (its tmpDirectory).
        self.config_file: Path | None = None

    def _has(self, name: str) -> bool:
        return has_symbol(self.lib, name)

    @property
    def missing_optional(self) -> list[str]:
        """The optional functions this library lacks (each only disables a feature)."""
        return sorted(set(_cdefs.OPTIONAL) - self.optional)

    @property
    def has_async(self) -> bool:
        return {"VixDiskLib_ReadAsync", "VixDiskLib_Wait"} <= self.optional

    @property
    def has_query_allocated(self) -> bool:
        return {"VixDiskLib_QueryAllocatedBlocks", "VixDiskLib_FreeBlockList"} <= self.optional

    def init(self, config_file: Path | None = None) -> None:
        """InitEx with `config_file` (VDDK's `key = value` format), or by default with a
        private tmpDirectory. Raises VddkLoadError when it fails, VddkPluginError (one) when
        VDDK reports that its vSphere plugin did not load."""
        if self._initialised:
            return

        def seen(msg: str, level: int) -> int:
            if _PLUGIN_FAILED_RE.search(msg):
                self._plugin_messages.append(msg)
            return logging.DEBUG if _NOISE_RE.search(msg) else level

        # The library may call these at any time until Exit: keep them alive.
        self._callbacks = log_callbacks(vddk_log, seen)
        self._plugin_messages.clear()
        try:
            if config_file is None:
                config_file = self._private_config()
            self.config_file = config_file
            err = self.lib.VixDiskLib_InitEx(
                6, 7, *self._callbacks, str(self.libdir).encode(), str(config_file).encode()
            )
            self.check(err, "VixDiskLib_InitEx", f"{self.libdir}, config {config_file}")
        except (VddkError, VddkLoadError, OSError) as e:
            self._remove_private_dir()
            raise VddkLoadError(f"VDDK initialisation failed: {e}") from None
        except BaseException:
            self._remove_private_dir()
            raise
        self._initialised = True
        if self._plugin_messages:
            self.exit()
            lib64 = self.libdir / "lib64"
            raise VddkPluginError(
                f"VDDK could not load its vSphere plugin: {self._plugin_messages[0]}; hint: "
                f"VDDK finds libvddkVimAccess.so and the libraries it needs only through the "
                f"library search path, which must hold {lib64} when the process starts (ivdfs "
                f"re-executes itself with LD_LIBRARY_PATH={lib64} for that); check that "
                f"{lib64} is the unpacked VDDK lib64 with libvddkVimAccess.so, and "
                f"`LD_LIBRARY_PATH={lib64} ldd {lib64}/libvddkVimAccess.so` for what is missing"
            )
        log.debug("loaded %s (optional symbols: %s)", self.path, ", ".join(sorted(self.optional)))

    def _private_config(self) -> Path:
        """A config file giving VDDK its own tmpDirectory, both in a fresh 0700 directory."""
        if self._private_dir is None:
            # Named for this process, as the guest volumes' run directories are: VixMntapi
            # mounts volumes under tmpDirectory, and recovery of a killed mount finds them.
            self._private_dir = Path(tempfile.mkdtemp(prefix=f"ivdfs-{os.getpid()}-vddk-"))
            # Also at interpreter exit, should `exit` never be reached.
            atexit.register(self._remove_private_dir)
        tmp = self._private_dir / "tmp"
        tmp.mkdir(mode=0o700, exist_ok=True)
        if any(c in str(tmp) for c in '"\n\\'):
            raise VddkLoadError(f"cannot hand {tmp} to VDDK as its tmpDirectory: set TMPDIR")
        config = self._private_dir / "vixDiskLib.conf"
        config.write_text(f'# written by ivdfs for this process\ntmpDirectory = "{tmp}"\n')
        return config

    def _remove_private_dir(self) -> None:
        if self._private_dir is not None:
            # Never into a mount: VixMntapi mounts guest volumes under tmpDirectory.
            problem = remove_tree(str(self._private_dir))
            if problem is not None:
                log.error("cannot remove VDDK's directory %s: %s", self._private_dir, problem)
            self._private_dir = None

    @property
    def private_dir(self) -> Path | None:
        """The directory of the default config file and tmpDirectory, while it exists."""
        return self._private_dir

    def exit(self) -> None:
        if self._initialised:
            self.lib.VixDiskLib_Exit()
            self._initialised = False
        self._remove_private_dir()

    def error_text(self, err: int) -> str:
        p = self.lib.VixDiskLib_GetErrorText(err, ffi.NULL)
        if p == ffi.NULL:
            return f"error {code_of(err)}"
        try:
            return str(ffi.string(p).decode("utf-8", "replace"))
        finally:
            self.lib.VixDiskLib_FreeErrorText(p)

    def check(self, err: int, function: str, context: str = "") -> None:
        if err != _cdefs.VIX_OK:
            raise VddkError(err, function, self.error_text(err), context)

    def call(
        self, function: str, *args: Any, context: str = "", nbytes: int = 0, lib: Any = None
    ) -> None:
        """Call a VixError-returning function (of this library, or of `lib`, e.g. VixMntapi,
        whose errors VixDiskLib explains), timed, raising VddkError on failure."""
        fn: Callable[..., int] = getattr(self.lib if lib is None else lib, function)
        t0 = time.perf_counter_ns()
        err = fn(*args)
        self.stats.add(function, (time.perf_counter_ns() - t0) // 1000, nbytes, err != 0)
        self.check(err, function, context)
