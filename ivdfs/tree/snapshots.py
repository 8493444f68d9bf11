"""What a snapshot directory holds: disk.raw, partition windows, info.json, volumes/, changes/.

Role: the loaders of snapshot directories and their volumes/ (the disk state they show is
`ivdfs.tree.disk`'s `SnapshotDisk`, probed there). A disk that cannot be opened yet leaves
disk.raw and info.json alone, and the windows, volumes/ and changes/ appear once it opens.

Concurrency: trio thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import TypeVar

from ivdfs.errors import BackendError
from ivdfs.forensics.evidence import Source
from ivdfs.formats.filesystems import FS_PROBE_SIZE
from ivdfs.formats.lvm_map import LogicalVolume
from ivdfs.formats.partitions import is_ldm
from ivdfs.inventory.model import Ivd, Snapshot
from ivdfs.io.probe import filesystem_at
from ivdfs.tree import info
from ivdfs.tree.changes import CHANGES_NAME, Changes, ChangeSource
from ivdfs.tree.disk import DiskSource, MakeReader, SnapshotDisk
from ivdfs.tree.inodes import InodeTable
from ivdfs.tree.nodes import (
    INFO_NAME,
    AddGenerated,
    ByteRange,
    DirNode,
    DiskFile,
    SnapshotDir,
    Span,
    SymlinkNode,
    VolumesDir,
    WindowFile,
    to_ns,
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

DISK_NAME = "disk.raw"
VOLUMES_NAME = "volumes"


async def volume_candidates(sd: SnapshotDisk, lv_paths: dict[str, Path]) -> tuple[Candidate, ...]:
    """Each partition (or the whole disk) and each LVM volume (its lv-*.raw file at
    `lv_paths[dm_name]`), with the filesystem its first bytes show."""
    reader = sd.reader
    assert reader is not None
    windows = [(p.number, p.start, p.length, is_ldm(p)) for p in sd.partitions]
    if not windows:
        windows = [(WHOLE_DISK, 0, reader.size, False)]
    out = []
    for number, start, length, ldm in windows:
        # An LDM partition's first volume may well start with a filesystem, but what it holds
        # is the dynamic disk's to say (guestfs mode assembles it); its type is enough here.
        if ldm:
            fs: str | None = "LDM_member"
        else:
            fs = await filesystem_at(reader, [(start, min(FS_PROBE_SIZE, length))])
        out.append(Candidate(number, start, length, fs))
    for lv in sd.logical_volumes:
        path = lv_paths.get(lv.dm_name)
        if path is None:
            continue
        fs = await filesystem_at(reader, lv.pieces(0, FS_PROBE_SIZE))
        out.append(Candidate(0, 0, lv.size, fs, lv.dm_name, path))
    return tuple(out)


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
        return await sd.probe(self.make_reader)

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


def lv_file_name(lv: LogicalVolume) -> str:
    # device-mapper's spelling: unambiguous even when names contain hyphens.
    return f"lv-{lv.dm_name}.raw"


def snapshot_info_key(sd: SnapshotDisk) -> Hashable:
    # Everything snapshot_info shows that can change: the probe, and hashes as they complete.
    return (sd.ivd, sd.snapshot, sd.probed, sd.size, sd.probed_at, tuple(sd.digests.items()),
            sd.disk.origin())  # fmt: skip


def snapshot_info(sd: SnapshotDisk) -> bytes:
    return info.snapshot_json(
        sd.ivd,
        sd.snapshot,
        sd.size if sd.probed else None,
        sector_size=sd.sector_size if sd.probed else None,
        source=sd.source,
        read_at=sd.probed_at,
        digests=sd.digests,
        origin=sd.disk.origin(),
    )
