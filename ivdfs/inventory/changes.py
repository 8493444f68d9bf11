"""Changed areas of an IVD between two snapshots, as vCenter's changed block tracking says.

Role: the plain record `VSphere.changed_areas` returns (no pyVmomi type escapes), the merge of
the pieces vCenter answers in, and its JSON document (a mount's changes/<older>.json and
`ivdfs changes --json`, byte for byte). Pure.

Concurrency: immutable records and pure functions; any thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ivdfs.inventory.model import Ivd

# (offset, length) in bytes.
Extent = tuple[int, int]


@dataclass(frozen=True)
class ChangedAreas:
    """What changed in a snapshot since the moment `change_id` names (the older snapshot's
    changedBlockTrackingId): sorted, non-overlapping, non-adjacent extents within
    [0, `covered`), the span vCenter was asked about (the IVD's capacity)."""

    change_id: str
    covered: int
    extents: tuple[Extent, ...]

    @property
    def changed_bytes(self) -> int:
        return sum(n for _, n in self.extents)


def merge(extents: Iterable[Extent]) -> tuple[Extent, ...]:
    """Sort, drop empty ones, and join overlapping or touching extents (an area split by a
    page boundary of the query is one area)."""
    out: list[list[int]] = []
    for start, length in sorted(e for e in extents if e[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return tuple((s, n) for s, n in out)


def changes_fields(
    ivd: Ivd, older_id: str, newer_id: str, areas: ChangedAreas | None, error: str | None
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "ivd": ivd.id,
        "ivd_name": ivd.name,
        "datastore": ivd.datastore.name,
        "older_snapshot": older_id,
        "snapshot": newer_id,
    }
    if error is not None or areas is None:
        doc["error"] = error or "not known yet"
        return doc
    doc.update(
        change_id=areas.change_id,
        covered_bytes=areas.covered,
        changed_bytes=areas.changed_bytes,
        extent_count=len(areas.extents),
        extents=[{"offset": s, "length": n} for s, n in areas.extents],
    )
    return doc


def changes_json(
    ivd: Ivd, older_id: str, newer_id: str, areas: ChangedAreas | None, error: str | None = None
) -> bytes:
    """The document of changes/<older>.json and of `ivdfs changes --json`, byte for byte."""
    doc = changes_fields(ivd, older_id, newer_id, areas, error)
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
