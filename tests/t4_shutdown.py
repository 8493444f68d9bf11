"""Every way of stopping, with reads in flight; a crash leaves a visibly broken mount."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ivdfs import journal
from tests.mounting import Bed, Mount, assert_standin_log_clean, mounted_at, umount, wait_for
from tests.testbed.vsphere import place_image

MiB = 1 << 20


@pytest.fixture(scope="module")
def disks(bed: Bed) -> list[tuple[str, Path, Path]]:
    """(IVD id, disk.raw relative to the mount point, source image) of two 64 MiB disks."""
    out = []
    for i, ds in enumerate(("LocalDS_0", "LocalDS_1")):
        ivd = bed.vcsim.create_ivd(f"shutdown-{i}", 64, ds)
        snap = bed.vcsim.create_snapshot(ivd, "s")
        src = bed.root / f"shutdown-{i}.raw"
        src.write_bytes(os.urandom(64 * MiB))
        place_image(bed.images, ivd, snap, src)
        out.append((ivd.id, Path(ds) / ivd.id / snap / "disk.raw", src))
    return out


# A reader that checks what it gets: each chunk against the source at the same offset. Exit 0:
# the whole disk, right; 3: wrong bytes or a short file (EOF before the end), the outcome a
# backup must never see; 4: a read failed with an error (its name on stdout).
READER = """
import os, sys
path, source = sys.argv[1], sys.argv[2]
size = os.path.getsize(source)
src = open(source, "rb")
pos, fd = 0, None
try:
    fd = os.open(path, os.O_RDONLY)
    while chunk := os.read(fd, 1 << 20):
        if chunk != src.read(len(chunk)):
            print("wrong bytes at", pos)
            sys.exit(3)
        pos += len(chunk)
except OSError as e:
    print(os.strerror(e.errno), e.errno, pos)
    sys.exit(4)
finally:
    try:
        if fd is not None:
            os.close(fd)  # fails too once the mount is gone
    except OSError:
        pass
if pos != size:
    print("EOF at", pos, "of", size)
    sys.exit(3)
"""
# How a read may fail when the mount goes away under it: ivdfs answers EIO, or the kernel
# finds the FUSE connection gone.
CLEAN_ERRORS = {errno.EIO, errno.ENOTCONN, errno.ECONNABORTED}


def start_readers(mp: Path, disks: list[tuple[str, Path, Path]]) -> list[subprocess.Popen[str]]:
    """Readers that are mid-way when the stop comes (the stand-in adds latency)."""
    argv = [sys.executable, "-c", READER]
    return [
        subprocess.Popen([*argv, str(mp / rel), str(src)], stdout=subprocess.PIPE, text=True)
        for _, rel, src in disks
    ]


def outcome(reader: subprocess.Popen[str]) -> tuple[int, str]:
    """(exit status, what it printed); a reader that hangs fails the test."""
    out, _ = reader.communicate(timeout=30)
    return reader.returncode, out.strip()


def assert_ended_cleanly(readers: list[subprocess.Popen[str]]) -> None:
    for r in readers:
        code, out = outcome(r)
        assert code in (0, 4), out  # the right bytes, or an error: never wrong or short
        if code == 4:
            assert int(out.split()[-2]) in CLEAN_ERRORS, out


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_stop_with_reads_in_flight(
    bed: Bed, disks: list[tuple[str, Path, Path]], tmp_path: Path, how: str
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    m = Mount(bed, tmp_path / "mnt", VDDK_STANDIN_LATENCY_US="20000")
    readers = start_readers(m.mountpoint, disks)
    # Wait until both disks are open and reading, then stop.
    wait_for(lambda: sum(" Read" in ln for ln in bed.log_lines()) >= 4, what="reads")
    assert m.unmount(how) == 0, m.log()
    assert_ended_cleanly(readers)
    assert not mounted_at(m.mountpoint)
    assert journal.find(m.mountpoint) is None
    assert_standin_log_clean(bed, {ivd for ivd, _, _ in disks})


def test_fusermount_after_readers_finish(
    bed: Bed, disks: list[tuple[str, Path, Path]], tmp_path: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    m = Mount(bed, tmp_path / "mnt")
    readers = start_readers(m.mountpoint, disks)
    assert [outcome(r) for r in readers] == [(0, "")] * len(disks)
    assert m.unmount("fusermount") == 0
    assert_standin_log_clean(bed, {ivd for ivd, _, _ in disks})


def test_crash_leaves_the_mountpoint_visibly_broken(
    bed: Bed, disks: list[tuple[str, Path, Path]], tmp_path: Path
) -> None:
    """After a crash `ls` must fail, never show an empty directory that `rsync --delete`
    would take for an empty snapshot."""
    m = Mount(bed, tmp_path / "mnt")
    os.listdir(m.mountpoint)
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=30)
    try:
        with pytest.raises(OSError) as e:
            os.listdir(m.mountpoint)
        assert e.value.errno == errno.ENOTCONN
    finally:
        # The recovery command, not a bare fusermount3: it also ends the dead mount's journal,
        # which would otherwise stay in /run/ivdfs after every run of the suite.
        r = umount(bed, m.mountpoint)
    assert r.returncode == 0, r.stderr
    assert not mounted_at(m.mountpoint)
