"""Metadata of IVDs and snapshots as info.json documents and `user.ivdfs.*` attributes.

Pure functions over the inventory records; no I/O; safe from any thread. Both views carry the
same fields so scripts can use whichever is handier.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ivdfs.inventory.model import Ivd, Snapshot

XATTR_PREFIX = "user.ivdfs."


def _time(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def ivd_fields(ivd: Ivd) -> dict[str, Any]:
    return {
        "name": ivd.name,
        "uuid": ivd.id,
        "capacity_bytes": ivd.capacity_bytes,
        "datastore": ivd.datastore.name,
        "datastore_moref": ivd.datastore.moref,
        "backing_file": ivd.backing_path,
        "provisioning": ivd.provisioning,
        "create_time": _time(ivd.create_time),
        "attached_vms": list(ivd.consumers),
    }


def snapshot_fields(snap: Snapshot) -> dict[str, Any]:
    return {
        "id": snap.id,
        "create_time": _time(snap.create_time),
        "description": snap.description,
    }


def _dump(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def ivd_json(ivd: Ivd, snapshots: Sequence[Snapshot]) -> bytes:
    return _dump({**ivd_fields(ivd), "snapshots": [snapshot_fields(s) for s in snapshots]})


def snapshot_json(ivd: Ivd, snap: Snapshot, capacity: int | None) -> bytes:
    """`capacity`: the snapshot's own size in bytes (what disk.raw has), None while unknown;
    the IVD's current size as vCenter reports it stays in `ivd.capacity_bytes`."""
    return _dump(
        {"ivd": ivd_fields(ivd), "snapshot": {**snapshot_fields(snap), "capacity_bytes": capacity}}
    )


def disk_xattrs(ivd: Ivd, snap: Snapshot, capacity: int | None) -> dict[str, bytes]:
    """user.ivdfs.<field> -> UTF-8 value; lists are comma-separated, missing times empty.
    `capacity_bytes` is the snapshot's own size (what the file has), `ivd_capacity_bytes`
    the IVD's current size as vCenter reports it."""
    fields = dict(ivd_fields(ivd))
    fields["ivd_capacity_bytes"] = fields["capacity_bytes"]
    fields["capacity_bytes"] = capacity
    for key, value in snapshot_fields(snap).items():
        fields[f"snapshot_{key}"] = value
    out: dict[str, bytes] = {}
    for key, value in fields.items():
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif value is None:
            text = ""
        else:
            text = str(value)
        out[XATTR_PREFIX + key] = text.encode()
    return out
