"""An LRU cache of whole disk blocks, bounded in bytes, with single-flight misses and a scan
segment.

Two `cachetools.LRUCache` segments share the byte budget: `main` holds blocks that random
(demand) reads asked for, `scan` holds blocks that sequential readers and the prefetcher
brought in. A sequential scan of a whole disk therefore cycles through the small scan segment
and never flushes the hot working set out of `main`; a random read that hits a block in the
scan segment promotes it to `main`.

Concurrency: used only from the trio thread. pyfuse3 runs many handler tasks at once and they
interleave at every `await`; concurrent misses on one block share one backend read through an
in-flight record, whether that read is a demand read or a prefetch. A hit returns without
awaiting anything, so it never leaves the trio thread.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import trio
from cachetools import LRUCache

from ivdfs.errors import BackendError

log = logging.getLogger(__name__)

Block = bytes | bytearray


@dataclass
class _Pending:
    event: trio.Event = field(default_factory=trio.Event)
    value: Block | None = None
    error: BaseException | None = None
    prefetch: bool = False


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    shared_misses: int = 0  # waited for another task's read of the same block
    prefetched: int = 0  # blocks read ahead by the prefetcher
    prefetch_hits: int = 0  # demand reads served by a block the prefetcher read (or was reading)
    prefetch_failures: int = 0
    promoted: int = 0  # scan-segment blocks a random read moved to the main segment
    zero_blocks: int = 0  # unallocated blocks answered with zeros, no read

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def scan_segment_bytes(max_bytes: int, block_size: int, prefetch_blocks: int) -> int:
    """Room for a reader's prefetch window twice over, an eighth of the cache at least, and
    never more than half of it."""
    want = max(max_bytes // 8, (2 * prefetch_blocks + 2) * block_size)
    return max(block_size, min(want, max_bytes // 2))


class BlockCache:
    def __init__(self, max_bytes: int, scan_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        scan = max_bytes // 4 if scan_bytes is None else min(scan_bytes, max_bytes // 2)
        self._main: LRUCache[Hashable, Block] = LRUCache(maxsize=max_bytes - scan, getsizeof=len)
        self._scan: LRUCache[Hashable, Block] = LRUCache(maxsize=scan, getsizeof=len)
        self._inflight: dict[Hashable, _Pending] = {}
        # Prefetched blocks not yet asked for, so the first demand hit counts as a prefetch hit.
        self._unused_prefetch: set[Hashable] = set()
        self.stats = CacheStats()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._main or key in self._scan or key in self._inflight

    @property
    def current_bytes(self) -> int:
        return int(self._main.currsize + self._scan.currsize)

    def _lookup(self, key: Hashable, scan: bool) -> Block | None:
        value = self._main.get(key)
        if value is not None:
            return value
        value = self._scan.get(key)
        if value is not None and not scan:
            # A random read wants it too: it belongs to the working set now.
            del self._scan[key]
            self._insert(key, value, scan=False)
            self.stats.promoted += 1
        return value

    def _insert(self, key: Hashable, value: Block, scan: bool) -> None:
        segment = self._scan if scan else self._main
        if len(value) <= segment.maxsize:
            segment[key] = value

    def _note_hit(self, key: Hashable) -> None:
        self.stats.hits += 1
        if self._unused_prefetch:
            if key in self._unused_prefetch:
                self._unused_prefetch.discard(key)
                self.stats.prefetch_hits += 1

    async def get(
        self, key: Hashable, fetch: Callable[[], Awaitable[Block]], scan: bool = False
    ) -> Block:
        """The block for `key`, read with `fetch` on a miss. `scan`: the caller reads
        sequentially, so a block it brings in goes to the scan segment."""
        while True:
            value = self._lookup(key, scan)
            if value is not None:
                self._note_hit(key)
                return value
            pending = self._inflight.get(key)
            if pending is None:
                break
            self.stats.shared_misses += 1
            if pending.prefetch:
                pending.prefetch = False  # one prefetch hit per block
                self.stats.prefetch_hits += 1
            await pending.event.wait()
            if pending.value is not None:
                self._unused_prefetch.discard(key)
                return pending.value
            if pending.error is not None and not isinstance(pending.error, trio.Cancelled):
                if not isinstance(pending.error, _PrefetchGaveUp):
                    raise pending.error
            # The reader was cancelled, or a prefetch failed: try again, possibly as the reader.

        self.stats.misses += 1
        return await self._fill(key, fetch, scan, prefetch=False)

    async def prefetch(self, key: Hashable, fetch: Callable[[], Awaitable[Block]]) -> bool:
        """Read `key` into the scan segment unless it is cached or being read; False when the
        read failed. A failure is only logged: the demand read that wants the block retries it
        and reports it."""
        if key in self:
            return True
        self.stats.prefetched += 1
        try:
            await self._fill(key, fetch, scan=True, prefetch=True)
        except BackendError as e:
            self.stats.prefetch_failures += 1
            log.debug("prefetch of %s failed: %s", key, e)
            return False
        else:
            self._unused_prefetch.add(key)
            # Bounded by what the scan segment can hold: forget keys it has evicted.
            if len(self._unused_prefetch) > 4 * max(1, len(self._scan)):
                self._unused_prefetch &= set(self._scan.keys())
            return True

    async def _fill(
        self, key: Hashable, fetch: Callable[[], Awaitable[Block]], scan: bool, prefetch: bool
    ) -> Block:
        pending = self._inflight[key] = _Pending(prefetch=prefetch)
        try:
            value = await fetch()
            pending.value = value
            # A failed or short read never gets here, so the cache only ever holds whole blocks.
            self._insert(key, value, scan)
            return value
        except BaseException as e:
            # Waiters on a failed prefetch retry as demand readers instead of seeing its error.
            pending.error = (
                _PrefetchGaveUp() if prefetch and not isinstance(e, trio.Cancelled) else e
            )
            raise
        finally:
            del self._inflight[key]
            pending.event.set()


class _PrefetchGaveUp(Exception):
    """Marks an in-flight record whose prefetch failed; waiters read the block themselves."""
