"""The mount's one owner of VDDK connections, disk handles and PrepareForAccess.

Role: disks follow use. A snapshot the tree knows is a `Slot` (`ivdfs.vddk.slots`); its disk is
opened on the first read (after PrepareForAccess for its IVD) and closed again when nothing
uses it: `idle_timeout` seconds after the last open file or guest volume let go of it, or a few
seconds after a probe (partition table, size) that no file followed. Reads in flight keep a
disk open; read-ahead never opens or evicts one. The service composes named parts:

- `ConnectionBudget` (`budget`): at most `max_connections` connections, a first-come queue,
  and the choice of which disk closes for a waiting one, in turns;
- `AccessLedger` (`ledger`): PrepareForAccess once per IVD, EndAccess once nothing of it was
  used within `idle_timeout`, however often the cap closed and reopened its disks;
- `FailureMemory` (`failures`): opens and blocks that failed lately fail again at once;
- an `Opener` (`opener`): how a disk is opened (today `NetworkOpener`: ConnectEx to the server
  and Open, a connection per handle, the IVD prepared);

and keeps the rest itself: opening and closing (one close path for the idle reaper, eviction,
a failed read and the unmount alike), the idle reaper (`run`), retries of failed reads, and the
pins of what holds a connection or an access outside the tree's reads (VixMntapi volumes,
--snapshot-now snapshots). Every real deployment needs the cap: each open disk is an NFC
session (ESXi caps them per host) and, with a password, a vCenter login.

Failures: a transient read failure reopens the disk and retries with backoff; permanent codes
(bad login, missing privilege, VDDK plugins not loaded ...) are not retried, since every
reopen is a fresh vCenter login.

Concurrency: everything here runs on the trio thread, except the `*_blocking` bodies, which
run on the control thread (ConnectEx, Open, Close, Disconnect, PrepareForAccess, EndAccess:
VDDK wants a handle opened and closed on one thread) and `close_all`, called once from the
main thread after the trio loop has ended. The access ledger's table is touched only on the
control thread.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import trio

from ivdfs.config import MIN_OPEN as MIN_OPEN  # under the cap (see ivdfs.vddk.budget)
from ivdfs.config import Limits as Limits
from ivdfs.errors import BackendError
from ivdfs.inventory.model import DiskTarget, Ivd, Snapshot
from ivdfs.vddk.budget import BudgetStats, ConnectionBudget
from ivdfs.vddk.connection import ServerTarget
from ivdfs.vddk.disk import OpenDisk
from ivdfs.vddk.failures import FailureMemory, RememberedFailure, is_permanent_error
from ivdfs.vddk.ledger import AccessLedger, Holdings, LedgerStats
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.opener import NetworkOpener, Opener
from ivdfs.vddk.slots import Changes, Slot, Slots
from ivdfs.vddk.threads import ThreadWorker

__all__ = [
    "MIN_OPEN",
    "DiskService",
    "Holdings",
    "Limits",
    "RememberedFailure",
    "ServiceDisk",
    "ServiceDisks",
    "ServiceStats",
    "Slot",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Reads: attempts per block and the backoff before the first retry (doubling).
READ_ATTEMPTS = 4
READ_BACKOFF = 0.2


@dataclass
class OpenStats:
    opens: int = 0
    closes: int = 0
    idle_closes: int = 0
    open_failures: int = 0


@dataclass
class ServiceStats(LedgerStats, BudgetStats, OpenStats):
    """Every part's counters as one record (/.ivdfs/stats)."""

    remembered_failures: int = 0  # opens answered from a remembered failure, no VDDK call


class DiskService:
    def __init__(
        self,
        lib: VddkLibrary,
        server: ServerTarget,
        identity: str,
        transport_modes: str | None = None,
        limits: Limits = Limits(),
        holdings: Holdings | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        opener: Opener | None = None,
    ) -> None:
        """`opener`: how disks open (default: ConnectEx to `server` and Open, `NetworkOpener`)."""
        if limits.max_connections < limits.handles_per_disk:
            raise ValueError("max_connections must allow one disk's handles")
        self.lib = lib
        self.limits = limits
        self._server = server
        self._transport_modes = transport_modes
        self._clock = clock
        self._control = ThreadWorker("vddk-control")
        self.opener = opener or NetworkOpener(lib, server, transport_modes, limits)
        self._slots = Slots()
        self._changes = Changes()
        self._closed = False
        self.failures = FailureMemory(clock)
        self.budget = ConnectionBudget(limits, self._slots, self._changes, clock, self._close_slot)
        self.ledger = AccessLedger(lib, server, identity, self._control, holdings)
        self._counts = OpenStats()

    # --- what the tree uses --------------------------------------------------------------

    def slot(self, target: DiskTarget) -> Slot:
        return self._slots.get(target)

    def forget(self, target: DiskTarget) -> None:
        """The tree freed the snapshot: close its disk as soon as no read is in flight."""
        slot = self._slots.find(target)
        if slot is None:
            return
        slot.forgotten = True
        if slot.gone:
            self._slots.drop(slot)
        self._notify()

    def hold(self, slot: Slot) -> None:
        """An open file or a mounted guest volume uses the disk (it stays open while held)."""
        slot.users += 1
        slot.held = slot.ever_held = True

    def release(self, slot: Slot) -> None:
        slot.users -= 1
        slot.last_used = self._clock()
        self._notify()

    async def capacity(self, slot: Slot) -> int:
        """The disk's own size in bytes; opens the disk the first time."""
        if slot.capacity is None:
            await self._acquire(slot, background=False)
            self._done(slot)
        assert slot.capacity is not None
        return slot.capacity

    async def sector_size(self, slot: Slot) -> int:
        """The disk's logical sector size (4096 for a 4Kn disk); opens it the first time."""
        await self.capacity(slot)
        return slot.sector_size

    async def read(
        self, slot: Slot, start_sector: int, nbytes: int, background: bool = False
    ) -> bytearray:
        """`background`: read-ahead, which is tried once, waits while a demand read waits, and
        never opens a disk or evicts another one to get a connection."""
        if not background:
            self.failures.check_block(slot, start_sector)
        for attempt in range(1, READ_ATTEMPTS + 1):
            disk: OpenDisk | None = None
            try:
                disk = await self._acquire(slot, background)
                try:
                    return await disk.read(start_sector, nbytes, background)
                finally:
                    self._done(slot)
            except BackendError as e:
                error = e
            if background:
                # Read-ahead: one attempt, neither retried nor remembered, so it never spends
                # a fresh connection or marks a block failed before anyone asked for it.
                raise error
            permanent = is_permanent_error(error)
            if permanent or attempt == READ_ATTEMPTS:
                if disk is not None:  # the read itself failed, not the disk's open
                    self.failures.block_failed(slot, start_sector, error)
                raise error
            if disk is not None:
                log.warning("%s; reopening and retrying (attempt %d of %d)", error, attempt + 1,
                            READ_ATTEMPTS)  # fmt: skip
                await self._discard(slot, disk)
            await trio.sleep(READ_BACKOFF * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def allocated(
        self, slot: Slot, start: int, end: int, granularity: int
    ) -> list[tuple[int, int]]:
        """Runs of sectors in [start, end) that may hold data (`OpenDisk.allocated`); not
        retried (callers treat a failure as 'allocated')."""
        disk = await self._acquire(slot, background=False)
        try:
            return await disk.allocated(start, end, granularity)
        finally:
            self._done(slot)

    # --- opening -------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changes.notify()

    def _done(self, slot: Slot) -> None:
        slot.active -= 1
        slot.last_used = self._clock()
        self._notify()

    async def _acquire(self, slot: Slot, background: bool) -> OpenDisk:
        """The slot's open disk, opened if need be, counted as in use until `_done`."""
        while True:
            if self._closed:
                raise BackendError("shutting down")
            disk = slot.disk
            if disk is not None and not disk.closed:
                if not slot.draining:
                    slot.active += 1
                    return disk
                if background:
                    raise BackendError("closing for another disk; no read-ahead", quiet=True)
                # Closing for a disk that waited: this reader queues up for it again.
                await self._changes.next.wait()
                continue
            if background:
                raise BackendError("not open; read-ahead does not open disks", quiet=True)
            self.failures.check_open(slot)
            if slot.opening is not None:
                await slot.opening.wait()
                continue
            await self._open(slot)

    async def _open(self, slot: Slot) -> None:
        slot.opening = event = trio.Event()
        target = slot.target
        n = self.opener.connections(target)
        try:
            # Shielded: readers waiting on `event` want the disk even if this caller left, and
            # a connection opened for nobody would never be counted back.
            with trio.CancelScope(shield=True):
                await self.budget.reserve(n)
                try:
                    disk = await self._control.run(lambda: self._open_blocking(target))
                except BaseException:
                    self.budget.release(n)
                    raise
            slot.disk, slot.connections = disk, n
            slot.capacity = disk.capacity
            slot.sector_size = disk.sector_size
            slot.held = slot.users > 0
            slot.last_used = slot.opened_at = self._clock()
            self.failures.opened(slot)
            if self.opener.needs_access(target):
                self.ledger.prepared.add(target.ivd_id)
            self._counts.opens += 1
        except BackendError as e:
            self._counts.open_failures += 1
            raise self.failures.open_failed(slot, e) from None
        finally:
            slot.opening = None
            event.set()
            self._notify()

    def _open_blocking(self, target: DiskTarget) -> OpenDisk:
        """Control thread: the IVD's access (first), then the disk."""
        access = self.opener.needs_access(target)
        if access:
            self.ledger.take(target)
        try:
            return self.opener.open(target)
        except BaseException:
            if access:
                self.ledger.give_back(target.ivd_id, end=True)
            raise

    # --- closing: one path, whoever asks ---------------------------------------------------

    async def _close_slot(self, slot: Slot, why: str) -> None:
        """Close the slot's disk (idle, to make room); the slot goes once the tree forgot it."""
        disk = slot.disk
        if disk is None:
            return
        slot.disk = None
        slot.held = slot.draining = False
        await self._close_disk(slot, disk, why)
        if slot.gone:
            self._slots.drop(slot)

    async def _discard(self, slot: Slot, broken: OpenDisk) -> None:
        """Close a disk whose read failed; concurrent readers that saw it share one close."""
        if slot.disk is broken:
            slot.disk = None
            await self._close_disk(slot, broken, "after a failed read")

    def _access_until(self, ivd_id: str) -> float:
        return self.ledger.until(self._slots, ivd_id, self.limits.idle_timeout)

    async def _close_disk(self, slot: Slot, disk: OpenDisk, why: str) -> None:
        disk.closed = True
        ivd_id = disk.target.ivd_id
        # The access ends with the disk only when nothing else of the IVD was in use lately.
        end = self.limits.legacy or self._access_until(ivd_id) <= self._clock()
        with trio.CancelScope(shield=True):
            try:
                # Joining the I/O threads waits for their queued reads: not on the trio thread.
                await trio.to_thread.run_sync(disk.stop_io)
                await self._control.run(lambda: self._close_blocking(disk, end))
            finally:
                self._closed_disk(slot, disk)
        log.debug("closed %s %s", disk.target.describe(), why)

    def _close_disk_blocking(self, slot: Slot, disk: OpenDisk) -> None:
        """The same close from outside trio (teardown), ending the IVD's access if unused."""
        disk.closed = True
        try:
            disk.stop_io()
            self._control.run_blocking(lambda: self._close_blocking(disk, True))
        finally:
            self._closed_disk(slot, disk)

    def _closed_disk(self, slot: Slot, disk: OpenDisk) -> None:
        """The bookkeeping of every close: the disk's connections go back to the budget. (The
        count is the disk's, not the slot's: a reader may have reopened the slot meanwhile.)"""
        self.budget.release(self.opener.connections(disk.target))
        if slot.disk is None and slot.opening is None:
            slot.connections = 0
        self._counts.closes += 1

    def _close_blocking(self, disk: OpenDisk, end_access: bool) -> None:
        """Control thread: close the handles, then give the IVD's access back."""
        for handle in disk.handles:
            try:
                handle.close()
            except BackendError as e:
                log.warning("closing %s: %s", handle.target.describe(), e)
        if self.opener.needs_access(disk.target):
            self.ledger.give_back(disk.target.ivd_id, end_access)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close disks that nothing uses once they have lingered, and end the access of IVDs
        nothing used for as long; runs until cancelled."""
        task_status.started()
        idle = self.limits.idle_timeout
        while True:
            change = self._changes.next
            now = self._clock()
            due = await self.ledger.end_idle_accesses(self._slots, idle, now)
            for slot in self._slots:
                if not slot.closable or slot.in_use:
                    continue
                linger = slot.linger(idle)
                if slot.last_used + linger <= now:
                    self._counts.idle_closes += 1
                    await self._close_slot(slot, "after being idle")
                else:
                    due = min(due, slot.last_used + linger)
            # `due` is on self._clock, not trio's: wait for a change or for that many seconds.
            with trio.move_on_after(max(0.0, due - self._clock()) if due < math.inf else 3600):
                await change.wait()

    # --- pins: what holds an IVD's access, or a connection, outside the tree's reads ------

    async def pin_connection(self) -> None:
        """Count one connection (a VixMntapi volume's) against the cap until `unpin_connection`."""
        await self.budget.pin()

    def unpin_connection(self) -> None:
        self.budget.unpin()

    def pin_access_blocking(self, target: DiskTarget) -> None:
        """PrepareForAccess (once per IVD) held until `unpin_access_blocking`: VMware's order
        for a temporary snapshot is Prepare, create, read, delete, EndAccess."""
        self._control.run_blocking(lambda: self.ledger.pin(target))

    def unpin_access_blocking(self, target: DiskTarget) -> None:
        self._control.run_blocking(lambda: self.ledger.unpin(target))

    def pin_access_on_control(self, target: DiskTarget) -> None:
        """`pin_access_blocking` for a caller already on the control thread (VixMntapi)."""
        self.ledger.pin(target)

    def unpin_access_on_control(self, target: DiskTarget) -> None:
        self.ledger.unpin(target)

    # --- for VixMntapi (ivdfs.volumes.vixmntapi): its calls belong on the control thread ---

    @property
    def server(self) -> ServerTarget:
        return self._server

    @property
    def transport_modes(self) -> str | None:
        return self._transport_modes

    async def run_on_control(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise BackendError("shutting down")
        return await self._control.run(fn)

    def run_on_control_blocking(self, fn: Callable[[], T]) -> T:
        """From outside trio (teardown), before `close_all` stops the thread."""
        return self._control.run_blocking(fn)

    # --- teardown (main thread, after the trio loop) -------------------------------------

    def close_targets_blocking(self, targets: Iterable[DiskTarget]) -> None:
        """Close the disks of these snapshots now (before deleting temporary snapshots)."""
        wanted = set(targets)
        for slot in self._slots:
            if slot.target in wanted and slot.disk is not None:
                disk, slot.disk = slot.disk, None
                self._close_disk_blocking(slot, disk)

    def close_all(self) -> None:
        """Close every handle, then EndAccess every IVD (pinned or not); once, at unmount."""
        self._closed = self.budget.closed = True
        for slot in self._slots:
            if slot.disk is not None:
                disk, slot.disk = slot.disk, None
                try:
                    self._close_disk_blocking(slot, disk)
                except BackendError as e:
                    log.warning("closing %s: %s", disk.target.describe(), e)
        self._slots.clear()
        self.ledger.prepared.clear()
        try:
            self._control.run_blocking(self.ledger.end_all)
        finally:
            self._control.stop()

    @property
    def stats(self) -> ServiceStats:
        """The counters of every part, as one record."""
        return ServiceStats(
            **asdict(self._counts),
            **asdict(self.budget.stats),
            **asdict(self.ledger.stats),
            remembered_failures=self.failures.remembered,
        )

    def report(self) -> dict[str, Any]:
        """For /.ivdfs/stats: what is open and held right now, and the counters."""
        open_slots = [s for s in self._slots if s.disk is not None]
        return {
            **self.stats.__dict__,
            "open_disks": len(open_slots),
            "held_disks": sum(1 for s in open_slots if s.users),
            "connections": self.budget.connections,
            "volume_connections": self.budget.pinned,
            "max_connections": self.limits.max_connections,
            "prepared_ivds": self.ledger.count,
            "known_snapshots": len(self._slots),
        }


class ServiceDisk:
    """The tree's view of one snapshot's disk (`ivdfs.tree.disk.Disk`), over the service."""

    def __init__(self, service: DiskService, slot: Slot) -> None:
        self._service = service
        self._slot = slot

    async def capacity(self) -> int:
        return await self._service.capacity(self._slot)

    async def sector_size(self) -> int:
        return await self._service.sector_size(self._slot)

    async def read(self, start_sector: int, nbytes: int, background: bool = False) -> bytearray:
        return await self._service.read(self._slot, start_sector, nbytes, background)

    async def allocated(self, start: int, end: int, granularity: int) -> list[tuple[int, int]]:
        return await self._service.allocated(self._slot, start, end, granularity)

    def hold(self) -> None:
        self._service.hold(self._slot)

    def release(self) -> None:
        self._service.release(self._slot)

    def forget(self) -> None:
        self._service.forget(self._slot.target)


class ServiceDisks:
    """The tree's source of disks (`ivdfs.tree.disk.DiskSource`): one slot per snapshot."""

    def __init__(self, service: DiskService) -> None:
        self.service = service

    def disk(self, ivd: Ivd, snapshot: Snapshot) -> ServiceDisk:
        return ServiceDisk(self.service, self.service.slot(DiskTarget.of(ivd, snapshot)))
