"""Dedicated VDDK threads and the per-mount registry of open disks.

Concurrency: VDDK wants Open/Close of a handle on one thread and never two reads at once on one
handle, and `trio.to_thread` has no thread affinity. So there is one control thread (connect,
open, close, PrepareForAccess, EndAccess) and one I/O thread per open disk. Trio tasks hand them
whole blocks and wait on a `trio.Event`; results come back through the trio token. Everything
else in this module runs on the trio thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from ivdfs.errors import BackendError
from ivdfs.vddk.connection import Access, DiskHandle, DiskTarget, ServerTarget
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


class OpenDisk:
    """An open snapshot: its handle and the I/O thread that alone reads from it."""

    def __init__(self, handle: DiskHandle) -> None:
        self.handle = handle
        self.capacity = handle.capacity_bytes
        self._io = ThreadWorker(f"vddk-io-{handle.target.ivd_id[:8]}")

    async def read(self, start_sector: int, nbytes: int) -> bytearray:
        def work() -> bytearray:
            buf = bytearray(nbytes)
            self.handle.read_into(start_sector, buf)
            return buf

        return await self._io.run(work)

    def stop_io(self) -> None:
        self._io.stop()


class VddkService:
    """Opens snapshots on demand (once each) and tears everything down in order."""

    def __init__(
        self,
        lib: VddkLibrary,
        server: ServerTarget,
        identity: str,
        transport_modes: str | None = None,
    ) -> None:
        self.lib = lib
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
            disk = await self._control.run(lambda: self._open_blocking(target))
            self._disks[target] = disk
            return disk

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
        handle = DiskHandle(self.lib, self._server, target, self._transport_modes)
        try:
            handle.open()
        except BaseException:
            handle.close()
            raise
        return OpenDisk(handle)

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
            broken.stop_io()
            await self._control.run(lambda: self._close_quietly(broken))
            disk = await self._control.run(lambda: self._open_blocking(target))
            self._disks[target] = disk
            return disk

    @staticmethod
    def _close_quietly(disk: OpenDisk) -> None:
        try:
            disk.handle.close()
        except BackendError as e:
            log.debug("closing a broken handle of %s: %s", disk.handle.target.describe(), e)

    def close_all(self) -> None:
        """Close every handle, then EndAccess every IVD; blocking, called once at unmount."""
        self._closed = True
        disks, self._disks = list(self._disks.values()), {}
        for disk in disks:
            disk.stop_io()
        self._control.run_blocking(lambda: self._close_blocking(disks))
        self._control.stop()

    def _close_blocking(self, disks: list[OpenDisk]) -> None:
        for disk in disks:
            try:
                disk.handle.close()
            except BackendError as e:
                log.warning("closing %s: %s", disk.handle.target.describe(), e)
        accesses, self._access = list(self._access.values()), {}
        for access in accesses:
            try:
                access.end()
            except BackendError as e:
                log.warning("EndAccess for %s: %s", access.target.describe(), e)
