"""Block cache and aligned reader against an in-memory disk."""

from __future__ import annotations

import random

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

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

    async with trio.open_nursery() as n:
        with trio.move_on_after(0.05):
            async with trio.open_nursery() as inner:
                inner.start_soon(reader.read, 0, 16)
                await trio.sleep(0.01)
                n.start_soon(waiter)
                await trio.sleep(1)
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
