"""Tree nodes: directories that load their children lazily, read-only files and links.

Role: plain records, and the names every module of the tree shares (`AddGenerated`,
`INFO_NAME`, `to_ns`). Behaviour lives in the tree modules (`catalog`, `snapshots`, `files`);
a node knows its name, inode, times and what its content comes from (a snapshot's disk state,
`ivdfs.tree.disk`, the one module of the tree this imports). `identity` is what a refreshed
listing compares to keep a node (and its inode) or replace it.

Concurrency: trio thread only. A directory loads its children under its own lock, so
concurrent lookups cause one inventory query.
"""

from __future__ import annotations

import bisect
import stat
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Protocol

import trio

from ivdfs.errors import BackendError
from ivdfs.inventory.model import Datastore, Ivd
from ivdfs.tree.disk import ChangePair, SnapshotDisk

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
LINK_MODE = stat.S_IFLNK | 0o777
# Every IVD and snapshot directory has one (ivdfs.tree.info renders it).
INFO_NAME = "info.json"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ns(t: datetime | None, default: int) -> int:
    """Nanoseconds since the epoch, exactly: `timestamp() * 1e9` in floats lands a nanosecond
    off for most microsecond times."""
    if t is None:
        return default
    if t.tzinfo is None:
        t = t.astimezone(UTC)  # a naive time is local, as timestamp() takes it
    return (t - _EPOCH) // timedelta(microseconds=1) * 1000


# A loader fills a directory; it returns False when the listing is incomplete (a disk that
# could not be probed yet), so the next lookup or listing runs it again.
Loader = Callable[["DirNode"], Awaitable[bool]]


@dataclass(eq=False)
class Node:
    ino: int
    name: str
    mtime_ns: int
    identity: Hashable = None

    @property
    def mode(self) -> int:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return 0

    @property
    def stable(self) -> bool:
        """Whether the kernel may keep this node's attributes for long (the size is final)."""
        return True

    @property
    def stored(self) -> int:
        """Bytes that hold data (st_blocks x 512): all of them, unless holes are known."""
        return self.size


@dataclass(eq=False)
class DirNode(Node):
    loader: Loader | None = None
    children: dict[str, Node] = field(default_factory=dict)
    loaded: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    # Monotonic time its listing goes stale, for directories that refresh from vCenter;
    # 0.0: refreshes, not loaded yet; None: never refreshes.
    refresh_due: float | None = None
    last_loaded: float = 0.0
    refresh_queued: bool = False  # waiting for a background refresh
    # The last failed load (monotonic time) and why; None once a load succeeds.
    failed_at: float | None = None
    failure: BackendError | None = None
    # Its refresh asks nobody (changes/ follows its IVD directory): a success there says
    # nothing about vCenter.
    local_refresh: ClassVar[bool] = False

    @property
    def mode(self) -> int:
        return DIR_MODE


@dataclass(eq=False)
class DatastoreDir(DirNode):
    datastore: Datastore | None = None


@dataclass(eq=False)
class IvdDir(DirNode):
    datastore: Datastore | None = None
    ivd_id: str = ""
    ivd: Ivd | None = None
    complete: bool = False  # `ivd` is the whole record, not a datastore listing's summary
    whole: Ivd | None = None  # the last whole record read (served while vCenter is silent)


@dataclass(eq=False)
class ByNameDir(DirNode):
    """``by-name/<ivd name>``: links to the snapshots of `target`."""

    target: IvdDir | None = None


@dataclass(eq=False)
class SnapshotDir(DirNode):
    disk: SnapshotDisk | None = None


@dataclass(eq=False)
class ChangesDir(DirNode):
    """``changes/`` of a snapshot: a .json and a .raw for each older snapshot of its IVD."""

    disk: SnapshotDisk | None = None
    pairs: dict[str, ChangePair] = field(default_factory=dict)  # by older snapshot id
    local_refresh: ClassVar[bool] = True


@dataclass(eq=False)
class VolumesDir(DirNode):
    """``volumes/`` of a snapshot: its loader attaches the guest volumes on first listing."""

    disk: SnapshotDisk | None = None


@dataclass(eq=False)
class DiskFile(Node):
    """``disk.raw``: the whole snapshot."""

    disk: SnapshotDisk | None = None

    @property
    def mode(self) -> int:
        return FILE_MODE

    @property
    def size(self) -> int:
        assert self.disk is not None
        return self.disk.size

    @property
    def stable(self) -> bool:
        return self.disk is not None and self.disk.probed

    @property
    def stored(self) -> int:
        assert self.disk is not None
        return self.size - self.disk.hole_bytes(0, self.size)


class Span(Protocol):
    """Where a window's bytes are on its disk: a partition, or an LVM logical volume (whose
    extents may be striped over several places)."""

    @property
    def size(self) -> int: ...

    def pieces(self, offset: int, length: int) -> Sequence[tuple[int | None, int]]:
        """(disk offset, length) runs of the window's bytes [offset, offset + length), clipped
        to the window; every run lies inside the disk. A disk offset of None is a run of
        zeros that comes from no disk (the unchanged part of a sparse view)."""
        ...


@dataclass(frozen=True)
class ByteRange:
    """A contiguous span: a partition."""

    start: int
    length: int

    @property
    def size(self) -> int:
        return self.length

    def pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = min(offset + length, self.length)
        return [(self.start + offset, end - offset)] if 0 <= offset < end else []


@dataclass(eq=False)
class WindowFile(Node):
    """A read-only view of part of its disk, served from the disk's cache: ``partN.raw`` or
    ``lv-<vg>-<lv>.raw``."""

    disk: SnapshotDisk | None = None
    span: Span = ByteRange(0, 0)
    # (map version, stored): a striped LV has a run per stripe chunk, too many for every stat.
    _stored: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def mode(self) -> int:
        return FILE_MODE

    @property
    def size(self) -> int:
        return self.span.size

    @property
    def stored(self) -> int:
        assert self.disk is not None
        version = self.disk.map_version
        if self._stored is None or self._stored[0] != version:
            pieces = self.span.pieces(0, self.size)
            # Zero runs from no disk (sparse views) hold nothing either.
            empty = sum(
                n if off is None else self.disk.hole_bytes(off, off + n) for off, n in pieces
            )
            self._stored = (version, self.size - empty)
        return self._stored[1]


@dataclass(frozen=True)
class SparseSpan:
    """A whole disk of which only `extents` ((offset, length), sorted, apart) are its bytes;
    the rest is zeros."""

    length: int
    extents: tuple[tuple[int, int], ...] = ()

    @property
    def size(self) -> int:
        return self.length

    @property
    def allocated(self) -> int:
        return sum(max(0, min(s + n, self.length) - s) for s, n in self.extents if s < self.length)

    def pieces(self, offset: int, length: int) -> list[tuple[int | None, int]]:
        end = min(offset + length, self.length)
        out: list[tuple[int | None, int]] = []
        pos = offset
        # The first extent that ends after `offset`.
        i = max(0, bisect.bisect_right(self.extents, (offset, 0)) - 1)
        while pos < end:
            while i < len(self.extents) and sum(self.extents[i]) <= pos:
                i += 1
            if i == len(self.extents) or self.extents[i][0] >= end:
                out.append((None, end - pos))
                break
            start, n = self.extents[i]
            if start > pos:
                out.append((None, start - pos))
                pos = start
            stop = min(start + n, end)
            out.append((pos, stop - pos))
            pos = stop
        return out


@dataclass(eq=False)
class SparseFile(WindowFile):
    """A disk-sized view whose bytes come from the disk only where `span` has extents, zeros
    elsewhere (``changes/<older>.raw``). `prepare` learns the extents before each open; until
    they are known, `span` has none and st_blocks counts the whole size (an upper bound), and
    the attributes are not kept."""

    prepare: Callable[[], Awaitable[None]] | None = None
    known: bool = False

    @property
    def stored(self) -> int:
        # The changed extents, holes or not: a fixed figure, so the kernel may keep it.
        if not self.known or not isinstance(self.span, SparseSpan):
            return self.size
        return self.span.allocated

    @property
    def stable(self) -> bool:
        return self.known


@dataclass(eq=False)
class SymlinkNode(Node):
    """A symbolic link; ``volumes/<n>`` points at where a guest volume is mounted."""

    target: str = ""
    # Awaited before each readlink: a guest volume's appliance that stopped when idle starts.
    prepare: Callable[[], Awaitable[None]] | None = None

    @property
    def mode(self) -> int:
        return LINK_MODE

    @property
    def size(self) -> int:
        return len(self.target.encode())


@dataclass(eq=False)
class GeneratedFile(Node):
    """Content rendered when opened (each open gets its own copy); stat renders it too."""

    render: Callable[[], bytes] = lambda: b""
    # Asked before each open's render, for what the content needs from vCenter.
    prepare: Callable[[], Awaitable[None]] | None = None
    # What the content depends on, when that is cheaper to tell than rendering it: the last
    # render is reused while the key is equal (stat and listings ask for the size a lot).
    key: Callable[[], Hashable] | None = None
    _memo: tuple[Hashable, bytes] | None = None

    def content(self) -> bytes:
        if self.key is None:
            return self.render()
        key = self.key()
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, self.render())
        return self._memo[1]

    @property
    def mode(self) -> int:
        return FILE_MODE

    @property
    def size(self) -> int:
        return len(self.content())

    @property
    def stable(self) -> bool:
        return False


# Adds a generated file to a directory: (parent, name, render, mtime_ns, key) -> the file
# (`Tree.add_generated`).
AddGenerated = Callable[
    [DirNode, str, Callable[[], bytes], int | None, Callable[[], Hashable] | None], GeneratedFile
]
