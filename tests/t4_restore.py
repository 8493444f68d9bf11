"""File-level restore through real mounts: partN.raw windows and guest volumes (issue 6).

Images come from tests.testbed.images (parted, mkfs.*, mtools, ntfs-3g), built once per module:
GPT (ext4 + FAT32 + NTFS), MBR (ext4 + extended with logicals ext4 and FAT), a bare ext4 and a
GPT whose primary header is damaged. Every check compares bytes with the source images or the
images' manifests; afterwards no loop device, mount or stand-in volume may be left, and the
source images must be unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mounting import (
    Bed,
    Mount,
    assert_standin_log_clean,
    call_lines,
    loop_devices_of,
    mounted_at,
    sha256_file,
    wait_for,
)
from tests.testbed import images as imgs
from tests.testbed.vsphere import Ivd, place_image

MiB = 1 << 20


@dataclass(frozen=True)
class Disk:
    kind: str
    ivd: Ivd
    snapshot: str
    manifest: imgs.DiskManifest
    sha256: str

    def snapdir(self, mp: Path) -> Path:
        return mp / self.ivd.datastore_name / self.ivd.id / self.snapshot

    @property
    def parts(self) -> list[imgs.PartitionManifest]:
        """The partitions with a filesystem, in table order (VixMntapi numbers them 1, 2 ...)."""
        return sorted((p for p in self.manifest.partitions if p.fs), key=lambda p: p.number)


@pytest.fixture(scope="module")
def disks(bed: Bed) -> dict[str, Disk]:
    src = bed.root / "restore-src"
    src.mkdir()
    builders = {
        "gpt": (lambda p: imgs.gpt_disk(p, 64), 64),
        "mbr": (lambda p: imgs.mbr_disk(p, 64), 64),
        "bare": (lambda p: imgs.bare_fs_disk(p, 32), 32),
        "corrupt": (lambda p: imgs.corrupt_gpt_disk(p, 32, "primary-header"), 32),
    }
    out = {}
    for kind, (build, size_mb) in builders.items():
        manifest = build(src / f"{kind}.img")
        ivd = bed.vcsim.create_ivd(f"restore-{kind}", size_mb, "LocalDS_0")
        snap = bed.vcsim.create_snapshot(ivd, kind)
        place_image(bed.images, ivd, snap, manifest.path)
        out[kind] = Disk(kind, ivd, snap, manifest, sha256_file(manifest.path))
    return out


def entries(sd: Path) -> set[str]:
    """A snapshot directory's disk entries (info.json and such belong to other features)."""
    return {n for n in os.listdir(sd) if n.endswith(".raw") or n == "volumes"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mounted_under(dirs: set[Path]) -> list[str]:
    """Mount points (from mountinfo) at or below any of `dirs`. Only this test's own volume
    directories are checked: other suites may mount volumes on this machine meanwhile."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [ln.split()[4] for ln in f]
    return [p for p in points if any(p == str(d) or p.startswith(f"{d}/") for d in dirs)]


def volume_dirs(mp: Path, disks: dict[str, Disk], kinds: Iterable[str]) -> set[Path]:
    """Where these disks' volumes/<n> links point (and their parent: the run directory)."""
    out: set[Path] = set()
    for d in (disks[k] for k in kinds):
        vols = d.snapdir(mp) / "volumes"
        if vols.is_dir():
            for n in os.listdir(vols):
                if n.endswith(".error"):  # a volume that was not mounted, and why
                    continue
                target = Path(os.readlink(vols / n))
                out |= (
                    {target, target.parent} if target.parent.name.startswith("ivdfs-") else {target}
                )
    return out


def assert_nothing_left(
    bed: Bed, disks: dict[str, Disk], mp: Path, dirs: set[Path] = frozenset()
) -> None:
    assert not mounted_at(mp)
    assert loop_devices_of(mp, bed.images) == []
    assert mounted_under(set(dirs)) == []
    assert not [d for d in dirs if d.exists()], "volume directories left behind"
    for d in disks.values():
        assert sha256_file(d.manifest.path) == d.sha256, f"{d.kind} source image changed"
        placed = bed.images / d.ivd.id / f"{d.snapshot}.raw"
        assert sha256_file(placed) == d.sha256, f"{d.kind} served image changed"


def find(root: Path, rel: str) -> Path:
    """`rel` under `root`, matching names case-insensitively: fusefat shows the 8.3 names
    that mcopy wrote (upper case) and ignores their lower-case flags."""
    p = root
    for part in rel.split("/"):
        names = {n.lower(): n for n in os.listdir(p)}
        p = p / names[part.lower()]
    return p


def check_volume(vol: Path, part: imgs.PartitionManifest, scratch: Path) -> None:
    """cp, rsync -a and grep -r reach every known file with the manifest's content."""
    assert vol.is_symlink() and vol.resolve().is_dir()
    for rel, digest in part.files.items():
        assert sha256_file(find(vol, rel)) == digest, f"{vol}/{rel}"
    cp = scratch / f"cp-{part.number}"
    subprocess.run(["cp", str(find(vol, "blob.bin")), str(cp)], check=True)
    assert sha256_file(cp) == part.files["blob.bin"]
    dest = scratch / f"rsync-{part.number}"
    subprocess.run(["rsync", "-a", f"{vol}/", f"{dest}/"], check=True)
    for rel, digest in part.files.items():
        assert sha256_file(find(dest, rel)) == digest, f"rsync copy of {rel}"
    grep = subprocess.run(
        ["grep", "-rl", f"ivdfs-needle-{part.number}", f"{vol}/"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    hits = {Path(p).name.lower() for p in grep.stdout.split()}
    assert {"needle.txt", "readme.txt"} <= hits


@pytest.mark.allow_log("partition table")
def test_partition_windows(bed: Bed, disks: dict[str, Disk], mountpoint: Path) -> None:
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, mountpoint) as m:
        for kind in ("gpt", "mbr"):
            d = disks[kind]
            sd = d.snapdir(mountpoint)
            expected = {"disk.raw"} | {f"part{p.number}.raw" for p in d.manifest.partitions}
            assert entries(sd) == expected
            src = d.manifest.path.read_bytes()
            for p in d.manifest.partitions:
                f = sd / f"part{p.number}.raw"
                assert f.stat().st_size == p.length
                assert f.stat().st_mode & 0o777 == 0o444
                assert sha256_file(f) == sha(src[p.start : p.start + p.length]), f"{kind} {f}"
                if kind == "gpt" and p.number == 1:  # nothing but this partition read so far
                    st = json.loads((mountpoint / ".ivdfs" / "stats").read_text())
                    # A partition read from start to end is a scan, read ahead like disk.raw.
                    assert st["cache"]["prefetched"] > 0
                with open(f, "rb", buffering=0) as fh:  # exact at and across EOF
                    end = p.start + p.length
                    assert os.pread(fh.fileno(), 4096, p.length - 100) == src[end - 100 : end]
                    assert os.pread(fh.fileno(), 4096, p.length) == b""
                with pytest.raises(OSError) as e:
                    os.open(f, os.O_WRONLY)
                assert e.value.errno == errno.EROFS
            assert sha256_file(sd / "disk.raw") == d.sha256
        # No table: only disk.raw, which reads as before.
        bare = disks["bare"]
        assert entries(bare.snapdir(mountpoint)) == {"disk.raw"}
        assert sha256_file(bare.snapdir(mountpoint) / "disk.raw") == bare.sha256
        # A damaged primary GPT: the backup is used, with one log line.
        bad = disks["corrupt"]
        sd = bad.snapdir(mountpoint)
        assert entries(sd) == {"disk.raw", "part1.raw", "part2.raw"}
        src = bad.manifest.path.read_bytes()
        p1 = bad.manifest.partitions[0]
        assert sha256_file(sd / "part1.raw") == sha(src[p1.start : p1.start + p1.length])
        assert sha256_file(sd / "disk.raw") == bad.sha256
        assert m.unmount() == 0
        table_lines = [ln for ln in m.log().splitlines() if "partition table" in ln]
        assert len(table_lines) == 1 and "primary GPT is invalid" in table_lines[0]
        assert m.unexpected_log_records(allowed=("partition table",)) == []
    assert_standin_log_clean(bed, {d.ivd.id for d in disks.values()})
    assert_nothing_left(bed, disks, mountpoint)


@pytest.mark.allow_log("injected Open failure", "cannot open the disk", "VixDiskLib_Open")
def test_disk_that_fails_to_open_still_lists(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, mountpoint, VDDK_STANDIN_FAIL_OPEN="1") as m:
        sd = disks["gpt"].snapdir(mountpoint)
        assert entries(sd) == {"disk.raw"}
        with pytest.raises(OSError) as e:
            (sd / "disk.raw").read_bytes()
        assert e.value.errno == errno.EIO
        assert m.unmount() == 0
        assert "cannot open the disk (will try again)" in m.log()
    # Every failed Open released its connection and its PrepareForAccess.
    lines = bed.log_lines()
    connects = [c for c in call_lines(lines, "ConnectEx") if c["err"] == "0"]
    assert connects and len(call_lines(lines, "Disconnect")) == len(connects)
    prepares = call_lines(lines, "PrepareForAccess")
    assert prepares and len(prepares) == len(call_lines(lines, "EndAccess"))
    assert not [ln for ln in lines if "VIOLATION" in ln]


# Volume numbers each image shows: partition numbers, 0 for the bare filesystem.
EXPECTED_VOLUMES = {"gpt": ["1", "2", "3"], "mbr": ["1", "5", "6"], "bare": ["0"]}


def parts_of(d: Disk) -> dict[str, imgs.PartitionManifest]:
    if d.manifest.whole_disk is not None:
        return {"0": d.manifest.whole_disk}
    return {str(p.number): p for p in d.manifest.partitions if p.fs is not None}


@pytest.mark.allow_log("partition table", "not mounted")
def test_kernel_volumes(bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path) -> None:
    bed.standin_log.unlink(missing_ok=True)
    m = Mount(bed, mountpoint, "--volumes", "kernel")
    try:
        for kind, names in EXPECTED_VOLUMES.items():
            d = disks[kind]
            vols = d.snapdir(mountpoint) / "volumes"
            assert sorted(os.listdir(vols)) == names
            for n, part in parts_of(d).items():
                target = Path(os.readlink(vols / n))
                assert target.parent.name.startswith("ivdfs-")
                assert target.parent.stat().st_mode & 0o777 == 0o700
                check_volume(vols / n, part, tmp_path)
        # The corrupt disk's ext4 (via the backup GPT) mounts; its unformatted partition is
        # skipped with a log line.
        corrupt_vols = disks["corrupt"].snapdir(mountpoint) / "volumes"
        assert sorted(os.listdir(corrupt_vols)) == ["1", "2.error"]
        assert (corrupt_vols / "2.error").read_text() == "no recognised filesystem\n"
        assert loop_devices_of(mountpoint), "kernel volumes read through our own disk.raw"
        # The loop devices keep the FUSE mount busy: fusermount3 -u is refused, nothing breaks.
        r = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
        assert r.returncode != 0 and "busy" in r.stderr.lower()
        assert mounted_at(mountpoint) and m.proc.poll() is None
        dirs = volume_dirs(mountpoint, disks, disks)
        assert len(dirs) == 1 + 3 + 3 + 1 + 1  # the run directory and 8 volumes
        assert mounted_under(dirs) != []
        # `ivdfs umount` sees the mount busy and has ivdfs detach its volumes first.
        assert m.unmount("ivdfs") == 0, m.log()
    finally:
        if m.proc.poll() is None:
            m.unmount("SIGTERM")
    log = m.log()
    assert "volume 2 skipped: no recognised filesystem" in log
    assert m.unexpected_log_records(allowed=("partition table",)) == []
    assert_standin_log_clean(bed, {d.ivd.id for d in disks.values()})
    assert_nothing_left(bed, disks, mountpoint, dirs)


def handles_of(lines: list[str], ivd: Ivd) -> tuple[set[str], set[str]]:
    """The stand-in handles opened on `ivd`'s disks, and those of them closed."""
    opened = {o["handle"] for o in call_lines(lines, "Open") if o.get("path") == ivd.id}
    closed = {c["handle"] for c in call_lines(lines, "Close")} & opened
    return opened, closed


@pytest.mark.allow_log("partition table")
def test_guest_volumes_hold_their_disk_past_the_idle_timeout(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    """A mounted guest volume is use: its disk stays open while another disk, used and let
    go at the same time, is closed by the idle timeout; stats say what volumes hold."""
    bed.standin_log.unlink(missing_ok=True)
    held, other = disks["bare"], disks["mbr"]
    with Mount(bed, mountpoint, "--volumes", "kernel", "--idle-timeout", "0.3") as m:
        assert os.listdir(held.snapdir(mountpoint) / "volumes") == ["0"]
        with open(other.snapdir(mountpoint) / "disk.raw", "rb") as f:
            f.read(4096)

        def other_closed() -> bool:
            opened, closed = handles_of(bed.log_lines(), other.ivd)
            return bool(opened) and opened == closed

        wait_for(other_closed, what="the idle disk's Close")  # the idle timeout has passed
        opened, closed = handles_of(bed.log_lines(), held.ivd)
        assert opened and opened != closed, "the volume's disk was closed under it"
        doc = json.loads((mountpoint / ".ivdfs" / "stats").read_text())
        assert doc["tree"]["volumes_mounted"] == 1 and doc["tree"]["snapshots_with_volumes"] == 1
        assert doc["disks"]["held_disks"] >= 1
        assert m.unmount("ivdfs") == 0, m.log()
    opened, closed = handles_of(bed.log_lines(), held.ivd)
    assert opened == closed
    assert_standin_log_clean(bed, {held.ivd.id, other.ivd.id})
    assert_nothing_left(bed, disks, mountpoint)


def test_4kn_gpt_disk(bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path) -> None:
    """A 4Kn disk (GetInfo: 4096-byte logical sectors; VDDK still counts 512-byte sectors):
    its GPT sits at byte 4096 and counts 4096-byte LBAs. Read as a 512-byte disk it would show
    no partition (the protective MBR's GPT header is not at byte 512). Every partN.raw and
    disk.raw read byte-exact; a guest volume mounts; info.json tells the sector size."""
    manifest = imgs.gpt_4kn_disk(tmp_path / "4kn.img", 64)
    src = manifest.path.read_bytes()
    assert src[4096:4104] == b"EFI PART" and src[512:520] != b"EFI PART"
    ivd = bed.vcsim.create_ivd("restore-4kn", 64, "LocalDS_0")
    snap = bed.vcsim.create_snapshot(ivd, "4kn")
    place_image(bed.images, ivd, snap, manifest.path, sector_size=4096)
    d = Disk("4kn", ivd, snap, manifest, sha(src))
    bed.standin_log.unlink(missing_ok=True)
    m = Mount(bed, mountpoint, "--volumes", "kernel")
    dirs: set[Path] = set()
    try:
        sd = d.snapdir(mountpoint)
        assert entries(sd) == {"disk.raw", "part1.raw", "part2.raw", "volumes"}
        for p in manifest.partitions:
            f = sd / f"part{p.number}.raw"
            assert f.stat().st_size == p.length
            assert sha256_file(f) == sha(src[p.start : p.start + p.length]), f
            with open(f, "rb", buffering=0) as fh:
                end = p.start + p.length
                assert os.pread(fh.fileno(), 8192, p.length - 100) == src[end - 100 : end]
        assert sha256_file(sd / "disk.raw") == d.sha256
        doc = json.loads((sd / "info.json").read_text())
        assert doc["provenance"]["logical_sector_size"] == 4096
        assert doc["provenance"]["capacity_sectors"] == len(src) // 512  # VDDK's unit
        vols = sd / "volumes"
        assert sorted(os.listdir(vols)) == ["1", "2"]
        check_volume(vols / "1", manifest.partitions[0], tmp_path)
        dirs = volume_dirs(mountpoint, {"4kn": d}, ["4kn"])
        assert m.unmount("ivdfs") == 0, m.log()
    finally:
        if m.proc.poll() is None:
            m.unmount("SIGTERM")
    infos = call_lines(bed.log_lines(), "GetInfo")
    assert infos and all(i["logical"] == "4096" for i in infos)
    assert_standin_log_clean(bed, {ivd.id})
    assert_nothing_left(bed, {"4kn": d}, mountpoint, dirs)
