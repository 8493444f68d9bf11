"""An LRU cache of whole disk blocks, bounded in bytes, with single-flight misses.

Concurrency: used only from the trio thread. pyfuse3 runs many handler tasks at once and they
interleave at every `await`; concurrent misses on one block share one backend read through an
in-flight record. A hit returns without awaiting anything, so it never leaves the trio thread.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import trio
from cachetools import LRUCache

log = logging.getLogger(__name__)

Block = bytes | bytearray


@dataclass
class _Pending:
    event: trio.Event = field(default_factory=trio.Event)
    value: Block | None = None
    error: BaseException | None = None


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    shared_misses: int = 0  # waited for another task's read of the same block


class BlockCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lru: LRUCache[Hashable, Block] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self._inflight: dict[Hashable, _Pending] = {}
        self.stats = CacheStats()

    def peek(self, key: Hashable) -> Block | None:
        return self._lru.get(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru or key in self._inflight

    @property
    def current_bytes(self) -> int:
        return int(self._lru.currsize)

    async def get(self, key: Hashable, fetch: Callable[[], Awaitable[Block]]) -> Block:
        while True:
            value = self._lru.get(key)
            if value is not None:
                self.stats.hits += 1
                return value
            pending = self._inflight.get(key)
            if pending is None:
                break
            self.stats.shared_misses += 1
            await pending.event.wait()
            if pending.value is not None:
                return pending.value
            if pending.error is not None and not isinstance(pending.error, trio.Cancelled):
                raise pending.error
            # The reader was cancelled (not failed): try again, possibly as the reader.

        self.stats.misses += 1
        pending = self._inflight[key] = _Pending()
        try:
            value = await fetch()
            pending.value = value
            # A failed or short read never gets here, so the cache only ever holds whole blocks.
            if len(value) <= self.max_bytes:
                self._lru[key] = value
            return value
        except BaseException as e:
            pending.error = e
            raise
        finally:
            del self._inflight[key]
            pending.event.set()

    def clear(self) -> None:
        self._lru.clear()
