"""Retries for reads that fail transiently (lost NFC connection, busy or restarted host).

Concurrency: trio thread only. A failed read is retried with exponential backoff after the
handle is reopened (a new ConnectEx + Open; concurrent failures share one reopen). A block
that still fails is remembered and fails fast for a while, so a reader scanning a damaged
region is not held up by every retry again. Permanent errors (`errors.is_permanent`: a refused
login, a missing privilege, VDDK's plugin not loaded) are never retried, and once a reopen
fails with one, the disk stops reopening: every reopen is a fresh vCenter login, and repeated
failed logins can lock the account. Nothing here caches data: a failed or short read never
reaches the block cache, because it raises.
"""

from __future__ import annotations

import logging
import time
from typing import Generic, Protocol, TypeVar

import trio

from ivdfs.errors import BackendError
from ivdfs.vddk.connection import DiskTarget
from ivdfs.vddk.errors import VddkError, is_permanent
from ivdfs.vddk.worker import BACKGROUND

log = logging.getLogger(__name__)


def _permanent(e: BackendError) -> bool:
    return isinstance(e, VddkError) and is_permanent(e.code)


class ReadableDisk(Protocol):
    capacity: int

    async def read(self, start_sector: int, nbytes: int) -> bytearray: ...


D = TypeVar("D", bound=ReadableDisk)


class Reopener(Protocol[D]):
    async def reopen(self, target: DiskTarget, broken: D) -> D: ...


class RetryingDisk(Generic[D]):
    def __init__(self, service: Reopener[D], target: DiskTarget, disk: D,
                 attempts: int = 4, backoff: float = 0.1, remember_failures: float = 30.0
                 ) -> None:  # fmt: skip
        self._service = service
        self._target = target
        self._disk = disk
        self.capacity = disk.capacity
        self.attempts = attempts
        self.backoff = backoff
        self.remember_failures = remember_failures
        self._failed: dict[int, tuple[float, str]] = {}  # start sector -> (until, reason)
        self._broken: BackendError | None = None  # a reopen failed for good
        self._reopening = trio.Lock()  # one reopen at a time, so one failed login ends them

    async def read(self, start_sector: int, nbytes: int) -> bytearray:
        if BACKGROUND.get():
            # Read-ahead: one attempt, neither retried nor remembered, so it never spends a
            # fresh connection's reads or marks a block failed before anyone asked for it.
            return await self._disk.read(start_sector, nbytes)
        if self._broken is not None:
            raise BackendError(f"{self._broken} (not reconnecting)")
        failed = self._failed.get(start_sector)
        if failed is not None:
            if time.monotonic() < failed[0]:
                raise BackendError(f"{failed[1]} (failed recently; not retried yet)")
            del self._failed[start_sector]
        for attempt in range(1, self.attempts + 1):
            disk = self._disk
            try:
                return await disk.read(start_sector, nbytes)
            except BackendError as e:  # VddkError, or a handle closed by a failed reopen
                if _permanent(e) or attempt == self.attempts:
                    self._failed[start_sector] = (time.monotonic() + self.remember_failures,
                                                  str(e))  # fmt: skip
                    raise
                log.warning("%s; reopening and retrying (attempt %d of %d)", e, attempt + 1,
                            self.attempts)  # fmt: skip
                await trio.sleep(self.backoff * 2 ** (attempt - 1))
                async with self._reopening:
                    if self._broken is not None:
                        raise BackendError(f"{self._broken} (not reconnecting)") from e
                    if self._disk is not disk:
                        continue  # another reader reopened it meanwhile
                    try:
                        self._disk = await self._service.reopen(self._target, disk)
                    except BackendError as reopen_error:
                        log.warning("reopening %s failed: %s", self._target.describe(),
                                    reopen_error)  # fmt: skip
                        if _permanent(reopen_error):
                            self._broken = reopen_error
                            raise reopen_error from e
        raise AssertionError("unreachable")

    async def query_allocated(
        self, start_sector: int, num_sectors: int, chunk_sectors: int
    ) -> list[tuple[int, int]]:
        """The current handle's allocated runs; not retried, as callers fall back to reading
        every block when it fails."""
        query = getattr(self._disk, "query_allocated", None)
        if query is None:
            raise BackendError("the disk cannot report its allocated blocks")
        runs: list[tuple[int, int]] = await query(start_sector, num_sectors, chunk_sectors)
        return runs
