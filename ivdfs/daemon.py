"""Detaching the mount from the terminal, with its start-up errors still reaching it.

Role: `detached(run)` forks; the child starts a session of its own and runs the mount, and the
parent waits on a pipe until the child reports the mount ready (exit 0) or its start-up error
(printed, with the child's exit code). After "ready" the child's stdin, stdout and stderr go
to /dev/null: the log file is its voice from then on.

Concurrency: main thread. The fork comes before anything starts threads or calls VDDK's InitEx
(VDDK wants InitEx after any fork), so `run` must acquire everything itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from ivdfs.errors import ExitCode, IvdfsError, exit_code_of

log = logging.getLogger(__name__)

# The mount, given the callback that reports it ready; returns the exit code.
Run = Callable[[Callable[[], None]], int]


class _ReadyPipe:
    """The detached child's report to its waiting parent: written once, then closed."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def send(self, text: str) -> bool:
        fd, self._fd = self._fd, None
        if fd is None:
            return False  # already reported; the fd may belong to another file by now
        try:
            os.write(fd, text.encode())
        except OSError:
            pass
        finally:
            os.close(fd)
        return True


def detached(run: Run) -> int:
    """Fork; the child runs the mount and reports readiness (or its error) to the parent."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        return _wait_for_child(pid, r)

    os.close(r)
    os.setsid()
    # Keep no directory of the caller busy (its filesystem could not be unmounted).
    os.chdir("/")
    pipe = _ReadyPipe(w)

    def ready() -> None:
        pipe.send("OK")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    code: int = ExitCode.INTERNAL
    try:
        code = run(ready)
    except IvdfsError as e:
        code = exit_code_of(e)
        pipe.send(f"ERR {code}\t{e}")  # after the mount was ready, run() logged it
    except BaseException as e:
        code = exit_code_of(e)
        log.exception("internal error")
        pipe.send(f"ERR {code}\tinternal error: {type(e).__name__}: {e}")
    os._exit(int(code))


def _wait_for_child(pid: int, r: int) -> int:
    chunks = []
    with os.fdopen(r, "rb") as f:
        while True:
            try:
                chunk = f.read()
            except KeyboardInterrupt:
                # Ctrl-C reaches only us (the child has its own session): pass it on, and wait
                # for the child to undo its start-up and report.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                continue
            chunks.append(chunk)
            break
    msg = b"".join(chunks).decode("utf-8", "replace")
    if msg.startswith("OK"):
        return ExitCode.OK
    if msg.startswith("ERR "):
        code_text, _, text = msg[4:].partition("\t")
        print(f"ivdfs: {text}", file=sys.stderr)
        return int(code_text)
    _, status = os.waitpid(pid, 0)
    print(
        "ivdfs: the mount process ended before the mount was ready "
        f"(status {os.waitstatus_to_exitcode(status)})",
        file=sys.stderr,
    )
    return ExitCode.INTERNAL
