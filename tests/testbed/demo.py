"""The demo: a private vcsim with sample IVDs and snapshots, mounted with `ivdfs mount`.

Run through scripts/demo. The images hold real partition tables and filesystems (built by
tests/testbed/images.py); the stand-in VDDK serves them. The mount is made exactly as a user
makes one (detached `ivdfs mount` with a password file), then the tree is printed and every
disk.raw is checked against its source image.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.mounting import REPO, VDDK_LIBDIR, fuse_mounts, mounted_at, sha256_file, wait_for
from tests.testbed import images
from tests.testbed.vsphere import Vcsim, place_image

MiB = 1024 * 1024


def print_tree(root: Path, depth: int = 4) -> None:
    def walk(p: Path, prefix: str, level: int) -> None:
        entries = sorted(os.scandir(p), key=lambda e: e.name)
        for i, e in enumerate(entries):
            last = i == len(entries) - 1
            info = ""
            if e.is_file(follow_symlinks=False):
                info = f"  ({e.stat().st_size // MiB} MiB)" if e.name.endswith(".raw") else ""
            elif e.is_symlink():
                info = f" -> {os.readlink(e.path)}"
            print(f"{prefix}{'└── ' if last else '├── '}{e.name}{info}")
            if e.is_dir(follow_symlinks=False) and level < depth and e.name != ".ivdfs":
                walk(Path(e.path), prefix + ("    " if last else "│   "), level + 1)

    print(root)
    walk(root, "", 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mountpoint", type=Path, default=Path("/tmp/ivdfs-demo/mnt"))
    ap.add_argument(
        "--keep",
        action="store_true",
        help="stay mounted until Enter is pressed (default on a terminal)",
    )
    ap.add_argument("--no-wait", action="store_true", help="unmount as soon as it is shown")
    args = ap.parse_args()
    wait = (args.keep or sys.stdin.isatty()) and not args.no_wait
    mp: Path = args.mountpoint.absolute()
    if mounted_at(mp):
        subprocess.run(["fusermount3", "-u", str(mp)], check=False)
    mp.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ivdfs-demo-"))
    imgdir, srcdir = work / "images", work / "src"
    imgdir.mkdir()
    srcdir.mkdir()
    log = work / "standin.log"
    t0 = time.monotonic()
    with Vcsim() as v:
        print(f"vcsim (govmomi vSphere simulator) listening at {v.url}")
        samples = [
            ("web-data", 64, "LocalDS_0", ["gpt", "gpt"]),
            ("db-logs", 64, "LocalDS_1", ["mbr"]),
            ("scratch", 32, "LocalDS_0", []),
        ]
        sources: list[tuple[str, Path, str]] = []
        for name, size, ds, kinds in samples:
            ivd = v.create_ivd(name, size, ds)
            for n, kind in enumerate(kinds, 1):
                snap = v.create_snapshot(ivd, f"{name} backup {n}")
                src = srcdir / f"{name}-{n}.raw"
                if kind == "gpt":
                    images.gpt_disk(src, size)
                else:
                    images.mbr_disk(src, size)
                place_image(imgdir, ivd, snap, src)
                sources.append((f"{ds}/{ivd.id}/{snap}/disk.raw", src, name))
            print(f"created IVD {name!r} ({size} MiB) on {ds} with {len(kinds)} snapshot(s)")

        pwfile = work / "password"
        pwfile.write_text(v.password + "\n")
        pwfile.chmod(0o600)
        env = {k: val for k, val in os.environ.items() if not k.startswith("VDDK_")}
        env.update(
            VDDK_STANDIN_IMAGES=str(imgdir),
            VDDK_STANDIN_LOG=str(log),
            VDDK_STANDIN_LOG_READS="0",
            VDDK_STANDIN_LATENCY_US="200",
            PYTHONPATH=str(REPO),
        )
        cmd = [
            sys.executable,
            "-m",
            "ivdfs",
            "mount",
            "--server",
            v.server,
            "--user",
            v.user,
            "--password-file",
            str(pwfile),
            "--ca-file",
            str(v.ca_file),
            "--vddk-libdir",
            str(VDDK_LIBDIR),
            "--log",
            str(work / "ivdfs.log"),
            "--debug",
            str(mp),
        ]
        print(
            "\n$ ivdfs mount --server",
            v.server,
            "--user",
            v.user,
            "--password-file",
            pwfile,
            "--ca-file",
            v.ca_file,
            "--vddk-libdir",
            VDDK_LIBDIR,
            mp,
        )
        r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            print(f"demo: ivdfs mount failed with exit code {r.returncode}", file=sys.stderr)
            return r.returncode
        try:
            print()
            print_tree(mp)
            print("\nverifying every disk.raw against its source image:")
            total = 0
            for rel, src, name in sources:
                got, want = sha256_file(mp / rel), sha256_file(src)
                total += src.stat().st_size
                status = "OK" if got == want else "MISMATCH"
                print(f"  {status}  {name:9s} sha256 {got[:16]}…  {rel[:60]}…")
                if got != want:
                    return 1
            if wait:
                input(
                    f"\nMounted at {mp}. Explore it in another shell; press Enter to "
                    "unmount and stop the simulator. "
                )
            else:
                print(f"\nMounted at {mp}; unmounting now (run scripts/demo --keep to explore it)")
        finally:
            print(f"\n$ ivdfs umount {mp}")
            # Returns once the daemon has finished: handles closed, EndAccess called.
            r = subprocess.run([sys.executable, "-m", "ivdfs", "umount", str(mp)], env=env)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
            wait_for(lambda: str(mp) not in fuse_mounts(), what="unmount")
            wait_for(lambda: log.exists() and " Exit " in log.read_text(), what="ivdfs exit")
    summary = next(ln for ln in log.read_text().splitlines() if " Exit " in ln)
    fields = dict(p.split("=", 1) for p in summary.split() if "=" in p)
    reads, nbytes = int(fields.get("reads", 0)), int(fields.get("read_bytes", 0))
    print(
        f"\ndemo figures: {len(samples)} IVDs, {len(sources)} snapshots, "
        f"{total // MiB} MiB verified byte for byte; {reads} VDDK reads of "
        f"{nbytes // max(reads, 1) // 1024} KiB on average ({nbytes} bytes: the rest is "
        f"unallocated and was answered with zeros without a read); "
        f"{time.monotonic() - t0:.1f} s in all"
    )
    print(f"logs: {work}/ivdfs.log (ivdfs), {log} (stand-in VDDK call log)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
