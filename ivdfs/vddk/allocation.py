"""VDDK's rules for VixDiskLib_QueryAllocatedBlocks, and the one function that keeps them.

Role: `allocated_runs` asks a disk which sectors of a range may hold data, as VDDK allows the
question. The real library refuses with VIX_E_INVALID_ARG anything but this: the chunk is a
power of two from 128 to 131072 sectors and no larger than the disk; start and length are
whole chunks inside the disk; at most 524288 chunks per call. The chunk is the largest power
of two that divides the caller's granularity (its block), so a block is whole chunks and
counts as allocated when any of them is. A disk whose size is not a whole number of chunks
ends in a partial chunk that no query may cover: as in VMware's sample, the queries stop at
the last whole chunk, and that tail counts as allocated (it is read). When the library cannot
answer at all (no such function, VIX_E_NOT_SUPPORTED, or no chunk within the rules divides the
granularity) it raises `AllocationUnsupported`; any other failure is the query's own error. So
nothing outside vddk/ knows a chunk rule or a VixError code.

Concurrency: `allocated_runs` runs on the trio thread; `query` (the disk's QueryAllocatedBlocks)
runs wherever its disk runs it (the handle's I/O thread).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ivdfs.errors import BackendError
from ivdfs.vddk._cdefs import VIX_E_INVALID_ARG, VIX_E_NOT_SUPPORTED, VIXDISKLIB_MIN_CHUNK_SIZE
from ivdfs.vddk.errors import VddkError

log = logging.getLogger(__name__)

# VDDK's limits besides VIXDISKLIB_MIN_CHUNK_SIZE (sectors, chunks per call).
MAX_CHUNK_SECTORS = 131072
MAX_CHUNKS_PER_QUERY = 524288

# QueryAllocatedBlocks(start sector, sectors, chunk sectors) -> (start, length) runs, chunk-aligned.
RawQuery = Callable[[int, int, int], Awaitable[list[tuple[int, int]]]]


class AllocationUnsupported(BackendError):
    """The library cannot tell which blocks hold data: every block is read."""


def chunk_sectors(granularity_sectors: int, capacity_sectors: int) -> int:
    """The chunk for asking about a disk in units of `granularity_sectors`: the largest power
    of two that divides it, within VDDK's limits and the disk; 0 when there is none."""
    chunk = min(granularity_sectors & -granularity_sectors, MAX_CHUNK_SECTORS)
    while chunk > capacity_sectors:
        chunk //= 2
    return chunk if chunk >= VIXDISKLIB_MIN_CHUNK_SIZE else 0


async def allocated_runs(
    query: RawQuery | None, capacity_sectors: int, start: int, end: int, granularity: int
) -> list[tuple[int, int]]:
    """(start, length) runs of sectors in [start, end) that may hold data (the rest is
    unallocated), asked in chunks that divide `granularity` sectors; `start` should be a
    multiple of it. AllocationUnsupported when the library cannot answer (see the module)."""
    chunk = chunk_sectors(granularity, capacity_sectors)
    if query is None or not chunk:
        raise AllocationUnsupported("QueryAllocatedBlocks cannot answer for this disk")
    # Queries end at the last whole chunk of the disk; what lies past it is read.
    queryable_end = capacity_sectors // chunk * chunk
    tail = max(start, queryable_end)
    runs = [(tail, end - tail)] if end > tail else []
    pos = start // chunk * chunk
    stop = min(-(-end // chunk) * chunk, queryable_end)
    while pos < stop:
        n = min(stop - pos, MAX_CHUNKS_PER_QUERY * chunk)
        try:
            found = await query(pos, n, chunk)
        except VddkError as e:
            if e.code == VIX_E_NOT_SUPPORTED:
                raise AllocationUnsupported(str(e)) from None
            if e.code == VIX_E_INVALID_ARG:
                # Our bug against VDDK's rules (the stand-in logs it as a VIOLATION too).
                log.warning("QueryAllocatedBlocks refused %d+%d in chunks of %d: %s",
                            pos, n, chunk, e)  # fmt: skip
            raise
        lo_bound, hi_bound = max(pos, start), min(pos + n, end)
        for run_start, length in found:
            lo, hi = max(run_start, lo_bound), min(run_start + length, hi_bound)
            if hi > lo:
                runs.append((lo, hi - lo))
        pos += n
    return sorted(runs)
