"""A cache of whole disk blocks, bounded in bytes, with single-flight misses and an adaptive,
scan-resistant split between a main and a scan segment (2Q-like).

Two lists share one byte budget. `main` (a `cachetools.LRUCache`) holds the working set: blocks
a random (demand) read asked for, and blocks referenced again after they came in. `scan` (a
`cachetools.FIFOCache`, 2Q's A1in) is the probation list: blocks that sequential readers and the
prefetcher brought in and nobody has referenced again yet. First in, first out: the oldest
block of a scan is one its reader has passed, while the newest are read-ahead it has not reached
yet (an LRU order would evict those first, since reading a block makes it most recent). Neither
list has a size of its own; what adapts is the eviction rule:

- evict from `scan` while it holds more than its reserve (`scan_bytes`), otherwise from `main`.

(Main may borrow free space too, and gives it back once the scan list wants its reserve.)

So a sequential pass over a disk that fits in the cache keeps all of it (the scan list grows
into whatever main does not use), a scan larger than the cache cycles through the scan list
and leaves `main` alone (main loses at most the reserve), and main can never squeeze the scan
list below its reserve (room for a reader's prefetch window, so read-ahead is not evicted before
it is read).

A block moves from `scan` to `main` when it is referenced again: by a random read, or by a
sequential reader more than `correlated` block lookups after its previous reference. The
kernel's read requests straddle block boundaries and a sequential reader touches each block a
few times in a row; those touches are one reference (2Q's "correlated references"), which is
what keeps one big scan from promoting every block it reads. A second pass over a disk, or the
kernel asking again for pages it dropped, is a real re-reference.

Why keep what fits when the kernel has a page cache (issue 17): the kernel's FUSE code keeps
disk.raw's pages (FOPEN_KEEP_CACHE on every disk and partition open, constant size and mtime,
so auto_inval_data never fires; no short reads, no notify_inval). What drops them is the host:
ftrace of filemap:mm_filemap_delete_from_page_cache on the mount showed every deletion coming
from kdamond (damon_pa_apply_scheme -> reclaim_pages), a DAMON scheme that pages out unmapped
file pages of physical regions idle for a minute, 128 MiB/s at most. It takes ext4 pages alike;
tmpfs (no swap) and mapped pages are spared, anonymous memory (this cache) too. It evicts by
physical region, so a file loses pages scattered over nearly every block, and the next pass
asks ivdfs for most blocks although 99% of the file is resident. Hosts under memory pressure do
the same through ordinary reclaim. Hence: whatever fits in --cache-size stays here, and a lost
page costs a memory copy, never a VDDK read.

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
from cachetools import FIFOCache, LRUCache

from ivdfs.errors import BackendError

log = logging.getLogger(__name__)

Block = bytes | bytearray

# Block lookups within which repeated touches of a scan block count as one reference: well
# above the few touches a sequential reader makes of one block while passing it, even with the
# kernel's concurrent read-ahead requests interleaved.
DEFAULT_CORRELATED = 32


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
    promoted: int = 0  # scan-segment blocks moved to the main segment (any re-reference)
    zero_blocks: int = 0  # unallocated blocks answered with zeros, no read
    rereferenced: int = 0  # of `promoted`: a sequential reader came back to the block
    evicted_main: int = 0
    evicted_scan: int = 0
    main_bytes: int = 0  # current size of each segment
    scan_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def scan_segment_bytes(max_bytes: int, block_size: int, prefetch_blocks: int) -> int:
    """The scan segment's reserve: room for a reader's prefetch window twice over, an eighth of
    the cache at least, and never more than half of it."""
    want = max(max_bytes // 8, (2 * prefetch_blocks + 2) * block_size)
    return max(block_size, min(want, max_bytes // 2))


class BlockCache:
    def __init__(
        self,
        max_bytes: int,
        scan_bytes: int | None = None,
        correlated: int = DEFAULT_CORRELATED,
    ) -> None:
        self.max_bytes = max_bytes
        reserve = max_bytes // 4 if scan_bytes is None else scan_bytes
        self.scan_reserve = min(reserve, max_bytes // 2)
        self.correlated = correlated
        # Each list could hold the whole budget; `_make_room` keeps their sum within it, so
        # neither list ever evicts on its own.
        self._main: LRUCache[Hashable, Block] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self._scan: FIFOCache[Hashable, Block] = FIFOCache(maxsize=max_bytes, getsizeof=len)
        # Scan blocks a demand read has referenced -> `_clock` at that reference. A block that
        # is not here was prefetched and never asked for: its first demand read is its first
        # reference, not a second one.
        self._referenced: dict[Hashable, int] = {}
        self._clock = 0  # demand block lookups so far
        self._inflight: dict[Hashable, _Pending] = {}
        # Prefetched blocks not yet asked for, so the first demand hit counts as a prefetch hit.
        self._unused_prefetch: set[Hashable] = set()
        self.stats = CacheStats()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._main or key in self._scan or key in self._inflight

    @property
    def current_bytes(self) -> int:
        return int(self._main.currsize + self._scan.currsize)

    def _sizes_changed(self) -> None:
        self.stats.main_bytes = int(self._main.currsize)
        self.stats.scan_bytes = int(self._scan.currsize)

    def _lookup(self, key: Hashable, scan: bool) -> Block | None:
        value = self._main.get(key)
        if value is not None:
            return value
        value = self._scan.get(key)
        if value is not None:
            self._reference_scan_block(key, value, scan)
        return value

    def _reference_scan_block(self, key: Hashable, value: Block, scan: bool) -> None:
        """A demand read of a block in the scan list: promote it if this is a second
        reference, otherwise remember when it was referenced."""
        previous = self._referenced.get(key)
        again = previous is not None and self._clock - previous > self.correlated
        if scan and not again:
            # The reader passing the block (or a prefetched block's first use): one reference.
            self._referenced[key] = self._clock
            return
        # A random read wants it, or a sequential reader came back: it is in use.
        del self._scan[key]
        self._referenced.pop(key, None)
        self.stats.promoted += 1
        if scan:
            self.stats.rereferenced += 1
        self._insert(key, value, scan=False)

    def _make_room(self, nbytes: int, scan: bool) -> None:
        """Evict until `nbytes` more fit, for an insert into the scan list or main."""
        while self._main.currsize + self._scan.currsize + nbytes > self.max_bytes:
            # The scan list pays for what it holds beyond its reserve (counting the block it
            # is about to take); within its reserve, main pays (main may borrow free space,
            # never the reserve).
            if self._scan and (self._scan.currsize + (nbytes if scan else 0) > self.scan_reserve
                               or not self._main):  # fmt: skip
                key, _ = self._scan.popitem()
                self._referenced.pop(key, None)
                self._unused_prefetch.discard(key)
                self.stats.evicted_scan += 1
            else:
                self._main.popitem()
                self.stats.evicted_main += 1

    def _insert(self, key: Hashable, value: Block, scan: bool) -> None:
        if len(value) > self.max_bytes:
            return
        self._make_room(len(value), scan)
        (self._scan if scan else self._main)[key] = value
        self._sizes_changed()

    def _note_hit(self, key: Hashable) -> None:
        self.stats.hits += 1
        if self._unused_prefetch:
            if key in self._unused_prefetch:
                self._unused_prefetch.discard(key)
                self.stats.prefetch_hits += 1

    def drop(self, owned: Callable[[Hashable], bool]) -> int:
        """Forget every cached block whose key `owned` claims (a disk whose source changed);
        reads in flight are left to finish. How many were dropped."""
        dropped = 0
        for segment in (self._main, self._scan):
            for key in [k for k in segment if owned(k)]:
                del segment[key]
                self._referenced.pop(key, None)
                self._unused_prefetch.discard(key)
                dropped += 1
        self._sizes_changed()
        return dropped

    async def get(
        self, key: Hashable, fetch: Callable[[], Awaitable[Block]], scan: bool = False
    ) -> Block:
        """The block for `key`, read with `fetch` on a miss. `scan`: the caller reads
        sequentially, so a block it brings in goes to the scan segment."""
        self._clock += 1
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
                if key in self._scan and key not in self._referenced:
                    self._referenced[key] = self._clock  # its first reference
                return pending.value
            if pending.error is not None and not isinstance(pending.error, trio.Cancelled):
                if not isinstance(pending.error, _PrefetchGaveUp):
                    raise pending.error
            # The reader was cancelled, or a prefetch failed: try again, possibly as the reader.

        self.stats.misses += 1
        value = await self._fill(key, fetch, scan, prefetch=False)
        if key in self._scan:
            self._referenced[key] = self._clock
        return value

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
            # Unless a demand read already took it, or it is already gone again (a scan list
            # at its reserve under a larger scan): eviction forgets what it evicts.
            if key in self._scan and key not in self._referenced:
                self._unused_prefetch.add(key)
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
