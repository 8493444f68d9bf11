"""Side-by-side benchmark of direct datastore access (issue 24, item 7).

One IVD with three snapshots whose VMDK chain (a thin flat base and two sparse children, each
changing about 5% of the disk, as tests/testbed/vmdk.py writes ESXi's files) lies in a
datastore folder that is bind-mounted read-only, and the same bytes as the stand-in's raw
image for the network path. The newest snapshot (three links) is read whole, with dd bs=1M, in
a fresh mount each time, alternating the cases `--repeat` times (medians):

1. the ceiling: a plain loop of 1 MiB VixDiskLib_Read over the chain in local-file mode, one
   stream, in its own process (what VDDK alone gives);
2. direct: ``ivdfs mount --datastore-path LocalDS_0=DIR``;
3. network at 1 ms and at 0 ms per request: the same mount without it, against the stand-in
   modelling NFC: per-session bandwidth `--nfc-mbps` (default 150 MB/s, the top of the
   published single-stream figures of 15 to 150 MB/s), 8 MiB of requests in flight per session
   and 48 MiB per host (VDDK_STANDIN_NFC_SESSION_BYTES, _HOST_BYTES).

Every file is dropped from the page cache before each case (posix_fadvise on those files
only), so every case reads from this machine's disk, which stands for the datastore's storage:
the ceiling is what that storage gives one VDDK stream, and the direct path's ratio to it is
what ivdfs loses on the way. Beside each figure: CPU seconds per GiB of the
process that read (the ivdfs mount, all its threads; for the ceiling, the loop). Goals: direct
at least 3x the network path at 1 ms, and at least 0.8x the ceiling.

Usage: `scripts/bench --only direct`, or `.venv/bin/python -m tests.bench_direct [--size-mb
1024] [--nfc-mbps 150] [--repeat 3] [--out FILE]`. Root (bind mounts, FUSE) and the test bed.
Not a test: about two minutes; it reports and marks each goal met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.mounting import REPO, VDDK_LIBDIR, Bed, Mount, read_only_view
from tests.testbed.images import random_disk
from tests.testbed.vsphere import Ivd, Vcsim, place_chain, place_image

MiB = 1 << 20
GiB = 1 << 30
GRAIN = 64 * 1024
DATASTORE = "LocalDS_0"
CACHE = "256M"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def evict(*paths: Path) -> None:
    """Drop these files (only) from the page cache: each case reads them from the disk, which
    stands for the datastore's storage."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dd(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def successors(base: Path, folder: Path, count: int, seed: int) -> list[Path]:
    """`count` images after `base`, each rewriting about 5% of the grains of the one before."""
    rng = random.Random(seed)
    size = base.stat().st_size
    out = [base]
    for k in range(count):
        dest = folder / f"image{k + 1}.raw"
        subprocess.run(["cp", "--sparse=always", str(out[-1]), str(dest)], check=True)
        with open(dest, "r+b") as f:
            for g in rng.sample(range(size // GRAIN), size // GRAIN // 20):
                os.pwrite(f.fileno(), rng.randbytes(GRAIN), g * GRAIN)
        out.append(dest)
    return out


class DirectBench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.samples: dict[str, list[tuple[float, float]]] = {}  # case -> (MB/s, CPU s/GiB)

    def sample(self, case: str, seconds: float, cpu: float, size: int) -> None:
        mbs, per_gib = size / seconds / 1e6, cpu / (size / GiB)
        self.samples.setdefault(case, []).append((mbs, per_gib))
        print(f"  {case}: {mbs:.0f} MB/s, {per_gib:.2f} CPU s/GiB", flush=True)

    def ceiling(self, top: Path, size: int) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.bench_direct", "ceiling", str(top), str(size // MiB)],
            env={**os.environ, "LD_LIBRARY_PATH": str(VDDK_LIBDIR / "lib64"),
                 "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, check=True, cwd=REPO,
        )  # fmt: skip
        r = json.loads(proc.stdout.splitlines()[-1])
        self.sample("ceiling", r["seconds"], r["cpu"], size)

    def mounted(self, case: str, bed: Bed, rel: Path, size: int, *extra: str, **env: str) -> None:
        mp = self.work / "mnt"
        m = Mount(bed, mp, "--cache-size", CACHE, *extra, VDDK_STANDIN_LOG_READS="0", **env)
        try:
            c0 = cpu_seconds(m.proc.pid)
            seconds = dd(mp / rel)
            cpu = cpu_seconds(m.proc.pid) - c0
        finally:
            rc = m.unmount()
        if rc != 0:
            raise RuntimeError(f"{case}: unmount exited {rc}: {m.log()[-2000:]}")
        self.sample(case, seconds, cpu, size)

    def network_env(self, latency_ms: float) -> dict[str, str]:
        return {
            "VDDK_STANDIN_TRANSPORT": "nbdssl",
            "VDDK_STANDIN_LATENCY_US": str(int(latency_ms * 1000)),
            "VDDK_STANDIN_HANDLE_BW": str(int(self.args.nfc_mbps * 1e6)),
            "VDDK_STANDIN_NFC_SESSION_BYTES": str(8 * MiB),
            "VDDK_STANDIN_NFC_HOST_BYTES": str(48 * MiB),
        }

    def run(self) -> dict[str, Any]:
        a = self.args
        size = a.size_mb * MiB
        src = self.work / "src"
        src.mkdir()
        print(f"building a {a.size_mb} MiB chain of three links ...", flush=True)
        images = successors(random_disk(src / "image0.raw", a.size_mb, seed=24).path, src, 2, 24)
        ds = self.work / "datastore"
        with Vcsim(datastores=1) as v:
            (self.work / "bed" / "images").mkdir(parents=True)
            bed = Bed(v, self.work / "bed")
            ivd: Ivd = v.create_ivd("bench-direct", a.size_mb, DATASTORE)
            snaps = [v.create_snapshot(ivd, f"s{k}") for k in range(len(images))]
            links = place_chain(v, ivd, ds, images, layout="flat")
            place_image(bed.images, ivd, snaps[-1], images[-1])
            top = links[len(images) - 1].descriptor
            rel = Path(DATASTORE) / ivd.id / snaps[-1] / "disk.raw"
            files = [p for link in links for p in (link.descriptor, *link.extents)]
            with read_only_view(ds, self.work / "ds-ro") as ro:
                ro_top = ro / top.relative_to(ds)
                direct = ("--datastore-path", f"{DATASTORE}={ro}")
                for r in range(a.repeat):
                    print(f"pass {r + 1} of {a.repeat}", flush=True)
                    evict(*files)
                    self.ceiling(ro_top, size)
                    evict(*files)
                    self.mounted("direct", bed, rel, size, *direct)
                    for ms in (1, 0):
                        evict(bed.images / ivd.id / f"{snaps[-1]}.raw")
                        self.mounted(f"network {ms} ms", bed, rel, size, **self.network_env(ms))
        return self.report()

    def report(self) -> dict[str, Any]:
        med = {
            case: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
            for case, v in self.samples.items()
        }
        d = med["direct"][0]
        rows = [
            {"case": "ceiling: VixDiskLib_Read loop, local file", "mbs": med["ceiling"][0],
             "cpu_s_per_gib": med["ceiling"][1], "ratio": None, "goal": "(reference)", "met": None},
            {"case": "direct (--datastore-path)", "mbs": d, "cpu_s_per_gib": med["direct"][1],
             "ratio": d / med["ceiling"][0], "goal": ">= 0.8x the ceiling",
             "met": d >= 0.8 * med["ceiling"][0]},
        ]  # fmt: skip
        for ms in (1, 0):
            n = med[f"network {ms} ms"]
            goal = ">= 3x: direct / network" if ms == 1 else "(info): direct / network"
            rows.append({"case": f"network, {ms} ms a request, NFC modelled", "mbs": n[0],
                         "cpu_s_per_gib": n[1], "ratio": d / n[0], "goal": goal,
                         "met": d >= 3 * n[0] if ms == 1 else None})  # fmt: skip
        return {
            "settings": {"size_mb": self.args.size_mb, "nfc_mbps": self.args.nfc_mbps,
                         "repeat": self.args.repeat, "cache": CACHE,
                         "nfc_session_bytes": 8 * MiB, "nfc_host_bytes": 48 * MiB},
            "rows": rows,
            "samples": self.samples,
        }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    head = f"{'case':<46} {'MB/s':>8} {'CPU s/GiB':>10} {'ratio':>6}  goal"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        mark = "" if r["met"] is None else (" ok" if r["met"] else " MISSED")
        lines.append(f"{r['case']:<46} {r['mbs']:>8.0f} {r['cpu_s_per_gib']:>10.2f} {ratio:>6}  "
                     f"{r['goal']}{mark}")  # fmt: skip
    return "\n".join(lines)


def _ceiling(path: str, count_mib: int) -> None:
    """In this process: InitEx, a local-file connection, Open read-only, `count_mib` 1 MiB
    VixDiskLib_Read calls in a loop; prints seconds and CPU seconds as JSON."""
    import cffi

    from ivdfs.vddk import _cdefs

    ffi = cffi.FFI()
    ffi.cdef(_cdefs.CDEFS)
    lib: Any = ffi.dlopen(str(VDDK_LIBDIR / "lib64" / "libvixDiskLib.so.8"))
    assert lib.VixDiskLib_InitEx(8, 0, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL) == 0
    params = lib.VixDiskLib_AllocateConnectParams()
    conn = ffi.new("VixDiskLibConnection *")
    assert lib.VixDiskLib_ConnectEx(params, b"\x01", ffi.NULL, ffi.NULL, conn) == 0
    handle = ffi.new("VixDiskLibHandle *")
    assert lib.VixDiskLib_Open(conn[0], path.encode(), 4, handle) == 0
    buf = ffi.new("uint8_t[]", MiB)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for i in range(count_mib):
        err = lib.VixDiskLib_Read(handle[0], i * 2048, 2048, buf)
        if err:
            raise RuntimeError(f"VixDiskLib_Read: {err}")
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    lib.VixDiskLib_Close(handle[0])
    lib.VixDiskLib_Disconnect(conn[0])
    lib.VixDiskLib_FreeConnectParams(params)
    lib.VixDiskLib_Exit()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"seconds": seconds, "cpu": cpu}))


def main(argv: list[str]) -> int:
    if argv[:1] == ["ceiling"]:
        _ceiling(argv[1], int(argv[2]))
        return 0
    ap = argparse.ArgumentParser(prog="bench_direct", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="disk size (1024)")
    ap.add_argument("--nfc-mbps", type=float, default=150.0,
                    help="NFC bandwidth per session, MB/s (150)")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=3, help="passes over the cases (3)")
    ap.add_argument("--out", type=Path, default=Path("bench-direct.json"), help="JSON output")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ivdfs-bench-direct-", dir="/var/tmp") as tmp:
        result = DirectBench(args, Path(tmp)).run()
    result["seconds"] = round(time.monotonic() - t0, 1)
    from tests.bench import _commit

    result["commit"] = _commit()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["settings"]
    print(f"\ndirect datastore access (issue 24), commit {result['commit']}: {s['size_mb']} MiB, "
          f"three links, NFC {s['nfc_mbps']:.0f} MB/s a session, 8 MiB a session, 48 MiB a "
          f"host; medians of {s['repeat']}; {result['seconds']} s")  # fmt: skip
    print(table(result))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
