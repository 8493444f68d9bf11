"""Stop signals for the one-shot commands: what may interrupt them, and what they may not.

Role: a command that holds something on vCenter (an IVD prepared for access, an open disk)
must release it however it is stopped. `interruptible` makes SIGTERM and SIGHUP end it as
Ctrl-C does (KeyboardInterrupt: the context managers release, the CLI says "interrupted" and
exits 130); `deferred` holds stop signals back during a release that a second Ctrl-C must not
cut short (EndAccess above all): they are delivered when it is done.

Concurrency: main thread only (Python runs signal handlers there).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as SIGINT does."""

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Clean-up that a stop signal must not cut short: the signals wait until it is done."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
