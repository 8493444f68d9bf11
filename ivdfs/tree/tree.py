"""/<datastore>/<ivd-uuid>/<snapshot-id>/disk.raw, built lazily from the inventory.

Concurrency: trio thread only. Blocking inventory queries go through `trio.to_thread` with a
limiter; disk opens go to the `DiskSource` (VDDK's control thread). Raises plain exceptions
(NotFound, BackendError, IsADirectoryError); fs/operations.py turns them into errno values.
Inode numbers are sequential and never reused, so the kernel never sees one change meaning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from datetime import datetime
from typing import Protocol, TypeVar

import trio

from ivdfs.errors import BackendError, NotFound
from ivdfs.inventory.model import Inventory, Ivd, Snapshot
from ivdfs.io.block_cache import Block, BlockCache
from ivdfs.io.reader import DiskReader
from ivdfs.tree.nodes import (
    DatastoreDir,
    DirNode,
    DiskFile,
    GeneratedFile,
    IvdDir,
    Node,
    SnapshotDir,
)

log = logging.getLogger(__name__)

ROOT_INO = 1
DISK_NAME = "disk.raw"

T = TypeVar("T")


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
    ) -> None:
        self.inventory = inventory
        self.disks = disks
        self.cache = cache
        self.block_size = block_size
        self.mount_time_ns = time.time_ns()
        self._limiter = trio.CapacityLimiter(inventory_threads)
        self._next_ino = ROOT_INO + 1
        self.root = DirNode(ROOT_INO, "", self.mount_time_ns, loader=self._load_root)
        self.nodes: dict[int, Node] = {ROOT_INO: self.root}

    # --- inode bookkeeping ---------------------------------------------------------------

    def _add(self, parent: DirNode, node: Node) -> None:
        parent.children[node.name] = node
        self.nodes[node.ino] = node

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

    async def children(self, d: DirNode) -> dict[str, Node]:
        if not d.loaded:
            async with d.lock:
                if not d.loaded and d.loader is not None:
                    await d.loader(d)
                d.loaded = True
        return d.children

    async def lookup(self, parent_ino: int, name: str) -> Node:
        parent = self.get(parent_ino)
        if not isinstance(parent, DirNode):
            raise NotADirectoryError(name)
        node = (await self.children(parent)).get(name)
        if node is None:
            raise NotFound(name)
        return node

    async def _load_root(self, d: DirNode) -> None:
        for ds in await self._query(self.inventory.datastores):
            if ds.name in d.children:
                log.warning(
                    "two datastores are named %r; showing %s only", ds.name, d.children[ds.name]
                )
                continue
            self._add(
                d,
                DatastoreDir(
                    self._ino(),
                    ds.name,
                    self.mount_time_ns,
                    loader=self._load_datastore,
                    datastore=ds,
                ),
            )

    async def _load_datastore(self, d: DirNode) -> None:
        assert isinstance(d, DatastoreDir) and d.datastore is not None
        ds = d.datastore
        for ivd_id in await self._query(lambda: self.inventory.list_ivds(ds)):
            self._add(
                d,
                IvdDir(
                    self._ino(),
                    ivd_id,
                    self.mount_time_ns,
                    loader=self._load_ivd,
                    datastore=ds,
                    ivd_id=ivd_id,
                ),
            )

    async def _load_ivd(self, d: DirNode) -> None:
        assert isinstance(d, IvdDir) and d.datastore is not None
        ds, ivd_id = d.datastore, d.ivd_id
        ivd = await self._query(lambda: self.inventory.ivd(ds, ivd_id))
        d.ivd = ivd
        snaps = await self._query(lambda: self.inventory.snapshots(ivd))
        snaps.sort(key=lambda s: (s.create_time.timestamp() if s.create_time else 0.0, s.id))
        for snap in snaps:
            mtime = to_ns(snap.create_time, self.mount_time_ns)
            self._add(
                d,
                SnapshotDir(
                    self._ino(), snap.id, mtime, loader=self._load_snapshot, ivd=ivd, snapshot=snap
                ),
            )

    async def _load_snapshot(self, d: DirNode) -> None:
        """What a snapshot directory holds; the one place to add per-snapshot entries."""
        assert isinstance(d, SnapshotDir) and d.ivd is not None and d.snapshot is not None
        ivd, snap = d.ivd, d.snapshot
        self._add(
            d,
            DiskFile(
                self._ino(),
                DISK_NAME,
                d.mtime_ns,
                ivd=ivd,
                snapshot=snap,
                capacity=ivd.capacity_bytes,
            ),
        )

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
        assert isinstance(node, DiskFile) and node.ivd is not None and node.snapshot is not None
        if node.reader is None:
            async with node.open_lock:
                if node.reader is None:
                    node.reader = await self._open_reader(node.ivd, node.snapshot, node.capacity)
        return node

    async def _open_reader(self, ivd: Ivd, snap: Snapshot, capacity: int) -> DiskReader:
        disk = await self.disks.open(ivd, snap)
        size = capacity
        if disk.capacity != capacity:
            # vCenter rounds capacity to whole MiB; the disk itself is the authority on bytes.
            log.warning(
                "IVD %s snapshot %s: vCenter reports %d bytes, the disk has %d; "
                "reading stops at the smaller",
                ivd.id,
                snap.id,
                capacity,
                disk.capacity,
            )
            size = min(capacity, disk.capacity)
        key: Hashable = (ivd.id, snap.id)
        fetch: Callable[[int, int], Awaitable[Block]] = disk.read
        return DiskReader(key, size, self.block_size, self.cache, fetch)

    async def read(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        node = self.get(ino)
        if isinstance(node, GeneratedFile):
            content = node.content if node.content is not None else node.render()
            return content[offset : offset + size]
        if not isinstance(node, DiskFile) or node.reader is None:
            raise BackendError(f"inode {ino} is not an open disk")
        return await node.reader.read(offset, size)
