"""The directories that mirror vCenter: datastores, their IVDs, each IVD's snapshots, by-name.

Role: loaders for `/`, `/<datastore>`, `/<datastore>/<ivd>` and `by-name/`, over the blocking
inventory (run in worker threads through a limiter). A subset mount (`--datastore`, `--ivd`)
shows, lists and opens nothing else. Snapshot directories themselves belong to
`tree.snapshots`; this module only creates them.

Concurrency: trio thread only; inventory calls go to `trio.to_thread` with a limiter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import trio

from ivdfs.errors import BackendError, NotFound
from ivdfs.inventory.model import Datastore, Inventory, Ivd, Snapshot, creation_order
from ivdfs.tree import info, naming
from ivdfs.tree.inodes import InodeTable
from ivdfs.tree.listing import Listings, Make
from ivdfs.tree.nodes import (
    ByNameDir,
    DatastoreDir,
    DirNode,
    GeneratedFile,
    IvdDir,
    Loader,
    SnapshotDir,
    SymlinkNode,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
D = TypeVar("D", bound=DirNode)

BY_NAME = "by-name"
INFO_NAME = "info.json"


def to_ns(t: datetime | None, default: int) -> int:
    return int(t.timestamp() * 1e9) if t is not None else default


@dataclass(frozen=True)
class Subset:
    """What a subset mount shows: datastore names or morefs, IVD UUIDs (None: all)."""

    datastores: frozenset[str] | None = None
    ivds: frozenset[str] | None = None

    def shows_datastore(self, ds: Datastore) -> bool:
        return self.datastores is None or bool({ds.name, ds.moref} & self.datastores)

    def shows_ivd(self, ivd_id: str) -> bool:
        return self.ivds is None or ivd_id in self.ivds


class Catalog:
    def __init__(
        self,
        inodes: InodeTable,
        listings: Listings,
        inventory: Inventory,
        mount_time_ns: int,
        make_snapshot_dir: Callable[[Ivd, Snapshot], SnapshotDir],
        add_generated: Callable[[DirNode, str, Callable[[], bytes], int | None], GeneratedFile],
        subset: Subset = Subset(),
        inventory_threads: int = 4,
    ) -> None:
        self.inodes = inodes
        self.listings = listings
        self.inventory = inventory
        self.mount_time_ns = mount_time_ns
        self.make_snapshot_dir = make_snapshot_dir
        self.add_generated = add_generated
        self.subset = subset
        self._limiter = trio.CapacityLimiter(inventory_threads)

    async def _query(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    def _dir(self, cls: type[D], name: str, loader: Loader, **kw: Any) -> D:
        """A directory that refreshes from vCenter."""
        return cls(
            self.inodes.new_ino(), name, self.mount_time_ns, loader=loader, refresh_due=0.0, **kw
        )

    async def load_root(self, d: DirNode) -> bool:
        if BY_NAME not in d.children:
            self.inodes.add(d, self._dir(ByNameDir, BY_NAME, self.load_by_name))

        def make(ds: Datastore) -> Make:
            return lambda: self._dir(DatastoreDir, ds.name, self.load_datastore, datastore=ds)

        wanted: dict[str, tuple[Hashable, Make]] = {}
        for ds in await self._query(self.inventory.datastores):
            if not self.subset.shows_datastore(ds):
                continue
            if ds.name in wanted:
                self.listings.warn_once(f"two datastores are named {ds.name!r}; showing one only")
                continue
            wanted[ds.name] = (ds.moref, make(ds))
        self.listings.sync(d, DatastoreDir, wanted)
        return True

    async def load_datastore(self, d: DirNode) -> bool:
        assert isinstance(d, DatastoreDir) and d.datastore is not None
        ds = d.datastore
        ids = await self._query(lambda: self.inventory.list_ivds(ds))

        def make(ivd_id: str) -> Make:
            return lambda: self._dir(IvdDir, ivd_id, self.load_ivd, datastore=ds, ivd_id=ivd_id)

        wanted: dict[str, tuple[Hashable, Make]] = {
            i: (i, make(i)) for i in ids if self.subset.shows_ivd(i)
        }
        self.listings.sync(d, IvdDir, wanted)
        return True

    async def load_ivd(self, d: DirNode) -> bool:
        assert isinstance(d, IvdDir) and d.datastore is not None
        ds, ivd_id = d.datastore, d.ivd_id
        ivd = await self._query(lambda: self.inventory.ivd(ds, ivd_id))
        snaps = await self._query(lambda: self.inventory.snapshots(ivd))
        snaps.sort(key=creation_order)
        d.ivd = ivd
        d.mtime_ns = to_ns(ivd.create_time, d.mtime_ns)

        def make(snap: Snapshot) -> Make:
            return lambda: self.make_snapshot_dir(ivd, snap)

        self.listings.sync(d, SnapshotDir, {s.id: (s.id, make(s)) for s in snaps})
        if INFO_NAME not in d.children:
            self.add_generated(d, INFO_NAME, lambda: self._ivd_info(d), None)
        return True

    def _ivd_info(self, d: IvdDir) -> bytes:
        assert d.ivd is not None
        snaps = [
            c.disk.snapshot
            for c in d.children.values()
            if isinstance(c, SnapshotDir) and c.disk is not None
        ]
        snaps.sort(key=creation_order)
        return info.ivd_json(d.ivd, snaps)

    # --- by-name/<ivd name>/<snapshot time and description> -> ../../<ds>/<uuid>/<snap> ---

    async def _ivd_dirs(self) -> list[IvdDir]:
        out = []
        for ds_dir in list((await self.listings.children(self.inodes.root)).values()):
            if isinstance(ds_dir, DatastoreDir):
                children = await self.listings.children(ds_dir)
                out += [c for c in children.values() if isinstance(c, IvdDir)]
        return out

    async def load_by_name(self, d: DirNode) -> bool:
        wanted = []
        dirs: dict[str, IvdDir] = {}
        for ivd_dir in await self._ivd_dirs():
            try:
                await self.listings.children(ivd_dir)  # its name, and its snapshots
            except (NotFound, BackendError) as e:  # one IVD must not hide the others
                log.debug("by-name: IVD %s: %s", ivd_dir.ivd_id, e)
                continue
            ivd = ivd_dir.ivd
            if ivd is None:
                continue
            wanted.append(
                naming.Wanted(naming.safe_name(ivd.name, ivd.id), creation_order(ivd), ivd.id)
            )
            dirs[ivd.id] = ivd_dir

        def make(name: str, ivd_dir: IvdDir) -> Make:
            return lambda: self._dir(ByNameDir, name, self.load_by_name_ivd, target=ivd_dir)

        entries: dict[str, tuple[Hashable, Make]] = {}
        for name, w in naming.unique_names(wanted).items():
            entries[name] = (dirs[w.ident].ino, make(name, dirs[w.ident]))
        self.listings.sync(d, ByNameDir, entries)
        return True

    async def load_by_name_ivd(self, d: DirNode) -> bool:
        assert isinstance(d, ByNameDir) and d.target is not None
        ivd_dir = d.target
        assert ivd_dir.datastore is not None
        snaps = [
            c.disk.snapshot
            for c in (await self.listings.children(ivd_dir)).values()
            if isinstance(c, SnapshotDir) and c.disk is not None
        ]

        def make(name: str, target: str, mtime: int) -> Make:
            return lambda: SymlinkNode(self.inodes.new_ino(), name, mtime, target=target)

        wanted: dict[str, tuple[Hashable, Make]] = {}
        for name, snap in naming.snapshot_names(snaps).items():
            # Relative, so the links also resolve through bind mounts and in copies of the tree.
            target = f"../../{ivd_dir.datastore.name}/{ivd_dir.ivd_id}/{snap.id}"
            wanted[name] = (target, make(name, target, to_ns(snap.create_time, self.mount_time_ns)))
        self.listings.sync(d, SymlinkNode, wanted)
        return True
