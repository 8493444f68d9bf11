"""`mount --snapshot-now`: snapshots made for one mount and deleted when it ends.

Only the snapshots this object created are ever deleted, by id; a snapshot someone else made in
the meantime is never touched. VMware's order is followed: PrepareForAccess before creating a
snapshot, EndAccess after deleting it (the access is pinned in the disk service meanwhile).
Each snapshot is in the mount's journal from before its task starts (with its description,
which names the mount and pid) until it is deleted, so a killed mount's snapshot is found and
deleted by `ivdfs umount`. A create whose reply was lost and whose snapshot vCenter did not
show stays in the journal the same way, and the teardown looks for it again by description.

Blocking; used by mount.py on the main thread before the mount serves and after it stopped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ivdfs import journal
from ivdfs.errors import BackendError, NotFound, TaskFailed
from ivdfs.inventory.model import DiskTarget, Ivd, Snapshot
from ivdfs.inventory.vsphere import OutcomeUnknown, VSphere

log = logging.getLogger(__name__)


class Pins(Protocol):
    def pin_access_blocking(self, target: DiskTarget) -> None: ...

    def unpin_access_blocking(self, target: DiskTarget) -> None: ...

    def close_targets_blocking(self, targets: Sequence[DiskTarget]) -> None: ...


class Record(Protocol):
    def add(self, kind: str, entry: dict[str, Any]) -> None: ...

    def update(self, kind: str, match: dict[str, Any], **fields: Any) -> None: ...

    def drop(self, kind: str, match: dict[str, Any]) -> None: ...


def description_for(mountpoint: str, pid: int) -> str:
    # Says who made it, so a snapshot left by a killed process is recognisable (and safe to
    # delete by hand); recovery finds a snapshot whose task outlived its process by it.
    return f"ivdfs --snapshot-now, mount {mountpoint}, pid {pid}"


class TemporarySnapshots:
    def __init__(self, vs: VSphere, pins: Pins, record: Record) -> None:
        self._vs = vs
        self._pins = pins
        self._journal = record
        self.created: list[tuple[Ivd, Snapshot]] = []
        # Creates whose outcome vCenter did not show (a lost reply): IVD and description.
        self.unknown: list[tuple[Ivd, str]] = []
        self._pinned: list[DiskTarget] = []

    def create(self, ivds: Sequence[Ivd], where: str, check: Callable[[], None]) -> None:
        """Snapshot each IVD; `check` raises when the start-up must stop (a signal). What was
        created before a failure is in `created` and still gets deleted by `delete_all`."""
        description = description_for(where, os.getpid())
        for ivd in ivds:
            target = DiskTarget.of(ivd)
            self._pins.pin_access_blocking(target)
            self._pinned.append(target)
            entry = {
                "ivd": ivd.id,
                "datastore": ivd.datastore.moref,
                "snapshot": None,
                "description": description,
            }
            self._journal.add("snapshots", entry)
            try:
                snap = self._vs.create_snapshot(
                    ivd, description, on_started=self._task_started(ivd.id)
                )
            except OutcomeUnknown as e:
                # It may yet appear: the journal keeps it, and delete_all looks again.
                self.unknown.append((ivd, description))
                raise TaskFailed(f"--snapshot-now: {e}") from None
            except BackendError as e:
                self._journal.drop("snapshots", {"ivd": ivd.id, "snapshot": None})
                raise TaskFailed(f"--snapshot-now: {e}") from None
            self._journal.update("snapshots", {"ivd": ivd.id, "snapshot": None}, snapshot=snap.id)
            self.created.append((ivd, snap))
            log.info("created snapshot %s of IVD %s (%s)", snap.id, ivd.id, ivd.name)
            check()

    def _task_started(self, ivd_id: str) -> Callable[[str], None]:
        def started(task_id: str) -> None:
            # Recovery waits for this task before it looks for what it created.
            self._journal.update("snapshots", {"ivd": ivd_id, "snapshot": None}, task=task_id)

        return started

    def delete_all(self) -> None:
        """Close their handles, delete every snapshot `create` made, then end the access.
        Failures are logged with what to do by hand and stay in the journal."""
        self._pins.close_targets_blocking([DiskTarget.of(ivd, snap) for ivd, snap in self.created])
        self._find_unknown()
        while self.created:
            ivd, snap = self.created.pop()
            try:
                self._vs.delete_snapshot(ivd, snap.id)
                log.info("deleted snapshot %s of IVD %s", snap.id, ivd.id)
            except NotFound:
                log.warning("snapshot %s of IVD %s was already deleted", snap.id, ivd.id)
            except BackendError as e:
                options = journal.connection_options(self._vs.server)
                log.error(
                    "could not delete snapshot %s of IVD %s (%s); `ivdfs umount` of this "
                    "mountpoint tries again, or delete it with: %s",
                    snap.id,
                    ivd.id,
                    e,
                    journal.advice("snapshot", "delete", ivd.id, snap.id, options=options),
                )
                continue
            self._journal.drop("snapshots", {"ivd": ivd.id, "snapshot": snap.id})
        while self._pinned:
            self._pins.unpin_access_blocking(self._pinned.pop())

    def _find_unknown(self) -> None:
        """Creates whose outcome was unknown: the snapshot vCenter made meanwhile is deleted
        like the others; none at all, and the entry goes (as `ivdfs umount` decides)."""
        while self.unknown:
            ivd, description = self.unknown.pop()
            match = {"ivd": ivd.id, "snapshot": None}
            try:
                found = [s for s in self._vs.snapshots(ivd) if s.description == description]
            except BackendError as e:
                log.error(
                    "could not look for the snapshot of IVD %s whose creation lost its reply "
                    "(%s); `ivdfs umount` of this mountpoint looks again",
                    ivd.id,
                    e,
                )
                continue
            if not found:
                log.info("no snapshot of IVD %s was left by the creation that lost its reply",
                         ivd.id)  # fmt: skip
                self._journal.drop("snapshots", match)
                continue
            for snap in found:
                entry = {"ivd": ivd.id, "datastore": ivd.datastore.moref, "snapshot": snap.id,
                         "description": description}  # fmt: skip
                self._journal.add("snapshots", entry)
                self.created.append((ivd, snap))
            self._journal.drop("snapshots", match)
