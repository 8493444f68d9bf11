"""Helpers shared by the subcommands: a logged-in session, tables, progress on a terminal,
the one-line-per-step report of `check` and of the recovery of a dead mount.

Main thread only; every call blocks.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from ivdfs.config import ServerConfig
from ivdfs.errors import ExitCode, IvdfsError
from ivdfs.inventory.vsphere import Progress, VSphere

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@contextmanager
def session(server: ServerConfig, pool: int = 1) -> Iterator[VSphere]:
    vs = VSphere(server, pool)
    try:
        vs.connect()
        yield vs
    finally:
        vs.close()


class Report:
    """One line per step, as a command goes: `ok`, `FAIL` (with what would undo it, when the
    user can), `skip`, `warn`; `step` names a column of its own. The first failure's exit code
    is the command's (`code`)."""

    def __init__(self, default_code: int = ExitCode.INTERNAL) -> None:
        self.failures: list[tuple[str, str, int]] = []  # (step, text, exit code)
        self._default_code = default_code

    def _line(self, mark: str, step: str, text: str) -> None:
        where = f"{step:<12} " if step else ""
        print(f"{mark:<5} {where}{text}", flush=True)

    def ok(self, text: str, step: str = "") -> None:
        self._line("ok", step, text)

    def skip(self, text: str, step: str = "") -> None:
        self._line("skip", step, text)

    def warn(self, text: str, step: str = "") -> None:
        self._line("warn", step, text)

    def fail(self, text: str, remedy: str = "", code: int | None = None, step: str = "") -> None:
        self._line("FAIL", step, f"{text}; to undo it: {remedy}" if remedy else text)
        self.failures.append((step, text, self._default_code if code is None else code))

    def error(self, e: IvdfsError, step: str = "") -> None:
        """A step that failed with `e`, and so with its exit code."""
        self.fail(str(e), code=e.exit_code, step=step)

    @property
    def code(self) -> int:
        return self.failures[0][2] if self.failures else ExitCode.OK


def cell(text: str) -> str:
    """One table cell: control characters (newlines in descriptions) would break the rows."""
    return _CONTROL.sub(" ", text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    cells = [list(headers), *[[cell(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*padded, r[-1]]).rstrip())
    return "\n".join(lines)


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'; exact byte counts are in --json."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{n} B"
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


@contextmanager
def progress(what: str) -> Iterator[Progress | None]:
    """On a terminal, a one-line '<what> ... N s' that updates while a task runs."""
    if not sys.stderr.isatty():
        yield None
        return
    shown = [False]

    def update(elapsed: float) -> None:
        if elapsed >= 1.0:
            shown[0] = True
            sys.stderr.write(f"\r{what} ... {elapsed:.0f} s")
            sys.stderr.flush()

    start = time.monotonic()
    try:
        yield update
    finally:
        if shown[0]:
            sys.stderr.write(f"\r{what} ... {time.monotonic() - start:.0f} s, done\n")
            sys.stderr.flush()


@contextmanager
def progress_count(what: str) -> Iterator[Callable[[int], None]]:
    """On a terminal, a one-line '<what> ... N' counter for long listings; `step(n)` counts n
    more (from any thread)."""
    count = [0]
    tty = sys.stderr.isatty()
    last = [0.0]
    lock = threading.Lock()

    def step(n: int) -> None:
        with lock:
            count[0] += n
            now = time.monotonic()
            if not (tty and now - last[0] >= 0.2):
                return
            last[0] = now
            sys.stderr.write(f"\r{what} ... {count[0]}")
            sys.stderr.flush()

    try:
        yield step
    finally:
        if tty and last[0]:
            sys.stderr.write(f"\r{what} ... {count[0]}, done\n")
            sys.stderr.flush()
