"""What a snapshot directory holds: disk.raw, partition windows, info.json, volumes/, changes/.

Role: one `SnapshotDisk` per snapshot the tree shows: the VDDK-backed `Disk`, and, once probed,
the disk's own size, its reader (block cache, holes, read-ahead) and its partition table. The
probe opens the disk through the service, reads its size and table sectors, and lets go (the
service closes the disk soon after unless a file holds it); the result never changes, so
`stat` and `ls` of a probed snapshot cost no VDDK call. A failed probe is tried again on the
next lookup or listing (the service remembers the failure for a growing interval, so a storm of
lookups costs no storm of connections), and until then disk.raw shows vCenter's capacity with
attributes the kernel must not keep: a file's size is never a guess the kernel can hold on to.

Concurrency: trio thread only. Table sectors are read in the caller's task (so in its cancel
scope); `parse` stays pure and synchronous by being re-run over the bytes read so far.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from ivdfs.errors import BackendError
from ivdfs.forensics.evidence import Source
from ivdfs.forensics.hashing import Digests
from ivdfs.inventory.model import Ivd, Snapshot
from ivdfs.io import lvm
from ivdfs.io.block_cache import Block
from ivdfs.io.partitions import (
    FS_PROBE_SIZE,
    Partition,
    PartitionTable,
    Reader,
    detect_filesystem,
    parse,
)
from ivdfs.io.reader import DiskReader
from ivdfs.tree import info
from ivdfs.tree.catalog import INFO_NAME, AddGenerated, to_ns
from ivdfs.tree.changes import CHANGES_NAME, Changes, ChangeSource
from ivdfs.tree.inodes import InodeTable
from ivdfs.tree.nodes import (
    ByteRange,
    DirNode,
    DiskFile,
    SnapshotDir,
    Span,
    SymlinkNode,
    VolumesDir,
    WindowFile,
)
from ivdfs.volumes.base import (
    ERROR_SUFFIX,
    WHOLE_DISK,
    Candidate,
    VolumeBackend,
    VolumeRequest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# parse() reads a bounded number of structures (MBR, two GPT headers and arrays, 128 EBRs);
# each round of the bridge below adds one of them.
MAX_TABLE_ROUNDS = 512
DISK_NAME = "disk.raw"
VOLUMES_NAME = "volumes"


class Disk(Protocol):
    """A snapshot's disk as the tree sees it (vddk.service behind it in a mount)."""

    async def capacity(self) -> int: ...

    async def sector_size(self) -> int:
        """The guest's logical sector size (512, or 4096 for a 4Kn disk): partition tables
        count in it. Reads stay in 512-byte sectors whatever it is."""
        ...

    async def read(self, start_sector: int, nbytes: int) -> Block: ...

    async def query_allocated(
        self, start_sector: int, num_sectors: int, chunk_sectors: int
    ) -> list[tuple[int, int]]: ...

    def hold(self) -> None: ...

    def release(self) -> None: ...

    def forget(self) -> None: ...


class DiskSource(Protocol):
    def disk(self, ivd: Ivd, snapshot: Snapshot) -> Disk:
        """The disk of a snapshot; no I/O until it is used."""
        ...


MakeReader = Callable[["SnapshotDisk", int], DiskReader]


@dataclass(eq=False)
class SnapshotDisk:
    ivd: Ivd
    snapshot: Snapshot
    disk: Disk
    size: int  # vCenter's capacity until probed, then the disk's own
    sector_size: int = 512  # the guest's logical sector size, once probed
    reader: DiskReader | None = None
    partitions: tuple[Partition, ...] = ()
    table: PartitionTable | None = None
    logical_volumes: tuple[lvm.LogicalVolume, ...] = ()
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Inodes whose attributes show this disk's holes (disk.raw, windows): refreshed in the
    # kernel when the allocation map learns more.
    files: list[int] = field(default_factory=list)
    # Provenance and evidence (ivdfs.forensics): the server, when the probe opened the disk,
    # and the hashes of its files by name (None: two complete reads disagreed).
    source: Source | None = None
    probed_at: datetime | None = None
    digests: dict[str, Digests | None] = field(default_factory=dict)

    @property
    def probed(self) -> bool:
        return self.reader is not None

    @property
    def key(self) -> tuple[str, str]:
        # Cache key: vCenter never reuses an IVD or snapshot id, so it never returns other data.
        return (self.ivd.id, self.snapshot.id)

    def where(self) -> str:
        return f"IVD {self.ivd.id} snapshot {self.snapshot.id}"

    @property
    def map_version(self) -> int:
        """Changes whenever `hole_bytes` may answer differently."""
        return self.reader.holes.version if self.reader else -1

    def hole_bytes(self, start: int, end: int) -> int:
        """Bytes of [start, end) known to be unallocated so far (learned as reads go)."""
        return self.reader.holes.unallocated_bytes(start, end) if self.reader else 0


class _NeedBytes(Exception):
    def __init__(self, offset: int, length: int) -> None:
        self.offset, self.length = offset, length


async def over_reader(fn: Callable[[Reader], T], reader: DiskReader, max_rounds: int) -> T:
    """Run a pure, synchronous parser whose bytes come through a read callback, with every
    read done here in the caller's task (its cancel scope, no thread hop): the parser is
    re-run over the bytes read so far until it needs no more. Parsers read a bounded number
    of structures, so this ends; `max_rounds` bounds it against a parser bug."""
    have: dict[tuple[int, int], bytes] = {}

    def read(offset: int, length: int) -> bytes:
        data = have.get((offset, length))
        if data is None:
            raise _NeedBytes(offset, length)
        return data

    for _ in range(max_rounds):
        try:
            return fn(read)
        except _NeedBytes as need:
            have[(need.offset, need.length)] = bytes(await reader.read(need.offset, need.length))
    raise BackendError("the disk's metadata needs more reads than any valid layout")


async def read_table(reader: DiskReader, sector_size: int = 512) -> PartitionTable:
    return await over_reader(
        lambda read: parse(read, reader.size, sector_size), reader, MAX_TABLE_ROUNDS
    )


async def read_lvm(reader: DiskReader, partitions: tuple[Partition, ...]) -> lvm.LvmScan:
    windows = [(p.start, p.length) for p in partitions] or [(0, reader.size)]
    # Each window costs a label read, each PV a header, an area header and its metadata.
    rounds = 8 * len(windows) + 64
    return await over_reader(lambda read: lvm.scan(read, windows), reader, rounds)


async def probe(sd: SnapshotDisk, make_reader: MakeReader) -> bool:
    """Learn the disk's size and partition table once; False (logged) while it cannot."""
    if sd.probed:
        return True
    async with sd.lock:
        if sd.probed:
            return True
        try:
            size = await sd.disk.capacity()
            sector_size = await sd.disk.sector_size()
        except BackendError as e:
            if not e.quiet:
                log.warning("%s: cannot open the disk (will try again): %s", sd.where(), e)
            return False
        if size != sd.size:
            # vCenter reports the IVD's current capacity in whole MiB; a snapshot taken before
            # the IVD grew, or a disk that is not a whole number of MiB, differs. The disk's
            # own GetInfo is the authority on its bytes.
            log.info("%s: %d bytes (vCenter reports the IVD at %d)", sd.where(), size, sd.size)
        reader = make_reader(sd, size)
        try:
            table = await read_table(reader, sector_size)
        except BackendError as e:
            log.warning("%s: cannot read the partition table: %s", sd.where(), e)
            table = PartitionTable("none", (), ())
        if table.warnings:
            log.warning(
                "%s: partition table (%s): %s%s",
                sd.where(),
                table.scheme,
                "; ".join(table.warnings),
                "" if table.partitions else "; showing disk.raw only",
            )
        try:
            found = await read_lvm(reader, table.partitions)
        except BackendError as e:
            log.warning("%s: cannot read LVM metadata: %s", sd.where(), e)
            found = lvm.LvmScan()
        if found.warnings:
            log.warning("%s: LVM: %s", sd.where(), "; ".join(found.warnings))
        for lv in found.volumes:
            if not lv.supported:
                log.info("%s: LVM volume %s not shown: %s", sd.where(), lv.dm_name, lv.reason)
        sd.size, sd.table, sd.partitions = size, table, table.partitions
        sd.sector_size = sector_size
        sd.logical_volumes = found.volumes
        sd.probed_at = datetime.now(UTC)
        sd.reader = reader  # last: `probed` means everything above is set
        return True


async def volume_candidates(sd: SnapshotDisk, lv_paths: dict[str, Path]) -> tuple[Candidate, ...]:
    """Each partition (or the whole disk) and each LVM volume (its lv-*.raw file at
    `lv_paths[dm_name]`), with the filesystem its first bytes show."""
    reader = sd.reader
    assert reader is not None
    windows = [(p.number, p.start, p.length) for p in sd.partitions]
    if not windows:
        windows = [(WHOLE_DISK, 0, reader.size)]
    out = []
    for number, start, length in windows:
        head = bytes(await reader.read(start, min(FS_PROBE_SIZE, length)))
        out.append(Candidate(number, start, length, detect_filesystem(head)))
    for lv in sd.logical_volumes:
        path = lv_paths.get(lv.dm_name)
        if path is None:
            continue
        pieces = lv.pieces(0, FS_PROBE_SIZE)
        head = b"".join([bytes(await reader.read(off, n)) for off, n in pieces])
        out.append(Candidate(0, 0, lv.size, detect_filesystem(head), lv.dm_name, path))
    return tuple(out)


Probe = Callable[[SnapshotDisk], Awaitable[bool]]


class SnapshotDirs:
    """Creates snapshot directories and fills them: disk.raw, info.json, partN.raw, volumes/,
    changes/."""

    def __init__(
        self,
        inodes: InodeTable,
        disks: DiskSource,
        make_reader: MakeReader,
        add_generated: AddGenerated,
        mount_time_ns: int,
        volumes: VolumeBackend | None = None,
        mountpoint: Path | None = None,
        complete_ivd: Callable[[DirNode], Awaitable[None]] | None = None,
        changes: ChangeSource | None = None,
        source: Source | None = None,
    ) -> None:
        """`complete_ivd(snapshot dir)` makes the IVD record whole (a listing may have given
        only a summary) before metadata is shown. `changes`: where changes/ asks what changed
        between snapshots (None: no changes/)."""
        self.changes = Changes(changes, inodes, add_generated) if changes is not None else None
        self.complete_ivd = complete_ivd
        self.inodes = inodes
        self.disks = disks
        self.make_reader = make_reader
        self.add_generated = add_generated
        self.mount_time_ns = mount_time_ns
        self.volumes = volumes
        self.mountpoint = mountpoint
        # Guest volumes keep their disks open (their loop devices read our files) until unmount.
        self.stats = {"volumes_mounted": 0, "volumes_refused": 0, "snapshots_with_volumes": 0}
        self.source = source

    def make(self, ivd: Ivd, snap: Snapshot) -> SnapshotDir:
        sd = SnapshotDisk(
            ivd, snap, self.disks.disk(ivd, snap), ivd.capacity_bytes, source=self.source
        )
        mtime = to_ns(snap.create_time, self.mount_time_ns)
        return SnapshotDir(self.inodes.new_ino(), snap.id, mtime, loader=self.load, disk=sd)

    async def probe(self, sd: SnapshotDisk) -> bool:
        return await probe(sd, self.make_reader)

    async def load(self, d: DirNode) -> bool:
        """What a snapshot directory holds; the one place to add per-snapshot entries.

        A disk that cannot be opened yet or a table that cannot be trusted costs one log line
        and leaves disk.raw and info.json alone; the partitions and changes/ appear once a
        probe succeeds.
        """
        assert isinstance(d, SnapshotDir) and d.disk is not None
        sd = d.disk
        if DISK_NAME not in d.children:
            node = DiskFile(self.inodes.new_ino(), DISK_NAME, d.mtime_ns, disk=sd)
            self.inodes.add(d, node)
            sd.files.append(node.ino)
            info_file = self.add_generated(
                d, INFO_NAME, lambda: snapshot_info(sd), d.mtime_ns, lambda: snapshot_info_key(sd)
            )
            if self.complete_ivd is not None:
                complete = self.complete_ivd
                info_file.prepare = lambda: complete(d)
        if not await self.probe(sd):
            return False
        spans: list[tuple[str, Span]] = [
            (f"part{p.number}.raw", ByteRange(p.start, p.length)) for p in sd.partitions
        ]
        spans += [(lv_file_name(lv), lv) for lv in sd.logical_volumes if lv.supported]
        for name, span in spans:
            if name not in d.children:
                window = WindowFile(self.inodes.new_ino(), name, d.mtime_ns, disk=sd, span=span)
                self.inodes.add(d, window)
                sd.files.append(window.ino)
        # After the probe: a .raw there has the disk's own size from the start.
        if self.changes is not None and CHANGES_NAME not in d.children:
            self.inodes.add(d, self.changes.make_dir(sd, d.mtime_ns))
        if self.volumes is not None and VOLUMES_NAME not in d.children:
            self.inodes.add(
                d,
                VolumesDir(
                    self.inodes.new_ino(),
                    VOLUMES_NAME,
                    d.mtime_ns,
                    loader=self.load_volumes,
                    disk=sd,
                ),
            )
        return True

    async def load_volumes(self, d: DirNode) -> bool:
        """Attach the snapshot's volumes on first listing; failures leave fewer (or no) links,
        and never silently: volumes/.error says what failed.

        A disk that could not be read (looking for filesystems) is tried again at the next
        listing; a volume backend that failed is not (it would fail again, each time with
        its cost: mounts, VDDK connections)."""
        assert isinstance(d, VolumesDir) and d.disk is not None
        sd = d.disk
        if self.volumes is None or self.mountpoint is None:
            return True
        snapdir = self.inodes.parent_of(d)
        here = self.mountpoint / self.inodes.path_of(snapdir)
        lv_paths = {lv.dm_name: here / lv_file_name(lv) for lv in sd.logical_volumes}
        try:
            candidates = await volume_candidates(sd, lv_paths)
        except BackendError as e:
            log.warning("volumes of %s: cannot read the disk (will try again): %s", sd.where(), e)
            self._volumes_error(d, f"cannot read the disk (tried again at the next listing): {e}")
            return False
        self._volumes_error(d, None)
        try:
            answer = await self.volumes.attach(
                VolumeRequest(sd.ivd, sd.snapshot, here / DISK_NAME, candidates)
            )
        except Exception as e:  # any backend failure: the snapshot stays readable
            log.error("volumes of %s: %s", sd.where(), e)
            self._volumes_error(d, f"the volume backend failed: {e}")
            return True
        refused = dict(answer.refused)
        for lv in sd.logical_volumes:
            if not lv.supported:
                refused[lv.dm_name] = f"LVM logical volume not supported: {lv.reason}"
        self.stats["volumes_mounted"] += len(answer.mounted)
        self.stats["volumes_refused"] += len(refused)
        self.stats["snapshots_with_volumes"] += bool(answer.mounted)
        for name, target in sorted(answer.mounted.items()):
            link = SymlinkNode(
                self.inodes.new_ino(), name, d.mtime_ns, target=target, prepare=answer.wake
            )
            self.inodes.add(d, link)
        # No volume is silently absent: volumes/<name>.error says why it is not mounted.
        for name, reason in sorted(refused.items()):
            text = (reason + "\n").encode()
            self.add_generated(d, name + ERROR_SUFFIX, _constant(text), d.mtime_ns, _constant(0))
        return True

    def _volumes_error(self, d: DirNode, reason: str | None) -> None:
        """volumes/.error: why no volume is there at all (None: remove it)."""
        if ERROR_SUFFIX in d.children:
            self.inodes.remove(d, ERROR_SUFFIX)
        if reason is not None:
            text = (reason + "\n").encode()
            self.add_generated(d, ERROR_SUFFIX, _constant(text), d.mtime_ns, _constant(0))


def _constant(value: T) -> Callable[[], T]:
    return lambda: value


def lv_file_name(lv: lvm.LogicalVolume) -> str:
    # device-mapper's spelling: unambiguous even when names contain hyphens.
    return f"lv-{lv.dm_name}.raw"


def snapshot_info_key(sd: SnapshotDisk) -> Hashable:
    # Everything snapshot_info shows that can change: the probe, and hashes as they complete.
    return (sd.ivd, sd.snapshot, sd.probed, sd.size, sd.probed_at, tuple(sd.digests.items()))


def snapshot_info(sd: SnapshotDisk) -> bytes:
    return info.snapshot_json(
        sd.ivd,
        sd.snapshot,
        sd.size if sd.probed else None,
        sector_size=sd.sector_size if sd.probed else None,
        source=sd.source,
        read_at=sd.probed_at,
        digests=sd.digests,
    )
