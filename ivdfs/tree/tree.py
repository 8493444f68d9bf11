"""/<datastore>/<ivd-uuid>/<snapshot-id>/disk.raw, built lazily from the inventory.

Concurrency: trio thread only. Blocking inventory queries go through `trio.to_thread` with a
limiter; disk opens go to the `DiskSource` (VDDK's control thread). Raises plain exceptions
(NotFound, BackendError, IsADirectoryError); fs/operations.py turns them into errno values.
Inode numbers are sequential and never reused, so the kernel never sees one change meaning.

Refresh (`refresh` seconds, 0 = never): the root, datastore, IVD and by-name directories list
again from vCenter when their listing is older than that. A child whose identity (datastore
moref, IVD or snapshot id, link target) is unchanged keeps its node and inode; vanished children
leave the directory but stay in `nodes`, so a file that is still open keeps its inode and its
reader (reads work, or fail with EIO once VDDK refuses them; cache keys are (IVD id, snapshot
id), which vCenter never reuses, so they never return other data).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from ivdfs.errors import BackendError, NotFound
from ivdfs.inventory.model import Datastore, Inventory, Ivd, Snapshot, creation_order
from ivdfs.io.block_cache import Block, BlockCache
from ivdfs.io.partitions import FS_PROBE_SIZE, Partition, detect_filesystem, parse
from ivdfs.io.prefetch import Prefetcher
from ivdfs.io.reader import DiskReader, ReadStream
from ivdfs.tree import info, naming
from ivdfs.tree.nodes import (
    DatastoreDir,
    DirNode,
    DiskFile,
    GeneratedFile,
    IvdDir,
    Node,
    PartitionFile,
    SnapshotDir,
    SymlinkNode,
    VolumesDir,
)
from ivdfs.volumes.base import WHOLE_DISK, Candidate, VolumeBackend, VolumeRequest

log = logging.getLogger(__name__)

ROOT_INO = 1
# File handles of disk opens start here, far above any inode number (inodes double as the
# handles of every other open).
STREAM_FH_BASE = 1 << 48
DISK_NAME = "disk.raw"
INFO_NAME = "info.json"
BY_NAME = "by-name"
VOLUMES_NAME = "volumes"

T = TypeVar("T")
Make = Callable[[], "Node"]


class Disk(Protocol):
    capacity: int

    async def read(self, start_sector: int, nbytes: int) -> Block: ...


class DiskSource(Protocol):
    async def open(self, ivd: Ivd, snapshot: Snapshot) -> Disk: ...


def to_ns(t: datetime | None, default: int) -> int:
    return int(t.timestamp() * 1e9) if t is not None else default


class Tree:
    def __init__(
        self,
        inventory: Inventory,
        disks: DiskSource,
        cache: BlockCache,
        block_size: int,
        inventory_threads: int = 4,
        refresh: float = 0.0,
    ) -> None:
        self.inventory = inventory
        self.refresh = refresh
        # ino -> monotonic time its listing goes stale, for directories that refresh; 0.0 means
        # "refreshes, not loaded yet".
        self._refresh_due: dict[int, float] = {ROOT_INO: 0.0}
        # ino -> what a refreshed child must still be to keep its node (see _sync).
        self._identity: dict[int, Hashable] = {}
        # by-name/<ivd> directory ino -> the IVD directory it shows.
        self._by_name_of: dict[int, IvdDir] = {}
        self._warned: set[str] = set()
        self.disks = disks
        self.cache = cache
        self.block_size = block_size
        self.mount_time_ns = time.time_ns()
        self._limiter = trio.CapacityLimiter(inventory_threads)
        self._next_ino = ROOT_INO + 1
        self.root = DirNode(ROOT_INO, "", self.mount_time_ns, loader=self._load_root)
        self.nodes: dict[int, Node] = {ROOT_INO: self.root}
        self._parents: dict[int, DirNode] = {}
        # Set by mount.py for --volumes: the backend, and where the mount is (loop devices
        # read our own disk.raw through it).
        self.volumes: VolumeBackend | None = None
        self.mountpoint: Path | None = None
        # Set by mount.py: background read-ahead for sequential readers (None = off).
        self.prefetcher: Prefetcher | None = None
        self.max_prefetch = 0
        # Per-open state of disk.raw (sequential detection); numbered above any inode.
        self._streams: dict[int, ReadStream] = {}
        self._windows: dict[int, PartitionFile] = {}  # fh -> window, for partition opens
        self._next_fh = STREAM_FH_BASE

    # --- inode bookkeeping ---------------------------------------------------------------

    def _add(self, parent: DirNode, node: Node) -> None:
        parent.children[node.name] = node
        self.nodes[node.ino] = node
        self._parents.setdefault(node.ino, parent)

    def path_of(self, node: Node) -> Path:
        """The node's path relative to the mount root (first parent it was added under)."""
        names: list[str] = []
        while node.ino != ROOT_INO:
            names.append(node.name)
            node = self._parents[node.ino]
        return Path(*reversed(names)) if names else Path()

    def _ino(self) -> int:
        ino, self._next_ino = self._next_ino, self._next_ino + 1
        return ino

    def get(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise NotFound(f"inode {ino}") from None

    async def _query(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    # --- directories ---------------------------------------------------------------------

    def _stale(self, d: DirNode) -> bool:
        due = self._refresh_due.get(d.ino)
        return due is not None and self.refresh > 0 and time.monotonic() >= due

    async def children(self, d: DirNode) -> dict[str, Node]:
        if not d.loaded or self._stale(d):
            async with d.lock:
                if not d.loaded and d.loader is not None:
                    await d.loader(d)
                elif self._stale(d) and d.loader is not None:
                    await self._reload(d)
                d.loaded = True
                if d.ino in self._refresh_due:
                    self._refresh_due[d.ino] = time.monotonic() + self.refresh
        return d.children

    async def _reload(self, d: DirNode) -> None:
        try:
            await d.loader(d)  # type: ignore[misc]  # checked by the caller
        except NotFound:
            # The object itself is gone (its parent will drop it at its own refresh).
            d.children.clear()
        except BackendError as e:
            # Stale beats nothing: the listing stays as it was until the next refresh.
            log.warning("refreshing %s failed; showing the previous listing: %s", d.name, e)

    def _sync(self, d: DirNode, kind: type[Node], wanted: dict[str, tuple[Hashable, Make]]) -> None:
        """Make `d`'s children of type `kind` those in `wanted` (name -> (identity, make)).

        A child with the same name and identity keeps its node (and inode); `make` is called
        only for names that are new or changed. Children of other types (by-name, files added
        by others) are left alone, and win a name they already hold.
        """
        for name, node in list(d.children.items()):
            if isinstance(node, kind) and (
                name not in wanted or self._identity.get(node.ino) != wanted[name][0]
            ):
                del d.children[name]
        for name, (ident, make) in wanted.items():
            current = d.children.get(name)
            if current is None:
                node = make()
                self._identity[node.ino] = ident
                self._add(d, node)
            elif not isinstance(current, kind):
                self._warn_once(f"{d.name}/{name} is taken; not showing {kind.__name__} {ident}")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def _dir_ino(self) -> int:
        """An inode for a directory that refreshes."""
        ino = self._ino()
        self._refresh_due[ino] = 0.0
        return ino

    async def lookup(self, parent_ino: int, name: str) -> Node:
        parent = self.get(parent_ino)
        if not isinstance(parent, DirNode):
            raise NotADirectoryError(name)
        node = (await self.children(parent)).get(name)
        if node is None:
            raise NotFound(name)
        return node

    async def _load_root(self, d: DirNode) -> None:
        if BY_NAME not in d.children:
            self._add(
                d, DirNode(self._dir_ino(), BY_NAME, self.mount_time_ns, loader=self._load_by_name)
            )

        def make(ds: Datastore) -> Make:
            return lambda: DatastoreDir(
                self._dir_ino(),
                ds.name,
                self.mount_time_ns,
                loader=self._load_datastore,
                datastore=ds,
            )

        wanted: dict[str, tuple[Hashable, Make]] = {}
        for ds in await self._query(self.inventory.datastores):
            if ds.name in wanted:
                self._warn_once(f"two datastores are named {ds.name!r}; showing one only")
                continue
            wanted[ds.name] = (ds.moref, make(ds))
        self._sync(d, DatastoreDir, wanted)

    async def _load_datastore(self, d: DirNode) -> None:
        assert isinstance(d, DatastoreDir) and d.datastore is not None
        ds = d.datastore
        ids = await self._query(lambda: self.inventory.list_ivds(ds))

        def make(ivd_id: str) -> Make:
            return lambda: IvdDir(
                self._dir_ino(),
                ivd_id,
                self.mount_time_ns,
                loader=self._load_ivd,
                datastore=ds,
                ivd_id=ivd_id,
            )

        self._sync(d, IvdDir, {ivd_id: (ivd_id, make(ivd_id)) for ivd_id in ids})

    async def _load_ivd(self, d: DirNode) -> None:
        assert isinstance(d, IvdDir) and d.datastore is not None
        ds, ivd_id = d.datastore, d.ivd_id
        ivd = await self._query(lambda: self.inventory.ivd(ds, ivd_id))
        snaps = await self._query(lambda: self.inventory.snapshots(ivd))
        snaps.sort(key=creation_order)
        d.ivd = ivd

        def make(snap: Snapshot) -> Make:
            return lambda: SnapshotDir(
                self._ino(),
                snap.id,
                to_ns(snap.create_time, self.mount_time_ns),
                loader=self._load_snapshot,
                ivd=ivd,
                snapshot=snap,
            )

        self._sync(d, SnapshotDir, {s.id: (s.id, make(s)) for s in snaps})
        if INFO_NAME not in d.children:
            self.add_generated(d, INFO_NAME, lambda: self._ivd_info(d))

    def _ivd_info(self, d: IvdDir) -> bytes:
        assert d.ivd is not None
        snaps = [
            c.snapshot for c in d.children.values() if isinstance(c, SnapshotDir) and c.snapshot
        ]
        snaps.sort(key=creation_order)
        return info.ivd_json(d.ivd, snaps)

    def _add_snapshot_info(self, d: SnapshotDir) -> None:
        ivd, snap = d.ivd, d.snapshot
        assert ivd is not None and snap is not None
        self.add_generated(d, INFO_NAME, lambda: info.snapshot_json(ivd, snap), d.mtime_ns)

    def xattrs(self, ino: int) -> dict[str, bytes]:
        """Extended attributes of a node: the metadata of disk.raw's IVD and snapshot."""
        node = self.get(ino)
        if isinstance(node, DiskFile) and node.ivd is not None and node.snapshot is not None:
            return info.disk_xattrs(node.ivd, node.snapshot)
        return {}

    # --- by-name/<ivd name>/<snapshot time and description> -> ../../<ds>/<uuid>/<snap> -----

    async def _ivd_dirs(self) -> list[IvdDir]:
        out = []
        for ds_dir in list((await self.children(self.root)).values()):
            if isinstance(ds_dir, DatastoreDir):
                out += [c for c in (await self.children(ds_dir)).values() if isinstance(c, IvdDir)]
        return out

    async def _load_by_name(self, d: DirNode) -> None:
        wanted = []
        dirs: dict[str, IvdDir] = {}
        for ivd_dir in await self._ivd_dirs():
            try:
                await self.children(ivd_dir)  # its name, and its snapshots for the next level
            except NotFound:
                continue  # deleted since the datastore was listed
            ivd = ivd_dir.ivd
            if ivd is None:
                continue
            rank = creation_order(ivd)
            wanted.append(naming.Wanted(naming.safe_name(ivd.name, ivd.id), rank, ivd.id))
            dirs[ivd.id] = ivd_dir

        def make(name: str, ivd_dir: IvdDir) -> Make:
            def new() -> DirNode:
                node = DirNode(
                    self._dir_ino(), name, self.mount_time_ns, loader=self._load_by_name_ivd
                )
                self._by_name_of[node.ino] = ivd_dir
                return node

            return new

        entries: dict[str, tuple[Hashable, Make]] = {}
        for name, w in naming.unique_names(wanted).items():
            entries[name] = (dirs[w.ident].ino, make(name, dirs[w.ident]))
        self._sync(d, DirNode, entries)

    async def _load_by_name_ivd(self, d: DirNode) -> None:
        ivd_dir = self._by_name_of[d.ino]
        assert ivd_dir.datastore is not None
        snaps = [
            c.snapshot
            for c in (await self.children(ivd_dir)).values()
            if isinstance(c, SnapshotDir) and c.snapshot is not None
        ]

        def make(name: str, target: str, mtime: int) -> Make:
            return lambda: SymlinkNode(self._ino(), name, mtime, target=target)

        wanted: dict[str, tuple[Hashable, Make]] = {}
        for name, snap in naming.snapshot_names(snaps).items():
            # Relative, so the links also resolve through bind mounts and in copies of the tree.
            target = f"../../{ivd_dir.datastore.name}/{ivd_dir.ivd_id}/{snap.id}"
            mtime = to_ns(snap.create_time, self.mount_time_ns)
            wanted[name] = (target, make(name, target, mtime))
        self._sync(d, SymlinkNode, wanted)

    async def _load_snapshot(self, d: DirNode) -> None:
        """What a snapshot directory holds; the one place to add per-snapshot entries.

        Listing opens the disk and reads its table sectors through the block cache, so the
        partN.raw windows are there at once. A disk that cannot be opened or a table that
        cannot be trusted costs one log line and leaves disk.raw alone (its reads then give
        EIO, or work, as before).
        """
        assert isinstance(d, SnapshotDir) and d.ivd is not None and d.snapshot is not None
        ivd, snap = d.ivd, d.snapshot
        disk = DiskFile(
            self._ino(),
            DISK_NAME,
            d.mtime_ns,
            ivd=ivd,
            snapshot=snap,
            capacity=ivd.capacity_bytes,
        )
        self._add(d, disk)
        self._add_snapshot_info(d)
        parts = await self._partitions(disk)
        windows = [
            PartitionFile(
                self._ino(),
                f"part{p.number}.raw",
                d.mtime_ns,
                disk=disk,
                number=p.number,
                start=p.start,
                length=p.length,
            )
            for p in parts
        ]
        for w in windows:
            self._add(d, w)
        if self.volumes is not None:
            self._add(
                d,
                VolumesDir(
                    self._ino(),
                    VOLUMES_NAME,
                    d.mtime_ns,
                    loader=self._load_volumes,
                    disk=disk,
                    partitions=tuple(windows),
                ),
            )

    async def _partitions(self, disk: DiskFile) -> tuple[Partition, ...]:
        where = f"IVD {disk.ivd.id if disk.ivd else '?'} snapshot "
        where += disk.snapshot.id if disk.snapshot else "?"
        try:
            await self.open(disk.ino)
        except Exception as e:  # any failure: disk.raw must still be listed
            log.warning("%s: cannot open the disk to read its partition table: %s", where, e)
            return ()
        reader = disk.reader
        assert reader is not None
        token = trio.lowlevel.current_trio_token()

        # parse() is pure and synchronous; run it on a worker thread whose reads hop back to
        # trio, so they share the cache and its single-flight without blocking this thread.
        def read(offset: int, length: int) -> bytes:
            return bytes(trio.from_thread.run(reader.read, offset, length, trio_token=token))

        try:
            table = await trio.to_thread.run_sync(parse, read, reader.size)
        except Exception as e:
            log.warning("%s: cannot read the partition table: %s", where, e)
            return ()
        if table.warnings:
            log.warning(
                "%s: partition table (%s): %s%s",
                where,
                table.scheme,
                "; ".join(table.warnings),
                "" if table.partitions else "; showing disk.raw only",
            )
        return table.partitions

    async def _load_volumes(self, d: DirNode) -> None:
        """Attach the snapshot's volumes on first listing; failures leave fewer (or no) links."""
        assert isinstance(d, VolumesDir) and d.disk is not None
        disk = d.disk
        if self.volumes is None or self.mountpoint is None:
            return
        assert disk.ivd is not None and disk.snapshot is not None
        try:
            candidates = await self._candidates(d)
            request = VolumeRequest(
                disk.ivd, disk.snapshot, self.mountpoint / self.path_of(disk), candidates
            )
            mounted = await self.volumes.attach(request)
        except Exception as e:
            # Not retried on the next listing: a backend that failed once would fail again,
            # each time with its cost (mounts, VDDK connections).
            log.error("volumes of IVD %s snapshot %s: %s", disk.ivd.id, disk.snapshot.id, e)
            return
        for number, target in sorted(mounted.items()):
            self._add(d, SymlinkNode(self._ino(), str(number), d.mtime_ns, target=target))

    async def _candidates(self, d: VolumesDir) -> tuple[Candidate, ...]:
        disk = d.disk
        assert disk is not None
        if disk.reader is None:
            return ()  # the disk did not open; VixMntapi may still try on its own connection
        reader = disk.reader
        windows = [(p.number, p.start, p.length) for p in d.partitions]
        if not windows:
            windows = [(WHOLE_DISK, 0, reader.size)]
        out = []
        for number, start, length in windows:
            head = bytes(await reader.read(start, min(FS_PROBE_SIZE, length)))
            out.append(Candidate(number, start, length, detect_filesystem(head)))
        return tuple(out)

    def add_generated(
        self, parent: DirNode, name: str, render: Callable[[], bytes], mtime_ns: int | None = None
    ) -> GeneratedFile:
        """A small read-only file whose content is rendered on open (stats, metadata)."""
        node = GeneratedFile(self._ino(), name, mtime_ns or self.mount_time_ns, render=render)
        self._add(parent, node)
        return node

    def add_dir(
        self,
        parent: DirNode,
        name: str,
        loader: Callable[[DirNode], Awaitable[None]] | None = None,
        mtime_ns: int | None = None,
    ) -> DirNode:
        node = DirNode(self._ino(), name, mtime_ns or self.mount_time_ns, loader=loader)
        node.loaded = loader is None
        self._add(parent, node)
        return node

    # --- files ---------------------------------------------------------------------------

    async def open(self, ino: int) -> Node:
        node = self.get(ino)
        if isinstance(node, DirNode):
            raise IsADirectoryError(node.name)
        if isinstance(node, GeneratedFile):
            node.content = node.render()
            return node
        if isinstance(node, PartitionFile):
            assert node.disk is not None
            await self.open(node.disk.ino)
            return node
        if isinstance(node, SymlinkNode):
            raise BackendError(f"{node.name} is a symbolic link")
        assert isinstance(node, DiskFile) and node.ivd is not None and node.snapshot is not None
        if node.reader is None:
            async with node.open_lock:
                if node.reader is None:
                    node.reader = await self._open_reader(node.ivd, node.snapshot, node.capacity)
                    # From now on the size is the disk's own (see _open_reader).
                    node.capacity = node.reader.size
        return node

    async def _open_reader(self, ivd: Ivd, snap: Snapshot, capacity: int) -> DiskReader:
        disk = await self.disks.open(ivd, snap)
        size = disk.capacity
        if size != capacity:
            # vCenter reports the IVD's current capacity in whole MiB; a snapshot taken before
            # the IVD grew, or a disk that is not a whole number of MiB, differs. The disk's
            # own GetInfo is the authority on its bytes.
            log.info(
                "IVD %s snapshot %s: %d bytes (vCenter reports the IVD at %d)",
                ivd.id,
                snap.id,
                size,
                capacity,
            )
        key: Hashable = (ivd.id, snap.id)
        fetch: Callable[[int, int], Awaitable[Block]] = disk.read
        return DiskReader(
            key,
            size,
            self.block_size,
            self.cache,
            fetch,
            query_allocated=getattr(disk, "query_allocated", None),
            prefetcher=self.prefetcher,
            max_prefetch=self.max_prefetch,
        )

    def open_stream(self, node: DiskFile | PartitionFile) -> int:
        """A file handle with its own sequential-read state, for an opened disk or partition
        (a partition's stream works on its disk's reader, at the window's offset)."""
        disk = node.disk if isinstance(node, PartitionFile) else node
        assert disk is not None and disk.reader is not None
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self._streams[fh] = disk.reader.open_stream()
        if isinstance(node, PartitionFile):
            self._windows[fh] = node
        return fh

    def release(self, fh: int) -> None:
        self._streams.pop(fh, None)
        self._windows.pop(fh, None)

    @staticmethod
    def _window_span(node: PartitionFile, offset: int, size: int) -> tuple[int, int]:
        """(disk offset, size) of a read of a partition window, clamped at the window's end."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        return node.start + offset, max(0, min(size, node.length - offset))

    async def read(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        stream = self._streams.get(ino)
        if stream is not None:
            window = self._windows.get(ino)
            if window is not None:
                offset, size = self._window_span(window, offset, size)
                if size == 0:
                    return b""
            return await stream.reader.read(offset, size, stream)
        node = self.get(ino)
        if isinstance(node, GeneratedFile):
            content = node.content if node.content is not None else node.render()
            return content[offset : offset + size]
        if isinstance(node, PartitionFile):
            if node.disk is None or node.disk.reader is None:
                raise BackendError(f"inode {ino} is not an open partition")
            offset, size = self._window_span(node, offset, size)
            if size == 0:
                return b""
            return await node.disk.reader.read(offset, size)
        if not isinstance(node, DiskFile) or node.reader is None:
            raise BackendError(f"inode {ino} is not an open disk")
        return await node.reader.read(offset, size)
