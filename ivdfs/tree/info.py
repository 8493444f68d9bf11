"""Metadata of IVDs and snapshots as info.json documents and `user.ivdfs.*` attributes.

Pure functions over the inventory records; no I/O; safe from any thread. Both views carry the
same fields so scripts can use whichever is handier. A snapshot's info.json also carries its
provenance (what an examiner cites: where the bytes came from, when ivdfs read them) and the
evidence hashes of its files once known (ivdfs.forensics.hashing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ivdfs import __version__
from ivdfs.forensics.evidence import Source
from ivdfs.forensics.hashing import Digests
from ivdfs.inventory.model import Ivd, Snapshot
from ivdfs.units import SECTOR_SIZE

XATTR_PREFIX = "user.ivdfs."
# The evidence hashes of a file by its name in the snapshot directory; None: two complete
# reads disagreed, so no hash is shown.
FileDigests = Mapping[str, Digests | None]


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


def provenance_fields(
    ivd: Ivd,
    snap: Snapshot,
    capacity: int | None,
    source: Source | None,
    read_at: datetime | None,
    sector_size: int | None = None,
) -> dict[str, Any]:
    """What an examiner cites, in one flat block (some of it repeats `ivd` and `snapshot`).
    `capacity` and `read_at` come from the probe: the disk's own size (VixDiskLib_GetInfo)
    and when ivdfs opened it, in UTC; None until the disk was opened."""
    return {
        "server": source.server if source else None,
        "server_thumbprint": source.thumbprint if source else None,
        "datastore": ivd.datastore.name,
        "datastore_moref": ivd.datastore.moref,
        "ivd_uuid": ivd.id,
        "ivd_name": ivd.name,
        "backing_file": ivd.backing_path,
        "snapshot_id": snap.id,
        "snapshot_create_time": _time(snap.create_time),
        "snapshot_description": snap.description,
        "capacity_bytes": capacity,
        "capacity_sectors": capacity // SECTOR_SIZE if capacity is not None else None,
        "sector_size": SECTOR_SIZE,  # the unit of capacity_sectors (VDDK's, always 512)
        "logical_sector_size": sector_size,  # the guest's (4096: a 4Kn disk); None unprobed
        "read_at": _time(read_at),
        "ivdfs_version": __version__,
    }


def hashes_fields(digests: FileDigests) -> dict[str, Any]:
    return {name: d.as_dict() for name, d in sorted(digests.items()) if d is not None}


def snapshot_json(
    ivd: Ivd,
    snap: Snapshot,
    capacity: int | None,
    *,
    sector_size: int | None = None,
    source: Source | None = None,
    read_at: datetime | None = None,
    digests: FileDigests | None = None,
) -> bytes:
    """`capacity`: the snapshot's own size in bytes (what disk.raw has), None while unknown;
    the IVD's current size as vCenter reports it stays in `ivd.capacity_bytes`. `hashes`:
    the evidence hashes of the files whose bytes one open read in order, by file name."""
    return _dump(
        {
            "ivd": ivd_fields(ivd),
            "snapshot": {**snapshot_fields(snap), "capacity_bytes": capacity},
            "provenance": provenance_fields(ivd, snap, capacity, source, read_at, sector_size),
            "hashes": hashes_fields(digests or {}),
        }
    )


def _xattrs(fields: Mapping[str, Any]) -> dict[str, bytes]:
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


def digest_xattrs(digests: Digests | None) -> dict[str, bytes]:
    """user.ivdfs.sha256 and .md5 of a file, once one open read all of it in order."""
    if digests is None:
        return {}
    return _xattrs({"sha256": digests.sha256, "md5": digests.md5})


def disk_xattrs(
    ivd: Ivd,
    snap: Snapshot,
    capacity: int | None,
    *,
    source: Source | None = None,
    read_at: datetime | None = None,
    digests: Digests | None = None,
) -> dict[str, bytes]:
    """user.ivdfs.<field> -> UTF-8 value; lists are comma-separated, missing times empty.
    `capacity_bytes` is the snapshot's own size (what the file has), `ivd_capacity_bytes`
    the IVD's current size as vCenter reports it."""
    fields = dict(ivd_fields(ivd))
    fields["ivd_capacity_bytes"] = fields["capacity_bytes"]
    fields["capacity_bytes"] = capacity
    for key, value in snapshot_fields(snap).items():
        fields[f"snapshot_{key}"] = value
    prov = provenance_fields(ivd, snap, capacity, source, read_at)
    for key in ("server", "server_thumbprint", "capacity_sectors", "read_at"):
        fields[key] = prov[key]
    return {**_xattrs(fields), **digest_xattrs(digests)}
