"""``<snapshot>/changes/``: what changed since each older snapshot of the same IVD.

Role: for every older snapshot O, ``changes/O.json`` (the changed extents from O to this
snapshot, with totals, as vCenter's changed block tracking reports them) and ``changes/O.raw``
(a disk-sized view whose changed extents read as this snapshot's bytes, through the same block
cache and disk service as disk.raw, and everything else as zeros that cost no VDDK call).

When vCenter is asked: at the first open of either file of a pair, once; the answer (or a
refusal: tracking off, a change id the server refuses, an ESXi host) never changes and is kept
with the pair. Listing and stat never ask: the directory comes from the IVD directory's
snapshots, and until the first open a .json shows size 0 and a .raw shows the disk's size with
st_blocks counting all of it (an upper bound); neither lets the kernel keep those attributes.
After it, the .json has its size and the .raw st_blocks counts the changed extents only. A
failure that may pass (vCenter unreachable) is not kept: that open fails with EIO, the next
asks again. A refusal is the .json's body ({"error": ...}) and makes each .raw open fail with
EIO, logged once per pair: never an empty "no changes".

Concurrency: trio thread only; the blocking query runs in a worker thread through a limiter,
one per pair at a time (concurrent opens wait for the same answer).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Protocol, runtime_checkable

import trio

from ivdfs.errors import BackendError, NotSupported
from ivdfs.inventory.changes import ChangedAreas, changes_json
from ivdfs.inventory.model import Ivd, creation_order
from ivdfs.tree.disk import ChangePair, SnapshotDisk
from ivdfs.tree.inodes import InodeTable
from ivdfs.tree.nodes import (
    AddGenerated,
    ChangesDir,
    DirNode,
    SnapshotDir,
    SparseFile,
    SparseSpan,
)

log = logging.getLogger(__name__)

CHANGES_NAME = "changes"
# Change queries to vCenter at once, across the mount (each may be many calls for a big disk).
QUERIES_AT_ONCE = 2


@runtime_checkable
class ChangeSource(Protocol):
    def changes_between(self, ivd: Ivd, older_id: str, newer_id: str) -> ChangedAreas:
        """Blocking; NotSupported when the server cannot answer (see VSphere.changed_areas)."""
        ...


def render(pair: ChangePair) -> bytes:
    """changes/<older>.json: empty until asked, then the document (or the refusal)."""
    if not pair.known:
        return b""  # stat before the first open: nothing asked yet
    sd = pair.disk
    return changes_json(sd.ivd, pair.older.id, sd.snapshot.id, pair.areas, pair.refusal)


class Changes:
    """Makes and fills changes/ directories; asks `source` once per pair."""

    def __init__(
        self, source: ChangeSource, inodes: InodeTable, add_generated: AddGenerated
    ) -> None:
        self.source = source
        self.inodes = inodes
        self.add_generated = add_generated
        self._limiter = trio.CapacityLimiter(QUERIES_AT_ONCE)

    def make_dir(self, sd: SnapshotDisk, mtime_ns: int) -> ChangesDir:
        # Refreshes with the IVD directory: a deleted older snapshot goes.
        return ChangesDir(
            self.inodes.new_ino(),
            CHANGES_NAME,
            mtime_ns,
            loader=self.load,
            refresh_due=0.0,
            disk=sd,
        )

    async def load(self, d: DirNode) -> bool:
        """One .json and one .raw per older snapshot the IVD directory shows now (no query)."""
        assert isinstance(d, ChangesDir) and d.disk is not None
        sd = d.disk
        snapdir = self.inodes.parent_of(d)
        ivd_dir = self.inodes.parent_of(snapdir)
        newer = creation_order(sd.snapshot)
        older = {
            c.disk.snapshot.id: c.disk.snapshot
            for c in ivd_dir.children.values()
            if isinstance(c, SnapshotDir)
            and c.disk is not None
            and c is not snapdir
            and creation_order(c.disk.snapshot) < newer
        }
        for old_id in [i for i in d.pairs if i not in older]:
            del d.pairs[old_id]
            for name in (f"{old_id}.json", f"{old_id}.raw"):
                if name in d.children:
                    self.inodes.remove(d, name)
        for old_id, snap in sorted(older.items()):
            if old_id not in d.pairs:
                self._add_pair(d, ChangePair(sd, snap))
        return True

    def _add_pair(self, d: ChangesDir, pair: ChangePair) -> None:
        d.pairs[pair.older.id] = pair

        def state() -> Hashable:
            return pair.known

        doc = self.add_generated(
            d, f"{pair.older.id}.json", lambda: render(pair), d.mtime_ns, state
        )
        doc.prepare = lambda: self.fetch(pair)
        raw = SparseFile(
            self.inodes.new_ino(),
            f"{pair.older.id}.raw",
            d.mtime_ns,
            disk=pair.disk,
            span=SparseSpan(pair.disk.size),
        )
        raw.prepare = lambda: self.prepare_raw(raw, pair)
        self.inodes.add(d, raw)

    async def fetch(self, pair: ChangePair) -> None:
        """Ask vCenter once; a refusal is kept, a failure that may pass is raised."""
        if pair.known:
            return
        async with pair.lock:
            if pair.known:
                return
            sd = pair.disk
            ivd, older_id, newer_id = sd.ivd, pair.older.id, sd.snapshot.id
            try:
                areas = await trio.to_thread.run_sync(
                    lambda: self.source.changes_between(ivd, older_id, newer_id),
                    limiter=self._limiter,
                )
            except NotSupported as e:
                pair.refusal = str(e)
                log.info("%s: %s", pair.where(), e)
                return
            pair.areas = areas
            log.info(
                "%s: %d extents, %d bytes changed",
                pair.where(),
                len(areas.extents),
                areas.changed_bytes,
            )

    async def prepare_raw(self, node: SparseFile, pair: ChangePair) -> None:
        await self.fetch(pair)
        if pair.refusal is not None:
            quiet, pair.logged = pair.logged, True
            raise BackendError(f"{pair.where()}: {pair.refusal}", quiet=quiet)
        if not node.known and pair.areas is not None:
            node.span = SparseSpan(node.span.size, pair.areas.extents)
            node.known = True
