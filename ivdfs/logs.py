"""Logging set-up: where the log goes, and what pyfuse3 and a crash leave in it.

Role: `setup` points the root logger at a file or stderr (one format for every command);
`for_mount` adds what a long-running mount needs: a Python trace of every thread when the
process crashes (VDDK included), and pyfuse3's errors for replies nobody waits for any more
turned into debug lines.

Concurrency: called once on the main thread before anything else starts; the filter runs on
whichever thread logs.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
from pathlib import Path
from typing import IO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(debug: bool, log_file: Path | None) -> IO[str] | None:
    """Returns the log file's stream, for crash traces."""
    handler: logging.Handler
    stream: IO[str] | None = None
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        stream = fh.stream
        handler = fh
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("pyVmomi", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return stream


def for_mount(debug: bool, log_file: Path | None) -> None:
    """`setup`, with crash traces to the same log and pyfuse3's aborted replies quiet."""
    stream = setup(debug, log_file)
    # faulthandler writes a Python trace of every thread to the log if VDDK (or anything)
    # crashes the process, so a dead mount leaves a reason behind.
    faulthandler.enable(file=stream if stream is not None else sys.stderr)
    logging.getLogger("pyfuse3").addFilter(_AbortedReplies())


class _AbortedReplies(logging.Filter):
    """pyfuse3 logs an ERROR when it answers a request the kernel no longer waits for (the
    reader was interrupted, or the mount is going away): ENOENT from fuse_reply_*. Nothing was
    lost, so it is worth a debug line, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "fuse_reply_" in record.getMessage():
            if "No such file or directory" in record.getMessage():
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True
