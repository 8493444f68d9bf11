"""Snapshots of one volume side by side (issue 19): XFS, btrfs and ext4 through real mounts.

Every snapshot of an IVD carries the same filesystem UUID (XFS) or fsid (btrfs); a kernel
mount without the right options refuses the second one. Each image here is built once
(tests.testbed.images, real mkfs) and served as two snapshots of one IVD, byte for byte: a
clone, as the datastore would hold it. `ivdfs mount --volumes kernel` must mount all six
side by side, each on a loop device of its own snapshot's disk.raw, every file equal to the
manifest, and leave no loop device, mount or LVM trace behind.

The backend is also driven directly (no FUSE: loop devices on the image files themselves) to
show what it answers where it cannot mount: a kernel profile playing a kernel older than 6.7
(no btrfs temp-fsid) refuses the second clone with its reason, and things that are no
filesystem come back with theirs. Only the profile is played; the mounts are real.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ivdfs.inventory.model import Datastore, Snapshot
from ivdfs.inventory.model import Ivd as IvdRecord
from ivdfs.volumes.base import Candidate, VolumeRequest
from ivdfs.volumes.kernel import KernelProfile, KernelVolumes
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

MiB = 1 << 20
FILESYSTEMS = {"xfs": 320, "btrfs": 128, "ext4": 32}  # MiB: the tools' minimum sizes or more
DRIVERS = {
    "xfs": "the kernel's xfs driver (ro,norecovery,nouuid)",
    "btrfs": "the kernel's btrfs driver (ro,rescue=nologreplay)",
    "ext4": "the kernel's ext4 driver (ro,noload)",
}


@dataclass(frozen=True)
class Clone:
    fs: str
    ivd: Ivd
    snapshots: tuple[str, str]
    manifest: imgs.DiskManifest
    sha256: str

    def volume(self, mp: Path, snap: str) -> Path:
        return mp / self.ivd.datastore_name / self.ivd.id / snap / "volumes" / "0"


def mount_source(target: Path) -> tuple[str, str, str]:
    """(filesystem type, source device, options) of the mount at `target`."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for ln in f:
            fields = ln.split()
            if fields[4] == str(target):
                sep = fields.index("-")
                return fields[sep + 1], fields[sep + 2], fields[5]
    raise AssertionError(f"nothing mounted at {target}")


def loop_backing(dev: str) -> str:
    return (Path("/sys/block") / Path(dev).name / "loop" / "backing_file").read_text().strip()


@pytest.fixture(scope="module")
def clones(bed: Bed) -> Iterator[dict[str, Clone]]:
    src = bed.root / "clone-src"
    src.mkdir()
    out = {}
    for fs, size_mb in FILESYSTEMS.items():
        manifest = imgs.bare_fs_disk(src / f"{fs}.img", size_mb, fs)
        ivd = bed.vcsim.create_ivd(f"clone-{fs}", size_mb, "LocalDS_0")
        snaps = (bed.vcsim.create_snapshot(ivd, "first"), bed.vcsim.create_snapshot(ivd, "second"))
        for snap in snaps:
            place_image(bed.images, ivd, snap, manifest.path)
        out[fs] = Clone(fs, ivd, snaps, manifest, sha256_file(manifest.path))
    yield out


def test_clones_mount_side_by_side(bed: Bed, clones: dict[str, Clone], mountpoint: Path) -> None:
    vgs_before = host_vgs(mountpoint, bed.images)
    m = Mount(bed, mountpoint, "--volumes", "kernel")
    run_dirs: set[Path] = set()
    targets: dict[str, Path] = {}  # snapshot id -> where its volume 0 is mounted
    try:
        devices: dict[str, set[int]] = {}
        for c in clones.values():
            whole = c.manifest.whole_disk
            assert whole is not None
            for snap in c.snapshots:
                vol = c.volume(mountpoint, snap)
                assert sorted(os.listdir(vol.parent)) == ["0"]
                target = Path(os.readlink(vol))
                targets[snap] = target
                run_dirs.add(target.parent)
                fstype, source, options = mount_source(target)
                assert fstype == c.fs and options.startswith("ro")
                # Each clone reads through a loop device on its own snapshot's disk.raw.
                assert loop_backing(source) == str(vol.parent.parent / "disk.raw")
                for rel, digest in whole.files.items():
                    assert sha256_file(vol / rel) == digest, f"{c.fs} {snap} {rel}"
                found = {
                    str(p.relative_to(vol)) for p in vol.rglob("*") if p.is_file()
                }  # fmt: skip
                assert found == set(whole.files), c.fs
                devices.setdefault(c.fs, set()).add(os.stat(vol).st_dev)
            # Two filesystems, not one mount shown twice.
            assert len(devices[c.fs]) == 2, c.fs
        assert len(run_dirs) == 1
        assert m.unmount("ivdfs") == 0, m.log()
    finally:
        if m.proc.poll() is None:
            m.unmount("SIGTERM")
    log = m.log()
    assert m.unexpected_log_records() == []
    assert "btrfs clones get a temporary fsid" in log  # the probe's one line about the kernel
    for c in clones.values():
        for snap in c.snapshots:
            line = next(ln for ln in log.splitlines() if f"snapshot {snap}: volume 0" in ln)
            assert line.endswith(f"mounted read-only at {targets[snap]} by {DRIVERS[c.fs]}")
    assert not mounted_at(mountpoint)
    assert loop_devices_of(mountpoint, bed.images) == []
    assert mounts_under(*run_dirs) == []
    assert not [d for d in run_dirs if d.exists()]
    assert host_vgs(mountpoint, bed.images) == vgs_before
    for c in clones.values():
        for snap in c.snapshots:
            assert sha256_file(bed.images / c.ivd.id / f"{snap}.raw") == c.sha256


# --------------------------------------------------------------------------------------------
# The backend's answers, without FUSE


def request(image: Path, snap: str, candidates: tuple[Candidate, ...]) -> VolumeRequest:
    ds = Datastore("ds", "datastore-1")
    ivd = IvdRecord("ivd-clone", "clone", ds, image.stat().st_size)
    return VolumeRequest(ivd, Snapshot(snap, ivd.id), image, candidates)


async def test_old_kernel_refuses_a_second_btrfs_clone_with_its_reason(
    clones: dict[str, Clone], tmp_path: Path
) -> None:
    probed = KernelProfile.probe()
    old = KernelProfile("6.1-played", probed.options, btrfs_clones=False)
    backend = KernelVolumes(run_root=tmp_path, profile=old)
    btrfs = clones["btrfs"].manifest
    images = [tmp_path / "snap-a.img", tmp_path / "snap-b.img"]
    for img in images:
        subprocess.run(["cp", "--sparse=always", str(btrfs.path), str(img)], check=True)
    whole = Candidate(0, 0, btrfs.size, "btrfs")
    try:
        first = await backend.attach(request(images[0], "a", (whole,)))
        assert set(first.mounted) == {"0"} and first.refused == {}
        second = await backend.attach(request(images[1], "b", (whole,)))
        assert second.mounted == {}
        reason = second.refused["0"]
        assert "already mounted from IVD ivd-clone snapshot a" in reason
        assert "before Linux 6.7" in reason
        assert loop_devices_of(images[1]) == []  # refused before any loop device
    finally:
        await backend.aclose()
    assert loop_devices_of(*images) == [] and not backend.run_dir.exists()
    # Once the first is gone, the fsid is free again.
    backend = KernelVolumes(run_root=tmp_path, profile=old)
    try:
        again = await backend.attach(request(images[1], "b", (whole,)))
        assert set(again.mounted) == {"0"}
    finally:
        await backend.aclose()
    assert loop_devices_of(*images) == []


@pytest.mark.allow_log("not mounted")
async def test_every_candidate_is_answered(clones: dict[str, Clone], tmp_path: Path) -> None:
    ext4 = clones["ext4"].manifest
    image = tmp_path / "ext4.img"
    subprocess.run(["cp", "--sparse=always", str(ext4.path), str(image)], check=True)
    probed = KernelProfile.probe()
    rejecting = KernelProfile(
        "played", {k: v for k, v in probed.options.items() if k != "xfs"},
        probed.btrfs_clones, {"xfs": "the kernel's xfs rejects ro,norecovery,nouuid"},
    )  # fmt: skip
    backend = KernelVolumes(run_root=tmp_path, profile=rejecting)
    size = ext4.size
    candidates = (
        Candidate(0, 0, size, "ext4"),
        Candidate(1, 0, size, None),
        Candidate(2, 0, size, "LVM2_member"),
        Candidate(3, 0, size, "swap"),
        Candidate(4, 0, size, "xfs"),
        Candidate(5, 0, size, "exfat" if "exfat" not in probed.options else "minix"),
        Candidate(6, 0, size, "xfs", name="vg-lv", path=image),  # an LV's file, by name
        Candidate(7, 4096, size - 4096, "ext4"),  # the wrong offset: the mount fails
    )
    try:
        answer = await backend.attach(request(image, "s", candidates))
        assert set(answer.mounted) == {"0"}
        assert sorted(answer.refused) == ["1", "2", "3", "4", "5", "7", "vg-lv"]
        assert answer.refused["1"] == "no recognised filesystem"
        assert "LVM2 physical volume" in answer.refused["2"]
        assert answer.refused["3"] == "swap space holds no files"
        assert answer.refused["4"] == answer.refused["vg-lv"]
        assert answer.refused["4"] == "the kernel's xfs rejects ro,norecovery,nouuid"
        assert answer.refused["5"] in ("the kernel has no exfat driver", "minix is not a "
                                       "filesystem ivdfs mounts")  # fmt: skip
        assert answer.refused["7"].startswith("mount failed: mount ")
        assert all("\n" not in r for r in answer.refused.values())
        again = await backend.attach(request(image, "t", candidates[:1]))
        assert again.mounted == {"0": str(backend.run_dir / "ivd-clone-t-0")}
    finally:
        await backend.aclose()
    assert loop_devices_of(image) == [] and not backend.run_dir.exists()


def test_probe_reads_what_the_kernel_says() -> None:
    """On this kernel (6.18): every choice is checked by the driver itself, none guessed."""
    p = KernelProfile.probe()
    assert p.options["xfs"] == "ro,norecovery,nouuid"
    assert p.options["btrfs"] == "ro,rescue=nologreplay"  # 'nologreplay' alone is refused
    assert p.options["ext4"] == "ro,noload" and p.options["ext2"] == "ro"
    assert p.btrfs_clones and p.notes == {}
    with open("/proc/filesystems", encoding="ascii") as f:
        has_vfat = any(ln.split()[-1] == "vfat" for ln in f)
    assert ("vfat" in p.options) == has_vfat
