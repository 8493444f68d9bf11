"""Shared fixtures. A missing prerequisite fails the run: nothing here ever skips."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import VDDK_LIBDIR, Bed
from tests.testbed.vsphere import LAUNCHER, TESTBED, Vcsim


@pytest.fixture(scope="session")
def built_testbed() -> None:
    """Build (incrementally) the vcsim launcher and the stand-in libraries."""
    subprocess.run([str(TESTBED / "build.sh")], check=True, stdout=subprocess.DEVNULL)
    missing = [
        str(p) for p in (LAUNCHER, VDDK_LIBDIR / "lib64" / "libvixDiskLib.so.8") if not p.exists()
    ]
    if missing:
        pytest.fail(f"test bed not built: {missing}; run scripts/setup")
    for tool in ("fusermount3", "openssl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing; run scripts/setup")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.fail("/dev/fuse is not usable; the tests mount for real and need it")


@pytest.fixture(scope="module")
def vcsim(built_testbed: None) -> Iterator[Vcsim]:
    with Vcsim() as v:
        yield v


@pytest.fixture(scope="module")
def bed(vcsim: Vcsim, tmp_path_factory: pytest.TempPathFactory) -> Bed:
    root = tmp_path_factory.mktemp("bed")
    (root / "images").mkdir()
    return Bed(vcsim, root)


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    mp = tmp_path / "mnt"
    mp.mkdir()
    return mp
