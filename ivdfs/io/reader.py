"""Byte ranges -> whole aligned blocks -> sector reads; holes, sequential detection, prefetch.

Concurrency: trio thread only. `fetch_block(start_sector, nbytes)` is the backend (a VDDK I/O
thread); everything it returns is cached by (disk key, block index). Each open file has its own
`ReadStream`, which detects sequential reading and keeps a prefetch window ahead of it: the
window grows (1, 2, 4 ... `max_window` blocks) each time the reader enters a new block in order,
and collapses on a random jump. Prefetches run in the `Prefetcher`'s nursery, never in the
reading task, so a read waits only for the blocks it needs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable

from ivdfs.io.block_cache import Block, BlockCache
from ivdfs.io.holes import Allocated, AllocationMap
from ivdfs.io.prefetch import Prefetcher
from ivdfs.units import SECTOR_SIZE

# Reads this many blocks behind the last one still count as in order: the kernel's concurrent
# read-ahead requests can reach us slightly out of order.
SEQ_SLACK = 2

# (start sector, bytes, background) -> the block; background: read ahead of a reader.
FetchBlock = Callable[[int, int, bool], Awaitable[Block]]


def block_span(offset: int, size: int, disk_size: int, block_size: int) -> tuple[int, int, int]:
    """(first block, last block exclusive, clamped end) for a read; empty when at/after EOF."""
    end = min(offset + size, disk_size)
    if offset >= end:
        return 0, 0, offset
    return offset // block_size, (end - 1) // block_size + 1, end


class ReadStream:
    """Sequential detection and prefetch window of one open file."""

    def __init__(self, reader: DiskReader, max_window: int) -> None:
        self.reader = reader
        self.max_window = max_window
        self.last_block: int | None = None
        self.window = 0  # blocks kept read ahead of `last_block`; 0 = not sequential
        self.ahead = -1  # highest block already handed to the prefetcher

    def note(self, first: int, last: int) -> bool:
        """Record a read of blocks [first, last); returns whether it is part of a scan."""
        prev = self.last_block
        if prev is not None and prev - SEQ_SLACK <= first <= prev + 1:
            if last - 1 > prev:
                self.window = min(max(1, 2 * self.window), self.max_window)
            self.last_block = max(prev, last - 1)
            return True
        # First read, or a jump: whatever was read ahead is not what this reader wants next.
        self.window = 0
        self.ahead = -1
        self.last_block = last - 1
        return False

    def schedule(self) -> None:
        if self.window == 0 or self.last_block is None:
            return
        target = min(self.last_block + self.window, self.reader.nblocks - 1)
        start = max(self.ahead + 1, self.last_block + 1)
        for index in range(start, target + 1):
            if not self.reader.start_prefetch(index):
                return
        self.ahead = max(self.ahead, target)


class DiskReader:
    def __init__(
        self,
        key: Hashable,
        disk_size: int,
        block_size: int,
        cache: BlockCache,
        fetch_block: FetchBlock,
        allocated: Allocated | None = None,
        prefetcher: Prefetcher | None = None,
        max_prefetch: int = 0,
        on_map_change: Callable[[], None] | None = None,
    ) -> None:
        if block_size % SECTOR_SIZE or block_size <= 0:
            raise ValueError("block size must be a positive multiple of 512")
        self.key = key
        self.size = disk_size
        self.block_size = block_size
        self.nblocks = (disk_size + block_size - 1) // block_size
        self.cache = cache
        self._fetch = fetch_block
        self.holes = AllocationMap(allocated, disk_size, block_size, on_change=on_map_change)
        self.prefetcher = prefetcher
        self.max_prefetch = max_prefetch if prefetcher is not None else 0
        self._zeros = bytes(block_size)  # shared by every hole of this disk

    def open_stream(self) -> ReadStream:
        return ReadStream(self, self.max_prefetch)

    def _block_bytes(self, index: int) -> int:
        # The last block is short when the capacity is not a multiple of the block size.
        return min(self.block_size, self.size - index * self.block_size)

    def _fetcher(self, index: int, background: bool = False) -> Callable[[], Awaitable[Block]]:
        nbytes = self._block_bytes(index)
        start_sector = index * self.block_size // SECTOR_SIZE
        return lambda: self._fetch(start_sector, nbytes, background)

    def _zero_block(self, index: int) -> Block:
        self.cache.stats.zero_blocks += 1
        nbytes = self._block_bytes(index)
        return self._zeros if nbytes == self.block_size else bytes(nbytes)

    async def block(self, index: int, scan: bool = False) -> Block:
        # Known regions are answered without awaiting anything (a cache hit stays a hit).
        if not await self.holes.is_allocated(index):
            return self._zero_block(index)
        return await self.cache.get((self.key, index), self._fetcher(index), scan)

    def start_prefetch(self, index: int) -> bool:
        """Hand block `index` to the prefetcher unless it is a known hole or already there."""
        if self.prefetcher is None:
            return False
        if self.holes.known(index) is False or (self.key, index) in self.cache:
            return True

        async def job() -> bool:
            if await self.holes.is_allocated(index):
                fetch = self._fetcher(index, background=True)
                return await self.cache.prefetch((self.key, index), fetch)
            return True

        return self.prefetcher.submit(job)

    async def read(
        self, offset: int, size: int, stream: ReadStream | None = None
    ) -> bytes | memoryview:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        first, last, end = block_span(offset, size, self.size, self.block_size)
        if first == last:
            return b""
        scan = False
        if stream is not None:
            scan = stream.note(first, last)
            # Before awaiting this read's own blocks, so the window overlaps with them.
            stream.schedule()
        bs = self.block_size
        if last - first == 1:
            blk = await self.block(first, scan)
            base = first * bs
            # A view, not a copy: pyfuse3 replies from any buffer.
            return memoryview(blk)[offset - base : end - base]
        parts: list[bytes | memoryview] = []
        for index in range(first, last):
            blk = await self.block(index, scan)
            base = index * bs
            parts.append(memoryview(blk)[max(offset, base) - base : min(end, base + bs) - base])
        return b"".join(parts)
