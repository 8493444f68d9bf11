"""Which blocks of a disk hold data, learned lazily from the disk (QueryAllocatedBlocks).

The disk is split into regions (1024 blocks: 1 GiB at the default block size); the first read
in a region asks the backend once which sectors of that region may hold data
(`ivdfs.vddk.allocation.allocated_runs`, which keeps VDDK's rules), in units of the block
size; a block counts as allocated when any run touches it.

Reading is always correct; skipping holes is only an optimisation. No query function, or a
backend that says it cannot answer (`AllocationUnsupported`), turns the map off: every block is
read. Any other failed query costs only its region, whose blocks count as allocated until the
region is asked again, `RETRY_SECONDS` later.

Concurrency: trio thread only. Concurrent first reads in one region share one query.
"""

from __future__ import annotations

import bisect
import logging
import time
from array import array
from collections.abc import Awaitable, Callable

import trio

from ivdfs.errors import BackendError
from ivdfs.units import SECTOR_SIZE
from ivdfs.vddk.allocation import AllocationUnsupported

log = logging.getLogger(__name__)

REGION_BLOCKS = 1024
RETRY_SECONDS = 30.0

# (start sector, end sector, granularity in sectors) -> runs (start, length) of sectors in the
# range that may hold data; AllocationUnsupported when the disk cannot tell.
Allocated = Callable[[int, int, int], Awaitable[list[tuple[int, int]]]]


class AllocationMap:
    def __init__(
        self,
        allocated: Allocated | None,
        disk_size: int,
        block_size: int,
        region_blocks: int = REGION_BLOCKS,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """`on_change` is called when a region becomes known (holes may now be shown)."""
        self._allocated = allocated
        self._on_change = on_change
        self.block_size = block_size
        self.block_sectors = block_size // SECTOR_SIZE
        self.nblocks = (disk_size + block_size - 1) // block_size
        self.region_blocks = region_blocks
        self._capacity_sectors = disk_size // SECTOR_SIZE
        self.enabled = allocated is not None
        # region -> its allocated block indexes, sorted: 8 bytes a block (a set took ~60), for
        # maps of multi-TiB disks kept for a mount's life; bisection answers both questions.
        self._regions: dict[int, array[int]] = {}
        self._failed: dict[int, float] = {}  # region -> monotonic time to ask again
        self._loading: dict[int, trio.Event] = {}
        self.version = 0  # counts regions learned: what was derived from the map may be stale

    def known(self, index: int) -> bool | None:
        """True/False when known without asking the backend; None when the region is unknown."""
        if not self.enabled:
            return True
        region = index // self.region_blocks
        allocated = self._regions.get(region)
        if allocated is not None:
            at = bisect.bisect_left(allocated, index)
            return at < len(allocated) and allocated[at] == index
        retry_at = self._failed.get(region)
        if retry_at is not None and time.monotonic() < retry_at:
            return True
        return None

    async def is_allocated(self, index: int) -> bool:
        answer = self.known(index)
        if answer is None:
            region = index // self.region_blocks
            loading = self._loading.get(region)
            if loading is not None:
                await loading.wait()
            else:
                await self._load(region)
            answer = self.known(index)
        # Still unknown: the query just failed and may be asked again at once. Read the block.
        return True if answer is None else answer

    async def _load(self, region: int) -> None:
        assert self._allocated is not None
        event = self._loading[region] = trio.Event()
        bs = self.block_sectors
        first = region * self.region_blocks
        last = min(first + self.region_blocks, self.nblocks)  # exclusive
        start, end = first * bs, min(last * bs, self._capacity_sectors)
        allocated: set[int] = set()
        try:
            for lo, length in await self._allocated(start, end, bs):
                hi = lo + length
                if hi > lo:
                    allocated.update(range(lo // bs, (hi - 1) // bs + 1))
            self._regions[region] = array("q", sorted(allocated))
            self.version += 1
            self._failed.pop(region, None)
            if self._on_change is not None and len(allocated) < last - first:
                self._on_change()
        except AllocationUnsupported as e:
            log.debug("the disk cannot say which blocks hold data; reading every block: %s", e)
            self.enabled = False
            self.version += 1
        except BackendError as e:
            log.debug("allocated blocks %d-%d unknown; reading them: %s", first, last - 1, e)
            self._failed[region] = time.monotonic() + RETRY_SECONDS
        finally:
            del self._loading[region]
            event.set()

    def unallocated_bytes(self, start: int, end: int) -> int:
        """Bytes of [start, end) in blocks known to be holes (unknown regions count as data):
        what `st_blocks` may leave out, for `du` and `cp --sparse=auto`. Asked at every stat,
        so it costs the regions the range touches, not the blocks: each known region counts
        its allocated blocks in the range by bisection."""
        end = min(end, self.nblocks * self.block_size)
        if not self.enabled or not self._regions or start >= end:
            return 0
        bs, rb = self.block_size, self.region_blocks
        first, last = start // bs, (end - 1) // bs  # inclusive
        total = 0
        for region in range(first // rb, last // rb + 1):
            allocated = self._regions.get(region)
            if allocated is None:
                continue
            lo, hi = max(region * rb, first), min((region + 1) * rb - 1, last)
            data = bisect.bisect_right(allocated, hi) - bisect.bisect_left(allocated, lo)
            total += (hi - lo + 1 - data) * bs
        # The range's first and last blocks count only their part inside it.
        for index in {first, last}:
            if self.known(index) is False:
                total -= bs - (min(end, (index + 1) * bs) - max(start, index * bs))
        return total
