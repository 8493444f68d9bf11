"""Background read-ahead for sequential readers.

A `Prefetcher` owns one nursery, started inside the mount's main nursery, so unmounting
cancels every outstanding prefetch with it. Readers hand it zero-argument coroutine functions
(each reads one block into the cache's scan segment); at most `max_in_flight` run at once. Their
reads say they are background reads (`DiskReader.start_prefetch`), so a demand read waiting for
a VDDK slot always goes first.

Concurrency: trio thread only. Without a running nursery (tests that build a reader directly,
or before the mount runs) `submit` declines and nothing is prefetched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)


# Blocks read ahead at once, for all readers: half of a handle's ReadAsync depth, so demand
# reads always find room in VDDK's queue.
DEFAULT_IN_FLIGHT = 8
# After a failed prefetch, read nothing ahead for this long: a failing backend (lost
# connections, a damaged region) should see only the reads someone waits for, and their retries.
PAUSE_AFTER_FAILURE = 5.0


class Prefetcher:
    def __init__(self, max_in_flight: int = DEFAULT_IN_FLIGHT) -> None:
        self._nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(max(1, max_in_flight))
        self.queued = 0
        self._paused_until = 0.0

    @property
    def running(self) -> bool:
        return self._nursery is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve prefetches until cancelled (at unmount)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def submit(self, job: Callable[[], Awaitable[bool]]) -> bool:
        """Run `job` (True: done, False: its read failed) in the background, unless stopped
        or paused after a failure."""
        if self._nursery is None or time.monotonic() < self._paused_until:
            return False
        self.queued += 1
        self._nursery.start_soon(self._one, job)
        return True

    async def _one(self, job: Callable[[], Awaitable[bool]]) -> None:
        try:
            async with self._limiter:
                if time.monotonic() >= self._paused_until and not await job():
                    self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE
        except Exception:
            # A prefetch is only a hint; the demand read that needs the block reports errors.
            log.debug("prefetch failed", exc_info=True)
        finally:
            self.queued -= 1
