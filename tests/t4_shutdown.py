"""Every way of stopping, with reads in flight; a crash leaves a visibly broken mount."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.mounting import Bed, Mount, assert_standin_log_clean, mounted_at, wait_for
from tests.testbed.vsphere import place_image

MiB = 1 << 20


@pytest.fixture(scope="module")
def disks(bed: Bed) -> list[tuple[str, Path]]:
    out = []
    for i, ds in enumerate(("LocalDS_0", "LocalDS_1")):
        ivd = bed.vcsim.create_ivd(f"shutdown-{i}", 64, ds)
        snap = bed.vcsim.create_snapshot(ivd, "s")
        src = bed.root / f"shutdown-{i}.raw"
        src.write_bytes(os.urandom(64 * MiB))
        place_image(bed.images, ivd.id, snap, src)
        out.append((ivd.id, Path(ds) / ivd.id / snap / "disk.raw"))
    return out


def start_readers(mp: Path, disks: list[tuple[str, Path]]) -> list[subprocess.Popen[bytes]]:
    """dd readers that are mid-way when the stop comes (the stand-in adds latency)."""
    cmd = ["dd", "of=/dev/null", "bs=1M"]
    return [
        subprocess.Popen([*cmd, f"if={mp / rel}"], stderr=subprocess.DEVNULL) for _, rel in disks
    ]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_stop_with_reads_in_flight(
    bed: Bed, disks: list[tuple[str, Path]], tmp_path: Path, how: str
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    m = Mount(bed, tmp_path / "mnt", VDDK_STANDIN_LATENCY_US="20000")
    readers = start_readers(m.mountpoint, disks)
    # Wait until both disks are open and reading, then stop.
    wait_for(lambda: sum(" Read" in ln for ln in bed.log_lines()) >= 4, what="reads")
    assert m.unmount(how) == 0, m.log()
    for r in readers:
        r.wait(timeout=30)  # the readers end (with an error), nothing hangs
    assert not mounted_at(m.mountpoint)
    assert_standin_log_clean(bed, {ivd for ivd, _ in disks})


def test_fusermount_after_readers_finish(
    bed: Bed, disks: list[tuple[str, Path]], tmp_path: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    m = Mount(bed, tmp_path / "mnt")
    readers = start_readers(m.mountpoint, disks)
    assert all(r.wait(timeout=60) == 0 for r in readers)
    assert m.unmount("fusermount") == 0
    assert_standin_log_clean(bed, {ivd for ivd, _ in disks})


def test_crash_leaves_the_mountpoint_visibly_broken(
    bed: Bed, disks: list[tuple[str, Path]], tmp_path: Path
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
        subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True)
