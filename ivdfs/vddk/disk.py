"""One open snapshot: its VDDK handles, the I/O thread that alone reads from each, and a bound
on what is in flight.

Role: a snapshot may have several handles (`--vddk-handles`), each its own ConnectEx + Open.
Trio tasks hand the I/O threads whole blocks and wait on a `trio.Event`; results come back
through the trio token, from the I/O thread or, for ReadAsync, from the library's completion
thread. With ReadAsync an I/O thread only starts requests, so one handle keeps several in
flight, bounded in bytes (ESXi's NFC server has a per-session memory limit); without it (or on
transports where VDDK serves ReadAsync inline) a handle has one read at a time. A block larger
than the bound is read as requests of at most the bound, one after another, so the bound holds
for every block size. Opening and closing are the service's job (`vddk.service`), on its control
thread.

Concurrency: `read`/`allocated` on the trio thread; `stop_io` from a worker thread
(it joins threads); the handles' blocking calls only on their own I/O thread.
"""

from __future__ import annotations

import logging

import trio

from ivdfs.errors import BackendError
from ivdfs.units import SECTOR_SIZE
from ivdfs.vddk.allocation import allocated_runs
from ivdfs.vddk.connection import AsyncRead, DiskHandle
from ivdfs.vddk.threads import PrioritySlots, ThreadWorker

log = logging.getLogger(__name__)


class _HandleIO:
    """One handle, the I/O thread that alone reads from it, and its outstanding request count."""

    def __init__(self, handle: DiskHandle, index: int) -> None:
        self.handle = handle
        self.worker = ThreadWorker(f"vddk-io-{handle.target.ivd_id[:8]}-{index}")
        self.load = 0  # trio thread only


class OpenDisk:
    """An open snapshot: one or more handles, each read only by its own I/O thread."""

    def __init__(
        self,
        handles: list[DiskHandle],
        use_async: bool,
        in_flight_bytes: int,
        block_size: int,
    ) -> None:
        """`in_flight_bytes`: what one handle keeps in flight with ReadAsync (--max-in-flight;
        ESXi's NFC server bounds each session's memory)."""
        self.handles = handles
        self.handle = handles[0]
        self.target = handles[0].target
        self.capacity = handles[0].capacity_bytes
        self.sector_size = handles[0].sector_size
        self._ios = [_HandleIO(h, i) for i, h in enumerate(handles)]
        self.use_async = use_async and handles[0].truly_async
        sector = SECTOR_SIZE
        # A read larger than the bound (a block larger than --max-in-flight) goes in parts.
        self.max_request = max(sector, in_flight_bytes // sector * sector)
        per_handle = in_flight_bytes // min(block_size, self.max_request)
        per_handle = max(1, per_handle) if self.use_async else 1
        # More waiting requests than the handles can serve would only queue on their threads.
        self._slots = PrioritySlots(per_handle * len(handles))
        # Set on the trio thread before the I/O threads stop: a reader that was waiting for a
        # slot must fail (and be retried on a new handle), never queue behind a dead thread.
        self.closed = False

    async def read(self, start_sector: int, nbytes: int, background: bool = False) -> bytearray:
        """`background`: a read ahead of a reader, which waits while a demand read waits."""
        await self._slots.acquire(background)
        try:
            if self.closed:
                raise BackendError(f"{self.target.describe()}: the handle was closed")
            io = min(self._ios, key=lambda h: h.load)
            io.load += 1
            try:
                if nbytes <= self.max_request:
                    return await self._read_one(io, start_sector, nbytes)
                # Larger than the bound: in turn, on this one slot.
                buf = bytearray(nbytes)
                step = self.max_request
                for off in range(0, nbytes, step):
                    n = min(step, nbytes - off)
                    part = await self._read_one(io, start_sector + off // SECTOR_SIZE, n)
                    buf[off : off + n] = part
                return buf
            finally:
                io.load -= 1
        finally:
            self._slots.release()

    async def _read_one(self, io: _HandleIO, start_sector: int, nbytes: int) -> bytearray:
        if self.use_async:
            return await self._read_async(io, start_sector, nbytes)

        def work() -> bytearray:
            buf = bytearray(nbytes)
            io.handle.read_into(start_sector, buf)
            return buf

        return await io.worker.run(work)

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

    async def allocated(self, start: int, end: int, granularity: int) -> list[tuple[int, int]]:
        """Runs of sectors in [start, end) that may hold data, asked in chunks dividing
        `granularity` (`ivdfs.vddk.allocation`; AllocationUnsupported when the library
        cannot tell)."""
        query = self._query_allocated if self.handle.can_query_allocated else None
        return await allocated_runs(query, self.capacity // SECTOR_SIZE, start, end, granularity)

    async def _query_allocated(
        self, start_sector: int, num_sectors: int, chunk_sectors: int
    ) -> list[tuple[int, int]]:
        """QueryAllocatedBlocks on the first handle's I/O thread (it counts as a read there)."""
        io = self._ios[0]
        return await io.worker.run(
            lambda: io.handle.query_allocated(start_sector, num_sectors, chunk_sectors)
        )

    def stop_io(self) -> None:
        """Drain each handle's ReadAsync requests on its own thread, then end the threads.
        Blocking: call from a worker thread or outside trio."""
        for io in self._ios:
            try:
                io.worker.run_blocking(io.handle.wait)
            except BackendError as e:
                # Each read already reported its own failure to its reader.
                log.debug("waiting for reads of %s: %s", io.handle.target.describe(), e)
            io.worker.stop()
