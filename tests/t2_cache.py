"""Block cache and aligned reader against an in-memory disk."""

from __future__ import annotations

import random

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

from ivdfs.errors import BackendError
from ivdfs.io.block_cache import BlockCache
from ivdfs.io.reader import DiskReader, block_span
from tests.fakes import FakeDisk, pattern

BS = 64 * 1024


def make_reader(size: int, cache_bytes: int = 16 * BS) -> tuple[DiskReader, FakeDisk]:
    disk = FakeDisk(pattern(size, "disk"))
    return DiskReader("d", size, BS, BlockCache(cache_bytes), disk.read), disk


async def test_random_reads_match_source_including_eof() -> None:
    size = 10 * BS + 3 * 512  # last block short
    reader, disk = make_reader(size)
    rng = random.Random(1)
    for _ in range(300):
        off = rng.randrange(0, size + 2 * BS)
        n = rng.choice([1, 511, 4096, BS - 1, BS, 3 * BS + 17])
        got = bytes(await reader.read(off, n))
        assert got == disk.data[off : off + n]
    assert bytes(await reader.read(size - 10, 100)) == disk.data[-10:]
    assert bytes(await reader.read(size, 100)) == b""
    # Every backend read is block aligned and within the disk.
    for sector, nbytes in disk.reads:
        assert (sector * 512) % BS == 0
        assert sector * 512 + nbytes <= size


async def test_concurrent_misses_share_one_backend_read() -> None:
    reader, disk = make_reader(8 * BS)
    disk.delay = 0.05
    results: list[bytes] = []

    async def one(off: int) -> None:
        results.append(bytes(await reader.read(off, 4096)))

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(one, i * 4096)
    assert len(disk.reads) == 1
    assert sorted(results) == sorted(disk.data[i * 4096 : (i + 1) * 4096] for i in range(8))
    assert reader.cache.stats.shared_misses == 7


async def test_failed_read_reaches_every_waiter_and_is_not_cached() -> None:
    reader, disk = make_reader(4 * BS)
    disk.delay = 0.02
    disk.fail_sectors = {BS // 512}
    errors: list[Exception] = []

    async def one() -> None:
        try:
            await reader.read(BS + 100, 10)
        except BackendError as e:
            errors.append(e)

    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(one)
    assert len(errors) == 4 and len(disk.reads) == 1
    disk.fail_sectors.clear()
    assert bytes(await reader.read(BS + 100, 10)) == disk.data[BS + 100 : BS + 110]
    assert len(disk.reads) == 2


async def test_cache_is_bounded_in_bytes_and_hits_stay_local() -> None:
    reader, disk = make_reader(32 * BS, cache_bytes=4 * BS)
    for i in range(32):
        await reader.read(i * BS, 10)
    assert reader.cache.current_bytes <= 4 * BS
    before = len(disk.reads)
    await reader.read(31 * BS, 10)  # most recent: a hit
    assert len(disk.reads) == before
    await reader.read(0, 10)  # long evicted: a miss
    assert len(disk.reads) == before + 1


async def test_cancelled_reader_does_not_poison_waiters() -> None:
    reader, disk = make_reader(4 * BS)
    disk.delay = 0.5
    got: list[bytes] = []

    async def waiter() -> None:
        got.append(bytes(await reader.read(0, 16)))

    # No timing: wait_all_tasks_blocked says when each task sits where we want it, and the
    # first reader is cancelled explicitly, whatever the machine's load.
    async with trio.open_nursery() as n:
        async with trio.open_nursery() as inner:
            inner.start_soon(reader.read, 0, 16)
            await wait_all_tasks_blocked()  # the first reader is inside the disk read
            assert len(disk.reads) == 1
            n.start_soon(waiter)
            await wait_all_tasks_blocked()  # the waiter waits for that same read
            assert len(disk.reads) == 1 and got == []
            inner.cancel_scope.cancel()
    assert inner.cancel_scope.cancelled_caught
    assert got == [disk.data[:16]]


@given(
    offset=st.integers(0, 1 << 40),
    size=st.integers(0, 1 << 22),
    disk_size=st.integers(0, 1 << 40),
    bs_sectors=st.integers(1, 4096),
)
def test_block_span_covers_exactly_the_clamped_range(
    offset: int, size: int, disk_size: int, bs_sectors: int
) -> None:
    bs = bs_sectors * 512
    first, last, end = block_span(offset, size, disk_size, bs)
    if offset >= disk_size or size == 0:
        assert first == last
        return
    assert end == min(offset + size, disk_size)
    assert first * bs <= offset < (first + 1) * bs
    assert (last - 1) * bs < end <= last * bs


def test_reader_rejects_unaligned_block_size() -> None:
    with pytest.raises(ValueError):
        DiskReader("d", 100, 1000, BlockCache(10_000), FakeDisk(b"").read)


# --- adaptive segments: a disk that fits stays whole, a hot set survives a larger scan ------


async def sequential_pass(reader: DiskReader, data: bytes, chunk: int = 16 * 1024) -> None:
    """One reader from start to end with small reads, as the kernel's read-ahead sends them:
    several touches per block, in order."""
    stream = reader.open_stream()
    for off in range(0, reader.size, chunk):
        assert bytes(await reader.read(off, chunk, stream)) == data[off : off + chunk]


async def test_a_sequential_pass_over_a_disk_that_fits_keeps_all_of_it() -> None:
    disk = FakeDisk(pattern(12 * BS, "fits"))
    cache = BlockCache(16 * BS, 4 * BS)
    reader = DiskReader("d", len(disk.data), BS, cache, disk.read)
    for _ in range(3):
        await sequential_pass(reader, disk.data)
    assert len(disk.reads) == 12  # the later passes came from the cache
    # The first pass referenced each block once, however many reads it took; the second came
    # back to every block, so the whole disk is in main now (the first read of a stream is not
    # yet sequential: block 0 went to main at once).
    assert cache.stats.promoted == cache.stats.rereferenced == 11
    assert cache.stats.main_bytes == 12 * BS
    assert cache.current_bytes == 12 * BS


async def test_a_scan_four_times_the_cache_leaves_the_hot_set_alone() -> None:
    size = 64 * BS  # the cache holds 16 blocks
    disk = FakeDisk(pattern(size, "4x"))
    cache = BlockCache(16 * BS, 4 * BS)
    reader = DiskReader("d", size, BS, cache, disk.read)
    # Hot set A: random reads (straight into main). Hot set B: read sequentially twice, far
    # enough apart to be a re-reference (promoted from the scan segment).
    hot_random = [40, 3, 17, 9]
    for i in hot_random:
        await reader.read(i * BS + 5, 100)
    stream = reader.open_stream()
    hot_seq = range(50, 56)
    for _ in range(2):
        for i in hot_seq:
            await reader.read(i * BS, BS, stream)
        for _ in range(64):  # other work between the two passes (more than `correlated`)
            await reader.read(hot_random[0] * BS, 10)
        stream = reader.open_stream()
    await sequential_pass(reader, disk.data)  # 64 blocks: four times the cache
    before = len(disk.reads)
    for i in [*hot_random, *hot_seq]:
        assert bytes(await reader.read(i * BS, 10)) == disk.data[i * BS : i * BS + 10]
    assert len(disk.reads) == before  # every hot block survived the scan
    # Block 50 opened each stream (a random read, so main at once); 51-55 were promoted.
    assert cache.stats.rereferenced == len(hot_seq) - 1
    assert cache.current_bytes <= 16 * BS


async def test_the_byte_bound_holds_with_both_segments_full() -> None:
    size = 40 * BS + 1536  # a short last block: sizes differ
    disk = FakeDisk(pattern(size, "bound"))
    max_bytes = 10 * BS + 512
    cache = BlockCache(max_bytes, 3 * BS)
    reader = DiskReader("d", size, BS, cache, disk.read)
    rng = random.Random(7)
    stream = reader.open_stream()
    pos = 0
    for step in range(2000):
        if rng.random() < 0.5:
            off = rng.randrange(size)
            got = bytes(await reader.read(off, 4096))
        else:
            off = pos
            got = bytes(await reader.read(pos, 32 * 1024, stream))
            pos = (pos + 32 * 1024) % size
            if pos < 32 * 1024:
                stream = reader.open_stream()
        assert got == disk.data[off : off + len(got)]
        s = cache.stats
        assert cache.current_bytes == s.main_bytes + s.scan_bytes <= max_bytes, step
        # Main never takes the scan segment's reserve (unless the scan segment leaves it free).
        assert s.main_bytes <= max_bytes - min(s.scan_bytes, cache.scan_reserve), step
    assert cache.stats.main_bytes > 0 and cache.stats.scan_bytes >= cache.scan_reserve - BS
    assert cache.stats.evicted_main > 0 and cache.stats.evicted_scan > 0
