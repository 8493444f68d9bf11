"""The real-VDDK tier (issue 23): VMware's own libvixDiskLib under ivdfs, on VMDK chains that
the real library wrote itself.

`IVDFS_TEST_VDDK` names a VDDK unpacked as VMware ships it (lib64/libvixDiskLib.so.N,
include/vixDiskLib.h). Then tests/testbed/build.sh builds, from tests/testbed/bridge:

- `build/realvddk`: a libdir for `--vddk-libdir`, laid out as VMware's, whose
  libvixDiskLib is our bridge to the real one: it turns each vStorageObject connection into a
  local-file connection on `<images>/<ivd>/<snapshot>.vmdk` and writes the stand-in's call log
  (tests/testbed/bridge/bridge.c says what else it changes, and why);
- `build/realvddk-tools/mkvmdk`: writes those VMDKs with VixDiskLib_Create, CreateChild and Write.

Tests marked `real_vddk` run only when the variable is set; conftest skips them otherwise,
with `SKIP_REASON`. Nothing of VMware's is ever copied into the repository or the build tree:
the header is read at build time, the libraries are symlinked.

Concurrency: plain functions for one test thread.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.mounting import Bed
from tests.testbed.vsphere import TESTBED, Ivd

ENV = "IVDFS_TEST_VDDK"
SKIP_REASON = (
    f"real-VDDK tier off: {ENV} is unset (point it at a VDDK unpacked from VMware's download; "
    "README, 'Testing against VMware's VDDK')"
)
REAL_LIBDIR = TESTBED / "build" / "realvddk"
MKVMDK = TESTBED / "build" / "realvddk-tools" / "mkvmdk"
GRAIN = 64 * 1024  # the sparse format's default grain, in which mkvmdk writes
_SONAME_RE = re.compile(r"^libvixDiskLib\.so\.(\d+)$")


def vddk_dir() -> Path | None:
    """The VDDK the tier runs against, or None when the tier is off."""
    value = os.environ.get(ENV, "")
    return Path(value) if value else None


def real_library(vddk: Path) -> Path:
    """VMware's newest lib64/libvixDiskLib.so.N in `vddk` (what ivdfs itself would load)."""
    found = {
        int(m.group(1)): p
        for p in (vddk / "lib64").glob("libvixDiskLib.so.*")
        if (m := _SONAME_RE.match(p.name))
    }
    if not found:
        raise FileNotFoundError(f"{ENV}={vddk} has no lib64/libvixDiskLib.so.N")
    return found[max(found)]


def missing_pieces() -> list[str]:
    """What build.sh should have made for the tier and did not."""
    return [str(p) for p in (REAL_LIBDIR / ".layout", MKVMDK) if not p.exists()]


def vddk_env() -> dict[str, str]:
    """The environment for programs linked to the real library: its lib64 on the search path
    (without it VDDK 7.0.2 aborts in InitEx: it binds the system's OpenSSL)."""
    vddk = vddk_dir()
    assert vddk is not None, SKIP_REASON
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VDDK_", "IVDFS_"))}
    env["LD_LIBRARY_PATH"] = str(vddk / "lib64")
    return env


@dataclass(frozen=True)
class Link:
    """One VMDK that mkvmdk wrote: the chain up to it holds `raw`'s bytes."""

    vmdk: Path
    raw: Path
    capacity: int  # sectors
    links: int  # numLinks of the chain ending here
    written: frozenset[int]  # grains (GRAIN bytes) this link holds


def write_vmdk(out: Path, raw: Path, parent: Path | None = None) -> Link:
    """A base disk (`parent` None) or a child link of `parent` holding `raw`'s bytes."""
    argv = [str(MKVMDK), "base", str(out), str(raw)]
    if parent is not None:
        argv = [str(MKVMDK), "child", str(parent), str(out), str(raw)]
    r = subprocess.run(argv, env=vddk_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"mkvmdk failed: {r.stderr}"
    doc = json.loads(r.stdout.splitlines()[-1])
    assert doc["grain"] * 512 == GRAIN
    return Link(out, raw, doc["capacity"], doc["links"], frozenset(doc["written"]))


@dataclass(frozen=True)
class ChainDisk:
    """An IVD whose snapshots are the links of one VMDK chain, oldest first."""

    ivd: Ivd
    snapshots: tuple[str, ...]
    links: tuple[Link, ...]

    def snapdir(self, mountpoint: Path, i: int) -> Path:
        return mountpoint / self.ivd.datastore_name / self.ivd.id / self.snapshots[i]

    def allocated(self, i: int) -> frozenset[int]:
        """The grains that snapshot `i` reads from some link (its links merged)."""
        return frozenset().union(*(link.written for link in self.links[: i + 1]))


def add_chain(bed: Bed, name: str, raws: list[Path]) -> ChainDisk:
    """An IVD with one snapshot per raw image, each stored as the next link of one VMDK chain
    in the bed's images directory, where the bridge serves it."""
    size = raws[0].stat().st_size
    ivd = bed.vcsim.create_ivd(name, (size + (1 << 20) - 1) >> 20, "LocalDS_0")
    snapshots: list[str] = []
    links: list[Link] = []
    folder = bed.images / ivd.id
    folder.mkdir(parents=True, exist_ok=True)
    for i, raw in enumerate(raws):
        snap = bed.vcsim.create_snapshot(ivd, f"{name}-{i + 1}")
        parent = links[-1].vmdk if links else None
        links.append(write_vmdk(folder / f"{snap}.vmdk", raw, parent))
        snapshots.append(snap)
    for link in links:
        link.vmdk.chmod(0o444)
    return ChainDisk(ivd, tuple(snapshots), tuple(links))
