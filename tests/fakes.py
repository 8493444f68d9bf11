"""Plain-Python stand-ins for the layers below the tree (not mocks: they really serve bytes)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import trio

from ivdfs.errors import BackendError, NotFound
from ivdfs.inventory.model import Datastore, Ivd, IvdSummary, Snapshot


def pattern(size: int, seed: str) -> bytes:
    """Deterministic, position-dependent bytes: a misplaced block never compares equal."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@dataclass
class FakeInventory:
    datastores_: list[Datastore] = field(default_factory=list)
    ivds: dict[str, Ivd] = field(default_factory=dict)
    snaps: dict[str, list[Snapshot]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def add(self, ds: Datastore, ivd_id: str, capacity: int, snapshot_ids: list[str]) -> Ivd:
        if ds not in self.datastores_:
            self.datastores_.append(ds)
        ivd = Ivd(ivd_id, f"name-{ivd_id}", ds, capacity, datetime(2026, 1, 1, tzinfo=UTC))
        self.ivds[ivd_id] = ivd
        self.snaps[ivd_id] = [
            Snapshot(s, ivd_id, datetime(2026, 1, 2, i, tzinfo=UTC), f"snap {i}")
            for i, s in enumerate(snapshot_ids)
        ]
        return ivd

    def datastores(self) -> list[Datastore]:
        self.calls.append("datastores")
        return list(self.datastores_)

    def list_ivds(self, datastore: Datastore) -> list[str]:
        self.calls.append(f"list_ivds {datastore.name}")
        return sorted(i for i, v in self.ivds.items() if v.datastore == datastore)

    def ivd(self, datastore: Datastore, ivd_id: str) -> Ivd:
        self.calls.append(f"ivd {ivd_id}")
        try:
            return self.ivds[ivd_id]
        except KeyError:
            raise NotFound(ivd_id) from None

    def snapshots_of(self, datastore: Datastore, ivd_id: str) -> list[Snapshot]:
        self.calls.append(f"snapshots {ivd_id}")
        if ivd_id not in self.snaps:
            raise NotFound(ivd_id)
        return list(self.snaps[ivd_id])

    def summaries(self, datastore: Datastore) -> list[IvdSummary]:
        self.calls.append(f"summaries {datastore.name}")
        return [IvdSummary(v, None) for v in self.ivds.values() if v.datastore == datastore]

    fast_summaries = False


@dataclass
class FakeDisk:
    """The tree's Disk protocol over bytes: counts probes, reads and users."""

    data: bytes
    reads: list[tuple[int, int]] = field(default_factory=list)
    fail_sectors: set[int] = field(default_factory=set)
    fail_open: bool = False
    delay: float = 0.0
    probes: int = 0
    users: int = 0
    forgotten: bool = False
    logical_sector_size: int = 512

    async def capacity(self) -> int:
        self.probes += 1
        if self.fail_open:
            raise BackendError("injected open failure")
        return len(self.data)

    async def sector_size(self) -> int:
        return self.logical_sector_size

    async def allocated(self, start: int, end: int, granularity: int) -> list[tuple[int, int]]:
        raise BackendError("no allocation map")

    def hold(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1

    def forget(self) -> None:
        self.forgotten = True

    async def read(self, start_sector: int, nbytes: int, background: bool = False) -> bytes:
        self.reads.append((start_sector, nbytes))
        if self.delay:
            await trio.sleep(self.delay)
        if start_sector in self.fail_sectors:
            raise BackendError(f"injected failure at sector {start_sector}")
        off = start_sector * 512
        assert nbytes % 512 == 0 or off + nbytes == len(self.data)
        return self.data[off : off + nbytes]


@dataclass
class FakeDiskSource:
    disks: dict[tuple[str, str], FakeDisk] = field(default_factory=dict)

    def disk(self, ivd: Ivd, snapshot: Snapshot) -> FakeDisk:
        key = (ivd.id, snapshot.id)
        if key not in self.disks:
            self.disks[key] = FakeDisk(b"", fail_open=True)
        return self.disks[key]
