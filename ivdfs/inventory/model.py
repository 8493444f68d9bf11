"""Plain inventory records; no pyvmomi type escapes the inventory package."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class Datastore:
    name: str
    moref: str  # e.g. 'datastore-123'


@dataclass(frozen=True)
class Ivd:
    id: str
    name: str
    datastore: Datastore
    capacity_bytes: int
    create_time: datetime | None = None
    backing_path: str = ""
    provisioning: str = ""
    # Ids of the VMs using the disk (VStorageObjectConfigInfo.consumerId), when the API says.
    consumers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    id: str
    ivd_id: str
    create_time: datetime | None = None
    description: str = ""


def creation_order(obj: Ivd | Snapshot) -> tuple[float, str]:
    """Oldest first; records without a creation time first; the id breaks ties."""
    return (obj.create_time.timestamp() if obj.create_time else 0.0, obj.id)


@dataclass(frozen=True)
class DiskTarget:
    """What a VDDK call names: an IVD (on its datastore) and, to read, one of its snapshots."""

    ivd_id: str
    datastore_moref: str
    snapshot_id: str | None = None

    @classmethod
    def of(cls, ivd: Ivd, snapshot: Snapshot | None = None) -> DiskTarget:
        return cls(ivd.id, ivd.datastore.moref, snapshot.id if snapshot is not None else None)

    def describe(self) -> str:
        snap = f" snapshot {self.snapshot_id}" if self.snapshot_id else ""
        return f"IVD {self.ivd_id}{snap} on {self.datastore_moref}"


@dataclass(frozen=True)
class IvdSummary:
    """An IVD as a listing of many shows it: its record (possibly without backing details),
    and how many snapshots it has when the server said (None: unknown)."""

    ivd: Ivd
    snapshot_count: int | None = None


class Inventory(Protocol):
    """Blocking inventory queries; callers run them off the trio thread."""

    def datastores(self) -> list[Datastore]: ...

    def list_ivds(self, datastore: Datastore) -> list[str]: ...

    def ivd(self, datastore: Datastore, ivd_id: str) -> Ivd: ...

    def snapshots_of(self, datastore: Datastore, ivd_id: str) -> list[Snapshot]: ...

    def summaries(self, datastore: Datastore) -> list[IvdSummary]:
        """Every IVD of a datastore, in as few round trips as the server allows."""
        ...

    @property
    def fast_summaries(self) -> bool:
        """Whether `summaries` costs a few calls per datastore rather than one per IVD."""
        ...
