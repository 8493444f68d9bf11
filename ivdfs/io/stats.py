"""Run-time statistics of a mount as one JSON-able dict: VDDK calls, cache, prefetch.

`collect` gathers the data path's part; mount.py adds the disk service's and the tree's, then
renders the whole for the read-only `/.ivdfs/stats` file (`dump`), logs it on SIGUSR1 and at
unmount with --debug (`log_report`). Concurrency: called on the trio thread (file render,
signal task) or the main thread after the loop ended; the VDDK counters are copied under their
own lock, the cache's are only ever written on the trio thread.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ivdfs.io.block_cache import BlockCache
from ivdfs.io.prefetch import Prefetcher
from ivdfs.vddk.library import VddkLibrary


def collect(
    lib: VddkLibrary, cache: BlockCache, prefetcher: Prefetcher | None = None
) -> dict[str, Any]:
    vddk: dict[str, dict[str, int]] = {}
    reads = read_bytes = 0
    for name, st in sorted(lib.stats.snapshot().items()):
        vddk[name] = {"calls": st.calls, "errors": st.errors, "us": st.micros, "bytes": st.bytes}
        if name in ("VixDiskLib_Read", "VixDiskLib_ReadAsync"):
            reads += st.calls
            read_bytes += st.bytes
    return {
        "vddk": vddk,
        "reads": reads,
        "read_bytes": read_bytes,
        "cache": {
            **cache.stats.as_dict(),
            "bytes": cache.current_bytes,
            "max_bytes": cache.max_bytes,
        },
        "prefetch_queued": prefetcher.queued if prefetcher is not None else 0,
    }


def dump(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, indent=1) + "\n").encode()


def log_report(logger: logging.Logger, level: int, report: dict[str, Any]) -> None:
    for name, st in report["vddk"].items():
        avg = st["bytes"] // st["calls"] if st["calls"] else 0
        logger.log(
            level,
            "%s: %d calls, %d errors, %.3f s, %d bytes (avg %d)",
            name,
            st["calls"],
            st["errors"],
            st["us"] / 1e6,
            st["bytes"],
            avg,
        )
    c = report["cache"]
    logger.log(
        level,
        "cache: %d hits, %d misses, %d shared misses, %d prefetched, %d prefetch hits, "
        "%d holes read as zeros, %d of %d bytes used",
        c["hits"],
        c["misses"],
        c["shared_misses"],
        c["prefetched"],
        c["prefetch_hits"],
        c["zero_blocks"],
        c["bytes"],
        c["max_bytes"],
    )
    d = report.get("disks")
    if d:
        logger.log(
            level,
            "disks: %d opens, %d closes (%d idle, %d to make room), %d waits for a connection "
            "(%.3f s), %d open now, %d prepared IVDs",
            d["opens"],
            d["closes"],
            d["idle_closes"],
            d["evictions"],
            d["waits"],
            d["wait_seconds"],
            d["open_disks"],
            d["prepared_ivds"],
        )
