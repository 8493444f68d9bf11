"""Recovering a killed mount with one command (issue 15): for each kill point, SIGKILL the
daemon, run `ivdfs umount`, and find nothing left: no loop device, no mount under the run
directory, the mountpoint a plain empty directory again, the IVD's snapshots as before the
mount, and every PrepareForAccess ended (the shared fixture checks the stand-in log across
the killed daemon and the recovering command).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivdfs import journal
from tests.mounting import (
    IVDFS,
    VDDK_LIBDIR,
    Bed,
    Mount,
    call_lines,
    loop_devices_of,
    mounted_at,
    mounts_under,
    wait_for,
)
from tests.testbed import images as imgs
from tests.testbed.vsphere import Ivd, Vcsim, place_image

MiB = 1 << 20
killed = pytest.mark.killed_mount


@pytest.fixture(scope="module")
def disk(bed: Bed) -> tuple[Ivd, str]:
    """An IVD with one snapshot holding an ext4 filesystem (a guest volume)."""
    ivd = bed.vcsim.create_ivd("victim", 32, "LocalDS_0")
    snap = bed.vcsim.create_snapshot(ivd, "before")
    img = bed.root / "victim.raw"
    imgs.bare_fs_disk(img, 32, "ext4")
    place_image(bed.images, ivd.id, snap, img)
    return ivd, snap


def umount(bed: Bed, mp: Path) -> subprocess.CompletedProcess[str]:
    v = bed.vcsim
    return subprocess.run(
        [*IVDFS, "umount", str(mp), "--server", v.server, "--user", v.user, "--ca-file",
         str(v.ca_file), "--vddk-libdir", str(VDDK_LIBDIR)],
        env=bed.env(), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def status(bed: Bed, mp: Path) -> dict[str, object]:
    r = subprocess.run([*IVDFS, "status", str(mp), "--json"], env=bed.env(), capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (doc,) = json.loads(r.stdout)
    return doc  # type: ignore[no-any-return]


def kill(m: Mount) -> int:
    pid = m.proc.pid
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=30)
    return pid


def assert_recovered(bed: Bed, mp: Path, pid: int, ivd: Ivd, snapshots: list[str]) -> None:
    doc = status(bed, mp)
    assert doc["state"] == "dead" and doc["pid"] == pid
    r = umount(bed, mp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout.count("FAIL") == 0
    assert not mounted_at(mp) and os.listdir(mp) == []
    assert loop_devices_of(mp) == []
    assert mounts_under(f"/run/ivdfs-{pid}-") == []
    assert not list(Path("/run").glob(f"ivdfs-{pid}-*"))
    assert journal.find(mp) is None
    assert bed.vcsim.snapshots(ivd) == snapshots
    lines = bed.log_lines()
    prepared = {p["id"] for p in call_lines(lines, "PrepareForAccess")}
    ended = {e["id"] for e in call_lines(lines, "EndAccess")}
    assert prepared <= ended


@pytest.fixture
def mp(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if mounted_at(path):  # a failed test: do not leave a dead mount behind
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


@killed
def test_killed_with_guest_volumes_mounted(bed: Bed, disk: tuple[Ivd, str], mp: Path) -> None:
    ivd, snap = disk
    before = bed.vcsim.snapshots(ivd)
    m = Mount(bed, mp, "--volumes", "kernel", "--snapshot-now", ivd.id)
    vols = mp / ivd.datastore_name / ivd.id / snap / "volumes"
    assert os.listdir(vols) == ["0"] and os.listdir(vols / "0")  # mounted, with files
    assert loop_devices_of(mp)
    pid = kill(m)
    doc = status(bed, mp)
    assert doc["loop_devices"] and doc["volume_mounts"] and len(doc["snapshots"]) == 1
    # A new mount on the leftovers is refused with the way out.
    r = subprocess.run(bed.mount_args(mp), env=bed.env(), capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 8 and f"ivdfs umount {mp}" in r.stderr
    assert_recovered(bed, mp, pid, ivd, before)


@killed
def test_killed_with_reads_in_flight(bed: Bed, disk: tuple[Ivd, str], mp: Path) -> None:
    ivd, snap = disk
    before = bed.vcsim.snapshots(ivd)
    m = Mount(bed, mp, VDDK_STANDIN_LATENCY_US="30000")
    path = mp / ivd.datastore_name / ivd.id / snap / "disk.raw"
    readers = [subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "bs=1M"],
                                stderr=subprocess.DEVNULL) for _ in range(3)]  # fmt: skip
    wait_for(lambda: sum(" ReadAsync " in ln for ln in bed.log_lines()) >= 3, what="reads")
    pid = kill(m)
    for r in readers:
        r.wait(timeout=30)
        assert r.returncode != 0  # they end with an error, never hang
    assert_recovered(bed, mp, pid, ivd, before)


@killed
def test_killed_while_creating_the_temporary_snapshot(
    built_testbed: None, tmp_path: Path, mp: Path
) -> None:
    """A slow vCenter: the kill lands while the snapshot task runs; the snapshot (if the task
    made one) is found by its description and deleted."""
    with Vcsim(delay_ms=150) as v:
        (tmp_path / "images").mkdir()
        bed = Bed(v, tmp_path)
        ivd = v.create_ivd("slow", 2, "LocalDS_0")
        before = v.snapshots(ivd)
        m = Mount.__new__(Mount)  # started by hand: it never gets to be mounted
        m.bed, m.mountpoint, m.log_file = bed, mp, tmp_path / "mnt.ivdfs.log"
        m.proc = subprocess.Popen(
            bed.mount_args(mp, "-f", "--log", str(m.log_file), "--snapshot-now", ivd.id),
            env=bed.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def creating() -> bool:
            rec = journal.find(mp)
            return rec is not None and any(s["snapshot"] is None for s in rec.snapshots)

        wait_for(creating, timeout=60, what="the snapshot task")
        pid = kill(m)
        assert_recovered(bed, mp, pid, ivd, before)


@killed
def test_killed_during_teardown(bed: Bed, disk: tuple[Ivd, str], mp: Path) -> None:
    ivd, snap = disk
    before = bed.vcsim.snapshots(ivd)
    # EndAccess takes a while: the kill comes between the unmount and the end.
    m = Mount(bed, mp, "--snapshot-now", ivd.id, VDDK_STANDIN_CONNECT_LATENCY_US="300000")
    data = (mp / ivd.datastore_name / ivd.id / snap / "disk.raw").read_bytes()
    assert len(data) == 32 * MiB
    m.proc.send_signal(signal.SIGTERM)

    def stopping() -> bool:
        rec = journal.find(mp)
        return rec is not None and rec.doc.get("state") == "stopping"

    wait_for(stopping, timeout=60, what="the teardown")
    pid = kill(m)
    assert_recovered(bed, mp, pid, ivd, before)


@killed
def test_umount_of_a_live_mount_reports_a_daemon_that_dies_in_teardown(
    bed: Bed, disk: tuple[Ivd, str], mp: Path
) -> None:
    """`ivdfs umount` waits for the daemon; when it dies on the way (here: killed while
    ending its access), umount says so in one line, naming the log, undoes what is left and
    exits non-zero."""
    ivd, _ = disk
    before = bed.vcsim.snapshots(ivd)
    m = Mount(bed, mp, "--snapshot-now", ivd.id, VDDK_STANDIN_CONNECT_LATENCY_US="300000")
    pid = m.proc.pid
    killer = subprocess.Popen(
        ["sh", "-c", f"while ! grep -q stopping {journal.find(mp).path}; do sleep 0.01; done; "  # type: ignore[union-attr]
         f"kill -9 {pid}"],
    )  # fmt: skip
    r = umount(bed, mp)
    killer.wait(timeout=30)
    m.proc.wait(timeout=30)
    assert r.returncode != 0
    assert "died before finishing its teardown" in r.stdout and str(m.log_file) in r.stdout
    assert "Traceback" not in r.stderr
    assert not mounted_at(mp) and journal.find(mp) is None, r.stdout + r.stderr
    assert bed.vcsim.snapshots(ivd) == before


def test_status_of_a_live_mount(bed: Bed, disk: tuple[Ivd, str], mp: Path) -> None:
    ivd, snap = disk
    with Mount(bed, mp) as m:
        (mp / ivd.datastore_name / ivd.id / snap / "disk.raw").open("rb").close()
        doc = status(bed, mp)
        assert doc["state"] == "serving" and doc["pid"] == m.proc.pid
        assert doc["prepared_ivds"] == [ivd.id] and doc["snapshots"] == []
        assert m.unmount() == 0
    assert journal.find(mp) is None
