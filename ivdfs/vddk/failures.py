"""The disk service's failure memory: what failed recently is answered again without a new
attempt.

Role: a disk that fails to open is remembered for a growing interval, during which opens fail at
once without another VDDK call or log line (a storm of lookups costs no storm of connections).
The first failure is retried after OPEN_RETRY_FIRST, each further one doubles the wait up to
OPEN_RETRY_MAX. A permanent error of one disk (no such file, no access to it) starts at a longer
wait: its login worked, so retrying risks no lockout, and a disk that appears later (a snapshot
still being written) is found without remounting. An account error (a refused login, a missing
privilege) waits the maximum at once, for every disk: each attempt is a failed vCenter login,
and repeated ones lock service accounts. A block whose read failed every attempt fails fast for
REMEMBER_FAILED_BLOCK.

Concurrency: trio thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ivdfs.errors import BackendError
from ivdfs.vddk.errors import ACCOUNT_CODES, VddkError, is_permanent
from ivdfs.vddk.slots import Failure, Slot

log = logging.getLogger(__name__)

OPEN_RETRY_FIRST = 0.1
OPEN_RETRY_PERMANENT_FIRST = 1.0
OPEN_RETRY_MAX = 60.0
REMEMBER_FAILED_BLOCK = 30.0


class RememberedFailure(BackendError):
    """An open that failed recently, answered again without a new attempt (nor a log line)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(
            f"{failure.error} (failed {failure.delay:.1f} s ago at most; not retried yet)",
            quiet=True,
        )
        self.permanent = failure.permanent


def is_permanent_error(error: BackendError) -> bool:
    """Whether a new connection cannot fix this failure (a read is then not retried)."""
    if isinstance(error, VddkError):
        return is_permanent(error.code)
    return isinstance(error, RememberedFailure) and error.permanent


class FailureMemory:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # A refused login or missing privilege stops every open for a while, not one disk's.
        self._account: Failure | None = None
        self.remembered = 0  # opens answered from a remembered failure, no VDDK call

    def check_open(self, slot: Slot) -> None:
        """RememberedFailure while an open of this disk (or any, after an account error) may
        not be tried again."""
        now = self._clock()
        failure = slot.failure
        if self._account is not None and now < self._account.until:
            failure = self._account
        if failure is not None and now < failure.until:
            self.remembered += 1
            raise RememberedFailure(failure)

    def opened(self, slot: Slot) -> None:
        slot.failure = None

    def open_failed(self, slot: Slot, error: BackendError) -> BackendError:
        """Remember a failed open; the error to raise (a permanent one is logged here, once,
        and raised quiet)."""
        code = error.code if isinstance(error, VddkError) else None
        permanent = code is not None and is_permanent(code)
        previous = slot.failure
        first = OPEN_RETRY_PERMANENT_FIRST if permanent else OPEN_RETRY_FIRST
        delay = first if previous is None else min(2 * previous.delay, OPEN_RETRY_MAX)
        if code in ACCOUNT_CODES:
            delay = OPEN_RETRY_MAX
        if permanent:
            log.error("%s; not reconnecting for %.0f s (a permanent error)", error, delay)
            error = BackendError(str(error), quiet=True)  # logged just now
        slot.failure = Failure(self._clock() + delay, delay, error, permanent)
        if code in ACCOUNT_CODES:
            self._account = slot.failure
        return error

    def check_block(self, slot: Slot, start_sector: int) -> None:
        """BackendError while a block that failed every attempt is remembered."""
        failed = slot.failed_blocks.get(start_sector)
        if failed is not None:
            if self._clock() < failed[0]:
                raise BackendError(f"{failed[1]} (failed recently; not retried yet)")
            del slot.failed_blocks[start_sector]

    def block_failed(self, slot: Slot, start_sector: int, error: BackendError) -> None:
        slot.failed_blocks[start_sector] = (self._clock() + REMEMBER_FAILED_BLOCK, str(error))
