"""The state of one snapshot's disk as the tree shows it: a leaf the nodes hold.

Role: `SnapshotDisk` is one snapshot the tree shows: the `Disk` behind it (the VDDK disk
service in a mount), and, once probed, the disk's own size, its reader (block cache, holes,
read-ahead), its partition table and LVM volumes, and the evidence of its files. `probe` opens
the disk through the service, reads its size and layout (`ivdfs.io.probe`), and lets go (the
service closes the disk soon after unless a file holds it); the result never changes, so `stat`
and `ls` of a probed snapshot cost no VDDK call. A failed probe is tried again on the next
lookup or listing (the service remembers the failure for a growing interval, so a storm of
lookups costs no storm of connections), and until then disk.raw shows vCenter's capacity with
attributes the kernel must not keep. `ChangePair` is what changes/ knows of one older snapshot.
Nothing here imports another module of the tree.

Concurrency: trio thread only; a disk probes under its own lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import trio

from ivdfs.errors import BackendError
from ivdfs.forensics.evidence import Source
from ivdfs.forensics.hashing import Digests
from ivdfs.formats.lvm_map import LogicalVolume
from ivdfs.formats.partitions import Partition, PartitionTable
from ivdfs.inventory.changes import ChangedAreas
from ivdfs.inventory.model import Ivd, Snapshot
from ivdfs.io.block_cache import Block
from ivdfs.io.probe import read_layout
from ivdfs.io.reader import DiskReader

log = logging.getLogger(__name__)


class Disk(Protocol):
    """A snapshot's disk as the tree sees it (vddk.service behind it in a mount)."""

    async def capacity(self) -> int: ...

    async def sector_size(self) -> int:
        """The guest's logical sector size (512, or 4096 for a 4Kn disk): partition tables
        count in it. Reads stay in 512-byte sectors whatever it is."""
        ...

    async def read(self, start_sector: int, nbytes: int, background: bool = False) -> Block:
        """`background`: read-ahead (ivdfs.io.prefetch), which yields to demand reads and
        never opens the disk."""
        ...

    async def allocated(self, start: int, end: int, granularity: int) -> list[tuple[int, int]]:
        """Runs of sectors in [start, end) that may hold data (ivdfs.io.holes.Allocated)."""
        ...

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
    logical_volumes: tuple[LogicalVolume, ...] = ()
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

    async def probe(self, make_reader: MakeReader) -> bool:
        """Learn the disk's size and layout once; False (logged) while it cannot."""
        if self.probed:
            return True
        async with self.lock:
            if self.probed:
                return True
            try:
                size = await self.disk.capacity()
                sector_size = await self.disk.sector_size()
            except BackendError as e:
                if not e.quiet:
                    log.warning("%s: cannot open the disk (will try again): %s", self.where(), e)
                return False
            if size != self.size:
                # vCenter reports the IVD's current capacity in whole MiB; a snapshot taken
                # before the IVD grew, or a disk that is not a whole number of MiB, differs.
                # The disk's own GetInfo is the authority on its bytes.
                log.info("%s: %d bytes (vCenter reports the IVD at %d)", self.where(), size,
                         self.size)  # fmt: skip
            reader = make_reader(self, size)
            layout = await read_layout(reader, sector_size, self.where())
            self.size, self.table, self.partitions = size, layout.table, layout.table.partitions
            self.sector_size = sector_size
            self.logical_volumes = layout.logical_volumes
            self.probed_at = datetime.now(UTC)
            self.reader = reader  # last: `probed` means everything above is set
            return True


@dataclass(eq=False)
class ChangePair:
    """The changes from `older` to the snapshot of `disk`, shared by the .json and the .raw
    of changes/ (`ivdfs.tree.changes`): asked of vCenter once, then kept."""

    disk: SnapshotDisk  # the newer snapshot's
    older: Snapshot
    areas: ChangedAreas | None = None
    refusal: str | None = None
    logged: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def known(self) -> bool:
        return self.areas is not None or self.refusal is not None

    def where(self) -> str:
        return f"{self.disk.where()} changes since snapshot {self.older.id}"
