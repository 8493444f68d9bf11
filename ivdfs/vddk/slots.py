"""The snapshots the disk service knows, and what each is doing: the state its parts share.

Role: a `Slot` is one snapshot the tree shows: its disk when open, who uses it (open files and
guest volumes hold it, reads in flight keep it open), when it was opened and last used, and its
remembered failures. The predicates say what the lifetime policy asks of a slot (is it open,
may it close now, how long may it linger idle). `Slots` is the registry by snapshot and by IVD;
`Changes` wakes whoever waits for a slot to change (a reader for a connection, the reaper).

Concurrency: trio thread only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from ivdfs.errors import BackendError
from ivdfs.inventory.model import DiskTarget
from ivdfs.vddk.disk import OpenDisk

# A disk opened for a probe (partition table, size) that no file then held closes this soon.
PROBE_LINGER = 5.0


@dataclass
class Failure:
    """An open that failed: answered again without a new attempt until `until`
    (`ivdfs.vddk.failures`)."""

    until: float
    delay: float
    error: BackendError
    permanent: bool = False


@dataclass(eq=False)
class Slot:
    """One snapshot the tree knows: its disk when open, and who uses it."""

    target: DiskTarget
    disk: OpenDisk | None = None
    opening: trio.Event | None = None
    connections: int = 0  # counted against the cap for `disk` (while open, opening, closing)
    users: int = 0  # open files and guest volumes: they keep the disk from idling out
    active: int = 0  # reads in flight on `disk`: they keep it from being closed at all
    held: bool = False  # a user held it since it was opened (else it was only probed)
    ever_held: bool = False  # a user held it at some time: its IVD's access lasts idle_timeout
    last_used: float = 0.0
    opened_at: float = 0.0
    draining: bool = False  # chosen to make room: admits no new read, closes when none is left
    capacity: int | None = None  # bytes, from the disk's own GetInfo
    sector_size: int = 512  # the guest's logical sector size, from the same GetInfo
    failure: Failure | None = None  # its last open failure, while remembered
    failed_blocks: dict[int, tuple[float, str]] = field(default_factory=dict)
    forgotten: bool = False

    @property
    def is_open(self) -> bool:
        """Its disk is open and settled (not being opened)."""
        return self.disk is not None and self.opening is None

    @property
    def in_use(self) -> bool:
        """Held by a file or volume the tree has not forgotten."""
        return bool(self.users) and not self.forgotten

    @property
    def closable(self) -> bool:
        """Open with no read in flight: it may close now."""
        return self.is_open and not self.active

    @property
    def gone(self) -> bool:
        """Forgotten, and nothing of it left open: the registry may drop it."""
        return self.forgotten and self.disk is None and self.opening is None

    @property
    def keeps_access(self) -> bool:
        """Its disk is open, opening or held: its IVD's access must stay."""
        return self.disk is not None or self.opening is not None or bool(self.users)

    def linger(self, idle_timeout: float) -> float:
        """How long its disk stays open unused: a disk only probed, a few seconds."""
        if self.forgotten:
            return 0.0
        return idle_timeout if self.held else min(PROBE_LINGER, idle_timeout)

    def access_linger(self, idle_timeout: float) -> float:
        """How long its IVD's access outlasts its last use."""
        return idle_timeout if self.ever_held else min(PROBE_LINGER, idle_timeout)


class Slots:
    """The registry: one slot per snapshot, found by target and by IVD."""

    def __init__(self) -> None:
        self._by_target: dict[DiskTarget, Slot] = {}
        self._by_ivd: dict[str, set[Slot]] = {}

    def get(self, target: DiskTarget) -> Slot:
        """The snapshot's slot, made on first use (and remembered again if it was forgotten)."""
        slot = self._by_target.get(target)
        if slot is None:
            slot = self._by_target[target] = Slot(target)
            self._by_ivd.setdefault(target.ivd_id, set()).add(slot)
        slot.forgotten = False
        return slot

    def find(self, target: DiskTarget) -> Slot | None:
        return self._by_target.get(target)

    def drop(self, slot: Slot) -> None:
        if self._by_target.get(slot.target) is slot:
            del self._by_target[slot.target]
        same = self._by_ivd.get(slot.target.ivd_id)
        if same is not None:
            same.discard(slot)
            if not same:
                del self._by_ivd[slot.target.ivd_id]

    def of_ivd(self, ivd_id: str) -> set[Slot]:
        return self._by_ivd.get(ivd_id, set())

    def clear(self) -> None:
        self._by_target.clear()
        self._by_ivd.clear()

    def __iter__(self) -> Iterator[Slot]:
        return iter(list(self._by_target.values()))

    def __len__(self) -> int:
        return len(self._by_target)


class Changes:
    """Wakes every task waiting for a slot to change (a connection freed, a disk opened or
    closed, a file released)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    @property
    def next(self) -> trio.Event:
        """Set at the next `notify`: take it before looking, then wait on it."""
        return self._event
