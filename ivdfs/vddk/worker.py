"""Dedicated VDDK threads and the per-mount registry of open disks.

Concurrency: VDDK wants Open/Close of a handle on one thread and never two reads at once on one
handle, and `trio.to_thread` has no thread affinity. So there is one control thread (connect,
open, close, PrepareForAccess, EndAccess) and one I/O thread per open handle; a snapshot may have
several handles (`--vddk-handles`), each its own ConnectEx + Open. Trio tasks hand the I/O
threads whole blocks and wait on a `trio.Event`; results come back through the trio token, from
the I/O thread or, for ReadAsync, from the library's completion thread. With ReadAsync an I/O
thread only starts requests, so one handle keeps several in flight; without it (or on transports
where VDDK serves ReadAsync inline) a handle has one read at a time. Everything else in this
module runs on the trio thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from ivdfs.errors import BackendError
from ivdfs.vddk.connection import Access, AsyncRead, DiskHandle, DiskTarget, ServerTarget
from ivdfs.vddk.library import VddkLibrary

log = logging.getLogger(__name__)

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
        """Run `fn` on this thread from outside trio (teardown) and wait for it."""
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
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._q.put(None)
        self._thread.join()


# Set in a task that reads ahead (the prefetcher's): its reads wait while a demand read waits.
BACKGROUND: ContextVar[bool] = ContextVar("ivdfs_vddk_background", default=False)


class _PrioritySlots:
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


# Requests one handle keeps in flight with ReadAsync over NBD: enough to cover a 16-block
# prefetch window at WAN latency, few enough that a demand read never queues behind many.
ASYNC_DEPTH = 16


class _HandleIO:
    """One handle, the I/O thread that alone reads from it, and its outstanding request count."""

    def __init__(self, handle: DiskHandle, index: int) -> None:
        self.handle = handle
        self.worker = ThreadWorker(f"vddk-io-{handle.target.ivd_id[:8]}-{index}")
        self.load = 0  # trio thread only


class OpenDisk:
    """An open snapshot: one or more handles, each read only by its own I/O thread."""

    def __init__(self, handles: list[DiskHandle], use_async: bool = True) -> None:
        self.handles = handles
        self.handle = handles[0]
        self.capacity = handles[0].capacity_bytes
        self._ios = [_HandleIO(h, i) for i, h in enumerate(handles)]
        self.use_async = use_async and handles[0].truly_async
        per_handle = ASYNC_DEPTH if self.use_async else 1
        # More waiting requests than the handles can serve would only queue on their threads.
        self._slots = _PrioritySlots(per_handle * len(handles))
        self.depth = per_handle * len(handles)
        # Set on the trio thread before the I/O threads stop: a reader that was waiting for a
        # slot must fail (and be retried on a new handle), never queue behind a dead thread.
        self.closed = False

    async def read(self, start_sector: int, nbytes: int) -> bytearray:
        await self._slots.acquire(BACKGROUND.get())
        try:
            if self.closed:
                raise BackendError(f"{self.handle.target.describe()}: the handle was closed")
            io = min(self._ios, key=lambda h: h.load)
            io.load += 1
            try:
                if self.use_async:
                    return await self._read_async(io, start_sector, nbytes)

                def work() -> bytearray:
                    buf = bytearray(nbytes)
                    io.handle.read_into(start_sector, buf)
                    return buf

                return await io.worker.run(work)
            finally:
                io.load -= 1
        finally:
            self._slots.release()

    async def _read_async(self, io: _HandleIO, start_sector: int, nbytes: int) -> bytearray:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def on_done(_req: AsyncRead) -> None:
            # Any thread: run_sync_soon is the thread-safe way back into trio.
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        req = AsyncRead(start_sector, bytearray(nbytes), on_done)
        io.worker.post(lambda: io.handle.read_async(req))
        # A cancelled waiter leaves `req` to finish on its own: the handle keeps its buffer.
        await done.wait()
        if req.error is not None:
            raise req.error
        return req.buf

    async def query_allocated(
        self, start_sector: int, num_sectors: int, chunk_sectors: int
    ) -> list[tuple[int, int]]:
        """QueryAllocatedBlocks on the first handle's I/O thread (it counts as a read there)."""
        if not self.handle.can_query_allocated:
            raise BackendError("VixDiskLib_QueryAllocatedBlocks is not available")
        io = self._ios[0]
        return await io.worker.run(
            lambda: io.handle.query_allocated(start_sector, num_sectors, chunk_sectors)
        )

    def stop_io(self) -> None:
        """Drain each handle's ReadAsync requests on its own thread, then end the threads."""
        for io in self._ios:
            try:
                io.worker.run_blocking(io.handle.wait)
            except BackendError as e:
                # Each read already reported its own failure to its reader.
                log.debug("waiting for reads of %s: %s", io.handle.target.describe(), e)
            io.worker.stop()


class VddkService:
    """Opens snapshots on demand (once each) and tears everything down in order."""

    def __init__(
        self,
        lib: VddkLibrary,
        server: ServerTarget,
        identity: str,
        transport_modes: str | None = None,
        handles_per_disk: int = 1,
        use_async: bool = True,
    ) -> None:
        self.lib = lib
        self._handles_per_disk = max(1, handles_per_disk)
        self._use_async = use_async
        self._server = server
        self._identity = identity
        self._transport_modes = transport_modes
        self._control = ThreadWorker("vddk-control")
        self._access: dict[str, Access] = {}
        self._disks: dict[DiskTarget, OpenDisk] = {}
        self._opening: dict[DiskTarget, trio.Lock] = {}
        self._closed = False

    async def open(self, target: DiskTarget) -> OpenDisk:
        disk = self._disks.get(target)
        if disk is not None:
            return disk
        lock = self._opening.setdefault(target, trio.Lock())
        async with lock:
            disk = self._disks.get(target)
            if disk is not None:
                return disk
            if self._closed:
                raise BackendError("shutting down")
            # Shielded: a handle opened for a cancelled caller must still be registered, or
            # close_all would never close it.
            with trio.CancelScope(shield=True):
                opened = await self._control.run(lambda: self._open_blocking(target))
                self._disks[target] = opened
            return opened

    # --- for VixMntapi (ivdfs.volumes.vixmntapi): its calls belong on the control thread ---

    @property
    def server(self) -> ServerTarget:
        return self._server

    @property
    def transport_modes(self) -> str | None:
        return self._transport_modes

    async def run_on_control(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise BackendError("shutting down")
        return await self._control.run(fn)

    def run_on_control_blocking(self, fn: Callable[[], T]) -> T:
        """From outside trio (teardown), before `close_all` stops the thread."""
        return self._control.run_blocking(fn)

    def _open_blocking(self, target: DiskTarget) -> OpenDisk:
        if target.ivd_id not in self._access:
            access = Access(self.lib, self._server, target, self._identity)
            # Registered before the attempt so EndAccess follows even a failed Prepare.
            self._access[target.ivd_id] = access
            try:
                access.prepare()
            except BackendError as e:
                # Prepare only guards against vMotion while we read; a snapshot stays readable.
                log.warning("%s (reading anyway)", e)
        handles: list[DiskHandle] = []
        try:
            for _ in range(self._handles_per_disk):
                handle = DiskHandle(self.lib, self._server, target, self._transport_modes)
                handles.append(handle)
                handle.open()
        except BaseException:
            for h in handles:
                try:
                    h.close()
                except BackendError as e:
                    log.debug("closing after a failed open: %s", e)
            raise
        disk = OpenDisk(handles, self._use_async)
        if self._use_async and self.lib.has_async and not disk.use_async:
            log.debug(
                "transport %s serves ReadAsync inline; --vddk-handles gives parallel reads",
                handles[0].transport or "?",
            )
        return disk

    async def reopen(self, target: DiskTarget, broken: OpenDisk) -> OpenDisk:
        """Replace a handle that failed (lost connection, host restarted) with a fresh
        ConnectEx + Open; concurrent callers that saw the same broken handle share one reopen."""
        async with self._opening.setdefault(target, trio.Lock()):
            current = self._disks.get(target)
            if current is not None and current is not broken:
                return current  # someone else already reopened it
            if self._closed:
                raise BackendError("shutting down")
            self._disks.pop(target, None)
            broken.closed = True
            # Shielded: a handle opened for a cancelled caller must still be registered, or
            # nothing would ever close it.
            with trio.CancelScope(shield=True):
                # Joining the I/O thread waits for its queued reads: not on the trio thread.
                await trio.to_thread.run_sync(broken.stop_io)
                await self._control.run(lambda: self._close_quietly(broken))
                disk = await self._control.run(lambda: self._open_blocking(target))
                self._disks[target] = disk
            return disk

    @staticmethod
    def _close_quietly(disk: OpenDisk) -> None:
        for handle in disk.handles:
            try:
                handle.close()
            except BackendError as e:
                log.debug("closing a broken handle of %s: %s", handle.target.describe(), e)

    def close_all(self) -> None:
        """Close every handle, then EndAccess every IVD; blocking, called once at unmount."""
        self._closed = True
        disks, self._disks = list(self._disks.values()), {}
        for disk in disks:
            disk.closed = True
            disk.stop_io()
        self._control.run_blocking(lambda: self._close_blocking(disks))
        self._control.stop()

    def _close_blocking(self, disks: list[OpenDisk]) -> None:
        for disk in disks:
            for handle in disk.handles:
                try:
                    handle.close()
                except BackendError as e:
                    log.warning("closing %s: %s", handle.target.describe(), e)
        accesses, self._access = list(self._access.values()), {}
        for access in accesses:
            try:
                access.end()
            except BackendError as e:
                log.warning("EndAccess for %s: %s", access.target.describe(), e)
