"""The kernel's side of the mount: the FUSE session pyfuse3 holds, from INIT to unmount.

Role: `FuseSession` opens the session on the mountpoint with our libfuse options, serves it
inside trio, tunes the kernel's connection once INIT is answered (read-ahead, background
requests), and closes it. It unmounts only on a clean exit: after a crash while serving, the
mountpoint stays visibly broken ("Transport endpoint is not connected") instead of looking like
an empty snapshot. `invalidate_entry` and `invalidate_attrs` tell the kernel what the tree
changed.

Concurrency: `open` and `close` on the main thread, `serve` and `terminate` on the trio
thread, `after_init` in a worker thread once the loop serves; `invalidate_entry` is asynchronous
(safe from a request handler), `invalidate_attrs` does not block without writeback caching.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pyfuse3

from ivdfs import mountinfo
from ivdfs.errors import FuseError
from ivdfs.fs.connection import tune_connection
from ivdfs.io.readahead import raise_read_ahead

log = logging.getLogger(__name__)

# pyfuse3 worker tasks: requests that wait for a slow disk must not hold up the others.
MAX_FUSE_TASKS = 512
# Kernel read-ahead of the mount, in blocks (raised through sysfs when permitted).
READ_AHEAD_BLOCKS = 4


class FuseSession:
    def __init__(self, mountpoint: Path, block_size: int) -> None:
        self.mountpoint = mountpoint
        self.block_size = block_size
        # False only while serving: a start-up error (or signal) before it still unmounts.
        self.clean = True

    def open(self, ops: pyfuse3.Operations, options: Sequence[str]) -> None:
        try:
            # A list, not a set: the order is ours, and a set's would change with the hash seed.
            pyfuse3.init(ops, str(self.mountpoint), list(options))  # type: ignore[arg-type]
        except RuntimeError as e:
            raise FuseError(f"cannot mount on {self.mountpoint}: {e}") from None

    async def serve(self) -> None:
        await pyfuse3.main(max_tasks=MAX_FUSE_TASKS)

    def terminate(self) -> None:
        pyfuse3.terminate()

    def close(self) -> None:
        # Unmount only on a clean exit: after a crash the mountpoint stays visibly broken
        # ("Transport endpoint is not connected") instead of looking like an empty snapshot.
        still_mounted = mountinfo.find(self.mountpoint) is not None
        pyfuse3.close(unmount=self.clean and still_mounted)
        if self.clean and still_mounted and mountinfo.find(self.mountpoint) is not None:
            # libfuse leaves a connection that was aborted mounted (its fd reports POLLERR).
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False,
                           stdin=subprocess.DEVNULL, capture_output=True)  # fmt: skip

    def mounted(self) -> bool:
        return mountinfo.find(self.mountpoint) is not None

    def after_init(self) -> None:
        """Runs in a thread once the loop serves requests: the kernel sets a FUSE mount's
        read-ahead when INIT is answered, undoing an earlier change, and a stat of the mount
        returns only after INIT."""
        try:
            os.stat(self.mountpoint)
        except OSError as e:
            log.debug("FUSE connection left alone: %s", e)
            return
        # Whole-block requests with several in flight, instead of the default 128 KiB.
        raise_read_ahead(self.mountpoint, READ_AHEAD_BLOCKS * self.block_size // 1024)
        tune_connection(self.mountpoint)


def invalidate_entry(parent_ino: int, name: str) -> None:
    # Asynchronous (a thread of pyfuse3's): safe from a request handler; the kernel then
    # drops the entry and forgets its inode, which frees the node.
    pyfuse3.invalidate_entry_async(parent_ino, os.fsencode(name), ignore_enoent=True)


def invalidate_attrs(ino: int) -> None:
    # Attributes only: the page cache stays. Without writeback caching this does not block.
    try:
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except OSError as e:
        log.debug("attributes of inode %d stay cached: %s", ino, e)
