"""The read path above the VDDK threads, over an in-memory disk: scan resistance of the cache,
the prefetch window (growth, cap, collapse), prefetch hits, clean cancellation, and demand
reads going before read-ahead at the VDDK slots."""

from __future__ import annotations

import trio
from trio.testing import wait_all_tasks_blocked

from ivdfs.errors import BackendError
from ivdfs.io.block_cache import BlockCache
from ivdfs.io.prefetch import Prefetcher
from ivdfs.io.reader import DiskReader
from ivdfs.vddk.threads import PrioritySlots
from tests.fakes import FakeDisk, pattern

BS = 64 * 1024


async def test_a_sequential_scan_does_not_flush_the_hot_set() -> None:
    disk = FakeDisk(pattern(64 * BS, "scan"))
    reader = DiskReader("d", len(disk.data), BS, BlockCache(16 * BS, 4 * BS), disk.read)
    hot = [3, 1, 5, 0, 4, 2]
    for i in hot:
        await reader.read(i * BS + 7, 100)
    stream = reader.open_stream()
    for off in range(8 * BS, 64 * BS, 16 * 1024):
        assert bytes(await reader.read(off, 16 * 1024, stream)) == disk.data[off : off + 16384]
    before = len(disk.reads)
    for i in hot:
        assert bytes(await reader.read(i * BS, 10)) == disk.data[i * BS : i * BS + 10]
    assert len(disk.reads) == before  # every hot block still cached
    assert reader.cache.current_bytes <= 16 * BS


async def test_prefetch_window_grows_to_its_cap_and_collapses_on_a_jump() -> None:
    disk = FakeDisk(pattern(200 * BS, "pf"))
    disk.delay = 0.001  # a backend read yields, as VDDK's do, so prefetches get to start
    cache = BlockCache(128 * BS, 48 * BS)
    prefetcher = Prefetcher(max_in_flight=8)
    async with trio.open_nursery() as nursery:
        await nursery.start(prefetcher.run)
        reader = DiskReader("d", len(disk.data), BS, cache, disk.read, None, prefetcher, 16)
        stream = reader.open_stream()
        windows = []
        for i in range(12):
            got = await reader.read(i * BS, BS, stream)
            assert bytes(got) == disk.data[i * BS : (i + 1) * BS]
            windows.append(stream.window)
            while prefetcher.queued:  # let the read-ahead finish, whatever the machine's load
                await trio.sleep(0)
        assert windows == [0, 1, 2, 4, 8, 16, 16, 16, 16, 16, 16, 16]
        assert stream.ahead == 11 + 16
        # Every block up to the window's end was read exactly once.
        assert sorted(s // (BS // 512) for s, _ in disk.reads) == list(range(28))
        assert cache.stats.prefetch_hits == 10  # blocks 2-11: read ahead before asked for
        reads_before = len(disk.reads)
        await reader.read(150 * BS, 100, stream)  # a random jump
        assert stream.window == 0
        while prefetcher.queued:
            await trio.sleep(0)
        assert len(disk.reads) == reads_before + 1  # only the block asked for
        nursery.cancel_scope.cancel()


async def test_unmount_cancels_outstanding_prefetches_cleanly() -> None:
    disk = FakeDisk(pattern(64 * BS, "cancel"))
    disk.delay = 10.0
    cache = BlockCache(64 * BS, 32 * BS)
    prefetcher = Prefetcher(max_in_flight=4)
    with trio.move_on_after(0.2):
        async with trio.open_nursery() as nursery:
            await nursery.start(prefetcher.run)
            reader = DiskReader("d", len(disk.data), BS, cache, disk.read, None, prefetcher, 8)
            stream = reader.open_stream()
            stream.note(0, 1)
            stream.note(1, 2)
            stream.schedule()
            await trio.sleep_forever()
    assert not prefetcher.running and prefetcher.queued == 0
    assert cache.current_bytes == 0 and not any((("d", i) in cache) for i in range(64))
    assert cache.stats.prefetch_failures == 0


async def test_demand_reads_take_vddk_slots_before_waiting_prefetches() -> None:
    slots = PrioritySlots(1)
    await slots.acquire(background=False)
    order: list[str] = []

    async def take(name: str, background: bool) -> None:
        await slots.acquire(background)
        order.append(name)
        slots.release()

    async with trio.open_nursery() as n:
        for name, background in (("prefetch-1", True), ("prefetch-2", True), ("demand", False)):
            n.start_soon(take, name, background)
            await wait_all_tasks_blocked()
        slots.release()
    assert order == ["demand", "prefetch-1", "prefetch-2"]
    assert slots.free == 1


async def test_a_scan_at_the_scan_segments_reserve_reads_each_block_once() -> None:
    # Main is full (8 hot blocks), so the scan segment has only its reserve of 8 blocks for a
    # reader with 5 blocks of read-ahead: it must evict the blocks the reader has passed, not
    # the read-ahead it has yet to reach (which an LRU order would, as reading refreshes).
    disk = FakeDisk(pattern(80 * BS, "reserve"))
    disk.delay = 0.001
    cache = BlockCache(16 * BS, 8 * BS)
    prefetcher = Prefetcher(max_in_flight=8)
    async with trio.open_nursery() as nursery:
        await nursery.start(prefetcher.run)
        reader = DiskReader("d", len(disk.data), BS, cache, disk.read, None, prefetcher, 5)
        for i in range(8):
            await reader.read((72 + i) * BS, 10)  # hot: random reads, into main
        stream = reader.open_stream()
        for off in range(0, 64 * BS, 32 * 1024):
            got = await reader.read(off, 32 * 1024, stream)
            assert bytes(got) == disk.data[off : off + 32 * 1024]
            while prefetcher.queued:
                await trio.sleep(0)
        blocks = [s // (BS // 512) for s, _ in disk.reads]
        assert sorted(blocks) == sorted({*range(64 + 5), *range(72, 80)})  # each block once
        # Block 0 started the stream as a random read: main borrowed free space for it, and
        # gave a block back once the scan segment wanted its reserve. Nothing else.
        assert cache.stats.evicted_main == 1
        nursery.cancel_scope.cancel()


async def test_scans_that_come_back_leave_the_hot_set_alone() -> None:
    # Two passes with read-ahead over a disk four times the cache: a block the first pass
    # brought in and the scan segment evicted is new to the second pass, not a re-reference.
    # (Eviction must forget a block's reference with the block, or the second pass promotes
    # every prefetched block on its first use and flushes the hot set.)
    disk = FakeDisk(pattern(64 * BS, "again"))
    disk.delay = 0.001
    cache = BlockCache(16 * BS, 6 * BS)
    prefetcher = Prefetcher(max_in_flight=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(prefetcher.run)
        reader = DiskReader("d", len(disk.data), BS, cache, disk.read, None, prefetcher, 2)
        hot = [60, 61, 62, 63]
        for i in hot:
            await reader.read(i * BS + 1, 10)  # random reads: into main
        for _ in range(2):
            stream = reader.open_stream()
            for off in range(8 * BS, 56 * BS, 16 * 1024):
                got = await reader.read(off, 16 * 1024, stream)
                assert bytes(got) == disk.data[off : off + 16 * 1024]
                while prefetcher.queued:
                    await trio.sleep(0)
        before = len(disk.reads)
        for i in hot:
            assert bytes(await reader.read(i * BS, 10)) == disk.data[i * BS : i * BS + 10]
        assert len(disk.reads) == before  # the hot set survived both passes
        # Block 8 opened each pass as a random read; nothing the scans read was promoted.
        assert cache.stats.promoted == 0
        assert cache.current_bytes <= 16 * BS
        nursery.cancel_scope.cancel()


class FailsOnce(FakeDisk):
    """Each sector in `fail_once` fails its first read only (a transient VDDK error), after
    `fail_delay` seconds."""

    fail_once: set[int]
    fail_delay: float = 0.0

    async def read(self, start_sector: int, nbytes: int, background: bool = False) -> bytes:
        if start_sector in self.fail_once:
            self.fail_once.discard(start_sector)
            self.reads.append((start_sector, nbytes))
            await trio.sleep(self.fail_delay)
            raise BackendError("injected transient failure")
        return await super().read(start_sector, nbytes)


async def test_a_failed_read_ahead_is_retried_by_the_reader_waiting_for_it() -> None:
    # A reader that waits for a block the prefetcher is reading must not see the prefetch's
    # error: the prefetch made one attempt only, and the reader's own read may well work.
    disk = FailsOnce(pattern(16 * BS, "retry"))
    disk.delay = 0.001
    disk.fail_once, disk.fail_delay = {2 * BS // 512}, 0.1
    cache = BlockCache(16 * BS, 8 * BS)
    prefetcher = Prefetcher(max_in_flight=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(prefetcher.run)
        reader = DiskReader("d", len(disk.data), BS, cache, disk.read, None, prefetcher, 4)
        stream = reader.open_stream()
        for i in range(2):  # the second block in order starts the read-ahead of block 2
            assert bytes(await reader.read(i * BS, BS, stream)) == disk.data[i * BS : (i + 1) * BS]
        await wait_all_tasks_blocked()
        assert ("d", 2) in cache and prefetcher.queued  # block 2 is being read ahead
        got = await reader.read(2 * BS, BS, stream)  # waits for that read, which fails
        assert bytes(got) == disk.data[2 * BS : 3 * BS]
        assert [s for s, _ in disk.reads].count(2 * BS // 512) == 2  # the prefetch, then ours
        assert cache.stats.prefetch_failures == 1
        nursery.cancel_scope.cancel()
