"""Warm reads through real mounts (issue 17): a disk smaller than the cache costs VDDK reads on
its first pass only, whether or not the kernel keeps its pages; the kernel keeps the pages of
disk.raw across opens; a hot set survives a sequential scan four times the cache size.

Counts, never timings: VDDK reads from the stand-in's call log and /.ivdfs/stats, page residency
with fincore, cache contents through /.ivdfs/stats. Speed is measured by scripts/bench.
`drop_caches` empties the page cache of the whole machine: harmless, only slower for others.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import Bed, DataDisk, Mount, call_lines, wait_for
from tests.testbed.images import random_disk
from tests.testbed.vsphere import Ivd, place_image

MiB = 1 << 20


Disk = DataDisk


@pytest.fixture(scope="module")
def disks(bed: Bed) -> dict[str, Disk]:
    out = {}
    src = bed.root / "warm-src"
    src.mkdir()
    for name, size_mb, seed in (("small", 48, 31), ("big", 128, 32)):
        ivd = bed.vcsim.create_ivd(f"warm-{name}", size_mb, "LocalDS_0")
        snap = bed.vcsim.create_snapshot(ivd, name)
        manifest = random_disk(src / f"{name}.raw", size_mb, seed=seed)
        place_image(bed.images, ivd, snap, manifest.path)
        out[name] = Disk(ivd, snap, manifest)
    return out


def stats(mountpoint: Path) -> dict[str, Any]:
    return json.loads((mountpoint / ".ivdfs" / "stats").read_text())  # type: ignore[no-any-return]


def quiet(mountpoint: Path) -> dict[str, Any]:
    """Statistics once no read-ahead is outstanding."""
    wait_for(lambda: stats(mountpoint)["prefetch_queued"] == 0, what="prefetches to finish")
    return stats(mountpoint)


def vddk_reads(bed: Bed) -> int:
    lines = bed.log_lines()
    return len(call_lines(lines, "Read")) + len(call_lines(lines, "ReadAsync"))


def blocks_read(bed: Bed, ivd: Ivd) -> list[int]:
    """The 1 MiB blocks of `ivd` that VDDK read, in order (from the stand-in's call log)."""
    lines = bed.log_lines()
    conns = {c["conn"] for c in call_lines(lines, "ConnectEx") if c["id"] == ivd.id}
    handles = {o["handle"] for o in call_lines(lines, "Open") if o["conn"] in conns}
    reads = call_lines(lines, "Read") + call_lines(lines, "ReadAsync")
    return [int(r["start"]) * 512 // MiB for r in reads if r["handle"] in handles]


def sha256_pass(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(MiB):
            h.update(data)
    return h.hexdigest()


def drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def resident_bytes(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(out.strip())


def direct_reads(path: Path, offsets: list[int], size: int) -> bytes:
    """O_DIRECT reads: every one reaches ivdfs, whatever the page cache holds."""
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
    out = bytearray()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for off in offsets:
            assert os.preadv(fd, [buf], off) == size
            out += buf[:size]
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def test_a_disk_smaller_than_the_cache_is_read_from_vddk_once(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    d = disks["small"]
    with Mount(bed, mountpoint, "--cache-size", "64M") as m:
        path = d.path(mountpoint)
        assert sha256_pass(path) == d.manifest.sha256
        first = quiet(mountpoint)
        reads = vddk_reads(bed)
        assert first["reads"] == reads == 48  # every block once
        for _ in range(3):
            # The page cache gone, as on a host that reclaims it: ivdfs's cache answers.
            drop_page_cache()
            assert sha256_pass(path) == d.manifest.sha256
        for _ in range(3):
            assert sha256_pass(path) == d.manifest.sha256
        later = quiet(mountpoint)
        assert vddk_reads(bed) == reads and later["reads"] == first["reads"]
        cache = later["cache"]
        # The whole disk is in the cache, and in main: the passes after the first referenced
        # it again (the blocks the listing read for the partition table went there at once).
        assert cache["bytes"] == cache["main_bytes"] == 48 * MiB
        assert cache["rereferenced"] >= 44 and cache["evicted_main"] == cache["evicted_scan"] == 0
        assert m.unmount() == 0
    assert m.unexpected_log_records() == []


def test_the_kernel_keeps_the_pages_of_disk_raw_across_opens(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    d = disks["small"]
    size = d.manifest.size
    with Mount(bed, mountpoint) as m:
        path = d.path(mountpoint)
        assert os.stat(path).st_size == size
        assert sha256_pass(path) == d.manifest.sha256
        # Opens, attribute and directory lookups in between must not cost the pages (a kernel
        # that drops them sends the next pass to ivdfs block by block). Half, not all: this
        # host's proactive reclaim (DAMON, see ivdfs/io/block_cache.py) may take some at any
        # time, scattered, so block lookups reaching ivdfs are no measure.
        for _ in range(3):
            with open(path, "rb") as f:
                assert f.read(4096) == d.manifest.path.read_bytes()[:4096]
            assert "disk.raw" in os.listdir(path.parent)
            assert os.stat(path).st_size == size
        resident = resident_bytes(path)
        assert resident > size // 2, f"{resident} of {size} bytes resident: {quiet(mountpoint)}"
        assert sha256_pass(path) == d.manifest.sha256
        assert m.unmount() == 0
    assert m.unexpected_log_records() == []


def test_a_hot_set_survives_a_scan_four_times_the_cache(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    small, big = disks["small"], disks["big"]
    data = small.manifest.path.read_bytes()
    rng = random.Random(4)
    # Hot set: 4 MiB read sequentially (twice, with other reads in between, so the second
    # read is a re-reference), and 2 MiB read at random.
    seq = [8 * MiB + i * 128 * 1024 for i in range(32)]
    rand = [rng.randrange(30 * MiB, 32 * MiB, 4096) for _ in range(64)]
    with Mount(bed, mountpoint, "--cache-size", "32M") as m:
        hot = small.path(mountpoint)
        for _ in range(2):
            assert direct_reads(hot, seq, 128 * 1024) == data[8 * MiB : 12 * MiB]
            got = direct_reads(hot, rand, 4096)
            assert got == b"".join(data[o : o + 4096] for o in rand)
        assert sha256_pass(big.path(mountpoint)) == big.manifest.sha256  # 4x the cache
        quiet(mountpoint)
        before = len(blocks_read(bed, small.ivd))
        assert direct_reads(hot, seq, 128 * 1024) == data[8 * MiB : 12 * MiB]
        assert direct_reads(hot, rand, 4096) == b"".join(data[o : o + 4096] for o in rand)
        quiet(mountpoint)
        # Read-ahead past the hot set may read blocks 12 and on; the hot blocks were cached.
        assert not {8, 9, 10, 11, 30, 31} & set(blocks_read(bed, small.ivd)[before:])
        cache = quiet(mountpoint)["cache"]
        assert cache["rereferenced"] >= 3  # blocks 9-11; block 8 started each stream
        assert cache["bytes"] <= 32 * MiB
        assert m.unmount() == 0
    assert m.unexpected_log_records() == []
