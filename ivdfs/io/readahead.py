"""Raising the kernel's read-ahead for a FUSE mount through its bdi in sysfs.

By default the kernel reads ahead 128 KiB on a FUSE mount, so a sequential reader sends small
requests with little in flight. libfuse 3 negotiates requests of up to 1 MiB (max_pages 256);
a larger `read_ahead_kb` lets the kernel use them and keep several in flight. Writing it needs
privilege; without it the mount works as before, which is only worth a debug line.

Concurrency: called once from a worker thread after the kernel's INIT was answered (the kernel
sets the read-ahead then, undoing an earlier change); the device number comes from
/proc/self/mountinfo.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ivdfs import mountinfo

log = logging.getLogger(__name__)

SYSFS_BDI = Path("/sys/class/bdi")


def mount_device(mountpoint: Path) -> str | None:
    """'major:minor' of the mount at `mountpoint`."""
    entry = mountinfo.find(mountpoint)
    return entry.device if entry is not None else None


def raise_read_ahead(mountpoint: Path, kib: int, bdi_root: Path = SYSFS_BDI) -> int | None:
    """Set the mount's read_ahead_kb to at least `kib`; returns the value now in effect."""
    dev = mount_device(mountpoint)
    if dev is None:
        log.debug("read-ahead: %s not found in mountinfo", mountpoint)
        return None
    knob = bdi_root / dev / "read_ahead_kb"
    try:
        current = int(knob.read_text().strip())
        if current < kib:
            knob.write_text(f"{kib}\n")
            current = int(knob.read_text().strip())
        log.debug("read-ahead of %s (bdi %s): %d KiB", mountpoint, dev, current)
        return current
    except (OSError, ValueError) as e:
        log.debug("read-ahead of %s stays at the kernel's default: %s", mountpoint, e)
        return None
