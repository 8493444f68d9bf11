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

VDDK 8 bundles libssl.so.3/libcrypto.so.3 in lib64, so with lib64 first on the path Python's
ssl and hashlib bind VDDK's OpenSSL, whose compiled-in default CA file and directory are not
the system's: certificates signed by the system's CAs would fail verification. The system's
defaults (asked of this process's OpenSSL before the exec, or of a clean child interpreter when
the user put lib64 on the path himself) are set as SSL_CERT_FILE and SSL_CERT_DIR unless the
user set them; every OpenSSL honours them, and children inherit them harmlessly, as they name
their own defaults.

Concurrency: main thread only, before any other thread exists (exec replaces the process).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ivdfs.vddk.errors import VddkLoadError

log = logging.getLogger(__name__)

MARKER = "IVDFS_REEXEC_LD_LIBRARY_PATH"
_LD = "LD_LIBRARY_PATH"
# The marker's value: "-" when LD_LIBRARY_PATH was unset, "+<old value>" when it was set.
_UNSET = "-"


def _entries(value: str | None) -> list[str]:
    return [e for e in (value or "").split(":") if e]


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


_ASK_TLS_DEFAULTS = (
    "import json, ssl; p = ssl.get_default_verify_paths(); "
    "print(json.dumps([p.openssl_cafile_env, p.openssl_cafile, p.openssl_capath_env, "
    "p.openssl_capath]))"
)


def _bundles_openssl(lib64: Path) -> bool:
    return any((lib64 / n).exists() for n in ("libssl.so.3", "libcrypto.so.3"))


def _tls_defaults(here: bool) -> dict[str, str]:
    """The system OpenSSL's default CA file and directory, as the environment variables that
    make any OpenSSL use them: asked of this process (`here`: it has not loaded VDDK's
    OpenSSL), else of a child interpreter started without LD_LIBRARY_PATH."""
    if here:
        import ssl

        p = ssl.get_default_verify_paths()
        values = [p.openssl_cafile_env, p.openssl_cafile, p.openssl_capath_env, p.openssl_capath]
    else:
        env = {k: v for k, v in os.environ.items() if k != _LD}
        try:
            argv = [sys.executable, "-I", "-c", _ASK_TLS_DEFAULTS]
            proc = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=30, check=True
            )
            values = json.loads(proc.stdout)
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            log.warning("cannot learn the system's default CA paths: %s", e)
            return {}
    out: dict[str, str] = {}
    for name, path in ((values[0], values[1]), (values[2], values[3])):
        if name and path and name not in os.environ and os.path.exists(path):
            out[name] = path
    return out


def ensure_library_path(libdir: Path, argv: Sequence[str] | None = None) -> None:
    """Make sure this process started with `libdir/lib64` on LD_LIBRARY_PATH: re-execute it
    (`argv`, default the interpreter's own command line) if not. Returns in the process that
    may load VDDK, with `os.environ` restored for its children. An exec that fails is logged
    and ignored, as by nbdkit: VDDK then reports its plugin failure when it is initialised.
    Raises VddkLoadError when Python's ssl cannot use the OpenSSL that VDDK bundles."""
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
        if _bundles_openssl(lib64):
            # OpenSSL reads these when asked for its defaults, so setting them now works.
            os.environ.update(_tls_defaults(here=False))
        return
    if not lib64.is_dir():
        return  # loading the library reports what is missing
    env = dict(os.environ)
    env[_LD] = ":".join([str(lib64), *_entries(current)])
    env[MARKER] = _UNSET if current is None else "+" + current
    if _bundles_openssl(lib64):
        env.update(_tls_defaults(here=True))
    args = list(sys.orig_argv if argv is None else argv)
    log.debug("re-executing with %s=%s", _LD, env[_LD])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # sys.executable, not /proc/self/exe: in a venv that is a symlink whose target would
        # start Python outside the venv.
        os.execve(sys.executable, args, env)
    except OSError as e:
        log.warning("cannot re-execute %s with %s on %s: %s", sys.executable, lib64, _LD, e)


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
        raise VddkLoadError(
            f"Python's ssl module cannot use the OpenSSL that VDDK bundles in {lib64}: {e}"
        ) from None


def _set_ld(value: str | None) -> None:
    if value is None:
        os.environ.pop(_LD, None)
    else:
        os.environ[_LD] = value
