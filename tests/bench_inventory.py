"""Inventory benchmark (issue 11): thousands of IVDs behind a vCenter with a real round trip.

For N IVDs (half with snapshots; spread over three datastores) and a delay per inventory query
(the test-bed vCenter adds it to every IVD query, not to login or tasks), one mount per case:

- `ivdfs ls DATASTORE` (a table of one datastore's IVDs with snapshot counts and attached VMs),
- `ls by-name/` through the mount (every IVD's name),
- listing every IVD's snapshot directory, one after another, as `ls DS/*` does,
- the mount's RSS afterwards,

each beside the serial cost (IVDs involved x round trip: what one query per IVD, one after
another, would take) as a ratio; the goal is under 10 % at 20 ms and RSS under 150 MiB. VSLM
rows use a vCenter 7.0.2 with the VSLM endpoint; "vim" rows one without it (per-IVD calls on
the session's pool).

Usage: scripts/bench --only inventory [--inventory-n 500,2000,5000] [--inventory-ms 0,20,50].
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.mounting import IVDFS, Bed, Mount
from tests.testbed.vsphere import Vcsim, bulk_specs

GOAL_RATIO = 0.10
GOAL_RSS_MIB = 150


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def one_case(tmp: Path, n: int, delay_ms: int, vslm: bool) -> dict[str, Any]:
    root = tmp / f"inv-{n}-{delay_ms}-{'vslm' if vslm else 'vim'}"
    (root / "images").mkdir(parents=True)
    kw: dict[str, Any] = {"vslm": True, "api_version": "7.0.2.0"} if vslm else {}
    with Vcsim(populate=bulk_specs(n), inventory_delay_ms=delay_ms, **kw) as v:
        bed = Bed(v, root)
        ds = "LocalDS_0"
        on_ds = sum(1 for p in v.populated if p.ivd.datastore_name == ds)
        t = time.monotonic()
        r = subprocess.run(
            [*IVDFS, "ls", ds, "--server", v.server, "--user", v.user, "--ca-file",
             str(v.ca_file)],
            env=bed.env(), capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        t_ls = time.monotonic() - t
        assert r.returncode == 0 and len(r.stdout.splitlines()) == on_ds + 1, r.stderr
        with Mount(bed, root / "mnt") as m:
            mp = m.mountpoint
            t = time.monotonic()
            names = os.listdir(mp / "by-name")
            t_names = time.monotonic() - t
            assert len(names) == n
            t = time.monotonic()
            dirs = 0
            for d in ("LocalDS_0", "LocalDS_1", "LocalDS_2"):
                for ivd in sorted(os.listdir(mp / d)):
                    os.listdir(mp / d / ivd)
                    dirs += 1
            t_dirs = time.monotonic() - t
            assert dirs == n
            rss = rss_mib(m.proc.pid)
            assert m.unmount() == 0
    rtt = delay_ms / 1000
    return {
        "n": n,
        "ms": delay_ms,
        "api": "vslm" if vslm else "vim",
        "ls_s": t_ls,
        "ls_serial_s": on_ds * rtt,
        "by_name_s": t_names,
        "dirs_s": t_dirs,
        "serial_s": n * rtt,
        "rss_mib": rss,
    }


def ratio(value: float, serial: float) -> str:
    return f"{value / serial:.1%}" if serial else "-"


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'N':>5} {'ms':>3} {'api':>4} | {'ls DS':>7} {'serial':>7} {'ratio':>6} | "
            f"{'by-name':>7} {'ratio':>6} | {'all dirs':>8} {'ratio':>6} | {'serial':>7} | "
            f"{'RSS':>5}")  # fmt: skip
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['n']:>5} {r['ms']:>3} {r['api']:>4} | {r['ls_s']:>6.2f}s "
            f"{r['ls_serial_s']:>6.1f}s {ratio(r['ls_s'], r['ls_serial_s']):>6} | "
            f"{r['by_name_s']:>6.2f}s {ratio(r['by_name_s'], r['serial_s']):>6} | "
            f"{r['dirs_s']:>7.2f}s {ratio(r['dirs_s'], r['serial_s']):>6} | "
            f"{r['serial_s']:>6.1f}s | {r['rss_mib']:>3}Mi"
        )
    return "\n".join(out)


def run(tmp: Path, sizes: list[int], delays: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        for ms in delays:
            rows.append(one_case(tmp, n, ms, vslm=True))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    # Without VSLM, per-IVD calls on the pool: the middle size at 20 ms.
    mid = sizes[len(sizes) // 2]
    rows.append(one_case(tmp, mid, 20, vslm=False))
    print(table(rows[-1:]).splitlines()[-1], flush=True)
    return rows
