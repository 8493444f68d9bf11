"""The access journal of a mount (`--audit-log FILE`): who opened what, which bytes were read.

Format (version 1): one JSON object per line, ASCII, ending in "\\n". Every line has
`n` (its line number, from 1), `prev`, `time` (UTC, ISO 8601 with microseconds and "Z"),
`event`, the event's fields, and last `hash`: the lowercase hex SHA-256 of the line's bytes
without that member, that is of everything before `,"hash":` followed by `}`. `prev` is the
previous line's `hash`; line 1 has the SHA-256 of the empty string (GENESIS). So a changed
byte shows in the line's own hash (or, if that was recomputed, in the next line's `prev`), a
removed, added or reordered line in `n` and `prev`. What a chain alone cannot show is lines cut
off at the end, or a journal rewritten from the start with every hash recomputed: for that,
note the head (`ivdfs audit verify` prints it, the mount log has it at unmount) and check
against it later with `--head`.

Events: `start` and `stop` of a mount (server, user, certificate thumbprint, ivdfs version);
`open` (path relative to the mount root, handle, the caller's uid, gid, pid, thread id and
process name, from the FUSE request and /proc at the open); `read` (the byte ranges of a file
served to one open since its last record, coalesced, [start, end) pairs in the file's own
offsets; written every FLUSH_SECONDS while an open reads, and when it has many ranges);
`close` (the rest of its ranges, and the total); `hash` (evidence hashes of a file whose bytes
one open read in order). Reads served from the kernel's page cache never reach ivdfs, so
audited mounts open disk files with direct I/O (ivdfs.fs.operations).

Fail closed: the journal is opened O_APPEND, never through a symlink, only if it is a regular
file of ours, under an exclusive lock; an existing journal is verified and continued. An open
returns only once its record is on disk (written and fdatasync'd). If a write fails, the
failure is logged as an ERROR and from then on every open and read of the mount fails with EIO:
no byte is served that the journal cannot record.

Concurrency: one writer thread owns the file and the chain; other threads queue events
(`opened` waits for its record to be durable). A read's ranges are added on the trio thread
under the open's own lock and taken by the writer thread.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ivdfs import __version__
from ivdfs.errors import UserError

log = logging.getLogger(__name__)

FORMAT = 1
GENESIS = hashlib.sha256(b"").hexdigest()
FLUSH_SECONDS = 5.0
# An open with this many separate ranges gets a `read` record before FLUSH_SECONDS are up.
MAX_RANGES = 1024
_HASH_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- lines -----------------------------------------------------------------------------------


def seal(n: int, prev: str, event: dict[str, Any]) -> tuple[bytes, str]:
    """Line `n` (with its newline) and its hash."""
    text = json.dumps({"n": n, "prev": prev, **event}, ensure_ascii=True, separators=(",", ":"))
    body = text.encode("ascii")
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest


class ChainBroken(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def _raw_lines(path: Path) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        yield from f


def check_line(raw: bytes, n: int, prev: str) -> tuple[dict[str, Any], str]:
    """The event of line `n` and its hash; ChainBroken if it is not what follows `prev`."""
    if not raw.endswith(b"\n"):
        raise ChainBroken(n, "incomplete (no newline at the end): a write was cut short")
    line = raw[:-1]
    m = _HASH_SUFFIX.search(line)
    if m is None:
        raise ChainBroken(n, 'no "hash" at the end of the line: not an ivdfs audit line')
    body = line[: m.start()] + b"}"
    digest = m.group(1).decode()
    if hashlib.sha256(body).hexdigest() != digest:
        raise ChainBroken(n, "its content does not match its hash: the line was changed")
    try:
        doc = json.loads(body)
    except ValueError:
        raise ChainBroken(n, "not a JSON object") from None
    if not isinstance(doc, dict) or "hash" in doc:
        raise ChainBroken(n, "not an ivdfs audit line")
    if doc.get("n") != n:
        raise ChainBroken(
            n,
            f"numbered {doc.get('n')!r}, expected {n}: lines were removed, added or reordered",
        )
    if doc.get("prev") != prev:
        raise ChainBroken(
            n,
            "does not follow the line before it (prev is not its hash): a line before it "
            "was changed, removed, added or reordered",
        )
    return doc, digest


@dataclass(frozen=True)
class Head:
    lines: int
    hash: str  # of the last line; GENESIS for an empty journal


def verify(
    path: Path, visit: Callable[[dict[str, Any]], None] | None = None, head: str | None = None
) -> Head:
    """Check every line of the journal at `path`; ChainBroken names the first bad one. With
    `head` (a hash noted earlier), that line must still be there."""
    n, prev = 0, GENESIS
    seen_head = head is None
    for raw in _raw_lines(path):
        doc, prev = check_line(raw, n + 1, prev)
        n += 1
        if prev == head:
            seen_head = True
        if visit is not None:
            visit(doc)
    if not seen_head:
        raise ChainBroken(
            n + 1,
            f"no line has the recorded head {head}: lines were removed from the end, or the "
            "journal was rewritten",
        )
    return Head(n, prev)


# --- who and what ----------------------------------------------------------------------------


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


# --- the writer ------------------------------------------------------------------------------


class _Ticket:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise OSError(errno.EIO, f"audit log: {self.error}")


@dataclass
class _Item:
    event: dict[str, Any] | None = None
    close: OpenAccess | None = None  # its remaining ranges are taken when written
    flush: OpenAccess | None = None
    close_fields: dict[str, Any] = field(default_factory=dict)
    ticket: _Ticket | None = None
    stop: bool = False


class AuditLog:
    """The journal of one mount. `open` checks and locks the file; `close` ends it."""

    def __init__(self, path: Path, fd: int, head: Head) -> None:
        self.path = path
        self._fd: int | None = fd
        self.lines, self._prev = head.lines, head.hash
        self.failed: BaseException | None = None
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._accesses: dict[int, OpenAccess] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.started = False
        self._thread = threading.Thread(target=self._run, name="ivdfs-audit", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: Path, not_under: Path | None = None) -> AuditLog:
        """Open (or create) the journal for appending, after verifying what it holds."""
        path = Path(os.path.abspath(path))
        if not_under is not None and path.is_relative_to(not_under):
            raise UserError(f"--audit-log {path}: must not be inside the mountpoint {not_under}")
        # O_NONBLOCK: a FIFO without a reader must not hang us (regular files ignore it).
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
        except OSError as e:
            why = {errno.ELOOP: "it is a symbolic link", errno.ENXIO: "not a regular file"}
            raise UserError(
                f"--audit-log {path}: cannot open it: {why.get(e.errno or 0, e.strerror)}"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"--audit-log {path}: not a regular file")
            if st.st_uid != os.geteuid():
                raise UserError(f"--audit-log {path}: owned by uid {st.st_uid}, not by us")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"--audit-log {path}: in use by another process") from None
            try:
                head = verify(path)
            except ChainBroken as e:
                raise UserError(
                    f"--audit-log {path}: the journal is damaged at {e} "
                    "(ivdfs audit verify shows it; move it aside to start a new one)"
                ) from None
        except BaseException:
            os.close(fd)
            raise
        if head.lines:
            log.info("audit log %s: continuing after line %d", path, head.lines)
        return cls(path, fd, head)

    # --- producers (any thread) ----------------------------------------------------------

    def _put(self, item: _Item) -> None:
        self._queue.put(item)

    def record(self, event: str, **fields: Any) -> _Ticket:
        """Queue an event; the ticket tells when it is on disk."""
        ticket = _Ticket()
        self._put(_Item(event={"time": utc_now(), "event": event, **fields}, ticket=ticket))
        return ticket

    def write(self, event: str, **fields: Any) -> None:
        """Record an event and wait until it is on disk (blocking; not on the trio thread)."""
        self.record(event, **fields).wait()

    def start(self, **fields: Any) -> None:
        """The mount's first record (blocking): UserError if it cannot be written."""
        try:
            self.write("start", **fields)
        except OSError as e:
            raise UserError(f"--audit-log {self.path}: cannot write: {e}") from None
        self.started = True

    def check(self) -> None:
        """Fail closed: OSError(EIO) once the journal cannot be written."""
        if self.failed is not None or self._closed:
            raise OSError(errno.EIO, f"the audit log {self.path} cannot be written")

    def opened(self, fh: int, path: str, caller: Caller) -> tuple[OpenAccess, _Ticket]:
        access = OpenAccess(fh, path, caller)
        with self._lock:
            self._accesses[fh] = access
        return access, self.record("open", path=path, fh=fh, **caller.fields())

    def read(self, access: OpenAccess, offset: int, n: int) -> None:
        if access.add(offset, n):
            self._put(_Item(flush=access))

    def closed(self, access: OpenAccess, **fields: Any) -> None:
        self._put(_Item(close=access, close_fields={"time": utc_now(), **fields}))

    def close(self, **stop_fields: Any) -> None:
        """End the journal: files still open get a close record, then `stop` (if it started)."""
        with self._lock:
            if self._closed:
                return
            remaining = list(self._accesses.values())
        for access in remaining:
            self.closed(access, reason="unmount")
        stop = {"time": utc_now(), "event": "stop", "pid": os.getpid(), **stop_fields}
        self._put(_Item(event=stop if self.started else None, stop=True))
        self._closed = True
        self._thread.join()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self.failed is None:
            log.info(
                "audit log %s ends at line %d, sha256 %s (note it: ivdfs audit verify --head)",
                self.path,
                self.lines,
                self._prev,
            )

    # --- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        next_flush = time.monotonic() + FLUSH_SECONDS
        stop = False
        while not stop:
            try:
                items = [self._queue.get(timeout=max(0.0, next_flush - time.monotonic()))]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events: list[dict[str, Any]] = []
            tickets = [item.ticket for item in items if item.ticket is not None]
            stop = stop or any(item.stop for item in items)
            try:
                for item in items:
                    if item.stop:
                        events += self._periodic()
                    if item.event is not None:
                        events.append(item.event)
                    if item.flush is not None:
                        events += self._reads_of(item.flush)
                    if item.close is not None:
                        events += self._close_event(item.close, item.close_fields)
                if time.monotonic() >= next_flush:
                    events += self._periodic()
                    next_flush = time.monotonic() + FLUSH_SECONDS
            except Exception as e:  # a bug: fail closed rather than lose the thread
                log.error("audit log %s: %s", self.path, e, exc_info=True)
                self.failed = self.failed or e
                events = []
            self._write(events)
            for t in tickets:
                t.error = self.failed
                t.done.set()

    def _reads_of(self, access: OpenAccess) -> list[dict[str, Any]]:
        ranges, nbytes = access.take()
        if not ranges:
            return []
        return [{"time": utc_now(), "event": "read", "path": access.path, "fh": access.fh,
                 "pid": access.caller.pid, "ranges": ranges, "bytes": nbytes}]  # fmt: skip

    def _periodic(self) -> list[dict[str, Any]]:
        with self._lock:
            accesses = list(self._accesses.values())
        return [e for a in accesses for e in self._reads_of(a)]

    def _close_event(self, access: OpenAccess, fields: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            if self._accesses.pop(access.fh, None) is None:
                return []  # closed already (a release racing the unmount)
        ranges, nbytes = access.take()
        return [
            {
                "time": fields.pop("time"),
                "event": "close",
                "path": access.path,
                "fh": access.fh,
                **access.caller.fields(),
                "ranges": ranges,
                "bytes": nbytes,
                "total_bytes": access.total,
                **fields,
            }
        ]

    def _write(self, events: list[dict[str, Any]]) -> None:
        if not events or self.failed is not None or self._fd is None:
            return
        try:
            for event in events:
                line, digest = seal(self.lines + 1, self._prev, event)
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view) :]
                self.lines, self._prev = self.lines + 1, digest
            os.fdatasync(self._fd)
        except Exception as e:  # OSError, or a bug: either way no line may go unwritten
            self.failed = e
            log.error(
                "audit log %s: cannot write (%s); from now on every open and read of this mount "
                "fails (fail closed: nothing is served that the journal cannot record)",
                self.path,
                e.strerror if isinstance(e, OSError) and e.strerror else e,
                exc_info=not isinstance(e, OSError),
            )


def start_fields(
    *, server: str, user: str, thumbprint: str, mountpoint: Path, **extra: Any
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": __version__,
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "mountpoint": str(mountpoint),
        "server": server,
        "user": user,
        "thumbprint": thumbprint,
        **extra,
    }


# --- reading it back -------------------------------------------------------------------------


@dataclass
class Reader:
    """What one (path, process) read over a journal: opens and the bytes' union."""

    path: str
    uid: int
    gid: int
    pid: int
    comm: str
    opens: int = 0
    ranges: RangeSet = field(default_factory=RangeSet)


@dataclass
class Summary:
    """Built line by line by `visit` during `verify`."""

    sessions: list[dict[str, Any]] = field(default_factory=list)
    readers: dict[tuple[str, int, int], Reader] = field(default_factory=dict)
    hashes: list[dict[str, Any]] = field(default_factory=list)
    _opens: dict[tuple[int, int], Reader] = field(default_factory=dict)  # (session, fh)
    # Intact lines of a shape this version cannot summarise: said, never skipped silently.
    unsummarised: list[int] = field(default_factory=list)

    def visit(self, doc: dict[str, Any]) -> None:
        try:
            self._visit(doc)
        except (TypeError, ValueError, AttributeError):
            self.unsummarised.append(int(doc.get("n", 0)))

    def _visit(self, doc: dict[str, Any]) -> None:
        event = doc.get("event")
        session = len(self.sessions)
        if event == "start":
            self.sessions.append({"start": doc, "stop": None})
        elif event == "stop" and self.sessions:
            self.sessions[-1]["stop"] = doc
        elif event == "open":
            key = (str(doc.get("path")), int(doc.get("uid", -1)), int(doc.get("pid", -1)))
            r = self.readers.get(key)
            if r is None:
                r = self.readers[key] = Reader(
                    key[0], key[1], int(doc.get("gid", -1)), key[2], str(doc.get("comm", ""))
                )
            r.opens += 1
            self._opens[(session, int(doc.get("fh", -1)))] = r
        elif event in ("read", "close"):
            r = self._opens.get((session, int(doc.get("fh", -1))))
            if r is not None:
                for start, end in doc.get("ranges", []):
                    r.ranges.add(int(start), int(end))
        elif event == "hash":
            self.hashes.append(doc)
