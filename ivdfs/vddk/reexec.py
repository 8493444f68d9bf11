"""Re-execute ivdfs once with VDDK's lib64 on LD_LIBRARY_PATH (nbdkit's plugins/vddk/reexec.c).

Role: VMware's libraries carry no RPATH, and `VixDiskLib_InitEx` dlopen()s its plugin
libvddkVimAccess.so by bare name; without `<libdir>/lib64` on the search path that load fails
silently and every vSphere call later fails with 16053, while VDDK binds the system's
libcurl/sqlite/OpenSSL instead of its own. The dynamic loader reads LD_LIBRARY_PATH once, when
a program starts, so setting it from Python is too late: `ensure_library_path` re-executes the
process with `LD_LIBRARY_PATH=<libdir>/lib64[:old]`, once, early (before VDDK or anything else
is loaded, before daemonizing, and before a password is read at a prompt, which an exec would
lose). The old value travels in IVDFS_REEXEC_LD_LIBRARY_PATH; in the re-executed process
`os.environ` gets it back, so child processes (mount, losetup, fusermount3, ntfs-3g, fusefat)
do not inherit VDDK's libraries. The loader keeps the search path it started with.

VDDK 8 bundles libssl.so.3/libcrypto.so.3 in lib64, so after the re-exec Python's ssl and
hashlib bind VDDK's OpenSSL, whose compiled-in default CA file and directory are not the
system's. The system's defaults, as seen before the exec, go along as SSL_CERT_FILE and
SSL_CERT_DIR (unless the user set them), which every OpenSSL honours; children inherit them,
harmlessly, as they name their own defaults.

Concurrency: main thread only, before any other thread exists (exec replaces the process).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ivdfs.errors import ExitCode, UserError

log = logging.getLogger(__name__)

MARKER = "IVDFS_REEXEC_LD_LIBRARY_PATH"
_LD = "LD_LIBRARY_PATH"
# The marker's value: "-" when LD_LIBRARY_PATH was unset, "+<old value>" when it was set.
_UNSET = "-"


def _entries(value: str | None) -> list[str]:
    return [e for e in (value or "").split(":") if e]


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _system_tls_defaults() -> dict[str, str]:
    """The default CA file and directory of the OpenSSL this process uses now (the system's),
    as the environment variables that make any OpenSSL use them."""
    import ssl

    paths = ssl.get_default_verify_paths()
    out: dict[str, str] = {}
    for name, path in (
        (paths.openssl_cafile_env, paths.openssl_cafile),
        (paths.openssl_capath_env, paths.openssl_capath),
    ):
        if name and path and name not in os.environ and os.path.exists(path):
            out[name] = path
    return out


def ensure_library_path(libdir: Path, argv: Sequence[str] | None = None) -> None:
    """Make sure this process started with `libdir/lib64` on LD_LIBRARY_PATH: re-execute it
    (`argv`, default the interpreter's own command line) if not. Returns in the process that
    may load VDDK, with `os.environ` restored for its children. Raises UserError when the
    re-executed process cannot work (exec failed, or Python's ssl cannot use VDDK's OpenSSL)."""
    lib64 = libdir / "lib64"
    old = os.environ.pop(MARKER, None)
    if old is not None:
        _restore(lib64, old)
        return
    current = os.environ.get(_LD)
    if any(_same_dir(e, str(lib64)) for e in _entries(current)):
        # Already there (set by the user): nothing to do for the loader; children still
        # should not inherit VDDK's libraries.
        kept = [e for e in _entries(current) if not _same_dir(e, str(lib64))]
        _set_ld(":".join(kept) if kept else None)
        return
    if not lib64.is_dir():
        return  # loading the library reports what is missing
    env = dict(os.environ)
    env[_LD] = ":".join([str(lib64), *_entries(current)])
    env[MARKER] = _UNSET if current is None else "+" + current
    env.update(_system_tls_defaults())
    args = list(sys.orig_argv if argv is None else argv)
    log.debug("re-executing with %s=%s", _LD, env[_LD])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # sys.executable, not /proc/self/exe: in a venv that is a symlink whose target would
        # start Python outside the venv.
        os.execve(sys.executable, args, env)
    except OSError as e:
        raise UserError(
            f"cannot re-execute {sys.executable} with {lib64} on {_LD}: {e}", ExitCode.VDDK
        ) from None


def _restore(lib64: Path, old: str) -> None:
    current = _entries(os.environ.get(_LD))
    if not current or not _same_dir(current[0], str(lib64)):
        # Something between the exec and here dropped it (a setuid wrapper, sudo's env_reset):
        # VDDK's plugin will not load; the library reports that with its own hint.
        log.warning("%s lost %s across the re-exec; VDDK may fail with error 16053", _LD, lib64)
    _set_ld(None if old == _UNSET else old.removeprefix("+"))
    try:
        # The first use of the bundled OpenSSL by Python: fail here, clearly, not somewhere
        # inside pyVmomi.
        import _hashlib  # noqa: F401
        import _ssl  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"Python's ssl module cannot use the OpenSSL that VDDK bundles in {lib64}: {e}",
            ExitCode.VDDK,
        ) from None


def _set_ld(value: str | None) -> None:
    if value is None:
        os.environ.pop(_LD, None)
    else:
        os.environ[_LD] = value
