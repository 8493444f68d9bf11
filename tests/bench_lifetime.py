"""More disks busy than --max-connections allows (issue 28): opens, access and throughput.

The load: readers spread over disks (reader k reads disk k mod the number of disks), each
holding its file open and reading 64 KiB at random offsets, every read checked against the
image and dropped from the page cache afterwards; --max-connections 2, --idle-timeout 0.5,
--cache-size 4M, so that reads reach VDDK as on disks larger than memory. Counted on the
stand-in's call log: VDDK opens, PrepareForAccess and EndAccess; and the bytes the readers got
per second.

`run` serves both the benchmark (scripts/bench --only lifetime: 16 readers over 5 disks for
3 minutes, the disk service's policy of today against the one before issue 28, side by side in
one run) and the suite's small version (tests/t4_lifetime.py: a bounded number of reads).

Usage: `scripts/bench --only lifetime [--lifetime-seconds 180]`, or `.venv/bin/python -m
tests.bench_lifetime [--seconds 180] [--readers 16] [--disks 5] [--size-mb 64]`. Not a test: it
reports, and marks the goal (at most 60 opens a minute at 0.8 times the old throughput or more).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivdfs.mount import LEGACY_LIFETIME_ENV
from tests.mounting import Bed, Mount, call_lines, most_connections
from tests.testbed.images import random_disk
from tests.testbed.vsphere import Vcsim, place_image

MiB = 1 << 20
READ = 64 << 10
MOUNT_OPTIONS = ("--max-connections", "2", "--idle-timeout", "0.5", "--cache-size", "4M")


@dataclass(frozen=True)
class LoadDisk:
    path: Path  # relative to the mountpoint
    image: Path  # what it must read as
    size: int


def make_disks(bed: Bed, count: int, size_mb: int, name: str = "lifetime") -> list[LoadDisk]:
    """`count` snapshots of as many IVDs on LocalDS_0, random bytes each."""
    src = bed.root / "src"
    src.mkdir(exist_ok=True)
    out = []
    for i in range(count):
        ivd = bed.vcsim.create_ivd(f"{name}-{i}", size_mb, "LocalDS_0")
        snap = bed.vcsim.create_snapshot(ivd, "load")
        image = random_disk(src / f"{name}-{i}.raw", size_mb, seed=280 + i).path
        placed = place_image(bed.images, ivd, snap, image)
        out.append(LoadDisk(Path("LocalDS_0") / ivd.id / snap / "disk.raw", placed, size_mb * MiB))
    return out


def run(
    bed: Bed,
    mountpoint: Path,
    disks: list[LoadDisk],
    readers: int,
    *,
    seconds: float | None = None,
    reads: int | None = None,
    legacy: bool = False,
    **env: str,
) -> dict[str, Any]:
    """Mount, load it (for `seconds`, or `reads` reads per reader), unmount; the figures."""
    bed.standin_log.unlink(missing_ok=True)
    env = {"VDDK_STANDIN_LOG_READS": "0", **env}
    if legacy:
        env[LEGACY_LIFETIME_ENV] = "1"
    errors: list[str] = []
    done = [0] * readers
    with Mount(bed, mountpoint, *MOUNT_OPTIONS, **env) as m:
        start = time.monotonic()
        until = start + seconds if seconds is not None else None

        def reader(k: int) -> None:
            disk = disks[k % len(disks)]
            rng = random.Random(k)
            try:
                with (
                    open(mountpoint / disk.path, "rb", buffering=0) as f,
                    open(disk.image, "rb") as src,
                ):
                    while not errors:
                        if reads is not None and done[k] >= reads:
                            break
                        if until is not None and time.monotonic() >= until:
                            break
                        off = rng.randrange(0, disk.size - READ)
                        if os.pread(f.fileno(), READ, off) != os.pread(src.fileno(), READ, off):
                            errors.append(f"wrong bytes: {disk.path} at {off}")
                        # The next read of these bytes reaches ivdfs, not the page cache.
                        os.posix_fadvise(f.fileno(), off, READ, os.POSIX_FADV_DONTNEED)
                        done[k] += 1
            except OSError as e:
                errors.append(f"reader {k}: {e}")

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=(seconds or 0) + 300)
        elapsed = time.monotonic() - start
        hung = sum(t.is_alive() for t in threads)
        code = m.unmount()
    lines = bed.log_lines()
    opens = sum(o["err"] == "0" for o in call_lines(lines, "Open"))
    return {
        "policy": "before issue 28" if legacy else "today",
        "seconds": round(elapsed, 2),
        "reads": sum(done),
        "mib_per_s": round(sum(done) * READ / MiB / elapsed, 2),
        "opens": opens,
        "opens_per_min": round(opens / elapsed * 60, 1),
        "prepares": len(call_lines(lines, "PrepareForAccess")),
        "end_accesses": len(call_lines(lines, "EndAccess")),
        "most_connections": most_connections(lines),
        "errors": errors[:5],
        "hung_readers": hung,
        "exit": code,
    }


def compare(seconds: float, readers: int = 16, count: int = 5, size_mb: int = 64) -> dict[str, Any]:
    """Both policies under the same load, one after the other, in one run."""
    with tempfile.TemporaryDirectory(prefix="ivdfs-bench-life-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        with Vcsim() as v:
            bed = Bed(v, root)
            disks = make_disks(bed, count, size_mb)
            old = run(bed, root / "mnt-old", disks, readers, seconds=seconds, legacy=True)
            new = run(bed, root / "mnt-new", disks, readers, seconds=seconds)
    ok = new["opens_per_min"] <= 60 and new["mib_per_s"] >= 0.8 * old["mib_per_s"]
    return {
        "load": f"{readers} readers of 64 KiB over {count} disks of {size_mb} MiB, "
        f"{' '.join(MOUNT_OPTIONS)}, {seconds:g} s each",
        "old": old,
        "new": new,
        "goal": "<= 60 opens/min at >= 0.8x the old throughput",
        "met": ok,
    }


def table(result: dict[str, Any]) -> str:
    old, new = result["old"], result["new"]
    rows = [
        ("opens per minute", "opens_per_min"),
        ("VDDK opens", "opens"),
        ("PrepareForAccess", "prepares"),
        ("EndAccess", "end_accesses"),
        ("reads", "reads"),
        ("throughput MiB/s", "mib_per_s"),
        ("most connections open", "most_connections"),
    ]
    out = [f"{'':<24} {'before issue 28':>16} {'today':>10} {'ratio':>7}"]
    for label, key in rows:
        ratio = f"{new[key] / old[key]:7.3f}" if old[key] else "      -"
        out.append(f"{label:<24} {old[key]:>16} {new[key]:>10} {ratio}")
    bad = [f"{p}: {r['errors']} hung={r['hung_readers']} exit={r['exit']}"
           for p, r in (("old", old), ("new", new))
           if r["errors"] or r["hung_readers"] or r["exit"]]  # fmt: skip
    out.append(f"goal {result['goal']}: {'met' if result['met'] else 'NOT met'}")
    return "\n".join(out + bad)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_lifetime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="load per policy (180)")
    ap.add_argument("--readers", type=int, default=16)
    ap.add_argument("--disks", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=64)
    args = ap.parse_args(argv)
    result = compare(args.seconds, args.readers, args.disks, args.size_mb)
    print(f"\nconnection cap and access (issue 28): {result['load']}")
    print(table(result))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
