"""Changed areas of an IVD between two snapshots, as vCenter's changed block tracking says.

Role: the plain record `VSphere.changed_areas` returns (no pyVmomi type escapes), and the
merge of the pieces vCenter answers in. Pure.

Concurrency: immutable records and pure functions; any thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
