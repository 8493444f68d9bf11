"""changes/ without changed block tracking: the grains written in a snapshot's own VMDK link.

Role: a `ChangeSource` for a mount with ``--datastore-path``. vCenter's CBT answers first, and
stays the source whenever it can. When it cannot (tracking off, or off when the older snapshot
was taken) and both snapshots are read directly, with the newer snapshot's own link having the
older snapshot's file as its parent, the grains written in that link are exactly what was
written since the older snapshot: VDDK's QueryAllocatedBlocks of the link opened alone
(VIXDISKLIB_FLAG_OPEN_SINGLE_LINK) lists them (measured with VDDK 7.0.2). The answer is marked
``"source": "delta-grains"``: a superset of the changed bytes (a grain rewritten with the same
bytes counts), at grain size. The chain is checked unchanged after the query, as after every
read. Any other case keeps CBT's refusal.

Concurrency: `changes_between` blocks (vCenter, the file system, and VDDK on the service's
control thread); the tree runs it on a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ivdfs.datastore.access import DirectAccess, NotDirect
from ivdfs.datastore.identity import ChainChanged, ChainUnverifiable, check_chain
from ivdfs.errors import BackendError, NotSupported
from ivdfs.inventory.changes import ChangedAreas, merge
from ivdfs.inventory.model import Datastore, DiskTarget, Ivd
from ivdfs.units import SECTOR_SIZE


class Cbt(Protocol):
    """What answers with CBT and says where snapshots' files are (VSphere)."""

    def changes_between(self, ivd: Ivd, older_id: str, newer_id: str) -> ChangedAreas: ...

    def snapshot_path(self, ivd_id: str, datastore: Datastore, snapshot_id: str) -> str: ...


# (snapshot, its link's file) -> runs of sectors written in that link alone (blocking).
LinkGrains = Callable[[DiskTarget, Path], list[tuple[int, int]]]


class DeltaChanges:
    def __init__(self, cbt: Cbt, access: DirectAccess, grains: LinkGrains) -> None:
        self._cbt = cbt
        self._access = access
        self._grains = grains

    def changes_between(self, ivd: Ivd, older_id: str, newer_id: str) -> ChangedAreas:
        try:
            return self._cbt.changes_between(ivd, older_id, newer_id)
        except NotSupported as refused:
            cbt_said = refused
        ds = ivd.datastore
        if self._access.root_for(ds.name, ds.moref) is None:
            raise cbt_said
        try:
            older = self._access.locate(
                ds.name, ds.moref, self._cbt.snapshot_path(ivd.id, ds, older_id)
            )
            newer = self._access.locate(
                ds.name, ds.moref, self._cbt.snapshot_path(ivd.id, ds, newer_id)
            )
        except (NotDirect, NotSupported, ChainChanged):
            raise cbt_said from None
        links = newer.identity.links
        if len(links) < 2 or links[1].descriptor != older.identity.top:
            raise NotSupported(
                f"{cbt_said}; and snapshot {newer_id}'s own VMDK link does not have snapshot "
                f"{older_id}'s file as its parent, so its grains are not what changed"
            )
        runs = self._grains(DiskTarget(ivd.id, ds.moref, newer_id), newer.file)
        try:
            check_chain(newer.identity)
        except (ChainChanged, ChainUnverifiable) as e:
            raise BackendError(f"changes of snapshot {newer_id}: {e}") from None
        extents = merge((s * SECTOR_SIZE, n * SECTOR_SIZE) for s, n in runs)
        return ChangedAreas("", links[0].capacity * SECTOR_SIZE, extents, source="delta-grains")
