"""Tuning the kernel's FUSE connection of our mount through sysfs.

By default the kernel keeps at most 12 background requests (read-ahead, async reads) in flight
per FUSE connection and treats the connection as congested at 9: readers of one slow disk then
fill those places and a read of another, already open disk waits behind them (issue 20 measured
0.5 s become 24-68 s). pyfuse3 cannot set `max_background` at INIT, so it is raised through
/sys/fs/fuse/connections/<N>/, where N is the minor device number of the mount. Writing there
needs root; without it the defaults stay, which is only worth a debug line.

Concurrency: called once from a worker thread after INIT (the files exist only then).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ivdfs import mountinfo

log = logging.getLogger(__name__)

SYSFS_FUSE = Path("/sys/fs/fuse/connections")
MAX_BACKGROUND = 256
CONGESTION_THRESHOLD = 192  # three quarters, as the kernel's own default ratio


def tune_connection(mountpoint: Path, root: Path = SYSFS_FUSE) -> bool:
    entry = mountinfo.find(mountpoint)
    if entry is None:
        return False
    conn = root / entry.device.split(":")[1]
    if not conn.is_dir():
        # fusectl is mounted by systemd at boot, but often not in containers.
        log.info(
            "the FUSE connection keeps the kernel's limit of 12 background requests: fusectl "
            "is not mounted on %s (as root: mount -t fusectl fusectl %s)",
            root,
            root,
        )
        return False
    try:
        # Raise the limit before the threshold: the kernel refuses a threshold above it.
        for name, value in (
            ("max_background", MAX_BACKGROUND),
            ("congestion_threshold", CONGESTION_THRESHOLD),
        ):
            knob = conn / name
            if int(knob.read_text()) < value:
                knob.write_text(f"{value}\n")
    except (OSError, ValueError) as e:
        log.debug("FUSE connection %s keeps the kernel's limits: %s", conn, e)
        return False
    log.debug("FUSE connection %s: max_background %d", conn, MAX_BACKGROUND)
    return True
