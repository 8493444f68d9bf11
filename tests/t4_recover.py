"""Recovering a killed mount with one command (issue 15): for each kill point, SIGKILL the
daemon, run `ivdfs umount`, and find nothing left: no loop device, no mount under the run
directory, no FUSE driver of a guest volume, the mountpoint a plain empty directory again, the
IVD's snapshots as before the mount, and every PrepareForAccess ended (the shared fixture
checks the stand-in log across the killed daemon and the recovering command).

What cannot be undone (vCenter unreachable, no connection options, a deletion vCenter
refuses) is named with a command; run as printed, with the password supplied as before, that
command works, and the journal is kept until it has.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ivdfs import journal
from tests.mounting import (
    IVDFS,
    VDDK_LIBDIR,
    Bed,
    Mount,
    alive,
    call_lines,
    loop_devices_of,
    mounted_at,
    mounts_under,
    umount,
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
    place_image(bed.images, ivd, snap, img)
    return ivd, snap


def advice(text: str, marker: str) -> list[list[str]]:
    """The commands printed after `marker` (to the end of each line), split as a shell would."""
    return [shlex.split(ln.split(marker, 1)[1]) for ln in text.splitlines() if marker in ln]


def run_as_printed(bed: Bed, command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`command` as the user would paste it; the password supplied as the test gave it (by
    default IVDFS_PASSWORD), which the command must never carry itself."""
    assert command[0] == "ivdfs" and bed.vcsim.password not in command
    return subprocess.run([*IVDFS, *command[1:]], env=bed.env(**env), capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip


def has_options(command: Sequence[str], given: Sequence[Sequence[str]]) -> bool:
    """Each of `given` (a flag, or a flag and its value) appears in `command` as given."""
    pairs = list(itertools.pairwise(command))
    return all(g[0] in command if len(g) == 1 else (g[0], g[1]) in pairs for g in given)


def processes_naming(prefix: str) -> dict[int, str]:
    """Live processes with a command-line argument starting with `prefix`: pid -> name."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            name = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if any(os.fsdecode(a).startswith(prefix) for a in argv) and alive(int(entry)):
            out[int(entry)] = name
    return out


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
    """The kill lands while the snapshot task is queued on vCenter (the test holds the task,
    so where the kill lands is the test's choice, not chance), and the task makes its snapshot
    only after recovery has begun: recovery waits for the task, journaled by its id when it
    started, before it looks for what it made by its description, and deletes it."""
    with Vcsim() as v:
        (tmp_path / "images").mkdir()
        bed = Bed(v, tmp_path)
        ivd = v.create_ivd("slow", 2, "LocalDS_0")
        before = v.snapshots(ivd)
        hold = v.tmpdir / "faults" / "createSnapshot.hold"
        hold.touch()
        m = Mount.__new__(Mount)  # started by hand: it never gets to be mounted
        m.bed, m.mountpoint, m.log_file = bed, mp, tmp_path / "mnt.ivdfs.log"
        m.proc = subprocess.Popen(
            bed.mount_args(mp, "-f", "--log", str(m.log_file), "--snapshot-now", ivd.id),
            env=bed.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def task_started() -> bool:
            rec = journal.find(mp)
            return rec is not None and any(
                s["snapshot"] is None and s.get("task") for s in rec.snapshots
            )

        wait_for(task_started, timeout=60, what="the snapshot task")
        pid = kill(m)
        assert v.snapshots(ivd) == before  # the task has not run: nothing to find yet
        doc = status(bed, mp)
        assert doc["state"] == "dead" and doc["pid"] == pid
        recovery = subprocess.Popen(
            [*IVDFS, "umount", str(mp), "--server", v.server, "--user", v.user,
             "--ca-file", str(v.ca_file), "--vddk-libdir", str(VDDK_LIBDIR)],
            env=bed.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert recovery.stdout is not None
            first = recovery.stdout.readline()  # blocks until recovery says it waits
            while first and "waiting for the interrupted creation" not in first:
                first = recovery.stdout.readline()
            assert "waiting for the interrupted creation" in first, first
            hold.unlink()  # now the task runs and makes its snapshot
            out, err = recovery.communicate(timeout=120)
        finally:
            hold.unlink(missing_ok=True)
            if recovery.poll() is None:
                recovery.kill()
        assert recovery.returncode == 0, out + err
        assert "deleted snapshot" in out and "FAIL" not in out, out
        assert v.snapshots(ivd) == before
        assert journal.find(mp) is None and not mounted_at(mp)


@killed
@pytest.mark.parametrize("point", ["teardown-begins", "vddk-teardown-begins"])
def test_killed_during_teardown(bed: Bed, disk: tuple[Ivd, str], mp: Path, point: str) -> None:
    """Killed as the teardown begins (the temporary snapshot may still be there), or once the
    VDDK teardown has begun (the first handle closed): by then the temporary snapshot must be
    deleted already, so a crash in VDDK's teardown cannot leave it behind (issue 12)."""
    ivd, snap = disk
    before = bed.vcsim.snapshots(ivd)
    # The stand-in holds the mount's EndAccess (its second access call) until the test
    # releases it, which it never does: the kill lands before the end, whatever the load.
    hold = mp.parent / "hold"
    hold.write_text("1")  # PrepareForAccess (1) goes; EndAccess (2) waits
    m = Mount(bed, mp, "--snapshot-now", ivd.id, VDDK_STANDIN_HOLD_ACCESS=str(hold))
    data = (mp / ivd.datastore_name / ivd.id / snap / "disk.raw").read_bytes()
    assert len(data) == 32 * MiB
    closes = len(call_lines(bed.log_lines(), "Close"))
    m.proc.send_signal(signal.SIGTERM)

    def stopping() -> bool:
        rec = journal.find(mp)
        return rec is not None and rec.doc.get("state") == "stopping"

    def vddk_teardown() -> bool:
        return len(call_lines(bed.log_lines(), "Close")) > closes

    wait_for(stopping if point == "teardown-begins" else vddk_teardown, timeout=60,
             what="the teardown")  # fmt: skip
    pid = kill(m)
    rec = journal.find(mp)
    assert rec is not None and not rec.alive and rec.prepared  # killed before its EndAccess
    if point == "vddk-teardown-begins":
        assert rec.snapshots == []
        assert bed.vcsim.snapshots(ivd) == before
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
    hold = mp.parent / "hold"
    hold.write_text("1")  # the daemon's EndAccess waits: the kill lands in its teardown
    m = Mount(bed, mp, "--snapshot-now", ivd.id, VDDK_STANDIN_HOLD_ACCESS=str(hold))
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


@pytest.fixture(scope="module")
def windows_disk(bed: Bed) -> tuple[Ivd, str]:
    """An IVD whose snapshot holds ext4, FAT32 and NTFS partitions: NTFS is served by ntfs-3g
    and, on a kernel without vfat (this one), FAT by fusefat, FUSE drivers that outlive a
    killed ivdfs."""
    ivd = bed.vcsim.create_ivd("windows", 64, "LocalDS_0")
    snap = bed.vcsim.create_snapshot(ivd, "before")
    img = bed.root / "windows.raw"
    imgs.gpt_disk(img, 64)
    place_image(bed.images, ivd, snap, img)
    return ivd, snap


@killed
def test_killed_with_fuse_driven_guest_volumes(
    bed: Bed, windows_disk: tuple[Ivd, str], mp: Path
) -> None:
    ivd, snap = windows_disk
    before = bed.vcsim.snapshots(ivd)
    m = Mount(bed, mp, "--volumes", "kernel")
    vols = mp / ivd.datastore_name / ivd.id / snap / "volumes"
    names = os.listdir(vols)
    assert len(names) == 3 and all(os.listdir(vols / n) for n in names)  # each with files
    pid = m.proc.pid
    drivers = processes_naming(f"/run/ivdfs-{pid}-")
    assert "ntfs-3g" in drivers.values(), drivers
    kill(m)
    assert all(alive(p) for p in drivers)  # they outlive ivdfs: recovery must stop them
    assert_recovered(bed, mp, pid, ivd, before)
    assert not [p for p in drivers if alive(p)]
    assert processes_naming(f"/run/ivdfs-{pid}-") == {}


@pytest.mark.allow_log("could not delete snapshot", "TLS verification disabled",
                       "the mount ended but left temporary snapshots")  # fmt: skip
@pytest.mark.parametrize("tls", ["ca-file", "thumbprint", "insecure", "password-file"])
def test_a_failed_deletion_names_a_command_that_works(
    bed: Bed, mp: Path, tmp_path: Path, tls: str
) -> None:
    """vCenter refuses to delete the --snapshot-now snapshots at unmount: the mount's log
    and `ivdfs umount` each name a command with the connection options the user gave; run
    as printed they delete the snapshots, and a later `ivdfs umount` finds nothing left."""
    v = bed.vcsim
    a = v.create_ivd(f"refused-a-{tls}", 2, "LocalDS_1")
    b = v.create_ivd(f"refused-b-{tls}", 2, "LocalDS_1")
    pw = tmp_path / "password"
    pw.write_text(v.password + "\n")
    pw.chmod(0o600)
    extra = {"ca-file": [], "thumbprint": ["--thumbprint", v.thumbprint],
             "insecure": ["--insecure"],
             "password-file": ["--password-file", str(pw)]}[tls]  # fmt: skip
    # The password as given: in the file, or else (and only then) in IVDFS_PASSWORD.
    env = {"IVDFS_PASSWORD": ""} if tls == "password-file" else {}
    given = [["--server", v.server], ["--user", v.user], ["--ca-file", str(v.ca_file)]]
    given += [extra] if extra else []
    m = Mount(bed, mp, *extra, "--snapshot-now", a.id, "--snapshot-now", b.id, **env)
    temporary = {a.id: v.snapshots(a), b.id: v.snapshots(b)}
    assert all(len(t) == 1 for t in temporary.values())
    with v.failing("deleteSnapshot"):
        r = umount(bed, mp, *extra, **env)
    # The daemon too: its status must not say all is well with snapshots left behind.
    assert m.proc.wait(timeout=30) == 11, m.log()
    assert "the mount ended but left temporary snapshots behind; `ivdfs umount" in m.log()
    assert r.returncode == 11, r.stdout + r.stderr  # vCenter's refusal, as for any failed task
    assert "Traceback" not in r.stderr and not mounted_at(mp)
    logged = advice(m.log(), "delete it with: ")
    printed = advice(r.stdout, "to undo it: ")
    assert len(logged) == len(printed) == 2, m.log() + r.stdout
    for command in logged + printed:
        assert command[:3] == ["ivdfs", "snapshot", "delete"]
        assert has_options(command, given), command
        assert v.password not in command
    by_ivd = {c[3]: c for c in logged}, {c[3]: c for c in printed}
    assert by_ivd[0][a.id][4] == by_ivd[1][a.id][4] == temporary[a.id][0]
    # What the mount logged, for one; what umount printed, for the other.
    for command in (by_ivd[0][a.id], by_ivd[1][b.id]):
        done = run_as_printed(bed, command, **env)
        assert done.returncode == 0, (command, done.stderr)
    assert v.snapshots(a) == v.snapshots(b) == []
    # The journal kept them; now umount finds them gone and clears it.
    rec = journal.find(mp)
    assert rec is not None and len(rec.snapshots) == 2
    r = umount(bed, mp, *extra, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("was already gone") == 2 and journal.find(mp) is None


@killed
def test_recovery_without_vcenter_names_what_is_left_and_finishes_later(
    bed: Bed, disk: tuple[Ivd, str], mp: Path
) -> None:
    """A dead mount holding a temporary snapshot and a PrepareForAccess: `ivdfs umount` with
    no connection options, then with an unreachable vCenter, undoes what it can, names each
    thing it cannot with the command that would, exits non-zero and keeps the journal; that
    command, run as printed once vCenter is reachable, finishes the job and exits 0."""
    v = bed.vcsim
    ivd, _ = disk
    before = v.snapshots(ivd)
    m = Mount(bed, mp, "--snapshot-now", ivd.id)
    pid = kill(m)
    rec = journal.find(mp)
    assert rec is not None and len(rec.snapshots) == 1 and len(rec.prepared) == 1
    snap = rec.snapshots[0]["snapshot"]

    bare = subprocess.run([*IVDFS, "umount", str(mp)], env=bed.env(IVDFS_PASSWORD=""),
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    unreachable = umount(bed, mp, server="127.0.0.1:1")
    for r, code, reason, server in ((bare, 3, "no server", v.server),
                                    (unreachable, 5, "cannot reach", "127.0.0.1:1")):  # fmt: skip
        assert r.returncode == code, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
        assert len(failed) == 2 and all(reason in ln for ln in failed), r.stdout
        assert f"snapshot {snap} of IVD {ivd.id}" in failed[0]
        assert f"IVD {ivd.id} left prepared" in failed[1]
        (command,) = {tuple(c) for c in advice(r.stdout, "to undo it: ")}
        assert command[:3] == ("ivdfs", "umount", str(mp))
        assert has_options(command, [["--server", server], ["--user", v.user]]), command
        kept = journal.find(mp)
        assert kept is not None and kept.snapshots == rec.snapshots
        assert kept.prepared == rec.prepared
        assert not mounted_at(mp)  # what needed no vCenter is done
    assert status(bed, mp)["state"] == "dead"
    assert v.snapshots(ivd) == [*before, snap]

    # The first advice (the mount's own server and certificate), as printed.
    (command,) = advice(bare.stdout, "to undo it: ")[:1]
    done = run_as_printed(bed, command)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"deleted snapshot {snap}" in done.stdout and "EndAccess for IVD" in done.stdout
    assert journal.find(mp) is None and v.snapshots(ivd) == before
    assert os.listdir(mp) == [] and mounts_under(f"/run/ivdfs-{pid}-") == []


def test_a_run_directory_that_cannot_be_removed_stays_journaled(tmp_path: Path) -> None:
    """undo_local names a run directory it could not remove and keeps it in the journal (the
    next umount finds it again); a journal it cannot update is said, not swallowed."""
    from ivdfs.commands import recover as rc

    stuck, gone = tmp_path / "ivdfs-stuck", tmp_path / "ivdfs-gone"
    for d in (stuck, gone):
        (d / "1").mkdir(parents=True)
    busy = stuck / "1" / "busy"
    busy.write_bytes(b"x")
    # Immutable: not even root removes it, so neither can the recovery's removal.
    subprocess.run(["chattr", "+i", str(busy)], check=True)
    mp = tmp_path / "mnt"
    mp.mkdir()
    doc = {"mountpoint": str(mp), "pid": 1, "run_dirs": [str(stuck), str(gone)]}
    rec = journal.Record(tmp_path / "state" / "mount.json", doc)
    rec.path.parent.mkdir()
    rec.path.write_text(json.dumps(doc))
    report = rc.Report()
    rc.undo_local(rec, report)
    assert report.failures and not gone.exists() and stuck.exists()
    assert json.loads(rec.path.read_text())["run_dirs"] == [str(stuck)]
    # A journal that cannot be written (its temporary name is taken by a directory, which
    # root cannot write through either): the failure is reported, not hidden.
    subprocess.run(["chattr", "-i", str(busy)], check=True)
    rec.path.with_name(f".{rec.path.name}.{os.getpid()}.tmp").mkdir()
    report = rc.Report()
    rc.undo_local(rec, report)
    failed = [text for _step, text, _code in report.failures]
    assert not stuck.exists() and failed and "cannot update the journal" in failed[0]
    assert json.loads(rec.path.read_text())["run_dirs"] == [str(stuck)]
