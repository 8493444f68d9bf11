"""The tree follows vCenter: after the --refresh interval a listing shows new IVDs and
snapshots and drops deleted ones; inodes stay stable; open files keep their data."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from tests.mounting import Bed, Mount, wait_for
from tests.testbed.vsphere import place_image

MiB = 1024 * 1024


def entries(path: Path) -> set[str]:
    return set(os.listdir(path)) - {"info.json"}


def links_to(by_name: Path, snap: str) -> bool:
    """Whether a link of `by_name` points at `snap`. A listing is shown as it is while it
    refreshes in the background, so an entry it showed may be gone a moment later."""
    for e in os.listdir(by_name):
        try:
            if os.readlink(by_name / e).endswith(snap):
                return True
        except FileNotFoundError:
            continue
    return False


def test_new_and_deleted_snapshots_and_ivds_follow_the_ttl(bed: Bed, mountpoint: Path) -> None:
    v = bed.vcsim
    ivd = v.create_ivd("moving", 2, "LocalDS_2")
    s1 = v.create_snapshot(ivd, "one")
    src = bed.root / "one.raw"
    data = os.urandom(2 * MiB)
    src.write_bytes(data)
    place_image(bed.images, ivd, s1, src)
    with Mount(bed, mountpoint, "--refresh", "0.3") as m:
        ds_dir = mountpoint / "LocalDS_2"
        ivd_dir = ds_dir / ivd.id
        assert entries(ivd_dir) == {s1}
        s1_ino = (ivd_dir / s1).stat().st_ino
        by_name = mountpoint / "by-name" / "moving"
        f = open(ivd_dir / s1 / "disk.raw", "rb", buffering=0)  # closed below
        try:
            assert f.read(4096) == data[:4096]

            s2 = v.create_snapshot(ivd, "two")
            place_image(bed.images, ivd, s2, src)
            wait_for(lambda: entries(ivd_dir) == {s1, s2}, what="the new snapshot")
            assert (ivd_dir / s1).stat().st_ino == s1_ino  # unchanged entries keep their inode
            s2_ino = (ivd_dir / s2).stat().st_ino
            assert s2_ino > s1_ino  # new inodes, never reused ones
            wait_for(lambda: os.readlink(by_name / "latest").endswith(s2), what="by-name/latest")
            assert (by_name / "latest" / "disk.raw").read_bytes()[:4096] == data[:4096]

            v.delete_snapshot(ivd, s1)
            wait_for(lambda: entries(ivd_dir) == {s2}, what="the deleted snapshot to go")
            wait_for(lambda: not (ivd_dir / s1).exists(), what="its entry to go")
            wait_for(lambda: not links_to(by_name, s1), what="its by-name link to go")
            # The open file: its data, or EIO; never someone else's bytes.
            try:
                assert os.pread(f.fileno(), MiB, MiB) == data[MiB : 2 * MiB]
            except OSError as e:
                assert e.errno == errno.EIO
        finally:
            f.close()

        other = v.create_ivd("arrives", 1, "LocalDS_2")
        wait_for(lambda: other.id in entries(ds_dir), what="the new IVD")
        wait_for(lambda: "arrives" in os.listdir(mountpoint / "by-name"), what="its name")
        v.delete_ivd(other)
        wait_for(lambda: other.id not in entries(ds_dir), what="the deleted IVD to go")
        assert m.unmount() == 0
    assert m.unexpected_log_records() == []


def test_refresh_zero_keeps_the_first_listing(bed: Bed, mountpoint: Path) -> None:
    v = bed.vcsim
    ivd = v.create_ivd("static", 1, "LocalDS_2")
    with Mount(bed, mountpoint, "--refresh", "0") as m:
        ivd_dir = mountpoint / "LocalDS_2" / ivd.id
        assert entries(ivd_dir) == set()
        v.create_snapshot(ivd, "later")
        assert entries(ivd_dir) == set()
        assert m.unmount() == 0
