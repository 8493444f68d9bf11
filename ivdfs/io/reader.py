"""Byte ranges -> whole aligned blocks -> sector reads.

Concurrency: trio thread only. `fetch_block(start_sector, nbytes)` is the backend (a VDDK I/O
thread); everything it returns is cached by (disk key, block index).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable

from ivdfs.io.block_cache import Block, BlockCache

SECTOR = 512

FetchBlock = Callable[[int, int], Awaitable[Block]]


def block_span(offset: int, size: int, disk_size: int, block_size: int) -> tuple[int, int, int]:
    """(first block, last block exclusive, clamped end) for a read; empty when at/after EOF."""
    end = min(offset + size, disk_size)
    if offset >= end:
        return 0, 0, offset
    return offset // block_size, (end - 1) // block_size + 1, end


class DiskReader:
    def __init__(
        self,
        key: Hashable,
        disk_size: int,
        block_size: int,
        cache: BlockCache,
        fetch_block: FetchBlock,
    ) -> None:
        if block_size % SECTOR or block_size <= 0:
            raise ValueError("block size must be a positive multiple of 512")
        self.key = key
        self.size = disk_size
        self.block_size = block_size
        self.cache = cache
        self._fetch = fetch_block

    def _block_bytes(self, index: int) -> int:
        # The last block is short when the capacity is not a multiple of the block size.
        return min(self.block_size, self.size - index * self.block_size)

    async def block(self, index: int) -> Block:
        nbytes = self._block_bytes(index)
        start_sector = index * self.block_size // SECTOR
        return await self.cache.get((self.key, index), lambda: self._fetch(start_sector, nbytes))

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        first, last, end = block_span(offset, size, self.size, self.block_size)
        if first == last:
            return b""
        bs = self.block_size
        if last - first == 1:
            blk = await self.block(first)
            base = first * bs
            # A view, not a copy: pyfuse3 replies from any buffer.
            return memoryview(blk)[offset - base : end - base]
        parts: list[bytes | memoryview] = []
        for index in range(first, last):
            blk = await self.block(index)
            base = index * bs
            parts.append(memoryview(blk)[max(offset, base) - base : min(end, base + bs) - base])
        return b"".join(parts)
