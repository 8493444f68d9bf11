"""The connection cap: at most `max_connections` VDDK connections (NFC sessions) at once.

Role: a disk that needs connections waits in one first-come queue (no waiting disk starves),
and the first in it takes free connections, or closes an open disk: one nobody holds or reads
first (least recently used), else a held one nobody has read for `in_use_gap`, else the disk in
use that has been open longest, once it has been open `min_open` seconds. A disk chosen so
admits no new reads (`Slot.draining`: its readers queue up for it again) and closes when those
in flight are done. So under contention opens follow the switches of a fair schedule, each
serving a batch of reads, not every read. Connections that VixMntapi's volumes hold are pinned:
counted, never evicted. (`legacy`: the policy before issue 28, kept for the side-by-side
benchmark: any disk without a read in flight is closed for another at once.)

Concurrency: trio thread only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ivdfs.config import Limits
from ivdfs.errors import BackendError
from ivdfs.vddk.slots import Changes, Slot, Slots

CloseSlot = Callable[[Slot, str], Awaitable[None]]


@dataclass
class BudgetStats:
    evictions: int = 0
    waits: int = 0  # opens that waited for a free connection
    wait_seconds: float = 0.0


class ConnectionBudget:
    def __init__(
        self,
        limits: Limits,
        slots: Slots,
        changes: Changes,
        clock: Callable[[], float],
        close: CloseSlot,
    ) -> None:
        """`close(slot, why)` closes an open disk to make room (the service's close path)."""
        self.limits = limits
        self._slots = slots
        self._changes = changes
        self._clock = clock
        self._close = close
        self.connections = 0  # open, opening or closing, counted against the cap
        self.pinned = 0  # connections held by VixMntapi volumes
        self.closed = False  # shutting down: no more room for anyone
        self._queue: deque[object] = deque()  # disks waiting, first come first served
        self.stats = BudgetStats()

    def check_room(self, n: int) -> None:
        if self.closed:
            raise BackendError("shutting down")
        if self.pinned + n > self.limits.max_connections:
            raise BackendError(
                f"all {self.limits.max_connections} VDDK connections (--max-connections) "
                "are held by mounted guest volumes"
            )

    async def reserve(self, n: int) -> None:
        """Count `n` connections against the cap, closing disks or waiting for room."""
        if n == 0:
            self.check_room(0)
            return
        if self.limits.legacy:
            await self._reserve_legacy(n)
            return
        started = self._clock()
        waited = False
        ticket = object()
        self._queue.append(ticket)
        try:
            while True:
                change = self._changes.next
                self.check_room(n)
                due = math.inf
                if self._queue[0] is ticket:
                    if self.connections + n <= self.limits.max_connections:
                        self.connections += n
                        break
                    victim, due = self._choose_victim()
                    if victim is not None and not victim.active:
                        self.stats.evictions += 1
                        await self._close(victim, "to make room for another disk")
                        continue
                    if victim is not None:
                        victim.draining = True  # its reads in flight end, then it closes
                if not waited:
                    waited = True
                    self.stats.waits += 1
                # `due` is on self._clock: wait for a change, or that many seconds.
                with trio.move_on_after(max(0.0, due - self._clock()) if due < math.inf else 3600):
                    await change.wait()
        finally:
            self._queue.remove(ticket)
            for slot in self._slots:
                slot.draining = False  # room was found (or the wait ended): all admit reads
            self._changes.notify()
        if waited:
            self.stats.wait_seconds += self._clock() - started

    def release(self, n: int) -> None:
        self.connections -= n
        self._changes.notify()

    async def pin(self) -> None:
        """Count one connection (a VixMntapi volume's) against the cap until `unpin`."""
        await self.reserve(1)
        self.pinned += 1

    def unpin(self) -> None:
        self.pinned -= 1
        self.release(1)

    def _choose_victim(self) -> tuple[Slot | None, float]:
        """The disk to close for the first waiting one, and when to look again if none may be
        closed yet: one nobody holds (least recently used), else a held one nobody has read
        for `in_use_gap`, else the one in use that has been open longest, once it has been open
        `min_open` (a disk already draining keeps its turn)."""
        now = self._clock()
        lim = self.limits
        unheld: list[Slot] = []
        unused: list[Slot] = []
        in_use: list[Slot] = []
        due = math.inf
        draining: Slot | None = None
        for s in self._slots:
            if not s.is_open or not s.connections:
                continue
            if not s.in_use:
                if not s.active:
                    unheld.append(s)
            elif s.draining:
                draining = s
            elif not s.active and now - s.last_used >= lim.in_use_gap:
                unused.append(s)
            else:
                if not s.active:
                    due = min(due, s.last_used + lim.in_use_gap)
                if now - s.opened_at >= lim.min_open:
                    in_use.append(s)
                else:
                    due = min(due, s.opened_at + lim.min_open)
        for group in (unheld, unused):
            if group:
                return min(group, key=lambda s: s.last_used), due
        if draining is not None:
            return draining, due
        if in_use:
            return min(in_use, key=lambda s: s.opened_at), due
        return None, due

    async def _reserve_legacy(self, n: int) -> None:
        started = self._clock()
        waited = False
        while self.connections + n > self.limits.max_connections:
            change = self._changes.next
            self.check_room(n)
            victim = self._victim_legacy()
            if victim is not None:
                self.stats.evictions += 1
                await self._close(victim, "to make room for another disk")
                continue
            if not waited:
                waited = True
                self.stats.waits += 1
            await change.wait()
        self.connections += n
        if waited:
            self.stats.wait_seconds += self._clock() - started

    def _victim_legacy(self) -> Slot | None:
        """The least recently used open disk with no read in flight; unheld disks first."""
        idle = [s for s in self._slots if s.closable and s.connections]
        if not idle:
            return None
        return min(idle, key=lambda s: (s.users > 0, s.last_used))
