"""Thread primitives for VDDK: one OS thread per job queue, and slots that favour demand reads.

Role: VDDK wants Open/Close of a handle on one thread and never two reads at once on one
handle, and `trio.to_thread` has no thread affinity. A `ThreadWorker` is one OS thread that
runs submitted callables in order; trio tasks wait for them on a `trio.Event` set through the
trio token. `PrioritySlots` bounds the requests waiting for a handle and hands freed slots to
demand reads before read-ahead.

Concurrency: `ThreadWorker.run`/`post` are called from the trio thread, `run_blocking` from
outside trio (teardown); the worker thread touches only the job it runs. `PrioritySlots` is
trio-thread only.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from ivdfs.errors import BackendError

T = TypeVar("T")


@dataclass
class _Job(Generic[T]):
    fn: Callable[[], T]
    token: trio.lowlevel.TrioToken | None
    done: trio.Event | None
    result: T | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class ThreadWorker:
    """One OS thread running submitted callables in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._q: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._q.get()) is not None:
            try:
                job.result = job.fn()
            except BaseException as e:  # handed back to the waiting task, never lost
                job.error = e
            job.finished.set()
            if job.token is not None and job.done is not None:
                try:
                    job.token.run_sync_soon(job.done.set)
                except trio.RunFinishedError:
                    pass

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on this thread; a cancelled caller still lets it finish (VDDK calls cannot
        be interrupted), but stops waiting."""
        job: _Job[T] = _Job(fn, trio.lowlevel.current_trio_token(), trio.Event())
        self._submit(job)
        assert job.done is not None
        await job.done.wait()
        return self._outcome(job)

    def post(self, fn: Callable[[], object]) -> None:
        """Queue `fn` without waiting for it; `fn` reports its own outcome and never raises.
        Raises BackendError, like `run`, once the thread is stopped."""
        self._submit(_Job(fn, None, None))

    def run_blocking(self, fn: Callable[[], T]) -> T:
        """Run `fn` on this thread from outside trio (start-up, teardown) and wait for it."""
        job: _Job[T] = _Job(fn, None, None)
        self._submit(job)
        job.finished.wait()
        return self._outcome(job)

    @staticmethod
    def _outcome(job: _Job[T]) -> T:
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _submit(self, job: _Job[Any]) -> None:
        # Checked under the lock so no job can land behind the stop sentinel and wait forever.
        with self._lock:
            if self._stopped:
                raise BackendError(f"{self.name}: the disk handle is closed")
            self._q.put(job)

    def stop(self) -> None:
        """Run what is queued, then end the thread; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._q.put(None)
        self._thread.join()


class PrioritySlots:
    """A counting semaphore whose released slots go to waiting demand reads before waiting
    background reads, so read-ahead never queues in front of a read someone waits for."""

    def __init__(self, n: int) -> None:
        self.free = n
        self._demand: deque[trio.Event] = deque()
        self._background: deque[trio.Event] = deque()

    async def acquire(self, background: bool) -> None:
        if self.free > 0 and not self._demand and not (background and self._background):
            self.free -= 1
            return
        event = trio.Event()
        waiters = self._background if background else self._demand
        waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # handed a slot as we were cancelled: pass it on
            else:
                waiters.remove(event)
            raise

    def release(self) -> None:
        for waiters in (self._demand, self._background):
            if waiters:
                waiters.popleft().set()  # the slot passes directly to that waiter
                return
        self.free += 1
