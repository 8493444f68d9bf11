"""Side-by-side benchmark of forensic inspection's cost on the read path (issue 18).

One run, one table of ratios against a plain mount (neither `--hashes` nor `--audit-log`):

1. hashlib in this process: ms per MiB for SHA-256 and MD5 (what the hashing costs if it ran on
   the trio thread: it does not, it runs on pool threads).
2. cold `dd bs=1M` of a fresh mount's disk.raw (stand-in at `--bw` MiB/s and 1 ms per read):
   `--hashes` (SHA-256 and MD5 computed), `--audit-log` (direct I/O and the journal alone)
   and `--hashes --audit-log` (direct I/O, journal, hashes).
3. warm `dd bs=1M`: the block cache holds the whole disk (filled by O_DIRECT reads in random
   order, which leave no hash), so the pass is FUSE and ivdfs only: the worst case for hashing.
4. CPU seconds of the ivdfs process per pass (hashing costs CPU, not wall time).
5. `ivdfs hash` of the same snapshot (VDDK in-process, no FUSE) vs the cold dd of (2).

Each pass runs `--repeat` times (default 3), modes alternating; medians. Usage:
`scripts/bench --only forensics`, or `.venv/bin/python -m tests.bench_forensics [--size-mb 512]
[--bw 400] [--repeat 3]`.
Not a test: about a minute or two; it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.mounting import IVDFS, VDDK_LIBDIR, Bed, Mount
from tests.testbed.images import random_disk
from tests.testbed.vsphere import Vcsim, place_image

MiB = 1 << 20
MODES = {
    "plain": (),
    "hash": ("--hashes",),
    "audit-only": ("--audit-log",),
    "audit": ("--hashes", "--audit-log"),
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dd(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def prewarm(path: Path, size: int) -> None:
    """Every block into ivdfs's cache, in random order and O_DIRECT: no hash, no pages."""
    buf = mmap.mmap(-1, MiB)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        offsets = list(range(0, size, MiB))
        random.Random(1).shuffle(offsets)
        for off in offsets:
            os.preadv(fd, [buf], off)
    finally:
        os.close(fd)
        buf.close()


def hashlib_ms_per_mib(algorithm: str) -> float:
    data = os.urandom(MiB)
    h = hashlib.new(algorithm)
    t0 = time.perf_counter()
    for _ in range(256):
        h.update(data)
    return (time.perf_counter() - t0) / 256 * 1000


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.env = {
            "VDDK_STANDIN_LATENCY_US": "1000",
            "VDDK_STANDIN_GLOBAL_BW": str(args.bw * MiB),
            "VDDK_STANDIN_LOG_READS": "0",
        }
        self.cache = f"{args.size_mb * 2}M"

    @contextmanager
    def mount(self, bed: Bed, mode: str, run: int) -> Iterator[Mount]:
        mp = self.work / f"mnt-{mode}-{run}"
        extra = list(MODES[mode])
        if mode.startswith("audit"):
            extra.append(str(self.work / f"audit-{run}.jsonl"))
        m = Mount(bed, mp, "--cache-size", self.cache, *extra, **self.env)
        try:
            yield m
        finally:
            if m.proc.poll() is None:
                m.unmount()

    def run(self) -> list[tuple[str, float, float | None, str]]:
        size = self.args.size_mb * MiB
        rows: list[tuple[str, float, float | None, str]] = []
        sha, md5 = hashlib_ms_per_mib("sha256"), hashlib_ms_per_mib("md5")
        rows.append(("hashlib sha256 update of 1 MiB", sha, None, "ms"))
        rows.append(("hashlib md5 update of 1 MiB", md5, None, "ms"))
        with Vcsim() as v:
            bed = Bed(v, self.work / "bed")
            bed.images.mkdir(parents=True, exist_ok=True)
            ivd = v.create_ivd("bench-evidence", self.args.size_mb, "LocalDS_0")
            snap = v.create_snapshot(ivd, "bench")
            image = random_disk(self.work / "disk.raw", self.args.size_mb, seed=18)
            place_image(bed.images, ivd, snap, image.path)
            rel = Path(ivd.datastore_name) / ivd.id / snap / "disk.raw"
            cold: dict[str, list[float]] = {m: [] for m in MODES}
            warm: dict[str, list[float]] = {m: [] for m in MODES}
            cpu_cold: dict[str, list[float]] = {m: [] for m in MODES}
            cpu_warm: dict[str, list[float]] = {m: [] for m in MODES}
            for run in range(self.args.repeat):
                for mode in MODES:
                    with self.mount(bed, mode, run) as m:
                        disk = m.mountpoint / rel
                        c0 = cpu_seconds(m.proc.pid)
                        cold[mode].append(dd(disk))
                        cpu_cold[mode].append(cpu_seconds(m.proc.pid) - c0)
                        if mode in ("hash", "audit"):
                            assert os.getxattr(disk, "user.ivdfs.sha256") == (
                                image.sha256.encode()
                            ), "the cold pass left no (or a wrong) hash"
                        m.unmount()
                    with self.mount(bed, mode, run) as m:
                        disk = m.mountpoint / rel
                        prewarm(disk, size)
                        c0 = cpu_seconds(m.proc.pid)
                        warm[mode].append(dd(disk))
                        cpu_warm[mode].append(cpu_seconds(m.proc.pid) - c0)
                        m.unmount()
                    print(f"  run {run} {mode}: cold {cold[mode][-1]:.2f} s, "
                          f"warm {warm[mode][-1]:.2f} s", flush=True)  # fmt: skip
            med = {k: statistics.median(v) for k, v in cold.items()}
            wmed = {k: statistics.median(v) for k, v in warm.items()}
            mb = self.args.size_mb
            rows.append((f"cold dd, no hashing ({mb} MiB)", mb / med["plain"], None, "MiB/s"))
            rows.append(("cold dd, --hashes", mb / med["hash"], mb / med["plain"],
                         "MiB/s"))  # fmt: skip
            rows.append(("cold dd, --audit-log (direct I/O)", mb / med["audit-only"],
                         mb / med["plain"], "MiB/s"))  # fmt: skip
            rows.append(("cold dd, --audit-log (direct I/O) + hashing", mb / med["audit"],
                         mb / med["plain"], "MiB/s"))  # fmt: skip
            rows.append(("warm dd, no hashing", mb / wmed["plain"], None, "MiB/s"))
            rows.append(("warm dd, --hashes", mb / wmed["hash"], mb / wmed["plain"],
                         "MiB/s"))  # fmt: skip
            rows.append(("warm dd, --audit-log (direct I/O)", mb / wmed["audit-only"],
                         mb / wmed["plain"], "MiB/s"))  # fmt: skip
            rows.append(("warm dd, --audit-log (direct I/O) + hashing", mb / wmed["audit"],
                         mb / wmed["plain"], "MiB/s"))  # fmt: skip
            for label, series in (("cold", cpu_cold), ("warm", cpu_warm)):
                ref = statistics.median(series["plain"])
                for mode in ("hash", "audit-only", "audit"):
                    rows.append((f"ivdfs CPU seconds, {label} pass, {mode}",
                                 statistics.median(series[mode]), ref, "s"))  # fmt: skip
            times = []
            for _ in range(self.args.repeat):
                t0 = time.perf_counter()
                r = subprocess.run(
                    [*IVDFS, "hash", "--server", v.server, "--user", v.user, "--ca-file",
                     str(v.ca_file), "--vddk-libdir", str(VDDK_LIBDIR), ivd.id, snap],
                    capture_output=True, text=True, env=bed.env(**self.env), check=True,
                )  # fmt: skip
                times.append(time.perf_counter() - t0)
                assert image.sha256 in r.stdout
            rows.append(("ivdfs hash (sha256+md5, in-process VDDK)",
                         mb / statistics.median(times), mb / med["plain"], "MiB/s"))  # fmt: skip
        return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--bw", type=int, default=400, help="stand-in bandwidth, MiB/s (400)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ivdfs-bench-forensics-", dir="/var/tmp") as tmp:
        rows = Bench(args, Path(tmp)).run()
    print(f"\nforensics benchmark: {args.size_mb} MiB disk, stand-in {args.bw} MiB/s and 1 ms "
          f"per read, cache {args.size_mb * 2}M, median of {args.repeat}")  # fmt: skip
    print(f"{'case':<48} {'value':>9} {'ref':>9} {'unit':<6} {'ratio':>6}")
    for case, value, ref, unit in rows:
        ratio = f"{value / ref:6.2f}" if ref else "     -"
        refs = f"{ref:9.1f}" if ref else " " * 9
        print(f"{case:<48} {value:9.2f} {refs} {unit:<6} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
