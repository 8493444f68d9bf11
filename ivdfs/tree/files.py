"""Open files: one handle per open, with the state that belongs to that open.

Role: a disk or window open gets its own sequential-read stream (read-ahead is per reader) and
keeps its snapshot's disk in use until released; a generated file (statistics, info.json) gets
the content rendered at its open, so two opens never read a document spliced from two renders.
An open may also carry its evidence hashes in progress and its audit log record
(ivdfs.forensics).
Handles are numbered on their own, apart from inode numbers.

Concurrency: trio thread only.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import NewType

from ivdfs.forensics.access import OpenAccess
from ivdfs.forensics.hashing import SequentialHash
from ivdfs.io.reader import ReadStream
from ivdfs.tree.disk import SnapshotDisk
from ivdfs.tree.nodes import Node

FileHandle = NewType("FileHandle", int)


@dataclass(eq=False)
class OpenFile:
    node: Node
    content: bytes | None = None  # generated files
    stream: ReadStream | None = None  # disk.raw and windows
    disk: SnapshotDisk | None = None  # held while open
    digest: SequentialHash | None = None  # evidence hashes while the reads are in order
    access: OpenAccess | None = None  # the audit log's record of this open


class OpenFiles:
    def __init__(self) -> None:
        self._files: dict[FileHandle, OpenFile] = {}
        self._next = 1

    def add(self, f: OpenFile) -> FileHandle:
        fh = FileHandle(self._next)
        self._next += 1
        self._files[fh] = f
        return fh

    def get(self, fh: int) -> OpenFile:
        try:
            return self._files[FileHandle(fh)]
        except KeyError:
            raise OSError(errno.EBADF, f"no open file {fh}") from None

    def pop(self, fh: int) -> OpenFile | None:
        return self._files.pop(FileHandle(fh), None)

    def __len__(self) -> int:
        return len(self._files)
