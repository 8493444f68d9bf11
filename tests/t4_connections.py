"""The life of VDDK connections through real mounts, with the stand-in's call log as witness:
disks close (and their IVD gets EndAccess) once idle, never while held; --max-connections
holds under concurrent readers without closing a disk under its reads; a failed
PrepareForAccess still reads and still ends; a permanent read error is not retried (issue 16).
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mounting import Bed, Mount, call_lines, wait_for
from tests.testbed.vsphere import Ivd, place_image

MiB = 1 << 20
SIZE_MB = 8


@dataclass(frozen=True)
class Disk:
    ivd: Ivd
    snapshot: str
    data: bytes

    def raw(self, mp: Path) -> Path:
        return mp / self.ivd.datastore_name / self.ivd.id / self.snapshot / "disk.raw"


@pytest.fixture(scope="module")
def disks(bed: Bed) -> list[Disk]:
    out = []
    for i in range(4):
        ivd = bed.vcsim.create_ivd(f"conn-{i}", SIZE_MB, "LocalDS_0")
        snap = bed.vcsim.create_snapshot(ivd, "s")
        data = random.Random(i).randbytes(SIZE_MB * MiB)
        src = bed.root / f"conn-{i}.raw"
        src.write_bytes(data)
        place_image(bed.images, ivd, snap, src)
        out.append(Disk(ivd, snap, data))
    return out


def handles_of(lines: list[str], ivd_id: str) -> set[str]:
    return {o["handle"] for o in call_lines(lines, "Open") if o["path"] == ivd_id}


def closed(lines: list[str], ivd_id: str) -> bool:
    """Every handle opened for the IVD is closed, and its last PrepareForAccess ended."""
    handles = handles_of(lines, ivd_id)
    closes = {c["handle"] for c in call_lines(lines, "Close")}
    prepares = [p for p in call_lines(lines, "PrepareForAccess") if p["id"] == ivd_id]
    ends = [e for e in call_lines(lines, "EndAccess") if e["id"] == ivd_id]
    return bool(handles) and handles <= closes and len(prepares) == len(ends)


def test_idle_disks_close_and_end_access_but_held_ones_stay_open(
    bed: Bed, disks: list[Disk], mountpoint: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    held, idle = disks[0], disks[1]
    with Mount(bed, mountpoint, "--idle-timeout", "0.5", "--prefetch", "0") as m:
        with open(held.raw(mountpoint), "rb", buffering=0) as f:
            assert os.pread(f.fileno(), 4096, 0) == held.data[:4096]
            with open(idle.raw(mountpoint), "rb", buffering=0) as g:
                assert os.pread(g.fileno(), 4096, MiB) == idle.data[MiB : MiB + 4096]
            # Closed while mounted: no read, no open file, nothing else happening to wake
            # the service, yet it closes after --idle-timeout.
            wait_for(lambda: closed(bed.log_lines(), idle.ivd.id), 15, "the idle disk's close")
            # The held disk was idle for longer, but an open file keeps it open.
            lines = bed.log_lines()
            assert not closed(lines, held.ivd.id)
            connects = len(call_lines(lines, "ConnectEx"))
            assert os.pread(f.fileno(), 4096, 2 * MiB) == held.data[2 * MiB : 2 * MiB + 4096]
            assert len(call_lines(bed.log_lines(), "ConnectEx")) == connects  # not reopened
        wait_for(lambda: closed(bed.log_lines(), held.ivd.id), 15, "the released disk's close")
        # The next use opens (and prepares) the disk again.
        with open(idle.raw(mountpoint), "rb", buffering=0) as g:
            assert os.pread(g.fileno(), 4096, 3 * MiB) == idle.data[3 * MiB : 3 * MiB + 4096]
        lines = bed.log_lines()
        assert len(handles_of(lines, idle.ivd.id)) == 2
        prepares = [p for p in call_lines(lines, "PrepareForAccess") if p["id"] == idle.ivd.id]
        assert len(prepares) == 2
        assert m.unmount() == 0


def max_open_connections(lines: list[str]) -> int:
    """The most connections open at once, in log order (a ConnectEx is logged once it has
    succeeded, a Disconnect once it is done)."""
    now = top = 0
    for line in lines:
        fn = line.split()[2:3]
        if fn == ["ConnectEx"] and " err=0" in line:
            now += 1
            top = max(top, now)
        elif fn == ["Disconnect"]:
            now -= 1
    return top


def read_whole(path: Path, data: bytes, errors: list[str]) -> None:
    try:
        with open(path, "rb", buffering=0) as f:
            pos = 0
            while chunk := f.read(256 * 1024):
                if chunk != data[pos : pos + len(chunk)]:
                    errors.append(f"{path}: wrong bytes at {pos}")
                    return
                pos += len(chunk)
        if pos != len(data):
            errors.append(f"{path}: {pos} bytes, not {len(data)}")
    except OSError as e:
        errors.append(f"{path}: {e}")


def test_the_connection_cap_holds_and_never_closes_a_disk_under_its_reads(
    bed: Bed, disks: list[Disk], mountpoint: Path
) -> None:
    """Four readers, two connections: disks take turns. The file transport serves one read
    per handle at a time, so a disk being read always has reads waiting for it; closing it to
    make room would fail them (and log a retry)."""
    bed.standin_log.unlink(missing_ok=True)
    env = {"VDDK_STANDIN_TRANSPORT": "file", "VDDK_STANDIN_LATENCY_US": "3000"}
    with Mount(bed, mountpoint, "--max-connections", "2", **env) as m:
        errors: list[str] = []
        threads = [
            threading.Thread(target=read_whole, args=(d.raw(mountpoint), d.data, errors))
            for d in disks
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a reader hangs"
        assert errors == []
        assert m.unmount() == 0
    lines = bed.log_lines()
    assert max_open_connections(lines) == 2  # used to the full, never beyond
    assert {o["path"] for o in call_lines(lines, "Open")} == {d.ivd.id for d in disks}


@pytest.mark.allow_log(r"VixError 3014.*\(reading anyway\)", "injected PrepareForAccess failure")
def test_a_failed_prepare_still_reads_and_still_ends_access(
    bed: Bed, disks: list[Disk], mountpoint: Path
) -> None:
    """PrepareForAccess only keeps vMotion away while we read; when it fails (a missing
    privilege), the snapshot is read anyway, and EndAccess still follows (VMware: always)."""
    bed.standin_log.unlink(missing_ok=True)
    d = disks[2]
    with Mount(bed, mountpoint, VDDK_STANDIN_FAIL_PREPARE="1") as m:
        assert d.raw(mountpoint).read_bytes() == d.data
        assert m.unmount() == 0
    lines = bed.log_lines()
    prepares = call_lines(lines, "PrepareForAccess")
    assert prepares and all(p["err"] == "3014" and p["id"] == d.ivd.id for p in prepares)
    assert [e["id"] for e in call_lines(lines, "EndAccess")] == [d.ivd.id] * len(prepares)


@pytest.mark.allow_log("VixError 13", "injected")
def test_a_read_failing_with_a_permanent_code_is_not_retried(
    bed: Bed, disks: list[Disk], mountpoint: Path
) -> None:
    """A permanent code (13: the host refused access to the disk file) fails the read at
    once: no reconnect (each is a vCenter login), no second attempt; other blocks still read."""
    bed.standin_log.unlink(missing_ok=True)
    d = disks[3]
    env = {"VDDK_STANDIN_FAIL_READ_NTH": "1", "VDDK_STANDIN_FAIL_CODE": "13"}
    with Mount(bed, mountpoint, "--prefetch", "0", **env) as m:
        failed = []
        with open(d.raw(mountpoint), "rb", buffering=0) as f:
            for off in range(0, len(d.data), MiB):
                try:
                    assert os.pread(f.fileno(), MiB, off) == d.data[off : off + MiB], off
                except OSError as e:
                    assert e.errno == errno.EIO
                    failed.append(off)
        assert len(failed) == 1  # the block of the first read request, and only that one
        assert m.unmount() == 0
    lines = bed.log_lines()
    assert len(call_lines(lines, "ConnectEx")) == 1

    def of_block(*fns: str) -> list[str]:
        return [r["err"] for fn in fns for r in call_lines(lines, fn)
                if int(r["start"]) * 512 == failed[0]]  # fmt: skip

    assert len(of_block("Read", "ReadAsync")) == 1  # one attempt
    assert of_block("Read", "ReadAsyncDone") == ["13"]
