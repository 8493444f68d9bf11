"""Disks, connections and access follow use (issue 10), through real mounts, with the stand-in's
call log as the witness: listing opens nothing for long, idle disks close and end their
access, a cap on connections holds under load without wrong bytes or a stall, and nodes that a
refresh removes are freed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import threading
from pathlib import Path

import pytest

from ivdfs.vddk.service import MIN_OPEN
from tests import bench_lifetime
from tests.mounting import Bed, Mount, call_lines, most_connections, wait_for
from tests.testbed.vsphere import Ivd, place_image

MiB = 1 << 20
N_SNAPSHOTS = 6


@pytest.fixture(scope="module")
def snapshots(bed: Bed) -> list[tuple[Ivd, str, bytes]]:
    """Six snapshots of three IVDs on one datastore, 3 MiB each, with distinct bytes."""
    out = []
    for i in range(N_SNAPSHOTS // 2):
        ivd = bed.vcsim.create_ivd(f"life-{i}", 3, "LocalDS_1")
        for j in range(2):
            snap = bed.vcsim.create_snapshot(ivd, f"s{j}")
            data = random.Random(f"{i}-{j}").randbytes(3 * MiB)
            src = bed.root / f"life-{i}-{j}.raw"
            src.write_bytes(data)
            place_image(bed.images, ivd, snap, src)
            out.append((ivd, snap, data))
    return out


def disk(mp: Path, ivd: Ivd, snap: str) -> Path:
    return mp / ivd.datastore_name / ivd.id / snap / "disk.raw"


def counts(bed: Bed) -> dict[str, int]:
    lines = bed.log_lines()
    return {
        "opens": sum(o["err"] == "0" for o in call_lines(lines, "Open")),
        "closes": len(call_lines(lines, "Close")),
        "prepares": len(call_lines(lines, "PrepareForAccess")),
        "ends": len(call_lines(lines, "EndAccess")),
    }


def max_connections(bed: Bed) -> int:
    return most_connections(bed.log_lines())


def stats(mp: Path) -> dict[str, dict[str, int]]:
    return json.loads((mp / ".ivdfs" / "stats").read_text())  # type: ignore[no-any-return]


def test_listing_opens_nothing_for_long(
    bed: Bed, snapshots: list[tuple[Ivd, str, bytes]], tmp_path: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, tmp_path / "mnt", "--idle-timeout", "1") as m:
        for ivd, snap, data in snapshots:
            d = disk(m.mountpoint, ivd, snap).parent
            assert "disk.raw" in os.listdir(d)
            assert (d / "disk.raw").stat().st_size == len(data)
        listed = counts(bed)
        assert listed["opens"] == N_SNAPSHOTS and listed["prepares"] == N_SNAPSHOTS // 2
        # Idle: every disk closes and every IVD ends its access, while the mount stays up.
        wait_for(lambda: counts(bed)["closes"] == N_SNAPSHOTS, timeout=30, what="idle closes")
        wait_for(lambda: counts(bed)["ends"] == N_SNAPSHOTS // 2, timeout=30, what="EndAccess")
        assert stats(m.mountpoint)["disks"]["open_disks"] == 0
        # Listing again, and stat: the result was kept, no VDDK call at all.
        before = len(bed.log_lines())
        for ivd, snap, data in snapshots:
            assert disk(m.mountpoint, ivd, snap).stat().st_size == len(data)
            assert "disk.raw" in os.listdir(disk(m.mountpoint, ivd, snap).parent)
        assert len(bed.log_lines()) == before
        assert m.unmount() == 0


def test_a_disk_reopened_after_idle_reads_right_and_prepares_again(
    bed: Bed, snapshots: list[tuple[Ivd, str, bytes]], tmp_path: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    ivd, snap, data = snapshots[0]
    with Mount(bed, tmp_path / "mnt", "--idle-timeout", "0.2", "--cache-size", "2M",
               "--block-size", "1M", "--prefetch", "0") as m:  # fmt: skip
        path = disk(m.mountpoint, ivd, snap)
        assert path.read_bytes() == data
        wait_for(lambda: counts(bed)["closes"] == counts(bed)["opens"], timeout=30,
                 what="the idle close")  # fmt: skip
        idle = counts(bed)
        assert idle["prepares"] == idle["ends"] >= 1
        # Out of the page cache; the block cache keeps at most two of the three blocks:
        # reading again needs VDDK.
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
        again = counts(bed)
        assert again["opens"] == idle["opens"] + 1 and again["prepares"] == idle["prepares"] + 1
        assert m.unmount() == 0


def test_open_files_beyond_the_cap(
    bed: Bed, snapshots: list[tuple[Ivd, str, bytes]], tmp_path: Path
) -> None:
    """Six disks open at once with --max-connections 2, read in round robin and concurrently:
    every byte right, never more than two connections open, and no stall."""
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, tmp_path / "mnt", "--max-connections", "2", "--cache-size", "4M",
               "--prefetch", "2", VDDK_STANDIN_LATENCY_US="2000") as m:  # fmt: skip
        files = [open(disk(m.mountpoint, ivd, snap), "rb") for ivd, snap, _ in snapshots]
        try:
            # Round robin, 256 KiB at a time, every file open all along.
            got = [bytearray() for _ in files]
            while any(len(g) < 3 * MiB for g in got):
                for f, g in zip(files, got, strict=True):
                    g += f.read(256 << 10)
            assert [bytes(g) for g in got] == [d for _, _, d in snapshots]
            # Concurrently, random offsets.
            errors: list[str] = []

            def reader(k: int) -> None:
                rng = random.Random(k)
                ivd, snap, data = snapshots[k % N_SNAPSHOTS]
                with open(disk(m.mountpoint, ivd, snap), "rb", buffering=0) as f:
                    for _ in range(40):
                        off = rng.randrange(0, len(data) - 4096)
                        f.seek(off)
                        if f.read(4096) != data[off : off + 4096]:
                            errors.append(f"wrong bytes at {off} of {snap}")

            threads = [threading.Thread(target=reader, args=(k,)) for k in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads), "a reader stalled"
            assert errors == []
            s = stats(m.mountpoint)["disks"]
            assert s["evictions"] > 0 and s["max_connections"] == 2
        finally:
            for f in files:
                f.close()
        assert m.unmount() == 0
    assert max_connections(bed) <= 2


def test_an_open_waits_for_a_connection_in_use_and_says_so(
    bed: Bed, snapshots: list[tuple[Ivd, str, bytes]], tmp_path: Path
) -> None:
    """With one connection allowed and a read in flight on it, a second disk waits (it never
    evicts a disk mid-read), then reads right; the wait is counted in the stats."""
    (slow, slow_snap, slow_data), (fast, fast_snap, fast_data) = snapshots[0], snapshots[2]
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, tmp_path / "mnt", "--max-connections", "1", "--prefetch", "0",
               VDDK_STANDIN_SLOW_IVD=slow.id, VDDK_STANDIN_SLOW_US="1500000") as m:  # fmt: skip
        got: list[bytes] = []

        def read_slow() -> None:
            with open(disk(m.mountpoint, slow, slow_snap), "rb", buffering=0) as f:
                got.append(f.read(4096))

        t = threading.Thread(target=read_slow)
        t.start()
        wait_for(lambda: any(" ReadAsync " in ln or " Read " in ln for ln in bed.log_lines()),
                 what="the slow read in flight")  # fmt: skip
        with open(disk(m.mountpoint, fast, fast_snap), "rb", buffering=0) as f:
            assert f.read(4096) == fast_data[:4096]
        t.join(timeout=60)
        assert got == [slow_data[:4096]]
        s = stats(m.mountpoint)["disks"]
        assert s["waits"] >= 1 and s["wait_seconds"] > 0
        assert m.unmount() == 0
    assert max_connections(bed) == 1


def test_more_busy_disks_than_connections_take_turns_without_churn(
    bed: Bed, tmp_path: Path
) -> None:
    """Issue 28's load, small: ten readers over five disks (two each, every file held open),
    64 KiB at random, every read checked, with --max-connections 2 --idle-timeout 0.5 and a
    4 MiB cache. Access follows the IVDs' use, not their connections: each IVD is prepared
    once and ended once, however often its disk gave up its connection. Opens follow the turns
    of a fair schedule (a disk in use keeps its connection MIN_OPEN seconds, then the one that
    waited longest gets it), not the reads; no reader waits forever."""
    disks = bench_lifetime.make_disks(bed, 5, 8, name="turns")
    r = bench_lifetime.run(bed, tmp_path / "mnt", disks, 10, reads=800,
                           VDDK_STANDIN_LATENCY_US="1000")  # fmt: skip
    assert r["errors"] == [] and r["hung_readers"] == 0 and r["exit"] == 0, r
    assert r["reads"] == 10 * 800
    assert r["prepares"] == r["end_accesses"] == 5, r
    assert r["most_connections"] == 2
    # Two connections, each changing hands at most once per MIN_OPEN while disks wait.
    turns = math.ceil(r["seconds"] / MIN_OPEN) + 1
    assert 5 <= r["opens"] <= 5 + 2 * turns, r


def test_nodes_removed_by_refresh_are_freed(bed: Bed, tmp_path: Path) -> None:
    """Snapshots created and deleted every cycle: the tree's nodes and the mount's memory stay
    bounded; removed nodes are freed once the kernel forgets them."""
    v = bed.vcsim
    ivd = v.create_ivd("churn", 1, "LocalDS_2")
    src = bed.root / "churn.raw"
    src.write_bytes(bytes(MiB))
    ivd_dir_rel = Path(ivd.datastore_name) / ivd.id
    with Mount(bed, tmp_path / "mnt", "--refresh", "0.05") as m:
        ivd_dir = m.mountpoint / ivd_dir_rel

        def cycle() -> None:
            snap = v.create_snapshot(ivd, "churn")
            place_image(bed.images, ivd, snap, src)
            wait_for(lambda: snap in os.listdir(ivd_dir), what="the new snapshot")
            os.listdir(ivd_dir / snap)  # its disk.raw, info.json and lookups
            v.delete_snapshot(ivd, snap)
            wait_for(lambda: snap not in os.listdir(ivd_dir), what="the deletion")

        def rss() -> int:
            """KiB resident, the least of five cycles' readings: a single reading may catch a
            refresh in flight in the background (its replies, a thread's malloc arena)."""
            readings = []
            for _ in range(5):
                cycle()
                with open(f"/proc/{m.proc.pid}/status") as f:
                    line = next(ln for ln in f if ln.startswith("VmRSS"))
                readings.append(int(line.split()[1]))
            return min(readings)

        for _ in range(30):  # warm-up: the thread pool and its malloc arenas settle
            cycle()
        tree = stats(m.mountpoint)["tree"]
        rss_before = rss()
        for _ in range(40):
            cycle()
        rss_after = rss()
        after = stats(m.mountpoint)["tree"]
        # 50 more cycles added no node that stayed, and freed the nodes they made.
        assert after["nodes"] <= tree["nodes"] + 4
        assert after["nodes_freed"] >= tree["nodes_freed"] + 50
        assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after)
        assert m.unmount() == 0
