"""Side-by-side benchmark of the guest-volume modes (issue 27): kernel vs fuse vs guestfs.

One disk (an ext4 spanning it, `--files` small files of 1-8 KiB in directories of 100, built
by tests.testbed.images.small_files_disk) served as one snapshot; for each mode, in one run,
alternating, `--repeat` times (medians):

1. time to first file: a fresh `ivdfs mount --volumes MODE` until it is mounted, then `ls` of
   ``volumes/0`` and a read of one file (for guestfs this includes the appliance's boot);
2. a second first file on the same mount, once started: what a later visit costs;
3. `rsync -a` of the whole volume to local disk (every file compared with the manifest after);
4. the same rsync once more (the appliance's and the kernel's caches warm).
Ratios are to the kernel mode. The stand-in VDDK serves at `--bw` MiB/s with 1 ms per read.
Usage: `scripts/bench --only volumes`, or `.venv/bin/python -m tests.bench_volumes [--files
2000] [--repeat 1]`. Root, the test bed and libguestfs (scripts/setup). Not a test: about two
minutes per repeat under TCG; it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.mounting import Bed, Mount, sha256_file
from tests.testbed.images import DiskManifest, small_files_disk
from tests.testbed.vsphere import Vcsim, place_image

MODES = ("kernel", "fuse", "guestfs")


def rsync(src: Path, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(["rsync", "-a", f"{src}/", f"{dest}/"], check=True)
    return time.perf_counter() - t0


def verify(dest: Path, manifest: DiskManifest) -> None:
    assert manifest.whole_disk is not None
    for rel, digest in manifest.whole_disk.files.items():
        if sha256_file(dest / rel) != digest:
            raise AssertionError(f"{rel} differs after rsync")


def one_pass(bed: Bed, work: Path, vols: str, mode: str, manifest: DiskManifest,
             env: dict[str, str]) -> dict[str, float]:  # fmt: skip
    mp = work / f"mnt-{mode}"
    mp.mkdir(exist_ok=True)
    first = sorted(manifest.whole_disk.files)[0] if manifest.whole_disk else ""
    t0 = time.perf_counter()
    m = Mount(bed, mp, "--volumes", mode, **env)
    try:
        t_mounted = time.perf_counter() - t0
        vol = mp / vols / "0"
        assert os.listdir(vol)
        (vol / first).read_bytes()
        t_first = time.perf_counter() - t0
        t1 = time.perf_counter()
        other = sorted(manifest.whole_disk.files)[-1] if manifest.whole_disk else ""
        assert os.listdir(mp / vols) and (vol / other).read_bytes() is not None
        t_again = time.perf_counter() - t1
        dest = work / f"copy-{mode}"
        cold = rsync(vol, dest)
        verify(dest, manifest)
        warm = rsync(vol, dest)
        shutil.rmtree(dest)
        rc = m.unmount("ivdfs")
        if rc != 0:
            raise RuntimeError(f"{mode}: unmount exited {rc}: {m.log()[-2000:]}")
    finally:
        if m.proc.poll() is None:
            m.unmount("SIGTERM")
    return {"mounted": t_mounted, "first_file": t_first, "again": t_again, "rsync": cold,
            "rsync_warm": warm}  # fmt: skip


def run(work: Path, files: int, repeat: int, bw: int) -> dict[str, Any]:
    with Vcsim() as vcsim:
        root = work / "bed"
        (root / "images").mkdir(parents=True)
        bed = Bed(vcsim, root)
        manifest = small_files_disk(root / "small.img", files)
        ivd = vcsim.create_ivd("bench-volumes", manifest.size >> 20, "LocalDS_0")
        snap = vcsim.create_snapshot(ivd, "bench")
        place_image(bed.images, ivd, snap, manifest.path)
        vols = f"{ivd.datastore_name}/{ivd.id}/{snap}/volumes"
        env = {"VDDK_STANDIN_LATENCY_US": "1000", "VDDK_STANDIN_GLOBAL_BW": str(bw << 20),
               "VDDK_STANDIN_LOG_READS": "0"}  # fmt: skip
        samples: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for i in range(repeat):
            for mode in MODES:
                r = one_pass(bed, work, vols, mode, manifest, env)
                samples[mode].append(r)
                print(f"  pass {i + 1} {mode}: " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                                           r.items()), flush=True)  # fmt: skip
    medians = {
        mode: {k: statistics.median(s[k] for s in samples[mode]) for k in samples[mode][0]}
        for mode in MODES
    }
    return {"files": files, "repeat": repeat, "bw_mib_s": bw, "medians": medians}


def table(result: dict[str, Any]) -> str:
    med = result["medians"]
    cases = [("first_file", "mount, then ls volumes/0 and read a file"),
             ("again", "ls and read once started"),
             ("rsync", f"rsync -a of {result['files']} small files (cold)"),
             ("rsync_warm", "the same rsync again")]  # fmt: skip
    head = f"{'case':<44} " + " ".join(f"{m:>9}" for m in MODES) + "   fuse/k  guestfs/k"
    lines = [head, "-" * len(head)]
    for key, label in cases:
        k = med["kernel"][key]
        vals = " ".join(f"{med[m][key]:>8.2f}s" for m in MODES)
        ratios = "  ".join(f"{med[m][key] / k:>7.1f}" if k else "      -" for m in MODES[1:])
        lines.append(f"{label:<44} {vals}   {ratios}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_volumes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000, help="small files on the volume (2000)")
    ap.add_argument("--repeat", type=int, default=1, help="passes per mode (1)")
    ap.add_argument("--bw", type=int, default=400, help="stand-in bandwidth, MiB/s (400)")
    ap.add_argument("--out", type=Path, default=Path("bench-volumes.json"), help="JSON output")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ivdfs-bench-vol-", dir="/var/tmp") as tmp:
        result = run(Path(tmp), args.files, args.repeat, args.bw)
    result["seconds"] = round(time.monotonic() - t0, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nguest volumes (issue 27): kernel vs fuse vs guestfs, medians of {args.repeat}, "
          f"{result['seconds']} s")  # fmt: skip
    print(table(result))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
