"""The directories that mirror vCenter: datastores, their IVDs, each IVD's snapshots, by-name.

Role: loaders for `/`, `/<datastore>`, `/<datastore>/<ivd>` and `by-name/`, over the blocking
inventory (run in worker threads through a limiter). A subset mount (`--datastore`, `--ivd`)
shows, lists and opens nothing else. Snapshot directories themselves belong to
`tree.snapshots`; this module only creates them.

Concurrency: trio thread only; inventory calls go to `trio.to_thread` with a limiter.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from ivdfs.errors import BackendError, IvdfsError, NotFound
from ivdfs.inventory.model import Datastore, Inventory, Ivd, IvdSummary, Snapshot, creation_order
from ivdfs.tree import info, naming
from ivdfs.tree.inodes import InodeTable
from ivdfs.tree.listing import Listings, Make
from ivdfs.tree.nodes import (
    INFO_NAME,
    AddGenerated,
    ByNameDir,
    DatastoreDir,
    DirNode,
    IvdDir,
    Loader,
    SnapshotDir,
    SymlinkNode,
    to_ns,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
D = TypeVar("D", bound=DirNode)

BY_NAME = "by-name"
STATS_DIR = ".ivdfs"  # the mount's own statistics, beside the datastores
# Directory read-ahead starts after this many IVD directories of one datastore were listed
# within this many seconds.
SCAN_LENGTH = 3
SCAN_WINDOW = 10.0


def _first_ivdfs_error(group: BaseExceptionGroup[BaseException]) -> IvdfsError | None:
    """The first error of a nursery's group when all of them are ivdfs's own (a backend
    failure, a name not found); None when anything else is in it (a bug, a cancellation)."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(group)
    if not leaves or not all(isinstance(e, IvdfsError) for e in leaves):
        return None
    # NotFound first: a deleted IVD fails both queries, and "no such IVD" is the news.
    first = next((e for e in leaves if isinstance(e, NotFound)), leaves[0])
    assert isinstance(first, IvdfsError)
    return first


@dataclass(eq=False)
class _Ahead:
    at: float
    done: trio.Event = field(default_factory=trio.Event)
    value: IvdData | None = None
    started: bool = False  # a worker is asking
    taken: bool = False  # a listing asked for itself before any worker did


# An IVD's record, its snapshots, and whether the record is whole (not a listing's summary).
IvdData = tuple[Ivd, list[Snapshot], bool]
_Job = tuple[Datastore, str, _Ahead]


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
        add_generated: AddGenerated,
        subset: Subset,
        inventory_threads: int,
        on_attrs: Callable[[int], None] = lambda _ino: None,
    ) -> None:
        """`on_attrs(ino)` tells the kernel a directory's attributes changed (its mtime
        becomes the IVD's creation time once the record is known)."""
        self.on_attrs = on_attrs
        self.inodes = inodes
        self.listings = listings
        self.inventory = inventory
        self.mount_time_ns = mount_time_ns
        self.make_snapshot_dir = make_snapshot_dir
        self.add_generated = add_generated
        self.subset = subset
        self._limiter = trio.CapacityLimiter(inventory_threads)
        # Directory read-ahead (see _note_scan), and what datastore listings said of each IVD.
        self._ahead_send: trio.MemorySendChannel[_Job] | None = None
        self._ahead: dict[tuple[str, str], _Ahead] = {}
        self._ahead_workers = max(1, inventory_threads - 1)
        self._scanned: dict[str, float] = {}
        self._ahead_ttl = listings.refresh if listings.refresh > 0 else math.inf
        self._recent: dict[str, list[float]] = {}
        self._summaries: dict[str, dict[str, IvdSummary]] = {}
        self._ds_entries: dict[str, str] = {}  # datastore moref -> its root entry's name
        self.stats = {
            "read_ahead_workers": self._ahead_workers,
            "read_ahead_queued": 0,
            "read_ahead_used": 0,
        }

    async def _query(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    def _dir(self, cls: type[D], name: str, loader: Loader, **kw: Any) -> D:
        """A directory that refreshes from vCenter."""
        mtime = kw.pop("mtime_ns", self.mount_time_ns)
        return cls(self.inodes.new_ino(), name, mtime, loader=loader, refresh_due=0.0, **kw)

    async def load_root(self, d: DirNode) -> bool:
        if BY_NAME not in d.children:
            self.inodes.add(d, self._dir(ByNameDir, BY_NAME, self.load_by_name))

        def make(name: str, ds: Datastore) -> Make:
            return lambda: self._dir(DatastoreDir, name, self.load_datastore, datastore=ds)

        shown = {
            ds.moref: ds
            for ds in await self._query(self.inventory.datastores)
            if self.subset.shows_datastore(ds)
        }
        names = naming.datastore_names(
            ((ds.name, ds.moref) for ds in shown.values()), reserved=(BY_NAME, STATS_DIR)
        )
        self._ds_entries = {moref: name for name, moref in names.items()}
        wanted: dict[str, tuple[Hashable, Make]] = {
            name: (moref, make(name, shown[moref])) for name, moref in names.items()
        }
        self.listings.sync(d, DatastoreDir, wanted)
        return True

    async def load_datastore(self, d: DirNode) -> bool:
        """The IVD ids of a datastore; with a server that lists records in a few calls (VSLM),
        the records too, so the IVD directories carry their creation times at once."""
        assert isinstance(d, DatastoreDir) and d.datastore is not None
        ds = d.datastore
        known: dict[str, IvdSummary] = {}
        if self.inventory.fast_summaries:
            known = await self._summaries_of(d)
            ids = sorted(known)
        else:
            ids = await self._query(lambda: self.inventory.list_ivds(ds))

        def make(ivd_id: str) -> Make:
            summary = known.get(ivd_id)
            mtime = to_ns(summary.ivd.create_time if summary else None, self.mount_time_ns)
            return lambda: self._dir(
                IvdDir, ivd_id, self.load_ivd, datastore=ds, ivd_id=ivd_id, mtime_ns=mtime
            )

        wanted: dict[str, tuple[Hashable, Make]] = {
            i: (i, make(i)) for i in ids if self.subset.shows_ivd(i)
        }
        self.listings.sync(d, IvdDir, wanted)
        return True

    async def load_ivd(self, d: DirNode) -> bool:
        assert isinstance(d, IvdDir) and d.datastore is not None
        self._note_scan(d)
        ivd, snaps, complete = await self._ivd_data(d.datastore, d.ivd_id, d.whole is not None)
        snaps = sorted(snaps, key=creation_order)
        d.ivd, d.complete = ivd, complete
        if complete:
            d.whole = ivd
        mtime = to_ns(ivd.create_time, d.mtime_ns)
        if mtime != d.mtime_ns:
            d.mtime_ns = mtime
            self.on_attrs(d.ino)

        def make(snap: Snapshot) -> Make:
            return lambda: self.make_snapshot_dir(ivd, snap)

        self.listings.sync(d, SnapshotDir, {s.id: (s.id, make(s)) for s in snaps})
        if INFO_NAME not in d.children:
            info_file = self.add_generated(
                d, INFO_NAME, lambda: self._ivd_info(d), None, lambda: self._ivd_info_key(d)
            )
            info_file.prepare = lambda: self._complete(d)
        return True

    async def _complete(self, d: IvdDir) -> None:
        """The whole record (backing file, provisioning, attached VMs) for info.json and the
        attributes, when the listing gave only a summary."""
        if d.complete or d.datastore is None:
            return
        ds, ivd_id = d.datastore, d.ivd_id
        if d.whole is None or d.ivd is None or not self.listings.outage:
            try:
                ivd = await self._query(lambda: self.inventory.ivd(ds, ivd_id))
            except BackendError:
                if d.whole is None or d.ivd is None:
                    raise
            else:
                d.ivd, d.complete, d.whole = ivd, True, ivd
                self._set_ivd(d, ivd)
                return
        # vCenter does not answer: the whole record read before, with what the listing says
        # now (held answers are served through an outage; it is asked again afterwards).
        log.debug("IVD %s: showing the record read before", ivd_id)
        d.ivd = dataclasses.replace(
            d.whole, name=d.ivd.name, capacity_bytes=d.ivd.capacity_bytes,
            create_time=d.ivd.create_time or d.whole.create_time,
        )  # fmt: skip
        self._set_ivd(d, d.ivd)

    @staticmethod
    def _set_ivd(d: IvdDir, ivd: Ivd) -> None:
        for child in d.children.values():
            if isinstance(child, SnapshotDir) and child.disk is not None:
                child.disk.ivd = ivd

    async def complete_parent(self, node: DirNode) -> None:
        """Make sure the IVD record above a snapshot directory is whole."""
        parent = self.inodes.parent_of(node)
        if isinstance(parent, IvdDir):
            await self._complete(parent)

    # --- an IVD's record and snapshots: one round trip, read ahead during a scan ----------

    async def _fetch_ivd(self, ds: Datastore, ivd_id: str, whole: bool = False) -> IvdData:
        """The record and the snapshots, asked at once (two calls, one round trip). A
        datastore listing's summary stands in for the record (the rest of it is asked when
        info.json is read), unless `whole` (an IVD whose whole record was asked once keeps it
        whole across refreshes); when the summary said the IVD has no snapshots, none are
        asked."""
        out: dict[str, object] = {}
        known = self._summaries.get(ds.moref, {}).get(ivd_id)
        summary = known is not None and not whole

        async def record() -> None:
            if known is not None and summary:
                out["ivd"] = known.ivd
            else:
                out["ivd"] = await self._query(lambda: self.inventory.ivd(ds, ivd_id))

        async def snapshots() -> None:
            if known is not None and known.snapshot_count == 0:
                out["snaps"] = []
            else:
                out["snaps"] = await self._query(lambda: self.inventory.snapshots_of(ds, ivd_id))

        try:
            async with trio.open_nursery() as n:
                n.start_soon(record)
                n.start_soon(snapshots)
        except BaseExceptionGroup as group:
            # Both queries fail together when vCenter does (refused, down, logged out): one
            # error says it (NotFound first, since a deleted IVD fails both), and callers catch
            # IvdfsError, not a group of them.
            first = _first_ivdfs_error(group)
            if first is None:
                raise
            raise first from None
        return out["ivd"], out["snaps"], not summary  # type: ignore[return-value]

    async def _ivd_data(self, ds: Datastore, ivd_id: str, whole: bool = False) -> IvdData:
        key = (ds.moref, ivd_id)
        ahead = self._ahead.pop(key, None)
        if ahead is not None:
            if not ahead.started:
                ahead.taken = True  # still queued: ask now instead of waiting for the queue
            else:
                await ahead.done.wait()
                fresh = self.listings.clock() - ahead.at < self._ahead_ttl
                if ahead.value is not None and fresh and (ahead.value[2] or not whole):
                    self.stats["read_ahead_used"] += 1
                    return ahead.value
        return await self._fetch_ivd(ds, ivd_id, whole)

    def _note_scan(self, d: IvdDir) -> None:
        """Directory read-ahead: when IVD directories of one datastore are listed one after
        another (`ls DS/*`, find, a backup's walk), fetch the rest in the background, in
        listing order, at most `inventory_threads - 1` at once (one stays for demand), so each
        next listing finds its answer waiting."""
        if self._ahead_send is None or d.datastore is None:
            return
        moref = d.datastore.moref
        now = self.listings.clock()
        recent = [t for t in self._recent.get(moref, []) if now - t < SCAN_WINDOW]
        recent.append(now)
        self._recent[moref] = recent
        if len(recent) < SCAN_LENGTH or now - self._scanned.get(moref, -math.inf) < SCAN_WINDOW:
            return
        self._scanned[moref] = now  # one pass over the siblings per window, not one per load
        parent = self.inodes.parent_of(d)
        for name, sib in sorted(parent.children.items()):
            key = (moref, name)
            if not isinstance(sib, IvdDir) or sib.loaded or sib is d or key in self._ahead:
                continue
            entry = self._ahead[key] = _Ahead(now)
            self._ahead_send.send_nowait((d.datastore, name, entry))
            self.stats["read_ahead_queued"] += 1

    async def _read_ahead_worker(self, receive: trio.MemoryReceiveChannel[_Job]) -> None:
        # A few workers taking jobs in order: tasks started per job would run in trio's
        # (deliberately shuffled) order, and the scan would wait for the ones left behind.
        async for ds, ivd_id, entry in receive:
            if entry.taken:
                continue
            entry.started = True
            try:
                entry.value = await self._fetch_ivd(ds, ivd_id)
            except (NotFound, BackendError) as e:
                log.debug("read-ahead of IVD %s: %s", ivd_id, e)
            finally:
                entry.at = self.listings.clock()
                entry.done.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve directory read-ahead until cancelled (at unmount)."""
        send, receive = trio.open_memory_channel[_Job](math.inf)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self._ahead_workers):
                    nursery.start_soon(self._read_ahead_worker, receive)
                self._ahead_send = send
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._ahead_send = None

    @staticmethod
    def _ivd_info_key(d: IvdDir) -> Hashable:
        snaps = [c.ino for c in d.children.values() if isinstance(c, SnapshotDir)]
        return (d.ivd, tuple(snaps))

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

    async def _summaries_of(self, ds_dir: DatastoreDir) -> dict[str, IvdSummary]:
        """Every IVD of a datastore as its listing shows it (VSLM pages or the pool)."""
        assert ds_dir.datastore is not None
        ds = ds_dir.datastore
        found = await self._query(lambda: self.inventory.summaries(ds))
        out = {x.ivd.id: x for x in found if self.subset.shows_ivd(x.ivd.id)}
        self._summaries[ds.moref] = out
        return out

    async def load_by_name(self, d: DirNode) -> bool:
        """Names of every IVD, from one listing per datastore: no IVD directory is loaded."""
        wanted = []
        dirs: dict[str, IvdDir] = {}
        stores = [c for c in (await self.listings.children(self.inodes.root)).values()
                  if isinstance(c, DatastoreDir)]  # fmt: skip
        for ds_dir in stores:
            by_id = {c.ivd_id: c for c in (await self.listings.children(ds_dir)).values()
                     if isinstance(c, IvdDir)}  # fmt: skip
            for ivd_id, summary in (await self._summaries_of(ds_dir)).items():
                ivd_dir = by_id.get(ivd_id)
                if ivd_dir is None:
                    continue  # created since the datastore was listed: at its next refresh
                ivd = summary.ivd
                ivd_dir.mtime_ns = to_ns(ivd.create_time, ivd_dir.mtime_ns)
                rank = creation_order(ivd)
                wanted.append(naming.Wanted(naming.safe_name(ivd.name, ivd.id), rank, ivd.id))
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
            ds_entry = self._ds_entries.get(ivd_dir.datastore.moref, ivd_dir.datastore.name)
            target = f"../../{ds_entry}/{ivd_dir.ivd_id}/{snap.id}"
            wanted[name] = (target, make(name, target, to_ns(snap.create_time, self.mount_time_ns)))
        self.listings.sync(d, SymlinkNode, wanted)
        return True
