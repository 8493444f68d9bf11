"""Which blocks of a disk hold data, learned lazily with VixDiskLib_QueryAllocatedBlocks.

The disk is split into regions (1024 blocks: 1 GiB at the default block size); the first read
in a region asks the backend once for that region's allocated chunks. Every query keeps VDDK's
rules, which the real library enforces with VIX_E_INVALID_ARG: the chunk is a power of two from
128 to 131072 sectors and no larger than the disk; start and length are whole chunks inside the
disk; at most 524288 chunks per call. The chunk is the largest power of two that divides the
block size, so a block is whole chunks and counts as allocated when any of them is; with a
power-of-two block size the chunk is the block. A disk whose size is not a whole number of
chunks ends in a partial chunk that no query may cover: as in VMware's sample, the queries stop
at the last whole chunk, and every block reaching past it counts as allocated (it is read).

Reading is always correct; skipping holes is only an optimisation. No query function, or a
library answering VIX_E_NOT_SUPPORTED, turns the map off: every block is read. Any other failed
query costs only its region, whose blocks count as allocated until the region is asked again,
`RETRY_SECONDS` later.

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
from ivdfs.vddk._cdefs import VIXDISKLIB_MIN_CHUNK_SIZE
from ivdfs.vddk.errors import VddkError

log = logging.getLogger(__name__)

REGION_BLOCKS = 1024
# VDDK's limits for QueryAllocatedBlocks besides VIXDISKLIB_MIN_CHUNK_SIZE (sectors, chunks).
MAX_CHUNK_SECTORS = 131072
MAX_CHUNKS_PER_QUERY = 524288
RETRY_SECONDS = 30.0
_VIX_E_INVALID_ARG = 3
_VIX_E_NOT_SUPPORTED = 6

QueryAllocated = Callable[[int, int, int], Awaitable[list[tuple[int, int]]]]


def query_chunk_sectors(block_sectors: int, capacity_sectors: int) -> int:
    """The chunk for querying a disk in blocks of `block_sectors`: the largest power of two
    that divides the block, within VDDK's limits and the disk; 0 when there is none."""
    chunk = min(block_sectors & -block_sectors, MAX_CHUNK_SECTORS)
    while chunk > capacity_sectors:
        chunk //= 2
    return chunk if chunk >= VIXDISKLIB_MIN_CHUNK_SIZE else 0


class AllocationMap:
    def __init__(
        self,
        query: QueryAllocated | None,
        disk_size: int,
        block_size: int,
        region_blocks: int = REGION_BLOCKS,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """`on_change` is called when a region becomes known (holes may now be shown)."""
        self._query = query
        self._on_change = on_change
        self.block_size = block_size
        self.block_sectors = block_size // SECTOR_SIZE
        self.nblocks = (disk_size + block_size - 1) // block_size
        self.region_blocks = region_blocks
        capacity_sectors = disk_size // SECTOR_SIZE
        self.chunk_sectors = query_chunk_sectors(self.block_sectors, capacity_sectors)
        # Queries end here: the last whole chunk of the disk.
        self._queryable_end = (
            capacity_sectors // self.chunk_sectors * self.chunk_sectors if self.chunk_sectors else 0
        )
        self.enabled = query is not None and self.chunk_sectors > 0
        # region -> its allocated block indexes, sorted: 8 bytes a block (a set took ~60), for
        # maps of multi-TiB disks kept for a mount's life; bisection answers both questions.
        self._regions: dict[int, array[int]] = {}
        self._failed: dict[int, float] = {}  # region -> monotonic time to ask again
        self._loading: dict[int, trio.Event] = {}
        self.queries = 0
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
        assert self._query is not None
        event = self._loading[region] = trio.Event()
        bs, chunk = self.block_sectors, self.chunk_sectors
        first = region * self.region_blocks
        last = min(first + self.region_blocks, self.nblocks)  # exclusive
        start = first * bs
        end = min(last * bs, self._queryable_end)
        # Blocks reaching past the last whole chunk cannot be asked about: read them.
        allocated = {i for i in range(first, last) if (i + 1) * bs > end}
        try:
            pos = start
            while pos < end:
                n = min(end - pos, MAX_CHUNKS_PER_QUERY * chunk)
                self.queries += 1
                for run_start, length in await self._query(pos, n, chunk):
                    lo = max(run_start, pos)
                    hi = min(run_start + length, pos + n)
                    if hi > lo:
                        allocated.update(range(lo // bs, (hi - 1) // bs + 1))
                pos += n
            self._regions[region] = array("q", sorted(allocated))
            self.version += 1
            self._failed.pop(region, None)
            if self._on_change is not None and len(allocated) < last - first:
                self._on_change()
        except BackendError as e:
            code = e.code if isinstance(e, VddkError) else None
            if code == _VIX_E_NOT_SUPPORTED:
                log.debug("QueryAllocatedBlocks unsupported, reading every block: %s", e)
                self.enabled = False
                self.version += 1
            else:
                # Invalid arguments would be our bug against VDDK's rules: say so.
                level = logging.WARNING if code == _VIX_E_INVALID_ARG else logging.DEBUG
                log.log(level, "QueryAllocatedBlocks for blocks %d-%d failed; reading them: %s",
                        first, last - 1, e)  # fmt: skip
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
