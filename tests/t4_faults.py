"""Fault injection through a real mount: retries, fail-fast, and never a wrong byte (issue 5)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.mounting import Bed, Mount, assert_standin_log_clean, call_lines, sha256_file
from tests.testbed.vsphere import place_image

pytestmark = pytest.mark.allow_log(
    "retrying",
    "failed recently",
    "VixDiskLib_",
    "stand-in",
    "read: ",
    "not retried yet",
    "cannot open the disk",
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def disk(bed: Bed) -> tuple[Path, bytes, str]:
    ivd = bed.vcsim.create_ivd("faulty", 24, "LocalDS_2")
    snap = bed.vcsim.create_snapshot(ivd, "faults")
    data = random.Random(9).randbytes(24 * MiB)
    src = bed.root / "faulty.raw"
    src.write_bytes(data)
    place_image(bed.images, ivd, snap, src)
    return Path("LocalDS_2") / ivd.id / snap / "disk.raw", data, ivd.id


def fault_log(m: Mount) -> str:
    return m.log()


ALLOWED = ("retrying", "failed recently", "VixDiskLib_Read", "injected", "stand-in")


@pytest.mark.parametrize(
    "env",
    [
        {"VDDK_STANDIN_FAIL_READ_RATE": "0.1", "VDDK_STANDIN_SEED": "3"},
        {"VDDK_STANDIN_DROP_AFTER": "5"},
        {"VDDK_STANDIN_SHORT_READ_NTH": "2,7", "VDDK_STANDIN_FAIL_READ_NTH": "3"},
    ],
    ids=["random-failures", "dropped-connections", "short-reads"],
)
def test_transient_faults_are_retried_and_hashes_match(
    bed: Bed, disk: tuple[Path, bytes, str], tmp_path: Path, env: dict[str, str]
) -> None:
    rel, data, ivd_id = disk
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, tmp_path / "mnt", **env) as m:
        assert sha256_file(m.mountpoint / rel) == hashlib.sha256(data).hexdigest()
        assert m.unmount() == 0
    assert "retrying" in m.log()
    assert m.unexpected_log_records(allowed=ALLOWED) == []
    lines = bed.log_lines()
    if "VDDK_STANDIN_DROP_AFTER" in env:
        assert len(call_lines(lines, "ConnectEx")) > 2  # reconnected, more than once
    assert_standin_log_clean(bed, {ivd_id})


def test_persistent_failures_are_eio_fail_fast_and_never_wrong(
    bed: Bed, disk: tuple[Path, bytes, str], tmp_path: Path
) -> None:
    rel, data, ivd_id = disk
    bed.standin_log.unlink(missing_ok=True)
    # Half of all reads fail: some blocks exhaust their retries.
    env = {"VDDK_STANDIN_FAIL_READ_RATE": "0.5", "VDDK_STANDIN_SEED": "11"}
    with Mount(bed, tmp_path / "mnt", **env) as m:
        path = m.mountpoint / rel
        rng = random.Random(2)
        ok = eio = 0
        failed_offsets = []
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(150):
                off = rng.randrange(0, len(data))
                n = rng.choice([512, 4096, 100_000])
                try:
                    got = os.pread(fd, n, off)
                except OSError as e:
                    assert e.errno == errno.EIO
                    eio += 1
                    failed_offsets.append(off)
                    continue
                # A short count is allowed (a later page failed); wrong bytes never are.
                assert got == data[off : off + len(got)], f"wrong bytes at {off}"
                assert len(got) == n or len(got) % 4096 == (4096 - off % 4096) % 4096
                ok += 1
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
            assert ok > 0 and eio > 0
            # A block that just failed fails fast: no new VDDK read for it.
            reads_before = len([ln for ln in bed.log_lines() if " Read " in ln])
            with pytest.raises(OSError):
                os.pread(fd, 10, failed_offsets[-1])
            reads_after = len([ln for ln in bed.log_lines() if " Read " in ln])
            assert reads_after == reads_before
        finally:
            os.close(fd)
        # The mount survives.
        assert rel.parts[1] in os.listdir(m.mountpoint / rel.parts[0])
        assert m.unmount() == 0
    assert_standin_log_clean(bed, {ivd_id})


def test_host_down_for_good_gives_eio_not_a_hang(
    bed: Bed, disk: tuple[Path, bytes, str], tmp_path: Path
) -> None:
    """The connection drops and every reconnect fails: readers get EIO in bounded time (on the
    asynchronous NBD path too), the mount stays usable, and everything is closed at the end."""
    rel, _, ivd_id = disk
    bed.standin_log.unlink(missing_ok=True)
    env = {"VDDK_STANDIN_DROP_AFTER": "3", "VDDK_STANDIN_FAIL_CONNECT_AFTER": "1"}
    with Mount(bed, tmp_path / "mnt", **env) as m:
        for _ in range(2):  # the second pass meets a disk whose reopen already failed
            r = subprocess.run(["dd", f"if={m.mountpoint / rel}", "of=/dev/null", "bs=1M"],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
            assert r.returncode != 0 and "Input/output error" in r.stderr
        assert rel.parts[1] in os.listdir(m.mountpoint / rel.parts[0])
        assert m.unmount() == 0
    assert "reopening" in m.log()
    assert_standin_log_clean(bed, {ivd_id})
