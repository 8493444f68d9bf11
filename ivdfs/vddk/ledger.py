"""The access ledger: PrepareForAccess once per IVD, EndAccess once nothing of it was used lately.

Role: VDDK's PrepareForAccess disables vMotion, Storage vMotion and DRS for the VMs an IVD is
attached to; each Prepare and EndAccess is a vCenter operation with its own tasks and events.
Access follows the IVD's use, not its connections: an IVD stays prepared while any of its
snapshots is open, opening or held, or was used within `idle_timeout` (a snapshot only probed:
within the probe's linger), however often the connection cap closed and reopened its disks
meanwhile, and ends once none was (`legacy`: as soon as no disk of it is open). Temporary
snapshots and VixMntapi volumes pin an access until they let go. Every Prepare is journaled
before it is made and cleared after its EndAccess (`Holdings`), so a killed mount can be undone;
EndAccess follows even a failed Prepare (VMware's rule).

Concurrency: the table of accesses (`take`, `give_back`, `pin`, `unpin`, `end_idle`, `end_all`)
is touched only on the VDDK control thread. The trio side keeps which IVDs a disk open took an
access for (`prepared`) and decides when one is idle (`until`, `end_idle_accesses`), then asks
the control thread, which ends the access only if no disk of the IVD is open or pinned by then.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Protocol

import trio

from ivdfs.errors import BackendError
from ivdfs.inventory.model import DiskTarget
from ivdfs.vddk.connection import Access, ServerTarget
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.slots import Slots
from ivdfs.vddk.threads import ThreadWorker

log = logging.getLogger(__name__)


class Holdings(Protocol):
    """Where the service records what it holds on vCenter (the mount's journal): written before
    PrepareForAccess and cleared after EndAccess, so a killed mount can be undone."""

    def prepared(self, ivd_id: str, datastore_moref: str) -> None: ...

    def ended(self, ivd_id: str) -> None: ...


@dataclass
class _AccessState:
    access: Access
    disks: int = 0  # open disks of the IVD
    pins: int = 0  # temporary snapshots and VixMntapi volumes


@dataclass
class LedgerStats:
    prepares: int = 0
    end_accesses: int = 0
    accesses_kept: int = 0  # disks closed while their IVD stayed prepared (it was in use)


class AccessLedger:
    def __init__(
        self,
        lib: VddkLibrary,
        server: ServerTarget,
        identity: str,
        control: ThreadWorker,
        holdings: Holdings | None = None,
    ) -> None:
        self._lib = lib
        self._server = server
        self._identity = identity
        self._control = control
        self._holdings = holdings
        self._states: dict[str, _AccessState] = {}  # control thread only
        # IVDs whose access a disk open took and the reaper has not ended yet (trio side).
        self.prepared: set[str] = set()
        self.stats = LedgerStats()

    @property
    def count(self) -> int:
        """IVDs prepared now."""
        return len(self._states)

    # --- the control thread --------------------------------------------------------------

    def _state(self, target: DiskTarget) -> _AccessState:
        state = self._states.get(target.ivd_id)
        if state is None:
            access = Access(self._lib, self._server, target, self._identity)
            state = self._states[target.ivd_id] = _AccessState(access)
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

    def take(self, target: DiskTarget) -> None:
        """A disk of the IVD opens: its access first (once per IVD)."""
        self._state(target).disks += 1

    def give_back(self, ivd_id: str, end: bool) -> None:
        """A disk of the IVD closed; `end`: end the access too if nothing else holds it."""
        state = self._states.get(ivd_id)
        if state is None:
            return
        state.disks -= 1
        if end:
            self._end_if_unused(state)
        elif not state.disks:
            self.stats.accesses_kept += 1

    def pin(self, target: DiskTarget) -> None:
        self._state(target).pins += 1

    def unpin(self, target: DiskTarget) -> None:
        state = self._states.get(target.ivd_id)
        if state is not None:
            state.pins -= 1
            self._end_if_unused(state)

    def end_idle(self, ivd_id: str) -> bool:
        """The trio side found the IVD idle: end its access unless a disk of it is open (one
        being closed: the reaper asks again once it is). True when nothing is left to do here
        (ended, never prepared, or pinned: the last unpin ends it)."""
        state = self._states.get(ivd_id)
        if state is None:
            return True
        if state.disks:
            return False
        if not state.pins:
            self._end_if_unused(state)
        return True

    def end_all(self) -> None:
        """EndAccess for every IVD, pinned or not (unmount)."""
        for state in list(self._states.values()):
            state.disks = state.pins = 0
            self._end_if_unused(state)

    def _end_if_unused(self, state: _AccessState) -> None:
        if state.disks or state.pins:
            return
        target = state.access.target
        del self._states[target.ivd_id]
        self.stats.end_accesses += 1
        try:
            state.access.end()
        except BackendError as e:
            log.warning("EndAccess for %s: %s", target.describe(), e)
        if self._holdings is not None:
            self._holdings.ended(target.ivd_id)

    # --- the trio side -------------------------------------------------------------------

    @staticmethod
    def until(slots: Slots, ivd_id: str, idle_timeout: float) -> float:
        """Until when the IVD's use keeps its access: infinity while a disk of it is open,
        opening or held; else its snapshots' last use plus their linger."""
        until = -math.inf
        for s in slots.of_ivd(ivd_id):
            if s.keeps_access:
                return math.inf
            until = max(until, s.last_used + s.access_linger(idle_timeout))
        return until

    async def end_idle_accesses(self, slots: Slots, idle_timeout: float, now: float) -> float:
        """EndAccess for each prepared IVD whose use has lapsed; when the next one is due."""
        due = math.inf
        for ivd_id in sorted(self.prepared):
            until = self.until(slots, ivd_id, idle_timeout)
            if until > now:
                due = min(due, until)
                continue
            with trio.CancelScope(shield=True):  # an access asked for is never left half done
                settled = await self._control.run(functools.partial(self.end_idle, ivd_id))
            if settled:
                self.prepared.discard(ivd_id)
        return due
