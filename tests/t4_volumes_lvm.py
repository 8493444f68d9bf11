"""LVM2 inside guest disks through real mounts (issue 19): lv-<vg>-<lv>.raw and volumes/<vg>-<lv>.

Waits for the tree's integration of ivdfs.formats.lvm_map (see the lead's patch): every supported
logical volume of a snapshot appears as ``lv-<dm_name>.raw`` beside ``partN.raw`` (dm_name:
``<vg>-<lv>`` with hyphens inside either doubled, as /dev/mapper spells it), read through the
disk's cache; with ``--volumes kernel`` its filesystem is mounted as ``volumes/<dm_name>``, and
every volume that is not mounted (a PV partition, an unsupported LV) shows its one-line reason
as ``volumes/<name>.error``.

Images come from tests.testbed.images, laid out by lvm2 itself in a sandbox (pvcreate,
vgcreate, lvcreate on loop devices, activation=0): a GPT disk whose partition 2 is a PV with
an XFS LV in two segments and an ext4 LV; the same with the PV on the whole disk; two PVs with
a striped LV, a linear one and one of type zero (unsupported), whose metadata wrapped around
its area; and that disk with one or all metadata copies damaged. The GPT disk is served as two
snapshots of one IVD: its XFS LVs mount side by side, with no device-mapper name to clash.
Every LV is compared byte for byte with what was written at the extents lvs reported, every
file with the manifest; afterwards no loop device, mount or VG is left and the host's ``vgs``
shows nothing new.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mounting import (
    Bed,
    Mount,
    host_vgs,
    loop_devices_of,
    mounted_at,
    mounts_under,
    sha256_file,
)
from tests.testbed import images as imgs
from tests.testbed.vsphere import Ivd, place_image

pytestmark = pytest.mark.allow_log("LVM", "partition table")

MiB = 1 << 20


@dataclass(frozen=True)
class Disk:
    kind: str
    ivd: Ivd
    snapshots: tuple[str, ...]
    manifest: imgs.DiskManifest
    sha256: str

    def snapdir(self, mp: Path, snap: str) -> Path:
        return mp / self.ivd.datastore_name / self.ivd.id / snap


def dm_name(vg: str, lv: str) -> str:
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def supported(lv: imgs.LvManifest) -> bool:
    return all(s.segtype in ("linear", "striped") for s in lv.segments)


@pytest.fixture(scope="module")
def disks(bed: Bed) -> dict[str, Disk]:
    src = bed.root / "lvm-src"
    src.mkdir()
    builders = {
        "part": lambda p: imgs.lvm_disk(p, "partition"),
        "whole": lambda p: imgs.lvm_disk(p, "whole"),
        "striped": imgs.lvm_striped_disk,
        "one-copy": lambda p: imgs.corrupt_lvm_disk(p, "one-copy"),
        "all-copies": lambda p: imgs.corrupt_lvm_disk(p, "all-copies"),
    }
    out = {}
    for kind, build in builders.items():
        m = build(src / f"{kind}.img")
        ivd = bed.vcsim.create_ivd(f"lvm-{kind}", m.size // MiB, "LocalDS_0")
        count = 2 if kind == "part" else 1  # two snapshots of one LVM disk, side by side
        snaps = tuple(bed.vcsim.create_snapshot(ivd, f"{kind}-{i}") for i in range(count))
        for snap in snaps:
            place_image(bed.images, ivd, snap, m.path)
        out[kind] = Disk(kind, ivd, snaps, m, sha256_file(m.path))
    return out


def expected_raw(m: imgs.DiskManifest) -> set[str]:
    parts = {f"part{p.number}.raw" for p in m.partitions}
    if m.damage == "all-copies":
        return {"disk.raw"} | parts
    lvs = {f"lv-{dm_name(lv.vg, lv.name)}.raw" for lv in m.lvs if supported(lv)}
    return {"disk.raw"} | parts | lvs


def test_lv_windows_read_exactly_what_lvm_placed(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    vgs_before = host_vgs()
    with Mount(bed, mountpoint) as m:
        for d in disks.values():
            for snap in d.snapshots:
                sd = d.snapdir(mountpoint, snap)
                assert {n for n in os.listdir(sd) if n.endswith(".raw")} == expected_raw(
                    d.manifest
                ), d.kind
                if d.manifest.damage == "all-copies":
                    continue
                for lv in d.manifest.lvs:
                    if not supported(lv):
                        continue
                    f = sd / f"lv-{dm_name(lv.vg, lv.name)}.raw"
                    assert f.stat().st_size == lv.size
                    assert f.stat().st_mode & 0o777 == 0o444
                    assert sha256_file(f) == lv.sha256, f"{d.kind} {lv.name}"
                    # Odd reads across segment and stripe boundaries, and at the end.
                    with open(d.manifest.path, "rb") as src, open(f, "rb", buffering=0) as fh:
                        for seg in lv.segments:
                            for off in (seg.lv_offset - 1000, seg.lv_offset + 65536 - 7):
                                if 0 <= off < lv.size:
                                    got = os.pread(fh.fileno(), 70000, off)
                                    assert got == _lv_read(src.fileno(), lv, off, 70000)
                        assert os.pread(fh.fileno(), 4096, lv.size) == b""
            assert sha256_file(d.snapdir(mountpoint, d.snapshots[0]) / "disk.raw") == d.sha256
        assert m.unmount() == 0
        lvm_lines = [ln for ln in m.log().splitlines() if "LVM" in ln and " WARNING " in ln]
        # One line per damaged disk, naming it: "one-copy" still lists its LVs.
        assert len(lvm_lines) == 2, lvm_lines
        damaged = {disks["one-copy"].ivd.id, disks["all-copies"].ivd.id}
        assert sorted(next(i for i in damaged if i in ln) for ln in lvm_lines) == sorted(damaged)
        assert m.unexpected_log_records(allowed=("LVM",)) == []
    assert loop_devices_of(mountpoint, bed.images) == []
    assert host_vgs() == vgs_before


def _lv_read(fd: int, lv: imgs.LvManifest, offset: int, length: int) -> bytes:
    """Read LV bytes from the source image as lvs placed them (independent of ivdfs.formats)."""
    out = bytearray()
    end = min(offset + length, lv.size)
    while offset < end:
        seg = next(s for s in lv.segments if s.lv_offset <= offset < s.lv_offset + s.length)
        n = len(seg.stripes)
        chunk = seg.stripe_size if n > 1 else seg.length
        rel = offset - seg.lv_offset
        k, within = divmod(rel, chunk)
        run = min(chunk - within, end - offset, seg.lv_offset + seg.length - offset)
        out += os.pread(fd, run, seg.stripes[k % n] + (k // n) * chunk + within)
        offset += run
    return bytes(out)


def test_lv_filesystems_mount_with_reasons_for_the_rest(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    vgs_before = host_vgs()
    m = Mount(bed, mountpoint, "--volumes", "kernel")
    run_dirs: set[Path] = set()
    try:
        for d in disks.values():
            man = d.manifest
            for snap in d.snapshots:
                vols = d.snapdir(mountpoint, snap) / "volumes"
                names = set(os.listdir(vols))
                mounted = {n for n in names if not n.endswith(".error")}
                errors = {
                    n.removesuffix(".error"): (vols / n).read_text()
                    for n in names
                    if n.endswith(".error")
                }
                want_mounted = {str(p.number) for p in man.partitions if p.fs is not None}
                if man.damage != "all-copies":
                    want_mounted |= {dm_name(lv.vg, lv.name) for lv in man.lvs if lv.fs}
                assert mounted == want_mounted, (d.kind, names)
                # The PV partitions (or the whole-disk PV) say what they are.
                pv_names = {str(p.number) for p in man.partitions if p.fs is None} or {"0"}
                for n in pv_names:
                    assert "LVM2 physical volume" in errors[n], errors
                for lv in man.lvs:
                    if not supported(lv) and man.damage != "all-copies":
                        reason = errors[dm_name(lv.vg, lv.name)]
                        assert "zero" in reason and reason.count("\n") <= 1
                for lv in man.lvs if man.damage != "all-copies" else ():
                    if not lv.fs:
                        continue
                    vol = vols / dm_name(lv.vg, lv.name)
                    target = Path(os.readlink(vol))
                    run_dirs.add(target.parent)
                    for rel, digest in lv.files.items():
                        assert sha256_file(vol / rel) == digest, f"{d.kind} {lv.name} {rel}"
                    grep = subprocess.run(["grep", "-rl", "ivdfs-needle", f"{vol}/"],
                                          capture_output=True, text=True, check=True)  # fmt: skip
                    assert {Path(p).name for p in grep.stdout.split()} >= {"needle.txt"}
        # The same XFS LV of two snapshots: two filesystems, mounted side by side.
        part = disks["part"]
        devs = {
            os.stat(part.snapdir(mountpoint, s) / "volumes" / "ivdvg-data").st_dev
            for s in part.snapshots
        }
        assert len(devs) == 2
        assert not Path("/dev/mapper/ivdvg-data").exists()
        assert m.unmount("ivdfs") == 0, m.log()
    finally:
        if m.proc.poll() is None:
            m.unmount("SIGTERM")
    assert m.unexpected_log_records(allowed=("LVM",)) == []
    assert not mounted_at(mountpoint)
    assert loop_devices_of(mountpoint, bed.images) == []
    assert mounts_under(*run_dirs) == [] and not [p for p in run_dirs if p.exists()]
    assert host_vgs() == vgs_before
    for d in disks.values():
        for snap in d.snapshots:
            assert sha256_file(bed.images / d.ivd.id / f"{snap}.raw") == d.sha256
