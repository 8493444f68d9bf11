"""`mount --snapshot-now`: snapshots made for one mount and deleted when it ends.

Only the snapshots this object created are ever deleted, by id; a snapshot someone else made in
the meantime is never touched. Blocking; used by mount.py on the main thread before the mount
starts serving and after it has stopped (after every VDDK handle on them is closed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ivdfs.errors import BackendError, ExitCode, NotFound, UserError
from ivdfs.inventory.model import Ivd, Snapshot
from ivdfs.inventory.vsphere import VSphere

log = logging.getLogger(__name__)


class TemporarySnapshots:
    def __init__(self, vs: VSphere) -> None:
        self._vs = vs
        self.created: list[tuple[Ivd, Snapshot]] = []

    def create(self, ivds: Sequence[str], where: str) -> None:
        """Snapshot each IVD (UUID or unique name). Raises UserError; what was created before
        the failure is in `created` and still gets deleted by `delete_all`."""
        # The description says who made it, so a snapshot left by a killed process is
        # recognisable (and safe to delete by hand).
        description = f"ivdfs --snapshot-now, mount {where}, pid {os.getpid()}"
        resolved = [self._vs.find_ivd(text) for text in ivds]
        for ivd in resolved:
            try:
                snap = self._vs.create_snapshot(ivd, description)
            except BackendError as e:
                raise UserError(f"--snapshot-now: {e}", ExitCode.VSPHERE) from None
            self.created.append((ivd, snap))
            log.info("created snapshot %s of IVD %s (%s)", snap.id, ivd.id, ivd.name)

    def delete_all(self) -> None:
        """Delete every snapshot `create` made; failures are logged with what to do by hand."""
        while self.created:
            ivd, snap = self.created.pop()
            try:
                self._vs.delete_snapshot(ivd, snap.id)
                log.info("deleted snapshot %s of IVD %s", snap.id, ivd.id)
            except NotFound:
                log.warning("snapshot %s of IVD %s was already deleted", snap.id, ivd.id)
            except BackendError as e:
                log.error(
                    "could not delete snapshot %s of IVD %s (%s); delete it with: "
                    "ivdfs snapshot delete %s %s",
                    snap.id,
                    ivd.id,
                    e,
                    ivd.id,
                    snap.id,
                )
