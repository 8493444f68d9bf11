"""Tree nodes: directories that load their children lazily, and read-only files.

Concurrency: trio thread only. A directory loads its children once, under its own lock, so
concurrent lookups cause one inventory query.
"""

from __future__ import annotations

import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ivdfs.inventory.model import Datastore, Ivd, Snapshot
from ivdfs.io.reader import DiskReader

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444
LINK_MODE = stat.S_IFLNK | 0o777


@dataclass(eq=False)
class Node:
    ino: int
    name: str
    mtime_ns: int

    @property
    def mode(self) -> int:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return 0


@dataclass(eq=False)
class DirNode(Node):
    loader: Callable[[DirNode], Awaitable[None]] | None = None
    children: dict[str, Node] = field(default_factory=dict)
    loaded: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)

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


@dataclass(eq=False)
class SnapshotDir(DirNode):
    ivd: Ivd | None = None
    snapshot: Snapshot | None = None


@dataclass(eq=False)
class DiskFile(Node):
    ivd: Ivd | None = None
    snapshot: Snapshot | None = None
    capacity: int = 0
    reader: DiskReader | None = None
    open_lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def mode(self) -> int:
        return FILE_MODE

    @property
    def size(self) -> int:
        return self.capacity


@dataclass(eq=False)
class PartitionFile(Node):
    """``partN.raw``: a read-only byte window onto its disk, served from the disk's cache.

    `start` and `length` come from `io.partitions.parse`, which guarantees the window lies
    inside the disk, so a read never needs more than clamping to `length`.
    """

    disk: DiskFile | None = None
    number: int = 0
    start: int = 0
    length: int = 0
    fs: str | None = None

    @property
    def mode(self) -> int:
        return FILE_MODE

    @property
    def size(self) -> int:
        return self.length


@dataclass(eq=False)
class VolumesDir(DirNode):
    """``volumes/`` of a snapshot: its loader attaches the guest volumes on first listing."""

    disk: DiskFile | None = None
    partitions: tuple[PartitionFile, ...] = ()


@dataclass(eq=False)
class SymlinkNode(Node):
    """A symbolic link; ``volumes/<n>`` points at where a guest volume is mounted."""

    target: str = ""

    @property
    def mode(self) -> int:
        return LINK_MODE

    @property
    def size(self) -> int:
        return len(self.target.encode())


@dataclass(eq=False)
class GeneratedFile(Node):
    """Content rendered when opened; the size reported before that is the last render's."""

    render: Callable[[], bytes] = lambda: b""
    content: bytes | None = None

    @property
    def mode(self) -> int:
        return FILE_MODE

    @property
    def size(self) -> int:
        if self.content is None:
            self.content = self.render()
        return len(self.content)
