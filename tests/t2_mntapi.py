"""The VixMntapi binding against the stand-in libvixMntapi: symbols, and the NULL-names trap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.mounting import REPO, VDDK_LIBDIR
from tests.testbed.vsphere import TESTBED


def test_stand_in_exports_every_required_symbol(built_testbed: None) -> None:
    from ivdfs.vddk.library import VddkLibrary
    from ivdfs.vddk.mntapi import Mntapi

    mnt = Mntapi(VddkLibrary(VDDK_LIBDIR))  # the symbol probe raises on anything missing
    assert mnt.path == VDDK_LIBDIR / "lib64" / "libvixMntapi.so.8"
    assert not mnt.initialised


_NULL_NAMES = """
from pathlib import Path
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
