"""/<datastore>/<ivd-uuid>/<snapshot-id>/disk.raw and friends: the protocol-free model that the
FUSE adapter serves (as borg's vfs.py is to its fuse.py).

Role: composes the inode table (lookup counts, forget), the listing engine, the catalog of
vCenter directories, the snapshot directories and the open-file table, and answers what the
adapter asks: lookup, children, open/read/release, extended attributes, forget, refresh. It
raises plain exceptions (NotFound, BackendError, OSError with an errno); fs/operations.py turns
them into errno values. Inode numbers are sequential and never reused, so the kernel never sees
one change meaning; a node removed by a refresh lives until the kernel forgets it, so an open
file keeps reading its own data (or fails with EIO once VDDK refuses), never another disk's.

Concurrency: trio thread only. Evidence hashes are computed on pool threads and finished on a
short-lived thread that hands them back through the trio token (`ivdfs.forensics.evidence`).
"""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any

import trio

from ivdfs.config import TreeSettings
from ivdfs.errors import BackendError, NotFound
from ivdfs.forensics.access import Caller
from ivdfs.forensics.evidence import Evidence, EvidenceHashes, HashTarget
from ivdfs.forensics.hashing import SequentialHash
from ivdfs.forensics.writer import AuditLog
from ivdfs.inventory.model import Inventory
from ivdfs.io.block_cache import BlockCache
from ivdfs.io.prefetch import Prefetcher
from ivdfs.io.reader import DiskReader
from ivdfs.tree import info
from ivdfs.tree.catalog import Catalog, Subset
from ivdfs.tree.changes import ChangeSource
from ivdfs.tree.disk import DiskSource, SnapshotDisk
from ivdfs.tree.files import FileHandle, OpenFile, OpenFiles
from ivdfs.tree.inodes import ROOT_INO, InodeTable
from ivdfs.tree.listing import Listings
from ivdfs.tree.nodes import (
    DatastoreDir,
    DirNode,
    DiskFile,
    GeneratedFile,
    IvdDir,
    Node,
    SnapshotDir,
    SparseFile,
    SymlinkNode,
    WindowFile,
)
from ivdfs.tree.snapshots import SnapshotDirs
from ivdfs.volumes.base import VolumeBackend

log = logging.getLogger(__name__)

__all__ = ["ROOT_INO", "Tree", "TreeSettings"]

# IVD and snapshot ids are UUIDs: a lookup of one the cached listing lacks asks vCenter again
# (an object created since the listing: "create, then read"), as often as the listings allow
# (`Listings.may_relist`).
UUID_RE = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$", re.IGNORECASE)
# getxattr of this name on a directory lists it again now (`ivdfs refresh`): reads are all a
# read-only mount offers, and a name nobody lists is never read by `getfattr -d` or backups.
REFRESH_XATTR = "user.ivdfs.refresh"


class Tree:
    def __init__(
        self,
        inventory: Inventory,
        disks: DiskSource,
        cache: BlockCache,
        settings: TreeSettings = TreeSettings(),
        *,
        subset: Subset = Subset(),
        prefetcher: Prefetcher | None = None,
        volumes: VolumeBackend | None = None,
        mountpoint: Path | None = None,
        on_detach: Callable[[int, str], None] | None = None,
        on_attrs: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        evidence: Evidence | None = None,
    ) -> None:
        """`subset`: what a subset mount shows (--datastore, --ivd). `volumes` and
        `mountpoint`: the guest-volume backend, and where this tree is
        mounted (loop devices read our own disk.raw through it). `on_detach(parent ino, name)`
        tells the kernel an entry is gone; `on_attrs(ino)` that an inode's attributes changed
        (st_blocks, as holes become known). `evidence`: hashes, audit log, provenance."""
        self._on_attrs = on_attrs or (lambda _ino: None)
        self.settings = settings
        self.evidence = evidence or Evidence()
        self.cache = cache
        self.prefetcher = prefetcher
        self.clock = clock
        self.mount_time_ns = time.time_ns()
        root = DirNode(ROOT_INO, "", self.mount_time_ns, refresh_due=0.0)
        self.inodes = InodeTable(root, self._freed, on_detach or (lambda _p, _n: None))
        self.listings = Listings(self.inodes, settings.refresh, clock)
        self.snapshots = SnapshotDirs(
            self.inodes,
            disks,
            self._make_reader,
            self.add_generated,
            self.mount_time_ns,
            volumes,
            mountpoint,
            complete_ivd=self._complete_ivd,
            changes=inventory if isinstance(inventory, ChangeSource) else None,
            source=self.evidence.source,
        )
        self.catalog = Catalog(
            self.inodes,
            self.listings,
            inventory,
            self.mount_time_ns,
            self.snapshots.make,
            self.add_generated,
            subset,
            settings.inventory_threads,
            self._on_attrs,
        )
        root.loader = self.catalog.load_root
        self.files = OpenFiles()
        self.hashes = EvidenceHashes(self.evidence.audit)

    @property
    def root(self) -> DirNode:
        return self.inodes.root

    @property
    def nodes(self) -> dict[int, Node]:
        return self.inodes.nodes

    def get(self, ino: int) -> Node:
        return self.inodes.get(ino)

    def _make_reader(self, sd: SnapshotDisk, size: int) -> DiskReader:
        def holes_known() -> None:
            for ino in sd.files:
                self._on_attrs(ino)

        return DiskReader(
            sd.key,
            size,
            self.settings.block_size,
            self.cache,
            sd.disk.read,
            allocated=sd.disk.allocated,
            prefetcher=self.prefetcher,
            max_prefetch=self.settings.max_prefetch,
            on_map_change=holes_known,
        )

    async def _complete_ivd(self, snapshot_dir: DirNode) -> None:
        await self.catalog.complete_parent(snapshot_dir)

    def _freed(self, node: Node) -> None:
        if isinstance(node, SnapshotDir) and node.disk is not None:
            node.disk.disk.forget()

    # --- directories ---------------------------------------------------------------------

    async def children(self, d: DirNode) -> dict[str, Node]:
        return await self.listings.children(d)

    async def lookup(self, parent_ino: int, name: str) -> Node:
        parent = self.get(parent_ino)
        if not isinstance(parent, DirNode):
            raise OSError(errno.ENOTDIR, parent.name)
        node = (await self.children(parent)).get(name)
        if node is None and isinstance(parent, DatastoreDir | IvdDir) and UUID_RE.match(name):
            if self.listings.may_relist(parent, name):
                # "Create, then read": a snapshot or IVD made after the last listing. Only
                # this waits on vCenter (and fails after its deadline when it does not answer).
                await self.listings.reload(parent)
                node = parent.children.get(name)
            elif self.listings.outage:
                # Not asked again so soon, and the last listing may be out of date: whether
                # it exists is unknown, which is not "no such file".
                raise BackendError(
                    f"{name}: not in the last listing of {parent.name}, and vCenter does not "
                    "answer",
                    quiet=True,
                )
        if node is None:
            raise NotFound(name)
        return node

    def remember(self, ino: int) -> None:
        self.inodes.remember(ino)

    def forget(self, ino: int, n: int) -> None:
        self.inodes.forget(ino, n)

    async def refresh(self, ino: int) -> None:
        """List a directory again now (and the root, for new datastores)."""
        node = self.get(ino)
        if not isinstance(node, DirNode):
            raise OSError(errno.ENOTDIR, node.name)
        if node.loader is not None and node.refresh_due is not None:
            await self.listings.reload(node)

    def add_generated(
        self,
        parent: DirNode,
        name: str,
        render: Callable[[], bytes],
        mtime_ns: int | None = None,
        key: Callable[[], Hashable] | None = None,
    ) -> GeneratedFile:
        """A small read-only file whose content is rendered at each open (stats, metadata);
        with `key`, only when what it depends on changed."""
        node = GeneratedFile(
            self.inodes.new_ino(), name, mtime_ns or self.mount_time_ns, render=render, key=key
        )
        self.inodes.add(parent, node)
        return node

    def add_dir(
        self,
        parent: DirNode,
        name: str,
        loader: Callable[[DirNode], Awaitable[bool]] | None = None,
    ) -> DirNode:
        node = DirNode(self.inodes.new_ino(), name, self.mount_time_ns, loader=loader)
        node.loaded = loader is None
        self.inodes.add(parent, node)
        return node

    # --- files ---------------------------------------------------------------------------

    async def open(self, ino: int, caller: Caller | None = None) -> tuple[FileHandle, Node]:
        """`caller`: who opens, for the audit log (which must hold the open before it
        succeeds)."""
        audit = self.evidence.audit
        if audit is not None:
            audit.check()
        node = self.get(ino)
        if isinstance(node, DirNode):
            raise OSError(errno.EISDIR, node.name)
        if isinstance(node, SymlinkNode):
            raise OSError(errno.ELOOP, node.name)
        if isinstance(node, GeneratedFile):
            if node.prepare is not None:
                await node.prepare()
            parent = self.inodes.parent_of(node)
            if isinstance(parent, SnapshotDir) and parent.disk is not None:
                await self.hashes.settled(parent.disk.key)  # info.json shows hashes just completed
            f = OpenFile(node, content=node.content())
        else:
            assert isinstance(node, DiskFile | WindowFile) and node.disk is not None
            if isinstance(node, SparseFile) and node.prepare is not None:
                await node.prepare()
            sd = node.disk
            # Held before the probe: a disk opened for it stays for the reads that follow,
            # rather than counting as unused (the first to go under --max-connections).
            sd.disk.hold()
            try:
                if not await self.snapshots.probe(sd):
                    raise BackendError(
                        f"{sd.where()}: the disk cannot be opened (see the log)", quiet=True
                    )
                if self.evidence.hashes:
                    # A hash just completed by another open counts as known (no second pass,
                    # and this open keeps the kernel's pages).
                    await self.hashes.settled(sd.key)
            except BaseException:
                sd.disk.release()
                raise
            assert sd.reader is not None
            digest = None
            # Evidence is the disk and its windows, not a changes/ view of the delta.
            evident = not isinstance(node, SparseFile) and node.name not in sd.digests
            if self.evidence.hashes and node.size and evident:
                digest = SequentialHash(node.size)
            f = OpenFile(node, stream=sd.reader.open_stream(), disk=sd, digest=digest)
        fh = self.files.add(f)
        if audit is not None:
            try:
                await self._audit_open(audit, fh, f, caller)
            except BaseException:
                self.release(fh)
                raise
        return fh, node

    async def _audit_open(
        self, audit: AuditLog, fh: FileHandle, f: OpenFile, caller: Caller | None
    ) -> None:
        who = caller or Caller(-1, -1, -1, -1, "")
        f.access, written = audit.opened(fh, str(self.inodes.path_of(f.node)), who)
        await trio.to_thread.run_sync(written.wait)

    def hashing(self, fh: int) -> bool:
        """Whether this open may yet produce its file's evidence hashes."""
        return self.files.get(fh).digest is not None

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        f = self.files.get(fh)
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "negative offset or size")
        audit = self.evidence.audit
        if audit is not None:
            audit.check()  # fail closed: nothing is served that the audit log cannot record
        data = await self._read(f, offset, size)
        if audit is not None and f.access is not None:
            audit.read(f.access, offset, len(data))
        if f.digest is not None and not await self.hashes.feed(
            f.digest, offset, data, lambda: self._hash_target(f)
        ):
            f.digest = None  # not read in order: this open yields no hash
        return data

    async def _read(self, f: OpenFile, offset: int, size: int) -> bytes | memoryview:
        if f.content is not None:
            return f.content[offset : offset + size]
        assert f.stream is not None
        reader = f.stream.reader
        if isinstance(f.node, WindowFile):
            spans = f.node.span.pieces(offset, size)
            if len(spans) == 1 and spans[0][0] is not None:
                return await reader.read(spans[0][0], spans[0][1], f.stream)
            # A run without a disk offset is zeros of a sparse view: no block, no VDDK.
            parts = [
                bytes(n) if off is None else await reader.read(off, n, f.stream) for off, n in spans
            ]
            return b"".join(parts)
        return await reader.read(offset, size, f.stream)

    def _hash_target(self, f: OpenFile) -> HashTarget:
        sd = f.disk
        assert sd is not None
        fh = f.access.fh if f.access is not None else None
        return HashTarget(sd.key, sd.digests, f.node.name, str(self.inodes.path_of(f.node)), fh)

    def release(self, fh: int) -> None:
        f = self.files.pop(fh)
        if f is None:
            return
        if f.digest is not None and not f.digest.collected:
            f.digest.cancel()
        if f.access is not None and self.evidence.audit is not None:
            self.evidence.audit.closed(f.access)
        if f.disk is not None:
            f.disk.disk.release()

    # --- metadata ------------------------------------------------------------------------

    async def xattrs(self, ino: int) -> dict[str, bytes]:
        """Extended attributes: the metadata of disk.raw's IVD and snapshot, and the evidence
        hashes of disk.raw and windows once known."""
        node = self.get(ino)
        if isinstance(node, WindowFile) and node.disk is not None:
            await self.hashes.settled(node.disk.key)
            return info.digest_xattrs(node.disk.digests.get(node.name))
        if not isinstance(node, DiskFile) or node.disk is None:
            return {}
        sd: SnapshotDisk = node.disk
        await self.catalog.complete_parent(self.inodes.parent_of(node))
        await self.snapshots.probe(sd)
        await self.hashes.settled(sd.key)
        return info.disk_xattrs(
            sd.ivd,
            sd.snapshot,
            sd.size if sd.probed else None,
            source=sd.source,
            read_at=sd.probed_at,
            digests=sd.digests.get(node.name),
        )

    def report(self) -> dict[str, Any]:
        return {
            "nodes": len(self.inodes.nodes),
            "nodes_known_to_kernel": self.inodes.known_to_kernel,
            "nodes_freed": self.inodes.freed,
            "open_files": len(self.files),
            **self.catalog.stats,
            **self.snapshots.stats,
            **self.listings.stats,
            "vcenter_outage": self.listings.outage,
        }
