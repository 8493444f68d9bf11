"""The VixMntapi binding against the stand-in libvixMntapi: symbols, and the NULL-names trap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.mounting import REPO, VDDK_LIBDIR
from tests.testbed.vsphere import TESTBED


def test_stand_in_exports_every_required_symbol(built_testbed: None) -> None:
    from ivdfs.vddk.library import VddkLibrary
    from ivdfs.vddk.mntapi import Mntapi

    mnt = Mntapi(VddkLibrary(VDDK_LIBDIR))  # the symbol probe raises on anything missing
    assert mnt.path == VDDK_LIBDIR / "lib64" / "libvixMntapi.so.1"  # VMware's name
    assert not mnt.initialised


_NULL_NAMES = """
from pathlib import Path
from ivdfs.vddk.reexec import ensure_library_path
ensure_library_path(Path({libdir!r}))
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.mntapi import Mntapi, ffi
lib = VddkLibrary(Path({libdir!r}))
lib.init()
m = Mntapi(lib)
m.init()
out = ffi.new("VixDiskSetHandle *")
m.lib.VixMntapi_OpenDisks(ffi.NULL, ffi.NULL, 1, 4, out)
print("survived")
"""


def test_open_disks_with_null_names_aborts_like_vddk(built_testbed: None, tmp_path: Path) -> None:
    log = tmp_path / "standin.log"
    env = {**os.environ, "VDDK_STANDIN_LOG": str(log), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _NULL_NAMES.format(libdir=str(VDDK_LIBDIR))],
        env=env, capture_output=True, text=True, cwd=TESTBED, timeout=60,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGABRT, proc.stderr
    assert "survived" not in proc.stdout
    assert any("VIOLATION null-disk-names" in ln for ln in log.read_text().splitlines())


_LOAD = """
from pathlib import Path
from ivdfs.vddk.errors import VddkLoadError
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.mntapi import Mntapi
try:
    Mntapi(VddkLibrary(Path({libdir!r})))
except VddkLoadError as e:
    print(e)
else:
    print("loaded")
"""


def test_without_libfuse2_vixmntapi_does_not_load_and_says_why(built_testbed: None) -> None:
    """Like VMware's libvixMntapi.so.1, the stand-in needs libfuse.so.2. The host's copy is
    hidden from one process by bind-mounting /dev/null over it in a private mount namespace."""
    libfuse = Path(os.path.realpath(
        Path("/usr/lib", sysconfig.get_config_var("MULTIARCH"), "libfuse.so.2")))  # fmt: skip
    assert libfuse.is_file(), "libfuse2 missing: run scripts/setup"
    script = _LOAD.format(libdir=str(VDDK_LIBDIR))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shell = 'mount --bind /dev/null "$1" && exec "$2" -c "$3"'
    hidden = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", shell, "sh", str(libfuse),
         sys.executable, script], env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert hidden.returncode == 0, hidden.stderr
    message = hidden.stdout.strip()
    assert "libvixMntapi.so.1" in message and "needs libfuse2" in message
    assert "--volumes kernel" in message
    # The same process with the library in place loads it: libfuse2 made the difference.
    plain = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert plain.stdout.strip() == "loaded", plain.stderr
