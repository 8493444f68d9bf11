"""Stop signals: what may interrupt ivdfs, and what they may not. The one place that handles
signals.

Role: a command that holds something on vCenter (an IVD prepared for access, an open disk)
must release it however it is stopped. For the one-shot commands, `interruptible` makes SIGTERM
and SIGHUP end it as Ctrl-C does (KeyboardInterrupt: the context managers release, the CLI says
"interrupted" and exits 130), and `cancel_on_stop` does the same inside trio; `deferred`
holds stop signals back during a release that a second Ctrl-C must not cut short (EndAccess
above all): they are delivered when it is done.

A mount has one handler per signal for its whole life (`MountSignals`): SIGTERM, SIGINT and
SIGHUP stop it at any stage (start-up checks `check` between steps; the serving loop waits in
`wait_for_stop`); any that arrive while stopping are logged and never interrupt the teardown;
SIGUSR1 logs statistics.

Concurrency: main thread only (Python runs signal handlers there). While the trio loop runs
(on the main thread too), the mount's handlers hand their work to it with `run_sync_soon`, as
trio's own signal receiver does, so it runs between tasks rather than inside one.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import trio

from ivdfs.errors import Interrupted

log = logging.getLogger(__name__)

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


async def cancel_on_stop(scope: trio.CancelScope, stopped: list[int]) -> None:
    """For a one-shot command that runs trio (`ivdfs hash`): the first stop signal cancels
    `scope` and is appended to `stopped` (the command then ends as Ctrl-C does). A handler
    raising KeyboardInterrupt could land anywhere in trio's own code; this one is a task."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as received:
        async for signum in received:
            stopped.append(signum)
            scope.cancel()
            return


class MountSignals:
    """Stop and statistics signals for the whole life of a mount."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopping = False
        self.log_stats: Callable[[], None] | None = None
        self._loop: trio.lowlevel.TrioToken | None = None  # while the trio loop serves
        self._stop: trio.Event | None = None

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_usr1)

    def check(self) -> None:
        """Between start-up steps: stop now if asked to."""
        if self.received is not None:
            raise Interrupted(self.received)

    @contextmanager
    def to_loop(self) -> Iterator[None]:
        """While the trio loop serves (entered on its thread): the handlers' work goes to it."""
        self._stop = trio.Event()
        self._loop = trio.lowlevel.current_trio_token()
        try:
            yield
        finally:
            self._loop = None

    async def wait_for_stop(self) -> None:
        """On the trio thread, inside `to_loop`: returns once a stop signal came (one that came
        before counts too); from then on further ones are logged and ignored."""
        assert self._stop is not None
        if self.received is None:
            await self._stop.wait()
        self.stopping = True

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None and not self.stopping:
            self.received = signum
            stop = self._stop
            if self._loop is not None and stop is not None:
                log.info("received %s; unmounting", name)
                self._in_loop(stop.set)
            else:
                log.info("received %s; stopping", name)
        else:
            log.warning("received %s while stopping; the teardown goes on", name)

    def _on_usr1(self, _signum: int, _frame: FrameType | None) -> None:
        if self.log_stats is not None:
            self._in_loop(self.log_stats)

    def _in_loop(self, fn: Callable[[], object]) -> None:
        """Run `fn` in the trio loop between its tasks if it serves, else right here."""
        loop = self._loop
        if loop is not None:
            try:
                loop.run_sync_soon(_logged, fn)
                return
            except trio.RunFinishedError:
                pass
        fn()


def _logged(fn: Callable[[], object]) -> None:
    # A callback that raised would end the trio loop (TrioInternalError).
    try:
        fn()
    except Exception:
        log.exception("handling a signal")
