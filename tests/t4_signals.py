"""Signals (issue 20), through real mounts.

- A second SIGTERM, SIGINT or SIGUSR1 during a slow teardown is logged and ignored: exit 0,
  nothing left mounted or on vCenter, every PrepareForAccess ended.
- SIGTERM at each start-up stage ends the start-up with 128+15 and one line, and deletes the
  --snapshot-now snapshot it had made.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.mounting import Bed, Mount, mounted_at, placed_disks, raw_path, wait_for
from tests.testbed.vsphere import Ivd, Vcsim

MiB = 1 << 20


@pytest.fixture(scope="module")
def disks(bed: Bed) -> dict[str, tuple[Ivd, str, Path]]:
    return placed_disks(bed, ("sig-a", "LocalDS_0"), ("sig-b", "LocalDS_1"))


@pytest.mark.allow_log("while stopping; the teardown goes on")
@pytest.mark.parametrize("second", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_second_signal_never_interrupts_the_teardown(
    bed: Bed, disks: dict[str, tuple[Ivd, str, Path]], tmp_path: Path, second: str
) -> None:
    ivd, snap, src = disks["sig-a"]
    before = bed.vcsim.snapshots(ivd)
    # EndAccess takes a while, so the second signal lands in the middle of the teardown.
    m = Mount(bed, tmp_path / "mnt", "--snapshot-now", ivd.id,
              VDDK_STANDIN_CONNECT_LATENCY_US="300000")  # fmt: skip
    assert (m.mountpoint / raw_path(ivd, snap)).read_bytes() == src.read_bytes()
    m.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "unmounting" in m.log(), what="the teardown")
    m.proc.send_signal(getattr(signal, second))
    m.proc.send_signal(getattr(signal, second))
    assert m.proc.wait(timeout=60) == 0, m.log()
    assert not mounted_at(m.mountpoint)
    assert bed.vcsim.snapshots(ivd) == before
    if second != "SIGUSR1":
        assert f"received {second} while stopping" in m.log()
    assert "Traceback" not in m.log() + (m.proc.stderr.read() if m.proc.stderr else "")


@pytest.mark.parametrize("stage", ["logged in", "created snapshot"])
def test_sigterm_during_start_up(built_testbed: None, tmp_path: Path, stage: str) -> None:
    """A slow vCenter so each stage lasts (the second of two snapshots takes a second): the
    signal ends the start-up with 143 and one line, the snapshots made for the mount are
    deleted, nothing is mounted."""
    with Vcsim(delay_ms=200) as v:
        (tmp_path / "images").mkdir()
        bed = Bed(v, tmp_path)
        ivd = v.create_ivd("startup", 2, "LocalDS_0")
        other = v.create_ivd("startup-2", 2, "LocalDS_1")
        before = v.snapshots(ivd)
        mp = tmp_path / "mnt"
        mp.mkdir()
        log = tmp_path / "ivdfs.log"
        proc = subprocess.Popen(
            bed.mount_args(mp, "-f", "--log", str(log), "--snapshot-now", ivd.id,
                           "--snapshot-now", other.id),
            env=bed.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(lambda: log.exists() and stage in log.read_text(), timeout=60, what=stage)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, (err, log.read_text())
        lines = [ln for ln in err.splitlines() if ln.startswith("ivdfs:")]
        assert len(lines) == 1 and "SIGTERM during start-up" in lines[0], err
        assert "Traceback" not in err + log.read_text()
        assert not mounted_at(mp)
        assert v.snapshots(ivd) == before and v.snapshots(other) == []
