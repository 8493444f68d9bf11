"""Side-by-side benchmark of the read path (issue 3): one run, one table of ratios, one JSON.

Everything is measured in the same run against the same stand-in settings: a global bandwidth
cap (`--bw`, default 400 MiB/s, so cold 1 GiB reads take seconds, not minutes, and the peer
gets the same cap through nbdkit's rate filter) and a per-read latency of 0, 1 and 4 ms.
Rows:

1. cold `dd bs=1M` of a 1 GiB disk.raw (fresh mount, --cache-size 128M), prefetch off and on,
   vs the single-stream ceiling: an in-process loop of 1 MiB VixDiskLib_Read on the stand-in.
2. the same dd through nbdkit (file plugin, delay + rate filters) behind nbdfuse.
3. warm re-read through the mount vs the same image on tmpfs.
4. eight concurrent readers of one 256 MiB region: VDDK reads per block (stand-in call log).
5. random 4 KiB reads of cold blocks: p50/p99 minus a direct 1 MiB VixDiskLib_Read's p50.
6. peak RSS of the ivdfs process during (1) vs --cache-size.
7. a half-allocated 256 MiB disk: bytes VDDK read / allocated bytes (and without the query).
8. warm passes (issue 17): a disk smaller than the cache (default 192 MiB, --cache-size 256M,
   stand-in at 2 ms and 300 MB/s per handle), read whole ten times after a cold pass 0, each
   pass beside one of the same image on tmpfs: slowest/median/fastest pass vs the tmpfs median,
   and the VDDK reads after pass 0 (stand-in log and /.ivdfs/stats).
9. the same ten passes with the page cache dropped before each: VDDK reads after pass 0.
10. a hot set (4 MiB read sequentially twice, 2 MiB at random, all O_DIRECT) then a sequential
   scan of a disk four times --cache-size 64M: hot blocks VDDK reads again afterwards.

Lifetime (issue 28, tests/bench_lifetime.py): 16 readers over 5 disks with two connections,
--idle-timeout 0.5 and a 4 MiB cache, three minutes under today's connection-cap and access
policy and three under the one before (selected for the benchmark only): opens a minute,
PrepareForAccess, throughput.

Usage: scripts/bench [--size-mb 1024] [--bw 400] [--latencies 0,1,4] [--warm-mb 192]
[--only warm|read|inventory|forensics|volumes|lifetime] [--lifetime-seconds 180] [--out FILE].
Never part of the test suite; about 4-5 minutes on a 2-core machine for rows 1-10 (--only warm:
rows 8-10, under a minute), plus a few minutes for the inventory table (tests/bench_inventory.py;
--only inventory), about two for the guest-volume modes (tests/bench_volumes.py; --only volumes)
and six for the lifetime table (--only lifetime). Not a timed test: it reports, and marks each
goal met or not. Rows 9 and 10 empty the page cache of the whole machine (drop_caches).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests import bench_direct, bench_forensics, bench_inventory, bench_lifetime, bench_volumes
from tests.mounting import REPO, VDDK_LIBDIR, Bed, Mount, call_lines, wait_for
from tests.testbed.images import DataManifest, random_disk, sparse_disk
from tests.testbed.vsphere import Ivd, Vcsim, place_image

MiB = 1 << 20
CACHE = "128M"
CACHE_BYTES = 128 * MiB
ASYNC_DEPTH = 8  # ivdfs.io.prefetch.DEFAULT_IN_FLIGHT: blocks read ahead at once
WARM_PASSES = 10
HOT_CACHE = "64M"
HOT_CACHE_MB = 64


def dd(path: Path, *extra: str) -> float:
    """Seconds to read `path` with dd bs=1M."""
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=1M", *extra],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def mount_stats(mp: Path) -> dict[str, Any]:
    return json.loads((mp / ".ivdfs" / "stats").read_text())  # type: ignore[no-any-return]


def reads_by_block(bed: Bed) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in bed.log_lines():
        parts = line.split()
        if parts[2:3] in (["Read"], ["ReadAsync"]):
            kv = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
            b = int(kv["start"]) // 2048
            counts[b] = counts.get(b, 0) + 1
    return counts


def read_pass(path: Path, buf: bytearray) -> float:
    """Seconds to read `path` whole with 1 MiB reads into one buffer, in this process (no dd
    start-up in the figure: a warm pass of a few hundred MiB takes tens of milliseconds)."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def vddk_blocks(bed: Bed, ivd_id: str) -> list[int]:
    """1 MiB blocks of IVD `ivd_id` read by VDDK so far, in order (the stand-in's call log)."""
    lines = bed.log_lines()
    conns = {c["conn"] for c in call_lines(lines, "ConnectEx") if c["id"] == ivd_id}
    handles = {o["handle"] for o in call_lines(lines, "Open") if o["conn"] in conns}
    reads = call_lines(lines, "Read") + call_lines(lines, "ReadAsync")
    return [int(r["start"]) // 2048 for r in reads if r["handle"] in handles]


def direct_reads(path: Path, offsets: list[int], size: int) -> str:
    """O_DIRECT reads (each reaches ivdfs whatever the page cache holds); sha256 of the data."""
    buf = mmap.mmap(-1, size)
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for off in offsets:
            os.preadv(fd, [buf], off)
            h.update(buf)
    finally:
        os.close(fd)
        buf.close()
    return h.hexdigest()


def block_lookups(mp: Path) -> int:
    """Block lookups of the cache so far: what the kernel asked ivdfs for."""
    cache = mount_stats(mp)["cache"]
    return int(cache["hits"] + cache["misses"])


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.bw = args.bw * MiB
        self.rows: list[dict[str, Any]] = []

    def row(
        self, n: int, case: str, value: float, ref: float | None, unit: str, goal: str, ok: bool
    ) -> None:
        ratio = value / ref if ref else None
        self.rows.append(
            dict(
                row=n,
                case=case,
                value=round(value, 3),
                reference=None if ref is None else round(ref, 3),
                unit=unit,
                ratio=None if ratio is None else round(ratio, 3),
                goal=goal,
                met=ok,
            )
        )
        r = f"{ratio:6.2f}" if ratio is not None else "     -"
        print(f"  [{n}] {case}: {value:.1f} {unit} (ref {ref or 0:.1f}) ratio {r}", flush=True)

    def env(self, latency_ms: float, **more: str) -> dict[str, str]:
        return {
            "VDDK_STANDIN_LATENCY_US": str(int(latency_ms * 1000)),
            "VDDK_STANDIN_GLOBAL_BW": str(self.bw),
            "VDDK_STANDIN_LOG_READS": "0",
            **more,
        }

    @contextmanager
    def mount(
        self, bed: Bed, name: str, *extra: str, cache: str = CACHE, **env: str
    ) -> Iterator[Mount]:
        mp = self.work / f"mnt-{name}"
        mp.mkdir(exist_ok=True)
        m = Mount(bed, mp, "--cache-size", cache, *extra, **env)
        try:
            yield m
        finally:
            if m.proc.poll() is None:
                m.unmount()

    def ceiling(self, bed: Bed, ivd: Ivd, snap: str, latency_ms: float, count: int) -> Any:
        """The in-process loop of 1 MiB VixDiskLib_Read, in its own process (InitEx reads the
        stand-in's settings once per process)."""
        v = bed.vcsim
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.bench",
                "ceiling",
                ivd.id,
                ivd.datastore_moref,
                snap,
                str(count),
                v.server,
                v.user,
                v.thumbprint,
            ],
            env=bed.env(**self.env(latency_ms)),
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        return json.loads(proc.stdout)

    def peer(self, image: Path, latency_ms: float) -> float:
        """Seconds for dd through nbdfuse + nbdkit (file, delay, rate) at the same settings."""
        mp = self.work / "mnt-nbdfuse"
        mp.mkdir(exist_ok=True)
        filters = ["--filter=rate"]
        params = [f"rate={self.bw * 8}"]
        if latency_ms:
            filters.insert(0, "--filter=delay")
            params.append(f"delay-read={int(latency_ms)}ms")
        proc = subprocess.Popen(
            [
                "nbdfuse",
                "-r",
                str(mp),
                "--command",
                "nbdkit",
                "-s",
                "--exit-with-parent",
                *filters,
                "file",
                str(image),
                *params,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(lambda: (mp / "nbd").exists(), 30, "nbdfuse")
            return dd(mp / "nbd")
        finally:
            subprocess.run(["fusermount3", "-u", str(mp)], check=False)
            proc.wait(timeout=30)

    def run(self) -> dict[str, Any]:
        a = self.args
        if a.only != "warm":
            self.read_path_rows()
        self.warm_rows()
        return {
            "settings": {
                "size_mb": a.size_mb,
                "bw_mib_s": a.bw,
                "latencies_ms": a.latencies,
                "cache": CACHE,
                "block": "1M",
                "async_depth": ASYNC_DEPTH,
                "warm_mb": a.warm_mb,
                "only": a.only,
            },
            "commit": _commit(),
            "rows": self.rows,
        }

    def read_path_rows(self) -> None:
        a = self.args
        size = a.size_mb * MiB
        print(f"building images ({a.size_mb} MiB random, 256 MiB half-allocated) ...", flush=True)
        src = self.work / "src"
        src.mkdir()
        full = random_disk(src / "full.raw", a.size_mb, seed=21)
        sparse = sparse_disk(src / "sparse.raw", 256, 0.5, seed=22)
        with Vcsim() as v:
            (self.work / "bed" / "images").mkdir(parents=True)
            bed = Bed(v, self.work / "bed")
            ivd = v.create_ivd("bench-full", a.size_mb, "LocalDS_0")
            snap = v.create_snapshot(ivd, "bench")
            place_image(bed.images, ivd, snap, full.path)
            sivd = v.create_ivd("bench-sparse", 256, "LocalDS_0")
            ssnap = v.create_snapshot(sivd, "bench")
            place_image(bed.images, sivd, ssnap, sparse.path)
            disk_rel = Path("LocalDS_0") / ivd.id / snap / "disk.raw"
            mb = a.size_mb * MiB / 1e6  # dd's MB
            rss: list[int] = []
            direct_p50 = 0.0

            for lat in a.latencies:
                print(f"latency {lat} ms:", flush=True)
                c = self.ceiling(bed, ivd, snap, lat, a.size_mb)
                ceil_mbs = mb / c["seconds"]
                if lat == 1:
                    direct_p50 = c["p50_ms"]
                for prefetch in ("0", "16"):
                    with self.mount(
                        bed, f"l{lat}p{prefetch}", "--prefetch", prefetch, **self.env(lat)
                    ) as m:
                        t = dd(m.mountpoint / disk_rel)
                        got = mb / t
                        if prefetch == "0":
                            self.row(
                                1,
                                f"cold seq, {lat} ms, prefetch off vs VDDK loop",
                                got,
                                ceil_mbs,
                                "MB/s",
                                ">= 0.9",
                                got >= 0.9 * ceil_mbs,
                            )
                        else:
                            bound = self.bw / 1e6
                            if lat:
                                bound = min(ASYNC_DEPTH * MiB / (lat / 1000) / 1e6, bound)
                            self.row(
                                1,
                                f"cold seq, {lat} ms, prefetch 16 vs min(8 MiB/lat, cap)",
                                got,
                                bound,
                                "MB/s",
                                ">= 0.8",
                                got >= 0.8 * bound,
                            )
                            self.row(
                                1,
                                f"cold seq, {lat} ms, prefetch 16 vs VDDK loop",
                                got,
                                ceil_mbs,
                                "MB/s",
                                "(info)",
                                True,
                            )
                            rss.append(peak_rss(m.proc.pid))
                            if lat == 1:
                                self.warm(m.mountpoint / disk_rel, full.path, mb)
                if lat:
                    peer_mbs = mb / self.peer(full.path, lat)
                    best = max(
                        r["value"]
                        for r in self.rows
                        if r["row"] == 1 and f", {lat} ms," in r["case"]
                    )
                    self.row(
                        2,
                        f"cold seq, {lat} ms, ivdfs vs nbdkit+nbdfuse",
                        best,
                        peer_mbs,
                        "MB/s",
                        ">= 2",
                        best >= 2 * peer_mbs,
                    )

            # 4 and 5: one mount at 1 ms, reads logged by the stand-in.
            print("latency 1 ms, concurrent and random readers:", flush=True)
            bed.standin_log.unlink(missing_ok=True)
            env = self.env(1, VDDK_STANDIN_LOG_READS="1")
            with self.mount(bed, "readers", **env) as m:
                region = min(256, a.size_mb // 4)
                start_block = a.size_mb // 8
                procs = [
                    subprocess.Popen(
                        [
                            "dd",
                            f"if={m.mountpoint / disk_rel}",
                            "of=/dev/null",
                            "bs=1M",
                            f"skip={start_block}",
                            f"count={region}",
                        ],
                        stderr=subprocess.DEVNULL,
                    )
                    for _ in range(8)
                ]
                for p in procs:
                    p.wait()
                counts = reads_by_block(bed)
                in_region = [counts.get(b, 0) for b in range(start_block, start_block + region)]
                worst = max(in_region)
                self.row(
                    4,
                    f"8 readers of one {region} MiB region: VDDK reads per block (max)",
                    worst,
                    1,
                    "reads",
                    "== 1",
                    worst == 1 and min(in_region) == 1,
                )
                # Blocks neither the readers nor their prefetch touched: cold.
                touched = range(start_block, start_block + region + 2 * ASYNC_DEPTH)
                lat_ms = self.random_reads(m.mountpoint / disk_rel, size, skip=touched)
                p50, p99 = statistics.median(lat_ms), statistics.quantiles(lat_ms, n=100)[98]
                self.row(
                    5,
                    "random 4 KiB cold read p50 minus direct 1 MiB Read p50",
                    p50 - direct_p50,
                    direct_p50,
                    "ms",
                    "(info)",
                    True,
                )
                self.row(
                    5,
                    "random 4 KiB cold read p99 minus direct 1 MiB Read p50",
                    p99 - direct_p50,
                    direct_p50,
                    "ms",
                    "(info)",
                    True,
                )
            peak = max(rss)
            self.row(
                6,
                f"peak RSS during (1), --cache-size {CACHE}",
                peak / MiB,
                CACHE_BYTES / MiB,
                "MiB",
                "<= cache + 150 MiB",
                peak <= CACHE_BYTES + 150 * MiB,
            )

            allocated = len(sparse.allocated) * MiB
            for qab in (True, False):
                env = self.env(1) if qab else self.env(1, VDDK_STANDIN_NO_QAB="1")
                with self.mount(bed, f"sparse{qab}", **env) as m:
                    dd(m.mountpoint / "LocalDS_0" / sivd.id / ssnap / "disk.raw")
                    read = mount_stats(m.mountpoint)["read_bytes"]
                what = "with" if qab else "without"
                self.row(
                    7,
                    f"half-allocated disk {what} QueryAllocatedBlocks: bytes read / allocated",
                    read / MiB,
                    allocated / MiB,
                    "MiB",
                    "~1.0" if qab else "(info)",
                    (abs(read - allocated) <= 16 * MiB) if qab else True,
                )

    def warm_rows(self) -> None:
        """Rows 8-10 (issue 17): warm passes of a disk smaller than the cache, with and without
        the page cache, and a hot set against a scan four times the cache."""
        a = self.args
        print(f"building images ({a.warm_mb} MiB and {4 * HOT_CACHE_MB} MiB random) ...")
        src = self.work / "warm-src"
        src.mkdir()
        warm = random_disk(src / "warm.raw", a.warm_mb, seed=23)
        scan = random_disk(src / "scan.raw", 4 * HOT_CACHE_MB, seed=24)
        shm = Path(tempfile.mkdtemp(prefix="ivdfs-bench-", dir="/dev/shm"))
        try:
            copy = shm / "disk.raw"
            shutil.copyfile(warm.path, copy)
            with Vcsim() as v:
                (self.work / "warm-bed" / "images").mkdir(parents=True)
                bed = Bed(v, self.work / "warm-bed")
                disks = {}
                for name, manifest in (("warm", warm), ("scan", scan)):
                    ivd = v.create_ivd(f"bench-{name}", manifest.size // MiB, "LocalDS_0")
                    snap = v.create_snapshot(ivd, "bench")
                    place_image(bed.images, ivd, snap, manifest.path)
                    disks[name] = (ivd, Path("LocalDS_0") / ivd.id / snap / "disk.raw")
                env = {
                    "VDDK_STANDIN_LATENCY_US": "2000",
                    "VDDK_STANDIN_HANDLE_BW": str(300_000_000),
                    "VDDK_STANDIN_LOG_READS": "1",
                }
                print(f"warm passes: {a.warm_mb} MiB disk, --cache-size 256M, 2 ms, 300 MB/s:")
                for drop in (False, True):
                    with self.mount(bed, f"warm{int(drop)}", cache="256M", **env) as m:
                        self.warm_passes(m, bed, disks["warm"], warm, copy, drop)
                print(f"hot set, then a scan of {4 * HOT_CACHE_MB} MiB, --cache-size {HOT_CACHE}:")
                with self.mount(bed, "hot", cache=HOT_CACHE, **env) as m:
                    self.hot_set(m, bed, disks["warm"], disks["scan"], warm.path)
        finally:
            shutil.rmtree(shm)

    def warm_passes(
        self,
        m: Mount,
        bed: Bed,
        disk: tuple[Ivd, Path],
        manifest: DataManifest,
        tmpfs_copy: Path,
        drop: bool,
    ) -> None:
        ivd, rel = disk
        path = m.mountpoint / rel
        mb = manifest.size / 1e6
        buf = bytearray(MiB)
        read_pass(path, buf)  # pass 0: cold, from VDDK
        wait_for(lambda: mount_stats(m.mountpoint)["prefetch_queued"] == 0, 30, "read-ahead")
        log0, stats0 = len(vddk_blocks(bed, ivd.id)), mount_stats(m.mountpoint)["reads"]
        read_pass(tmpfs_copy, buf)  # the tmpfs copy's pages were written, not yet read
        ours, theirs, asked = [], [], []
        # Side by side, pass by pass: both see the same moments of the two shared cores.
        for _ in range(WARM_PASSES):
            if drop:
                drop_page_cache()  # tmpfs pages stay: they are the files themselves
            before = block_lookups(m.mountpoint)
            ours.append(mb / read_pass(path, buf))
            theirs.append(mb / read_pass(tmpfs_copy, buf))
            asked.append(block_lookups(m.mountpoint) - before)
        print(f"    MB/s ivdfs {[round(x) for x in ours]}", flush=True)
        print(f"    MB/s tmpfs {[round(x) for x in theirs]}", flush=True)
        print(f"    block lookups that reached ivdfs per pass {asked}", flush=True)
        wait_for(lambda: mount_stats(m.mountpoint)["prefetch_queued"] == 0, 30, "read-ahead")
        log_reads = len(vddk_blocks(bed, ivd.id)) - log0
        stat_reads = mount_stats(m.mountpoint)["reads"] - stats0
        lo, mid, hi = spread(ours)
        tmpfs = statistics.median(theirs)
        if not drop:
            what = f"warm passes 1-{WARM_PASSES} ({manifest.size // MiB} MiB < cache) vs tmpfs"
            self.row(8, f"{what}: slowest", lo, tmpfs, "MB/s", ">= 0.9", lo >= 0.9 * tmpfs)
            self.row(8, f"{what}: median", mid, tmpfs, "MB/s", "(info)", True)
            self.row(8, f"{what}: fastest", hi, tmpfs, "MB/s", "(info)", True)
            tlo, _, thi = spread(theirs)
            self.row(8, "tmpfs passes: slowest / fastest (the reference's own spread)",
                     tlo, thi, "MB/s", "(info)", True)  # fmt: skip
            pairs = min(o / t for o, t in zip(ours, theirs, strict=True))
            self.row(8, "warm passes: worst pass / its tmpfs neighbour",
                     pairs, 1.0, "x", "(info)", True)  # fmt: skip
            self.row(8, "warm passes: block lookups reaching ivdfs, most in one pass",
                     max(asked), manifest.size // MiB, "blocks", "(info)", True)  # fmt: skip
            n = 8
        else:
            what = f"passes 1-{WARM_PASSES} after drop_caches vs tmpfs"
            self.row(9, f"{what}: slowest", lo, tmpfs, "MB/s", "(info)", True)
            self.row(9, f"{what}: median", mid, tmpfs, "MB/s", "(info)", True)
            n = 9
        ok = log_reads == stat_reads == 0
        self.row(n, f"VDDK reads after pass 0 (stand-in log; stats: {stat_reads})",
                 log_reads, None, "reads", "== 0", ok)  # fmt: skip

    def hot_set(
        self, m: Mount, bed: Bed, hot: tuple[Ivd, Path], scan: tuple[Ivd, Path], image: Path
    ) -> None:
        ivd, rel = hot
        path = m.mountpoint / rel
        rng = random.Random(8)
        seq = [8 * MiB + i * 128 * 1024 for i in range(32)]  # blocks 8-11
        rand = [rng.randrange(40 * MiB, 42 * MiB, 4096) for _ in range(64)]  # blocks 40-41
        blocks = {8, 9, 10, 11, 40, 41}
        data = image.read_bytes()
        want = [
            hashlib.sha256(b"".join(data[o : o + 128 * 1024] for o in seq)).hexdigest(),
            hashlib.sha256(b"".join(data[o : o + 4096] for o in rand)).hexdigest(),
        ]
        for _ in range(2):  # the second round re-references the sequential part
            got = [direct_reads(path, seq, 128 * 1024), direct_reads(path, rand, 4096)]
            assert got == want, "the hot set read wrong data"
        buf = bytearray(MiB)
        read_pass(m.mountpoint / scan[1], buf)  # four times the cache, through the page cache
        wait_for(lambda: mount_stats(m.mountpoint)["prefetch_queued"] == 0, 30, "read-ahead")
        drop_page_cache()
        before = len(vddk_blocks(bed, ivd.id))
        got = [direct_reads(path, seq, 128 * 1024), direct_reads(path, rand, 4096)]
        assert got == want, "the hot set read wrong data"
        wait_for(lambda: mount_stats(m.mountpoint)["prefetch_queued"] == 0, 30, "read-ahead")
        again = blocks & set(vddk_blocks(bed, ivd.id)[before:])
        self.row(10, f"hot set blocks read again after a {4 * HOT_CACHE_MB} MiB scan",
                 len(again), len(blocks), "blocks", "== 0", not again)  # fmt: skip

    def warm(self, disk: Path, image: Path, mb: float) -> None:
        # Best of three passes on each side: one pass is at the mercy of whatever else the
        # two cores are doing at that moment, and both sides get the same treatment.
        mountpoint = disk.parents[3]
        before = block_lookups(mountpoint)
        warm = max(mb / dd(disk) for _ in range(3))
        # Pages the kernel dropped between passes (this host's DAMON reclaims idle page
        # cache) are read through ivdfs again, from its 128M cache or from VDDK: count them.
        asked = block_lookups(mountpoint) - before
        shm = Path(tempfile.mkdtemp(prefix="ivdfs-bench-", dir="/dev/shm"))
        try:
            copy = shm / "disk.raw"
            shutil.copyfile(image, copy)
            dd(copy)  # into the page cache, as the mount's copy is
            tmpfs = max(mb / dd(copy) for _ in range(3))
        finally:
            shutil.rmtree(shm)
        self.row(3, "warm re-read vs tmpfs", warm, tmpfs, "MB/s", ">= 0.9", warm >= 0.9 * tmpfs)
        self.row(3, "warm re-read: block lookups reaching ivdfs in 3 passes", asked,
                 3 * mb, "blocks", "(info)", True)  # fmt: skip

    def random_reads(self, disk: Path, size: int, skip: range) -> list[float]:
        rng = random.Random(5)
        blocks = [b for b in range(size // MiB) if b not in skip]
        rng.shuffle(blocks)
        out = []
        fd = os.open(disk, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for b in blocks[:150]:
                off = b * MiB + rng.randrange(0, MiB // 4096) * 4096
                t0 = time.perf_counter()
                os.pread(fd, 4096, off)
                out.append((time.perf_counter() - t0) * 1000)
        finally:
            os.close(fd)
        return out


def _commit() -> str:
    r = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "ivdfs"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return r.stdout.strip() + ("+uncommitted" if dirty else "")


def _ceiling(argv: list[str]) -> None:
    """In-process single-stream ceiling: 1 MiB VixDiskLib_Read calls in a loop."""
    from ivdfs.config import Secret
    from ivdfs.vddk.connection import DiskHandle, DiskTarget, ServerTarget
    from ivdfs.vddk.library import VddkLibrary
    from ivdfs.vddk.reexec import ensure_library_path

    ensure_library_path(VDDK_LIBDIR)  # VDDK's plugin loads only with lib64 on the search path
    ivd, ds, snap, count, server, user, thumb = argv
    host, _, port = server.rpartition(":")
    lib = VddkLibrary(VDDK_LIBDIR)
    lib.init()
    password = os.environ["IVDFS_PASSWORD"]
    h = DiskHandle(
        lib, ServerTarget(host, int(port), user, Secret(password), thumb), DiskTarget(ivd, ds, snap)
    )
    h.open()
    buf = bytearray(MiB)
    times = []
    t0 = time.perf_counter()
    for i in range(int(count)):
        t = time.perf_counter()
        h.read_into(i * 2048, buf)
        times.append((time.perf_counter() - t) * 1000)
    seconds = time.perf_counter() - t0
    h.close()
    lib.exit()
    print(json.dumps({"seconds": seconds, "p50_ms": statistics.median(times)}))


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'#':>2}  {'case':<66} {'ivdfs':>9} {'ref':>9} {'unit':<5} {'ratio':>6}  goal"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        mark = "" if r["goal"] == "(info)" else (" ok" if r["met"] else " MISSED")
        ref = "" if r["reference"] is None else f"{r['reference']:.1f}"
        lines.append(
            f"{r['row']:>2}  {r['case']:<66} {r['value']:>9.1f} {ref:>9} {r['unit']:<5} "
            f"{ratio:>6}  {r['goal']}{mark}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["ceiling"]:
        _ceiling(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="disk size of rows 1-3 (1024)")
    ap.add_argument("--bw", type=int, default=400, help="global bandwidth cap, MiB/s (400)")
    ap.add_argument("--latencies", default="0,1,4", help="per-read latencies, ms (0,1,4)")
    ap.add_argument("--warm-mb", type=int, default=192, help="disk size of rows 8-9 (192)")
    ap.add_argument("--only",
                    choices=["warm", "read", "inventory", "forensics", "volumes", "lifetime",
                             "direct"],
                    help="warm: rows 8-10 only; read: rows 1-10; inventory: the inventory "
                    "table only; forensics: the cost of --hashes and --audit-log "
                    "(tests/bench_forensics.py); volumes: kernel vs fuse vs guestfs "
                    "(tests/bench_volumes.py); lifetime: opens, access and throughput with "
                    "more busy disks than connections, against the policy before issue 28 "
                    "(tests/bench_lifetime.py); direct: --datastore-path against the network "
                    "path and a plain VixDiskLib_Read loop (tests/bench_direct.py; default: "
                    "everything)")  # fmt: skip
    ap.add_argument("--lifetime-seconds", type=float, default=180.0,
                    help="load per policy of the lifetime table (180)")  # fmt: skip
    ap.add_argument("--inventory-n", default="500,2000,5000", help="inventory sizes")
    ap.add_argument("--inventory-ms", default="0,20,50", help="inventory round trips, ms")
    ap.add_argument("--out", type=Path, default=Path("bench-results.json"), help="JSON output")
    args = ap.parse_args(argv)
    args.latencies = [float(x) if "." in x else int(x) for x in args.latencies.split(",")]
    t0 = time.monotonic()
    if args.only == "inventory":
        return _inventory(args)
    if args.only == "forensics":
        return bench_forensics.main(["--size-mb", "512", "--bw", str(args.bw)])
    if args.only == "volumes":
        return bench_volumes.main(["--bw", str(args.bw)])
    if args.only == "lifetime":
        return _lifetime(args)
    if args.only == "direct":
        return bench_direct.main(["--out", str(args.out.with_name(args.out.stem + "-direct.json"))])
    with tempfile.TemporaryDirectory(prefix="ivdfs-bench-", dir="/var/tmp") as tmp:
        result = Bench(args, Path(tmp)).run()
    if args.only is None:
        result["inventory"] = _inventory_rows(args)
    result["seconds"] = round(time.monotonic() - t0, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["settings"]
    rows_1_7 = (
        ""
        if s["only"] == "warm"
        else f"rows 1-7: {s['size_mb']} MiB disk, bandwidth cap {s['bw_mib_s']} MiB/s, "
        f"cache {s['cache']}; "
    )
    print(
        f"\nivdfs read-path benchmark, commit {result['commit']}: {rows_1_7}rows 8-9: "
        f"{s['warm_mb']} MiB disk, cache 256M; row 10: cache {HOT_CACHE}; {result['seconds']} s"
    )
    print(format_table(result["rows"]))
    if "inventory" in result:
        print("\ninventory (issue 11), ratios to the serial cost IVDs x round trip:")
        print(bench_inventory.table(result["inventory"]))
    print(f"\nJSON: {args.out}")
    if args.only is None:
        bench_forensics.main(["--size-mb", "512", "--bw", str(args.bw)])
        bench_volumes.main(["--bw", str(args.bw)])
        _lifetime(args)
        bench_direct.main(["--out", str(args.out.with_name(args.out.stem + "-direct.json"))])
    return 0


def _lifetime(args: argparse.Namespace) -> int:
    result = bench_lifetime.compare(args.lifetime_seconds)
    out = args.out.with_name(args.out.stem + "-lifetime" + args.out.suffix)
    out.write_text(json.dumps({"commit": _commit(), "lifetime": result}, indent=2) + "\n")
    print(f"\nconnection cap and access (issue 28), commit {_commit()}: {result['load']}")
    print(bench_lifetime.table(result))
    print(f"\nJSON: {out}")
    return 0


def _inventory_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [int(x) for x in args.inventory_n.split(",")]
    delays = [int(x) for x in args.inventory_ms.split(",")]
    with tempfile.TemporaryDirectory(prefix="ivdfs-bench-inv-", dir="/var/tmp") as tmp:
        return bench_inventory.run(Path(tmp), sizes, delays)


def _inventory(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    rows = _inventory_rows(args)
    args.out.write_text(json.dumps({"commit": _commit(), "inventory": rows}, indent=2) + "\n")
    took = time.monotonic() - t0
    print(f"\nivdfs inventory benchmark, commit {_commit()}, {took:.0f} s; ratios to the "
          "serial cost IVDs x round trip:")  # fmt: skip
    print(bench_inventory.table(rows))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
