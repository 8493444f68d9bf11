"""Evidence hashes (SHA-256 and MD5) of a file, computed from the reads that serve it.

Role: `InOrder` turns the reads of one open (slightly reordered by the kernel's read-ahead,
overlapping, repeated) into the file's bytes in order, each byte exactly once, and gives up
(for good) on a jump it cannot bridge: a reader that does not cover the file from its start to
its end in order produces no hash, never a wrong one. `Digester` hashes the bytes it is given,
in the order given, on a small shared pool of threads (hashlib releases the GIL for buffers of
2 KiB and more), one serial chain per algorithm so SHA-256 and MD5 run side by side.
`SequentialHash` is the two together for one open file.

Concurrency: `InOrder` and `SequentialHash.feed` belong to one thread (the trio thread in a
mount, the main thread in `ivdfs hash`). A `Digester` is fed from that thread; its updates run
on pool threads, at most one at a time per algorithm and in the order fed; `wait_below`,
`result` and `cancel` may be called from any thread. Buffers handed over must not change
afterwards (the block cache's blocks never do).
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

ALGORITHMS = ("sha256", "md5")
# Reads may arrive this far ahead of the first byte not yet hashed and still count as in
# order: the kernel's read-ahead (4 blocks at the default settings) has several requests in
# flight that complete out of order. Farther is a jump: a random reader.
MAX_GAP = 16 << 20
# Bytes held for later while waiting for a gap to fill (views of cached blocks, not copies).
MAX_PENDING = 16 << 20
# A chain hashes this much, then lets another chain have its pool thread (fairness).
CHAIN_SLICE = 8 << 20
POOL_THREADS = 4

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Digests:
    """Hex digests of `size` bytes."""

    sha256: str
    md5: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "md5": self.md5, "bytes": self.size}


class InOrder:
    """Hands every byte of [0, size) to `sink` exactly once, in file order."""

    def __init__(
        self,
        size: int,
        sink: Callable[[memoryview], None],
        max_gap: int = MAX_GAP,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.size = size
        self.pos = 0  # bytes [0, pos) went to the sink
        self._sink = sink
        self._max_gap = max_gap
        self._max_pending = max_pending
        self._pending: dict[int, memoryview] = {}  # offset -> bytes that start there
        self._pending_bytes = 0
        self.abandoned = False

    @property
    def complete(self) -> bool:
        return not self.abandoned and self.pos >= self.size

    def abandon(self) -> None:
        self.abandoned = True
        self._pending.clear()
        self._pending_bytes = 0

    def add(self, offset: int, data: Buffer) -> None:
        """The bytes a read returned at `offset` (a short read at EOF is fine)."""
        if self.abandoned or self.complete or not len(data):
            return
        view = memoryview(data).cast("B")
        end = min(offset + len(view), self.size)
        if offset < 0 or offset >= end:
            return
        view = view[: end - offset]
        if offset <= self.pos:
            if end > self.pos:
                self._emit(view[self.pos - offset :])
                self._drain()
            return
        if offset - self.pos > self._max_gap:
            self.abandon()
            return
        held = self._pending.get(offset)
        if held is None or len(held) < len(view):
            self._pending_bytes += len(view) - (len(held) if held is not None else 0)
            self._pending[offset] = view
        if self._pending_bytes > self._max_pending:
            self.abandon()

    def _emit(self, view: memoryview) -> None:
        self._sink(view)
        self.pos += len(view)

    def _drain(self) -> None:
        while self._pending:
            ready = sorted(o for o in self._pending if o <= self.pos)
            if not ready:
                return
            for offset in ready:
                view = self._pending.pop(offset)
                self._pending_bytes -= len(view)
                if offset + len(view) > self.pos:
                    self._emit(view[self.pos - offset :])


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """The process's hashing threads, started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="ivdfs-hash")
        return _pool


class _Chain:
    """Updates of one hash object, run in order on the pool, at most one at a time."""

    def __init__(self, algorithm: str, executor: ThreadPoolExecutor) -> None:
        self.hash = hashlib.new(algorithm)
        self._executor = executor
        self._cond = threading.Condition()
        self._items: deque[memoryview] = deque()
        self._running = False
        self.backlog = 0  # bytes queued, not hashed yet
        self.cancelled = False
        self.error: BaseException | None = None

    def put(self, view: memoryview) -> None:
        with self._cond:
            if self.cancelled:
                return
            self._items.append(view)
            self.backlog += len(view)
            if self._running:
                return
            self._running = True
        self._executor.submit(self._run)

    def _run(self) -> None:
        done = 0
        while True:
            with self._cond:
                if self.cancelled or not self._items or done >= CHAIN_SLICE:
                    if self._items and not self.cancelled:
                        break  # more to do: go to the back of the pool's queue
                    self._items.clear()
                    self.backlog = 0
                    self._running = False
                    self._cond.notify_all()
                    return
                view = self._items.popleft()
            try:
                self.hash.update(view)
            except BaseException as e:  # never lost: `result` raises it
                with self._cond:
                    self.error, self.cancelled = e, True
            done += len(view)
            with self._cond:
                if not self.cancelled:  # cancel() already zeroed the backlog
                    self.backlog -= len(view)
                self._cond.notify_all()
        self._executor.submit(self._run)

    def wait_below(self, limit: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.backlog <= limit or self.cancelled)

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._items.clear()
            self.backlog = 0
            self._cond.notify_all()


class Digester:
    """SHA-256 and MD5 of everything fed, in the order fed, computed on pool threads."""

    def __init__(
        self, algorithms: tuple[str, ...] = ALGORITHMS, executor: ThreadPoolExecutor | None = None
    ) -> None:
        ex = executor or pool()
        self._chains = {a: _Chain(a, ex) for a in algorithms}
        self.size = 0

    def update(self, data: Buffer) -> None:
        """Queue `data`; returns at once. Empty data is skipped."""
        view = memoryview(data).cast("B")
        if not len(view):
            return
        self.size += len(view)
        for chain in self._chains.values():
            chain.put(view)

    @property
    def backlog(self) -> int:
        return max((c.backlog for c in self._chains.values()), default=0)

    def wait_below(self, limit: int) -> None:
        """Block until at most `limit` bytes wait to be hashed (back-pressure on a reader)."""
        for c in self._chains.values():
            c.wait_below(limit)

    def result(self) -> dict[str, str]:
        """Block until everything fed is hashed; algorithm -> hex digest."""
        self.wait_below(0)
        out = {}
        for name, c in self._chains.items():
            if c.error is not None:
                raise c.error
            if c.cancelled:
                raise RuntimeError("hashing was cancelled")
            out[name] = c.hash.hexdigest()
        return out

    def cancel(self) -> None:
        """Drop whatever is still queued (the reader went away)."""
        for c in self._chains.values():
            c.cancel()


class SequentialHash:
    """The evidence hashes of one open file of `size` bytes, from that open's reads."""

    def __init__(self, size: int, executor: ThreadPoolExecutor | None = None) -> None:
        self.size = size
        self.digester = Digester(ALGORITHMS, executor)
        self.order = InOrder(size, self.digester.update)
        self.collected = False  # someone took (or is taking) the result

    def feed(self, offset: int, data: Buffer) -> None:
        was_abandoned = self.order.abandoned
        self.order.add(offset, data)
        if self.order.abandoned and not was_abandoned:
            self.digester.cancel()

    @property
    def complete(self) -> bool:
        return self.order.complete

    @property
    def abandoned(self) -> bool:
        return self.order.abandoned

    def result(self) -> Digests:
        """Blocking; only once `complete`."""
        assert self.complete
        d = self.digester.result()
        return Digests(d["sha256"], d["md5"], self.size)

    def cancel(self) -> None:
        self.order.abandon()
        self.digester.cancel()
