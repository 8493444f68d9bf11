"""Which blocks of a disk hold data, learned lazily with VixDiskLib_QueryAllocatedBlocks.

The disk is split into regions (1024 blocks: 1 GiB at the default block size); the first read
in a region asks the backend once for that region's allocated chunks, with the cache block as
the chunk size, so every answer is in whole blocks. Unallocated blocks are then answered with
zeros without a read. When the query is missing or fails, the map switches itself off and every
block counts as allocated: reading is always correct, skipping holes is only an optimisation.

Concurrency: trio thread only. Concurrent first reads in one region share one query.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ivdfs.errors import BackendError
from ivdfs.vddk._cdefs import SECTOR_SIZE, VIXDISKLIB_MIN_CHUNK_SIZE

log = logging.getLogger(__name__)

REGION_BLOCKS = 1024

QueryAllocated = Callable[[int, int, int], Awaitable[list[tuple[int, int]]]]


class AllocationMap:
    def __init__(
        self,
        query: QueryAllocated | None,
        disk_size: int,
        block_size: int,
        region_blocks: int = REGION_BLOCKS,
    ) -> None:
        self._query = query
        self.block_size = block_size
        self.chunk_sectors = block_size // SECTOR_SIZE
        self.nblocks = (disk_size + block_size - 1) // block_size
        self.region_blocks = region_blocks
        self.enabled = query is not None and self.chunk_sectors >= VIXDISKLIB_MIN_CHUNK_SIZE
        self._regions: dict[int, frozenset[int]] = {}  # region -> allocated block indexes
        self._loading: dict[int, trio.Event] = {}
        self.queries = 0

    def known(self, index: int) -> bool | None:
        """True/False when known without asking the backend; None when the region is unknown."""
        if not self.enabled:
            return True
        allocated = self._regions.get(index // self.region_blocks)
        return None if allocated is None else index in allocated

    async def is_allocated(self, index: int) -> bool:
        answer = self.known(index)
        while answer is None:
            region = index // self.region_blocks
            loading = self._loading.get(region)
            if loading is not None:
                await loading.wait()
            else:
                await self._load(region)
            answer = self.known(index)
        return answer

    async def _load(self, region: int) -> None:
        assert self._query is not None
        event = self._loading[region] = trio.Event()
        first = region * self.region_blocks
        count = min(self.region_blocks, self.nblocks - first)
        try:
            self.queries += 1
            runs = await self._query(
                first * self.chunk_sectors, count * self.chunk_sectors, self.chunk_sectors
            )
            allocated: set[int] = set()
            for start, length in runs:
                if length <= 0:
                    continue
                lo = start // self.chunk_sectors
                hi = (start + length - 1) // self.chunk_sectors
                allocated.update(range(max(lo, first), min(hi, first + count - 1) + 1))
            self._regions[region] = frozenset(allocated)
        except BackendError as e:
            # Missing or failing: read everything, as if the query did not exist.
            log.debug("QueryAllocatedBlocks unusable, reading every block: %s", e)
            self.enabled = False
        finally:
            del self._loading[region]
            event.set()
