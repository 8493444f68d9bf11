"""The mount's one owner of VDDK connections, disk handles and PrepareForAccess.

Role: disks follow use. A snapshot the tree knows is a `Slot`; its disk is opened on the first
read (ConnectEx + Open, after PrepareForAccess for its IVD) and closed again when nothing uses
it: `idle_timeout` seconds after the last open file or guest volume let go of it, or a few
seconds after a probe (partition table, size) that no file followed.

Access follows the IVD's use, not its connections: an IVD stays prepared while any of its
snapshots is held or was used within `idle_timeout` (a probe: within the probe's linger), and
ends (EndAccess) once none was, however often the cap closed and reopened its disks meanwhile.
Each PrepareForAccess and EndAccess is a vCenter operation with its own tasks and events, on
every VM the IVD is attached to.

At most `max_connections` VDDK connections are open at once. A disk that needs one waits in
one first-come queue (no waiting disk starves), and the first in it takes a free connection,
or closes an open disk: one nobody holds or reads first (least recently used), else the disk
in use that has been open longest, once it has been open `min_open` seconds. A disk chosen so
admits no new reads (its readers queue up for it again) and closes when those in flight are
done. Readers waiting for a disk are served together when it opens. So under contention opens
follow the switches of a fair schedule, each serving a batch of reads, not every read; read-ahead
never opens or evicts. (`legacy`: the policy before, kept for the side-by-side benchmark: any
disk without a read in flight is closed for another at once, and EndAccess follows as soon as
no disk of the IVD is open.) Every real deployment needs a cap: each open disk is an NFC session
(ESXi caps them per host) and, with a password, a vCenter login.

Failures: a transient read failure reopens the disk and retries with backoff; permanent codes
(bad login, missing privilege, VDDK plugins not loaded ...) are not retried, since every
reopen is a fresh vCenter login. A disk that fails to open is remembered for a growing
interval, during which opens fail at once without another VDDK call or log line; a block that
keeps failing fails fast for a while.

Concurrency: everything here runs on the trio thread, except the `*_blocking` bodies, which
run on the control thread (ConnectEx, Open, Close, Disconnect, PrepareForAccess, EndAccess:
VDDK wants a handle opened and closed on one thread) and `close_all`, called once from the
main thread after the trio loop has ended. The access table is touched only on the control
thread; the trio side decides when an IVD is idle (`_prepared`) and asks the control thread,
which ends the access only if no disk of the IVD is open or pinned by then.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from ivdfs.config import MIN_OPEN as MIN_OPEN  # under the cap (see the module doc)
from ivdfs.config import Limits as Limits
from ivdfs.errors import BackendError
from ivdfs.inventory.model import DiskTarget
from ivdfs.vddk.connection import Access, DiskHandle, ServerTarget
from ivdfs.vddk.disk import OpenDisk
from ivdfs.vddk.errors import ACCOUNT_CODES, VddkError, is_permanent
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.threads import ThreadWorker

log = logging.getLogger(__name__)

T = TypeVar("T")

# A disk opened for a probe (partition table, size) that no file then held closes this soon.
PROBE_LINGER = 5.0
# Remembered open failures: the first is retried after this long, each further failure doubles
# the wait, up to the maximum. A permanent error of one disk (no such file, no access to it)
# starts at a longer wait: its login worked, so retrying risks no lockout, and a disk that
# appears later (a snapshot still being written) is found without remounting. An account error
# (a refused login, a missing privilege) waits the maximum at once, for every disk: each
# attempt is a failed vCenter login, and repeated ones lock service accounts.
OPEN_RETRY_FIRST = 0.1
OPEN_RETRY_PERMANENT_FIRST = 1.0
OPEN_RETRY_MAX = 60.0
# Reads: attempts per block and the backoff before the first retry (doubling).
READ_ATTEMPTS = 4
READ_BACKOFF = 0.2
# A block that failed every attempt fails fast for this long.
REMEMBER_FAILED_BLOCK = 30.0


class Holdings(Protocol):
    """Where the service records what it holds on vCenter (the mount's journal): written before
    PrepareForAccess and cleared after EndAccess, so a killed mount can be undone."""

    def prepared(self, ivd_id: str, datastore_moref: str) -> None: ...

    def ended(self, ivd_id: str) -> None: ...


@dataclass
class _Failure:
    until: float
    delay: float
    error: BackendError
    permanent: bool = False


class RememberedFailure(BackendError):
    """An open that failed recently, answered again without a new attempt (nor a log line)."""

    def __init__(self, failure: _Failure) -> None:
        super().__init__(
            f"{failure.error} (failed {failure.delay:.1f} s ago at most; not retried yet)",
            quiet=True,
        )
        self.permanent = failure.permanent


@dataclass(eq=False)
class Slot:
    """One snapshot the tree knows: its disk when open, and who uses it."""

    target: DiskTarget
    disk: OpenDisk | None = None
    opening: trio.Event | None = None
    users: int = 0  # open files and guest volumes: they keep the disk from idling out
    active: int = 0  # reads in flight on `disk`: they keep it from being closed at all
    held: bool = False  # a user held it since it was opened (else it was only probed)
    ever_held: bool = False  # a user held it at some time: its IVD's access lasts idle_timeout
    last_used: float = 0.0
    opened_at: float = 0.0
    draining: bool = False  # chosen to make room: admits no new read, closes when none is left
    capacity: int | None = None  # bytes, from the disk's own GetInfo
    sector_size: int = 512  # the guest's logical sector size, from the same GetInfo
    failure: _Failure | None = None
    failed_blocks: dict[int, tuple[float, str]] = field(default_factory=dict)
    forgotten: bool = False


@dataclass
class _AccessState:
    access: Access
    disks: int = 0  # open disks of the IVD
    pins: int = 0  # temporary snapshots and VixMntapi volumes


@dataclass
class ServiceStats:
    opens: int = 0
    closes: int = 0
    idle_closes: int = 0
    evictions: int = 0
    open_failures: int = 0
    remembered_failures: int = 0  # opens answered from a remembered failure, no VDDK call
    waits: int = 0  # opens that waited for a free connection
    wait_seconds: float = 0.0
    prepares: int = 0
    end_accesses: int = 0
    accesses_kept: int = 0  # disks closed while their IVD stayed prepared (it was in use)


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
    ) -> None:
        if limits.max_connections < limits.handles_per_disk:
            raise ValueError("max_connections must allow one disk's handles")
        self.lib = lib
        self.limits = limits
        self._server = server
        self._identity = identity
        self._transport_modes = transport_modes
        self._holdings = holdings
        self._clock = clock
        self._control = ThreadWorker("vddk-control")
        self._slots: dict[DiskTarget, Slot] = {}
        self._by_ivd: dict[str, set[Slot]] = {}
        self._access: dict[str, _AccessState] = {}  # control thread only
        # IVDs whose access a disk open took and the reaper has not ended yet (trio side).
        self._prepared: set[str] = set()
        # Disks waiting for a connection, first come first served.
        self._queue: deque[object] = deque()
        self._connections = 0  # open, opening or closing, counted against the cap
        self._pinned = 0  # connections held by VixMntapi volumes
        self._change = trio.Event()
        self._closed = False
        # A refused login or missing privilege stops every open for a while, not one disk's.
        self._account_failure: _Failure | None = None
        self.stats = ServiceStats()

    # --- what the tree uses --------------------------------------------------------------

    def slot(self, target: DiskTarget) -> Slot:
        slot = self._slots.get(target)
        if slot is None:
            slot = self._slots[target] = Slot(target)
            self._by_ivd.setdefault(target.ivd_id, set()).add(slot)
        slot.forgotten = False
        return slot

    def _drop_slot(self, slot: Slot) -> None:
        if self._slots.get(slot.target) is slot:
            del self._slots[slot.target]
        same = self._by_ivd.get(slot.target.ivd_id)
        if same is not None:
            same.discard(slot)
            if not same:
                del self._by_ivd[slot.target.ivd_id]

    def forget(self, target: DiskTarget) -> None:
        """The tree freed the snapshot: close its disk as soon as no read is in flight."""
        slot = self._slots.get(target)
        if slot is None:
            return
        slot.forgotten = True
        if slot.disk is None and slot.opening is None:
            self._drop_slot(slot)
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
            failed = slot.failed_blocks.get(start_sector)
            if failed is not None:
                if self._clock() < failed[0]:
                    raise BackendError(f"{failed[1]} (failed recently; not retried yet)")
                del slot.failed_blocks[start_sector]
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
            permanent = (isinstance(error, VddkError) and is_permanent(error.code)) or (
                isinstance(error, RememberedFailure) and error.permanent
            )
            if permanent or attempt == READ_ATTEMPTS:
                if disk is not None:  # the read itself failed, not the disk's open
                    until = self._clock() + REMEMBER_FAILED_BLOCK
                    slot.failed_blocks[start_sector] = (until, str(error))
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

    # --- opening, closing, the cap -------------------------------------------------------

    def _notify(self) -> None:
        self._change.set()
        self._change = trio.Event()

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
                await self._change.wait()
                continue
            if background:
                raise BackendError("not open; read-ahead does not open disks", quiet=True)
            failure = slot.failure
            account = self._account_failure
            if account is not None and self._clock() < account.until:
                failure = account
            if failure is not None and self._clock() < failure.until:
                self.stats.remembered_failures += 1
                raise RememberedFailure(failure)
            if slot.opening is not None:
                await slot.opening.wait()
                continue
            await self._open(slot)

    async def _open(self, slot: Slot) -> None:
        slot.opening = event = trio.Event()
        n = self.limits.handles_per_disk
        try:
            # Shielded: readers waiting on `event` want the disk even if this caller left, and
            # a connection opened for nobody would never be counted back.
            with trio.CancelScope(shield=True):
                await self._reserve(n)
                try:
                    disk = await self._control.run(lambda: self._open_blocking(slot.target))
                except BaseException:
                    self._connections -= n
                    raise
            slot.disk = disk
            slot.capacity = disk.capacity
            slot.sector_size = disk.sector_size
            slot.held = slot.users > 0
            slot.last_used = slot.opened_at = self._clock()
            slot.failure = None
            self._prepared.add(slot.target.ivd_id)
            self.stats.opens += 1
        except BackendError as e:
            self.stats.open_failures += 1
            previous = slot.failure
            code = e.code if isinstance(e, VddkError) else None
            permanent = code is not None and is_permanent(code)
            first = OPEN_RETRY_PERMANENT_FIRST if permanent else OPEN_RETRY_FIRST
            delay = first if previous is None else min(2 * previous.delay, OPEN_RETRY_MAX)
            if code in ACCOUNT_CODES:
                delay = OPEN_RETRY_MAX
            if permanent:
                log.error("%s; not reconnecting for %.0f s (a permanent error)", e, delay)
                e = BackendError(str(e), quiet=True)  # logged just now
            slot.failure = _Failure(self._clock() + delay, delay, e, permanent)
            if code in ACCOUNT_CODES:
                self._account_failure = slot.failure
            raise e from None
        finally:
            slot.opening = None
            event.set()
            self._notify()

    async def _reserve(self, n: int) -> None:
        """Count `n` connections against the cap, closing disks or waiting for room."""
        if self.limits.legacy:
            await self._reserve_legacy(n)
            return
        started = self._clock()
        waited = False
        ticket = object()
        self._queue.append(ticket)
        try:
            while True:
                self._check_room(n)
                due = math.inf
                if self._queue[0] is ticket:
                    if self._connections + n <= self.limits.max_connections:
                        self._connections += n
                        break
                    victim, due = self._choose_victim()
                    if victim is not None and not victim.active:
                        self.stats.evictions += 1
                        await self._close_slot(victim, "to make room for another disk")
                        continue
                    if victim is not None:
                        victim.draining = True  # its reads in flight end, then it closes
                if not waited:
                    waited = True
                    self.stats.waits += 1
                # `due` is on self._clock: wait for a change, or that many seconds.
                with trio.move_on_after(max(0.0, due - self._clock()) if due < math.inf else 3600):
                    await self._change.wait()
        finally:
            self._queue.remove(ticket)
            for slot in self._slots.values():
                slot.draining = False  # room was found (or the wait ended): all admit reads
            self._notify()
        if waited:
            self.stats.wait_seconds += self._clock() - started

    def _check_room(self, n: int) -> None:
        if self._closed:
            raise BackendError("shutting down")
        if self._pinned + n > self.limits.max_connections:
            raise BackendError(
                f"all {self.limits.max_connections} VDDK connections (--max-connections) "
                "are held by mounted guest volumes"
            )

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
        for s in self._slots.values():
            if s.disk is None or s.opening is not None:
                continue
            if s.forgotten or not s.users:
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
        while self._connections + n > self.limits.max_connections:
            self._check_room(n)
            victim = self._victim_legacy()
            if victim is not None:
                self.stats.evictions += 1
                await self._close_slot(victim, "to make room for another disk")
                continue
            if not waited:
                waited = True
                self.stats.waits += 1
            await self._change.wait()
        self._connections += n
        if waited:
            self.stats.wait_seconds += self._clock() - started

    def _victim_legacy(self) -> Slot | None:
        """The least recently used open disk with no read in flight; unheld disks first."""
        idle = [
            s for s in self._slots.values() if s.disk is not None and not s.active and not s.opening
        ]
        if not idle:
            return None
        return min(idle, key=lambda s: (s.users > 0, s.last_used))

    async def _close_slot(self, slot: Slot, why: str) -> None:
        disk = slot.disk
        if disk is None:
            return
        slot.disk = None
        slot.held = slot.draining = False
        await self._close_disk(disk, why)
        if slot.forgotten and slot.disk is None and slot.opening is None:
            self._drop_slot(slot)

    async def _discard(self, slot: Slot, broken: OpenDisk) -> None:
        """Close a disk whose read failed; concurrent readers that saw it share one close."""
        if slot.disk is broken:
            slot.disk = None
            await self._close_disk(broken, "after a failed read")

    def _access_until(self, ivd_id: str, now: float) -> float:
        """Until when the IVD's use keeps its access: infinity while a disk of it is open,
        opening or held; else its snapshots' last use plus their linger."""
        until = -math.inf
        idle = self.limits.idle_timeout
        for s in self._by_ivd.get(ivd_id, ()):
            if s.disk is not None or s.opening is not None or s.users:
                return math.inf
            until = max(until, s.last_used + (idle if s.ever_held else min(PROBE_LINGER, idle)))
        return until

    async def _close_disk(self, disk: OpenDisk, why: str) -> None:
        disk.closed = True
        ivd_id = disk.target.ivd_id
        # The access ends with the disk only when nothing else of the IVD was in use lately.
        end = self.limits.legacy or self._access_until(ivd_id, self._clock()) <= self._clock()
        with trio.CancelScope(shield=True):
            try:
                # Joining the I/O threads waits for their queued reads: not on the trio thread.
                await trio.to_thread.run_sync(disk.stop_io)
                await self._control.run(lambda: self._close_blocking(disk, end))
            finally:
                self._connections -= len(disk.handles)
                self.stats.closes += 1
                self._notify()
        log.debug("closed %s %s", disk.target.describe(), why)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close disks that nothing uses once they have lingered, and end the access of IVDs
        nothing used for as long; runs until cancelled."""
        task_status.started()
        while True:
            change = self._change
            now = self._clock()
            due = await self._end_idle_accesses(now)
            for slot in list(self._slots.values()):
                if slot.disk is None or slot.active or slot.opening:
                    continue
                if slot.forgotten:
                    linger = 0.0
                elif slot.users:
                    continue
                else:
                    idle = self.limits.idle_timeout
                    linger = idle if slot.held else min(PROBE_LINGER, idle)
                if slot.last_used + linger <= now:
                    self.stats.idle_closes += 1
                    await self._close_slot(slot, "after being idle")
                else:
                    due = min(due, slot.last_used + linger)
            # `due` is on self._clock, not trio's: wait for a change or for that many seconds.
            with trio.move_on_after(max(0.0, due - self._clock()) if due < math.inf else 3600):
                await change.wait()

    async def _end_idle_accesses(self, now: float) -> float:
        """EndAccess for each prepared IVD whose use has lapsed; when the next one is due."""
        due = math.inf
        for ivd_id in sorted(self._prepared):
            until = self._access_until(ivd_id, now)
            if until > now:
                due = min(due, until)
                continue
            with trio.CancelScope(shield=True):  # an access asked for is never left half done
                settled = await self._control.run(functools.partial(self._end_idle, ivd_id))
            if settled:
                self._prepared.discard(ivd_id)
        return due

    # --- pins: what holds an IVD's access, or a connection, outside the tree's reads ------

    async def pin_connection(self) -> None:
        """Count one connection (a VixMntapi volume's) against the cap until `unpin_connection`."""
        await self._reserve(1)
        self._pinned += 1

    def unpin_connection(self) -> None:
        self._pinned -= 1
        self._connections -= 1
        self._notify()

    def pin_access_blocking(self, target: DiskTarget) -> None:
        """PrepareForAccess (once per IVD) held until `unpin_access_blocking`: VMware's order
        for a temporary snapshot is Prepare, create, read, delete, EndAccess."""
        self._control.run_blocking(lambda: self._pin(target))

    def unpin_access_blocking(self, target: DiskTarget) -> None:
        self._control.run_blocking(lambda: self._unpin(target))

    def pin_access_on_control(self, target: DiskTarget) -> None:
        """`pin_access_blocking` for a caller already on the control thread (VixMntapi)."""
        self._pin(target)

    def unpin_access_on_control(self, target: DiskTarget) -> None:
        self._unpin(target)

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

    # --- the control thread --------------------------------------------------------------

    def _access_state(self, target: DiskTarget) -> _AccessState:
        state = self._access.get(target.ivd_id)
        if state is None:
            access = Access(self.lib, self._server, target, self._identity)
            state = self._access[target.ivd_id] = _AccessState(access)
            # Journal first: a crash between these lines still leaves an EndAccess to do.
            if self._holdings is not None:
                self._holdings.prepared(target.ivd_id, target.datastore_moref)
            self.stats.prepares += 1
            try:
                access.prepare()
            except BackendError as e:
                # Prepare only guards against vMotion while we read; a snapshot stays readable.
                # EndAccess still follows (VMware: always paired, even after a failed Prepare).
                log.warning("%s (reading anyway)", e)
        return state

    def _end_idle(self, ivd_id: str) -> bool:
        """The trio side found the IVD idle: end its access unless a disk of it is open (one
        being closed: the reaper asks again once it is). True when nothing is left to do here
        (ended, never prepared, or pinned: the last unpin ends it)."""
        state = self._access.get(ivd_id)
        if state is None:
            return True
        if state.disks:
            return False
        if not state.pins:
            self._end_if_unused(state)
        return True

    def _end_if_unused(self, state: _AccessState) -> None:
        if state.disks or state.pins:
            return
        target = state.access.target
        del self._access[target.ivd_id]
        self.stats.end_accesses += 1
        try:
            state.access.end()
        except BackendError as e:
            log.warning("EndAccess for %s: %s", target.describe(), e)
        if self._holdings is not None:
            self._holdings.ended(target.ivd_id)

    def _pin(self, target: DiskTarget) -> None:
        self._access_state(target).pins += 1

    def _unpin(self, target: DiskTarget) -> None:
        state = self._access.get(target.ivd_id)
        if state is not None:
            state.pins -= 1
            self._end_if_unused(state)

    def _open_blocking(self, target: DiskTarget) -> OpenDisk:
        state = self._access_state(target)
        state.disks += 1
        handles: list[DiskHandle] = []
        try:
            for _ in range(self.limits.handles_per_disk):
                handle = DiskHandle(self.lib, self._server, target, self._transport_modes)
                handles.append(handle)
                handle.open()
        except BaseException:
            for h in handles:
                try:
                    h.close()
                except BackendError as e:
                    log.debug("closing after a failed open: %s", e)
            state.disks -= 1
            self._end_if_unused(state)
            raise
        lim = self.limits
        disk = OpenDisk(handles, lim.use_async, lim.in_flight_bytes, lim.block_size)
        if lim.use_async and self.lib.has_async and not disk.use_async:
            log.debug(
                "transport %s serves ReadAsync inline; --vddk-handles gives parallel reads",
                handles[0].transport or "?",
            )
        return disk

    def _close_blocking(self, disk: OpenDisk, end_access: bool) -> None:
        for handle in disk.handles:
            try:
                handle.close()
            except BackendError as e:
                log.warning("closing %s: %s", handle.target.describe(), e)
        state = self._access.get(disk.target.ivd_id)
        if state is not None:
            state.disks -= 1
            if end_access:
                self._end_if_unused(state)
            elif not state.disks:
                self.stats.accesses_kept += 1

    # --- teardown (main thread, after the trio loop) -------------------------------------

    def close_targets_blocking(self, targets: Iterable[DiskTarget]) -> None:
        """Close the disks of these snapshots now (before deleting temporary snapshots)."""
        wanted = set(targets)
        for slot in list(self._slots.values()):
            if slot.target in wanted and slot.disk is not None:
                disk, slot.disk = slot.disk, None
                self._close_disk_blocking(disk)

    def _close_disk_blocking(self, disk: OpenDisk) -> None:
        disk.closed = True
        disk.stop_io()
        self._control.run_blocking(lambda: self._close_blocking(disk, True))
        self._connections -= len(disk.handles)
        self.stats.closes += 1

    def close_all(self) -> None:
        """Close every handle, then EndAccess every IVD (pinned or not); once, at unmount."""
        self._closed = True
        for slot in list(self._slots.values()):
            if slot.disk is not None:
                disk, slot.disk = slot.disk, None
                try:
                    self._close_disk_blocking(disk)
                except BackendError as e:
                    log.warning("closing %s: %s", disk.target.describe(), e)
        self._slots.clear()
        self._by_ivd.clear()
        self._prepared.clear()

        def end_all() -> None:
            for state in list(self._access.values()):
                state.disks = state.pins = 0
                self._end_if_unused(state)

        try:
            self._control.run_blocking(end_all)
        finally:
            self._control.stop()

    def report(self) -> dict[str, Any]:
        """For /.ivdfs/stats: what is open and held right now, and the counters."""
        open_slots = [s for s in self._slots.values() if s.disk is not None]
        return {
            **self.stats.__dict__,
            "open_disks": len(open_slots),
            "held_disks": sum(1 for s in open_slots if s.users),
            "connections": self._connections,
            "volume_connections": self._pinned,
            "max_connections": self.limits.max_connections,
            "prepared_ivds": len(self._access),
            "known_snapshots": len(self._slots),
        }
