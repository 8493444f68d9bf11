"""Real mounts of `ivdfs mount` against vcsim and the stand-in VDDK: tree, bytes, lifecycle."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mounting import (
    Bed,
    Mount,
    assert_standin_log_clean,
    fuse_mounts,
    mounted_at,
    sha256_file,
    wait_for,
)
from tests.testbed.vsphere import Ivd, place_image

MiB = 1024 * 1024


@dataclass(frozen=True)
class Image:
    ivd: Ivd
    snapshot: str
    path: Path
    sha256: str


def write_image(path: Path, size: int, seed: int) -> str:
    rng = random.Random(seed)
    data = rng.randbytes(size)
    # A zero run and a repeated block make misplaced reads visible too.
    data = data[: size // 3] + bytes(MiB) + data[size // 3 + MiB :]
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def images(bed: Bed) -> list[Image]:
    v = bed.vcsim
    out: list[Image] = []
    a = v.create_ivd("alpha", 8, "LocalDS_0")
    b = v.create_ivd("beta", 5, "LocalDS_1")
    v.create_ivd("gamma-no-snapshots", 4, "LocalDS_0")
    src = bed.root / "src"
    src.mkdir()
    for ivd, seeds in ((a, (1, 2)), (b, (3,))):
        for seed in seeds:
            snap = v.create_snapshot(ivd, f"seed {seed}")
            p = src / f"{ivd.id}-{snap}.raw"
            digest = write_image(p, ivd.capacity_bytes, seed)
            place_image(bed.images, ivd, snap, p)
            out.append(Image(ivd, snap, p, digest))
    return out


def test_tree_bytes_and_read_only(bed: Bed, images: list[Image], mountpoint: Path) -> None:
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, mountpoint, "--block-size", "256K") as m:
        assert {"LocalDS_0", "LocalDS_1"} <= set(os.listdir(mountpoint))
        a, b = images[0].ivd, images[2].ivd
        ds0 = os.listdir(mountpoint / "LocalDS_0")
        assert a.id in ds0 and b.id not in ds0 and len(ds0) == 2
        assert os.listdir(mountpoint / "LocalDS_1") == [b.id]
        assert sorted(os.listdir(mountpoint / "LocalDS_0" / a.id)) == sorted(
            [*(i.snapshot for i in images[:2]), "info.json"]
        )
        empty = next(n for n in ds0 if n != a.id)
        assert os.listdir(mountpoint / "LocalDS_0" / empty) == ["info.json"]
        assert not (mountpoint / "LocalDS_0" / "no-such-ivd").exists()

        for img in images:
            disk = mountpoint / img.ivd.datastore_name / img.ivd.id / img.snapshot / "disk.raw"
            st = disk.stat()
            assert st.st_size == img.ivd.capacity_bytes
            assert st.st_mode & 0o777 == 0o444
            assert sha256_file(disk) == img.sha256, f"{disk} differs from its source"

        # Unaligned random reads and reads at and across EOF, compared with the source.
        rng = random.Random(7)
        for img in images:
            src = img.path.read_bytes()
            disk = mountpoint / img.ivd.datastore_name / img.ivd.id / img.snapshot / "disk.raw"
            fd = os.open(disk, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            os.close(fd)  # O_DIRECT is accepted (it bypasses the page cache)
            with open(disk, "rb", buffering=0) as f:
                for _ in range(200):
                    off = rng.randrange(0, len(src) + 4096)
                    n = rng.choice([1, 333, 4096, 65537, 400_000, 1_500_000])
                    assert os.pread(f.fileno(), n, off) == src[off : off + n]
                size = len(src)
                assert os.pread(f.fileno(), 100, size - 7) == src[-7:]
                assert os.pread(f.fileno(), 100, size) == b""

        # Writes of every kind are refused with EROFS.
        disk = mountpoint / a.datastore_name / a.id / images[0].snapshot / "disk.raw"
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                os.open(disk, flags)
            assert e.value.errno == errno.EROFS
        for action in (
            lambda: (mountpoint / "LocalDS_0" / "new").mkdir(),
            lambda: (mountpoint / "LocalDS_0" / "new.txt").write_bytes(b"x"),
            lambda: disk.unlink(),
            lambda: disk.chmod(0o644),
            lambda: os.setxattr(disk, "user.x", b"1"),
        ):
            with pytest.raises(OSError) as e:
                action()
            assert e.value.errno == errno.EROFS
        assert m.unmount() == 0
    assert not mounted_at(mountpoint)
    assert m.unexpected_log_records() == []
    assert_standin_log_clean(bed, {a.id, b.id})
    # The sources were never touched.
    for img in images:
        assert sha256_file(img.path) == img.sha256
        placed = bed.images / img.ivd.id / f"{img.snapshot}.raw"
        assert sha256_file(placed) == img.sha256


# The 4 KiB read starts the kernel's read-ahead; an unmount right after it may abort those
# requests before pyfuse3 answers them, which pyfuse3 logs as an ERROR (fuse_reply_* failed).
@pytest.mark.allow_log("fuse_read\\(\\): fuse_reply_\\* failed with No such file or directory")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "fusermount"])
def test_stop_cleanly(bed: Bed, images: list[Image], mountpoint: Path, how: str) -> None:
    bed.standin_log.unlink(missing_ok=True)
    img = images[2]
    m = Mount(bed, mountpoint)
    disk = mountpoint / img.ivd.datastore_name / img.ivd.id / img.snapshot / "disk.raw"
    with open(disk, "rb") as f:
        assert f.read(4096) == img.path.read_bytes()[:4096]
    assert m.unmount(how) == 0, m.log()
    assert not mounted_at(mountpoint)
    assert_standin_log_clean(bed, {img.ivd.id})


@pytest.mark.allow_log("was aborted while mounted")
def test_an_aborted_connection_is_exit_9_and_leaves_no_dead_mount(
    bed: Bed, images: list[Image], mountpoint: Path
) -> None:
    """The kernel ends the session (the FUSE connection aborted through sysfs, as an admin or
    a watchdog does): ivdfs exits 9 with one line, unmounts the dead mount and pairs every
    Prepare, instead of exiting 0 and leaving "Transport endpoint is not connected"."""
    bed.standin_log.unlink(missing_ok=True)
    img = images[1]
    m = Mount(bed, mountpoint)
    disk = mountpoint / img.ivd.datastore_name / img.ivd.id / img.snapshot / "disk.raw"
    with open(disk, "rb") as f:
        assert f.read(4096) == img.path.read_bytes()[:4096]
    conn = Path(f"/sys/fs/fuse/connections/{os.minor(os.stat(mountpoint).st_dev)}")
    # Raised after INIT, so one slow disk's readers cannot take every background place.
    wait_for(lambda: (conn / "max_background").read_text() == "256\n", what="max_background")
    assert (conn / "congestion_threshold").read_text() == "192\n"
    (conn / "abort").write_text("1\n")
    assert m.proc.wait(timeout=30) == 9, m.log()
    assert not mounted_at(mountpoint)
    errors = [ln for ln in m.log().splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "was aborted while mounted" in errors[0], errors
    assert "Traceback" not in m.log()
    assert_standin_log_clean(bed, {img.ivd.id})


def test_detached_mount_reports_ready_and_errors(
    bed: Bed, images: list[Image], mountpoint: Path
) -> None:
    img = images[0]
    r = subprocess.run(
        bed.mount_args(mountpoint), env=bed.env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    try:
        assert mounted_at(mountpoint)  # ready when the command returns, not later
        disk = mountpoint / img.ivd.datastore_name / img.ivd.id / img.snapshot / "disk.raw"
        assert sha256_file(disk) == img.sha256
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    wait_for(lambda: str(mountpoint) not in fuse_mounts(), what="unmount")

    bad = subprocess.run(
        bed.mount_args(mountpoint),
        env=bed.env(IVDFS_PASSWORD="wrong"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 4
    assert "rejected" in bad.stderr and "Traceback" not in bad.stderr
    assert bed.vcsim.password not in bad.stderr
    assert not mounted_at(mountpoint)


def test_mount_is_private_to_the_mounting_user(
    bed: Bed, images: list[Image], mountpoint: Path
) -> None:
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    os.chmod(mountpoint.parent, 0o755)
    with Mount(bed, mountpoint) as m:
        r = subprocess.run([*nobody, "ls", str(mountpoint)], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr
        assert os.listdir(mountpoint)
        assert m.unmount() == 0


def test_password_never_in_argv_or_logs(bed: Bed, images: list[Image], mountpoint: Path) -> None:
    with Mount(bed, mountpoint, "--debug") as m:
        with open(f"/proc/{m.proc.pid}/cmdline", "rb") as f:
            assert bed.vcsim.password.encode() not in f.read()
        img = images[0]
        disk = mountpoint / img.ivd.datastore_name / img.ivd.id / img.snapshot / "disk.raw"
        disk.read_bytes()
        assert m.unmount() == 0
    assert bed.vcsim.password not in m.log()
    assert bed.vcsim.password not in bed.standin_log.read_text()


def test_size_is_the_disks_own(bed: Bed, mountpoint: Path) -> None:
    """vCenter gives an IVD's current capacity in whole MiB; a snapshot taken before the IVD
    grew, or a disk that is not a whole number of MiB, must still show and read every byte."""
    v = bed.vcsim
    ivd = v.create_ivd("grown", 8, "LocalDS_2")
    small, odd = v.create_snapshot(ivd, "before growing"), v.create_snapshot(ivd, "odd")
    sources = {
        small: random.Random(1).randbytes(4 * MiB),
        odd: random.Random(2).randbytes(MiB + 1536),
    }
    for snap, data in sources.items():
        src = bed.root / f"grown-{snap}.raw"
        src.write_bytes(data)
        place_image(bed.images, ivd, snap, src)
    with Mount(bed, mountpoint) as m:
        for snap, data in sources.items():
            snapdir = mountpoint / ivd.datastore_name / ivd.id / snap
            os.listdir(snapdir)  # listing opens the disk (for its partition table)
            disk = snapdir / "disk.raw"
            assert disk.stat().st_size == len(data)
            assert disk.read_bytes() == data
        assert m.unmount() == 0
