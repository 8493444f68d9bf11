"""Who opened what through the mount, and which bytes each open was served: what the audit log
records (`ivdfs.forensics.writer`).

Role: `Caller` is the process behind a FUSE request; `RangeSet` the byte ranges served,
coalesced; `OpenAccess` one open's record, whose ranges the trio thread adds as reads are
served and the writer thread takes when it writes them out.

Concurrency: `Caller` and `RangeSet` are plain; an `OpenAccess` is shared by the trio thread
(`add`) and the writer thread (`take`) under its own lock.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# An open with this many separate ranges gets a `read` record before the writer's periodic one.
MAX_RANGES = 1024


@dataclass(frozen=True)
class Caller:
    """The process behind a FUSE request (the kernel names the calling thread)."""

    uid: int
    gid: int
    pid: int
    tid: int
    comm: str

    @classmethod
    def of(cls, uid: int, gid: int, tid: int, proc: Path = Path("/proc")) -> Caller:
        """Reads /proc/<tid>/status (a few microseconds): the process name and thread group.
        A caller in another pid namespace has tid 0 and stays anonymous."""
        comm, pid = "", tid
        if tid > 0:
            try:
                text = (proc / str(tid) / "status").read_text(errors="replace")
            except OSError:
                text = ""
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key == "Name":
                    comm = value.strip()
                elif key == "Tgid" and value.strip().isdigit():
                    pid = int(value.strip())
        return cls(uid, gid, pid, tid, comm)

    def fields(self) -> dict[str, Any]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid, "tid": self.tid,
                "comm": self.comm}  # fmt: skip


class RangeSet:
    """Disjoint, sorted [start, end) byte ranges; adjacent and overlapping ones merge."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # The first range that could touch [start, end) and the first that starts after it.
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def pairs(self) -> list[list[int]]:
        return [[s, e] for s, e in zip(self._starts, self._ends, strict=True)]

    def take(self) -> list[list[int]]:
        out = self.pairs()
        self._starts, self._ends = [], []
        return out


@dataclass(eq=False)
class OpenAccess:
    """One open's record: what was read since the last `read` record."""

    fh: int
    path: str
    caller: Caller
    ranges: RangeSet = field(default_factory=RangeSet)
    total: int = 0  # bytes served to this open, counting repeats
    lock: threading.Lock = field(default_factory=threading.Lock)
    flush_asked: bool = False

    def add(self, offset: int, n: int) -> bool:
        """Record a read; True when it is time to write the ranges out early."""
        with self.lock:
            self.ranges.add(offset, offset + n)
            self.total += n
            if len(self.ranges) >= MAX_RANGES and not self.flush_asked:
                self.flush_asked = True
                return True
        return False

    def take(self) -> tuple[list[list[int]], int]:
        with self.lock:
            self.flush_asked = False
            bytes_ = self.ranges.bytes
            return self.ranges.take(), bytes_
