"""The fast read path through real mounts: prefetch, one VDDK read per block under concurrent
readers, holes read as zeros without VDDK reads, several handles per snapshot, statistics in
/.ivdfs/stats, on SIGUSR1 and at unmount. Correctness only; speed is measured by scripts/bench.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import Bed, DataDisk, Mount, call_lines, wait_for
from tests.testbed import images as imgs
from tests.testbed.images import block_data, random_disk, sparse_disk
from tests.testbed.vsphere import place_image

MiB = 1 << 20


Disk = DataDisk


@pytest.fixture(scope="module")
def disks(bed: Bed) -> dict[str, Disk]:
    v = bed.vcsim
    out = {}
    src = bed.root / "perf-src"
    src.mkdir()
    for name, size, build in (
        ("full", 48, lambda p: random_disk(p, 48, seed=11)),
        ("sparse", 64, lambda p: sparse_disk(p, 64, 0.5, seed=12)),
    ):
        ivd = v.create_ivd(f"perf-{name}", size, "LocalDS_0")
        snap = v.create_snapshot(ivd, name)
        manifest = build(src / f"{name}.raw")
        place_image(bed.images, ivd, snap, manifest.path)
        out[name] = Disk(ivd, snap, manifest)
    return out


def stats(mountpoint: Path) -> dict[str, Any]:
    return json.loads((mountpoint / ".ivdfs" / "stats").read_text())  # type: ignore[no-any-return]


def sha256_sequential(path: Path, chunk: int = MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def violations(bed: Bed) -> list[str]:
    return [ln for ln in bed.log_lines() if ln.split()[2:3] == ["VIOLATION"]]


def read_requests(bed: Bed) -> list[dict[str, str]]:
    out = []
    for line in bed.log_lines():
        parts = line.split()
        if parts[2:3] in (["Read"], ["ReadAsync"]):
            out.append(dict(p.split("=", 1) for p in parts[1:] if "=" in p))
    return out


@pytest.mark.parametrize("prefetch", ["16", "0"])
def test_sequential_read_prefetches_and_reads_each_block_once(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, prefetch: str
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    d = disks["full"]
    with Mount(bed, mountpoint, "--prefetch", prefetch, VDDK_STANDIN_LATENCY_US="1000") as m:
        assert sha256_sequential(d.path(mountpoint)) == d.manifest.sha256
        s = stats(mountpoint)
        assert s["reads"] == 48 and s["read_bytes"] == 48 * MiB  # every block exactly once
        cache = s["cache"]
        if prefetch == "0":
            assert cache["prefetched"] == 0
        else:
            assert cache["prefetched"] > 0 and cache["prefetch_hits"] > 0
            assert cache["prefetch_failures"] == 0
        assert m.unmount() == 0
    assert m.unexpected_log_records() == []
    assert violations(bed) == []
    reqs = read_requests(bed)
    assert len(reqs) == 48 and all(int(r["n"]) == 2048 for r in reqs)


def test_eight_readers_of_one_region_cause_one_vddk_read_per_block(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    d = disks["full"]
    region = (8 * MiB, 24 * MiB)
    expected = hashlib.sha256(d.manifest.path.read_bytes()[region[0] : region[1]]).hexdigest()
    with Mount(bed, mountpoint, VDDK_STANDIN_LATENCY_US="2000") as m:
        path = d.path(mountpoint)
        got: list[str] = []
        start = threading.Barrier(8)

        def reader(i: int) -> None:
            h = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                start.wait()
                off = region[0]
                while off < region[1]:
                    h.update(os.pread(f.fileno(), 256 * 1024, off))
                    off += 256 * 1024
            got.append(h.hexdigest())

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [expected] * 8
        s = stats(mountpoint)
        starts = sorted(int(r["start"]) // 2048 for r in read_requests(bed))
        # The region's blocks once each; prefetch may run a few blocks past its end.
        assert [b for b in starts if 8 <= b < 24] == list(range(8, 24))
        assert len(starts) == len(set(starts))  # never two reads of one block
        # Read-ahead may still be finishing after the statistics were taken.
        assert s["reads"] <= len(starts)
        assert m.unmount() == 0
    assert violations(bed) == []


@pytest.mark.parametrize("qab", [True, False])
def test_holes_read_as_zeros_without_vddk_reads(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, qab: bool
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    d = disks["sparse"]
    env = {} if qab else {"VDDK_STANDIN_NO_QAB": "1"}
    with Mount(bed, mountpoint, **env) as m:
        assert sha256_sequential(d.path(mountpoint)) == d.manifest.sha256
        s = stats(mountpoint)
        blocks = sorted(int(r["start"]) // 2048 for r in read_requests(bed))
        st = d.path(mountpoint).stat()
        if qab:
            assert blocks == list(d.manifest.allocated)
            assert s["cache"]["zero_blocks"] >= 64 - len(d.manifest.allocated)
            # The holes it knows now show in st_blocks (du, cp --sparse=auto).
            assert st.st_blocks * 512 == len(d.manifest.allocated) * MiB
        else:
            assert blocks == list(range(64))
            assert s["cache"]["zero_blocks"] == 0
            assert st.st_blocks * 512 == st.st_size
        assert m.unmount() == 0
    assert m.unexpected_log_records() == []
    assert violations(bed) == []


def test_data_in_every_allocation_region_reads_as_itself(bed: Bed, mountpoint: Path) -> None:
    """The allocation map asks VDDK one region (1024 blocks) at a time; with 64 KiB blocks a
    region is 64 MiB, so this 200 MiB disk spans four. Data on either side of each region
    boundary reads as itself, holes as zeros without a VDDK read, and every region is asked
    about once."""
    bs, region = 64 << 10, 1024
    nblocks = 200 * MiB // bs
    data_blocks = {0, 517, region - 1, region, region + 1, 2 * region - 1, 2 * region,
                   3 * region - 1, 3 * region, 3 * region + 77, nblocks - 1}  # fmt: skip
    holes = {b + 2 for b in data_blocks if b + 2 < nblocks and b + 2 not in data_blocks}
    ivd = bed.vcsim.create_ivd("perf-regions", 200, "LocalDS_0")
    snap = bed.vcsim.create_snapshot(ivd, "regions")
    src = bed.root / "perf-regions.raw"
    with open(src, "wb") as f:
        f.truncate(200 * MiB)
        for b in data_blocks:
            os.pwrite(f.fileno(), block_data(21, b, bs), b * bs)
    place_image(bed.images, ivd, snap, src)
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, mountpoint, "--block-size", "64K", "--prefetch", "0") as m:
        disk = mountpoint / ivd.datastore_name / ivd.id / snap / "disk.raw"
        with open(disk, "rb", buffering=0) as f:
            for b in sorted(data_blocks | holes):
                want = block_data(21, b, bs) if b in data_blocks else bytes(bs)
                assert os.pread(f.fileno(), bs, b * bs) == want, f"block {b}"
        assert m.unmount() == 0
    sectors = bs // 512
    read = {int(r["start"]) // sectors for r in read_requests(bed)}
    # The kernel's read-ahead may ask for more blocks; only blocks with data reach VDDK.
    assert data_blocks <= read and read <= data_blocks
    queried = sorted(int(q["start"]) // (region * sectors)
                     for q in call_lines(bed.log_lines(), "QueryAllocatedBlocks"))  # fmt: skip
    assert queried == [0, 1, 2, 3]


def test_several_handles_per_snapshot(bed: Bed, disks: dict[str, Disk], mountpoint: Path) -> None:
    bed.standin_log.unlink(missing_ok=True)
    d = disks["full"]
    with Mount(bed, mountpoint, "--vddk-handles", "3", VDDK_STANDIN_TRANSPORT="file") as m:
        assert sha256_sequential(d.path(mountpoint)) == d.manifest.sha256
        assert m.unmount() == 0
    lines = bed.log_lines()
    opens = [ln for ln in lines if ln.split()[2:3] == ["Open"]]
    assert len(opens) == 3
    assert len([ln for ln in lines if ln.split()[2:3] == ["PrepareForAccess"]]) == 1
    assert len({r["handle"] for r in read_requests(bed)}) == 3
    assert violations(bed) == []
    assert m.unexpected_log_records() == []


def test_statistics_on_sigusr1_and_at_unmount_with_debug(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    d = disks["full"]
    with Mount(bed, mountpoint, "--debug") as m:
        with open(d.path(mountpoint), "rb") as f:
            assert f.read(4096) == d.manifest.path.read_bytes()[:4096]
        st = (mountpoint / ".ivdfs" / "stats").stat()
        assert st.st_mode & 0o777 == 0o444
        with pytest.raises(OSError):
            (mountpoint / ".ivdfs" / "stats").write_text("x")
        m.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: " cache: " in m.log(), what="statistics after SIGUSR1")
        assert m.unmount() == 0
    lines = m.log().splitlines()
    assert sum(" cache: " in ln for ln in lines) == 2
    assert any("VixDiskLib_ReadAsync: " in ln for ln in lines)


def data_blocks(path: Path, bs: int) -> set[int]:
    """Blocks of a (sparse) image holding data, as the stand-in's QueryAllocatedBlocks sees
    them (SEEK_DATA/SEEK_HOLE of the image)."""
    out: set[int] = set()
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            out.update(range(start // bs, (end - 1) // bs + 1))
            pos = end
    return out


def test_partition_windows_leave_out_their_known_holes(bed: Bed, tmp_path: Path) -> None:
    """st_blocks of partN.raw counts the partition's bytes in blocks not known to be holes,
    and follows the allocation map as reads teach it more: with 64 KiB blocks a region is 64
    MiB, and the probe (partition table, GPT backup, each partition's first bytes) leaves the
    second unknown."""
    bs, region = 64 << 10, 64 * MiB
    src = tmp_path / "gpt.img"
    manifest = imgs.gpt_disk(src, 320)
    ivd = bed.vcsim.create_ivd("perf-windows", 320, "LocalDS_0")
    snap = bed.vcsim.create_snapshot(ivd, "windows")
    allocated = data_blocks(place_image(bed.images, ivd, snap, src), bs)
    image = src.read_bytes()

    def counted(p: imgs.PartitionManifest, unknown: range) -> int:
        end = p.start + p.length
        return sum(
            min(end, (b + 1) * bs) - max(p.start, b * bs)
            for b in range(p.start // bs, (end - 1) // bs + 1)
            if b in allocated or b * bs // region in unknown
        )

    with Mount(bed, tmp_path / "mnt", "--prefetch", "0", "--block-size", "64K") as m:
        snapdir = m.mountpoint / ivd.datastore_name / ivd.id / snap
        windows = {p.number: snapdir / f"part{p.number}.raw" for p in manifest.partitions}
        for p in manifest.partitions:
            assert windows[p.number].stat().st_blocks * 512 == counted(p, range(1, 2)), p.number
        some_holes = False
        for p in manifest.partitions:
            assert windows[p.number].read_bytes() == image[p.start : p.start + p.length]
        for p in manifest.partitions:
            data = counted(p, range(0))
            some_holes |= data < counted(p, range(1, 2))
            assert windows[p.number].stat().st_blocks * 512 == data, p.number
        assert some_holes, "no partition had holes in the middle region: nothing was checked"
        assert m.unmount() == 0
