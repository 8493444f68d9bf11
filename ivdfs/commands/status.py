"""`ivdfs status` (live and dead mounts and what each holds) and `ivdfs refresh`.

Main thread only; reads journals, the kernel's tables and a live mount's statistics file.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from ivdfs import journal
from ivdfs.commands import recover
from ivdfs.commands.common import table
from ivdfs.errors import BackendError, ExitCode, MountpointError, UsageError
from ivdfs.tree.tree import REFRESH_XATTR

STATS_FILE = ".ivdfs/stats"


def describe(rec: journal.Record) -> dict[str, Any]:
    left = recover.leftovers(rec)
    alive = rec.alive
    doc: dict[str, Any] = {
        "mountpoint": str(rec.mountpoint),
        "pid": rec.pid,
        "state": rec.doc.get("state") if alive else "dead",
        "server": rec.doc.get("server"),
        "user": rec.doc.get("user"),
        "started": rec.doc.get("started"),
        "log": rec.doc.get("log"),
        "snapshots": [s.get("snapshot") or "(being created)" for s in rec.snapshots],
        "prepared_ivds": [p["ivd"] for p in rec.prepared],
        "loop_devices": left.loops,
        "volume_mounts": left.volume_mounts,
        "vixmntapi_mounts": left.vixmntapi,
        "appliances": recover.appliance_processes(rec),
    }
    if alive:
        try:
            stats = json.loads((rec.mountpoint / STATS_FILE).read_text())
            doc["open_disks"] = stats["disks"]["open_disks"]
            doc["connections"] = stats["disks"]["connections"]
            if "volumes" in stats:
                doc["volumes"] = stats["volumes"]
        except (OSError, ValueError, KeyError):
            pass
    return doc


def status(mountpoint: Path | None, as_json: bool) -> int:
    if mountpoint is not None:
        rec = journal.find(Path(os.path.abspath(mountpoint.expanduser())))
        if rec is None:
            raise MountpointError(f"{mountpoint} is not an ivdfs mount")
        records = [rec]
    else:
        records = list(journal.every())
    docs = [describe(r) for r in records]
    if as_json:
        print(json.dumps(docs, indent=2))
        return ExitCode.OK
    if not docs:
        print("no ivdfs mounts")
        return ExitCode.OK
    rows = [
        [
            d["mountpoint"],
            str(d["pid"]),
            d["state"],
            d["server"] or "",
            str(len(d["prepared_ivds"])),
            str(len(d["snapshots"])),
            str(len(d["loop_devices"])),
            str(len(d["volume_mounts"])),
            str(len(rec.appliances)),
        ]
        for rec, d in zip(records, docs, strict=True)
    ]
    headers = ["MOUNTPOINT", "PID", "STATE", "SERVER", "PREPARED", "SNAPSHOTS", "LOOPS", "VOLUMES",
               "APPLIANCES"]  # fmt: skip
    print(table(headers, rows))
    for rec, d in zip(records, docs, strict=True):
        if d["state"] == "dead":
            print(f"dead mount: run `{rec.umount_advice()}` to undo what it holds")
    return ExitCode.OK


def refresh(path: Path) -> int:
    """Ask the mount serving `path` to list that directory again from vCenter now."""
    try:
        os.getxattr(path, REFRESH_XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise UsageError(f"{path} is not a directory of an ivdfs mount") from None
        if e.errno == errno.ENOTDIR:
            raise UsageError(f"{path} is not a directory") from None
        raise BackendError(f"refreshing {path}: {e.strerror}") from None
    print(f"refreshed {path}")
    return ExitCode.OK
