"""The audit log of a mount (`--audit-log FILE`): the writer thread that owns the file.

Fail closed: the audit log is opened O_APPEND, never through a symlink, only if it is a regular
file of ours, under an exclusive lock; an existing one is verified (`ivdfs.forensics.chain`)
and continued. An open returns only once its record is on disk (written and fdatasync'd).
While an open reads, its ranges (`ivdfs.forensics.access`) are written every FLUSH_SECONDS,
and early when it has many. If a write fails, the failure is logged as an ERROR and from then
on every open and read of the mount fails with EIO: no byte is served that the audit log cannot
record. Reads served from the kernel's page cache never reach ivdfs, so audited mounts open
disk files with direct I/O (ivdfs.fs.operations).

Concurrency: one writer thread owns the file and the chain; other threads queue events
(`opened` waits for its record to be durable). A read's ranges are added on the trio thread
under the open's own lock and taken by the writer thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivdfs import __version__
from ivdfs.errors import UserError
from ivdfs.forensics.access import Caller, OpenAccess
from ivdfs.forensics.chain import FORMAT, ChainBroken, Head, seal, utc_now, verify

log = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0


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
    """The audit log of one mount. `open` checks and locks the file; `close` ends it."""

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
        """Open (or create) the audit log for appending, after verifying what it holds."""
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
                    f"--audit-log {path}: the audit log is damaged at {e} "
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
        """Fail closed: OSError(EIO) once the audit log cannot be written."""
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
        """End the audit log: files still open get a close record, then `stop` (if it started)."""
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
                "fails (fail closed: nothing is served that the audit log cannot record)",
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
