"""Safe day-to-day operation (issue 12) as users type it: umount never cuts off readers, exact
FUSE options, fresh lookups, subset mounts, ownership options, and the small things.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from datetime import UTC
from pathlib import Path

import pytest

from ivdfs import journal
from tests.mounting import IVDFS, Bed, Mount, mounted_at
from tests.testbed.vsphere import Ivd, place_image

MiB = 1 << 20


@pytest.fixture(scope="module")
def ivds(bed: Bed) -> dict[str, tuple[Ivd, str]]:
    out = {}
    for name, ds in (("safe-a", "LocalDS_0"), ("safe-b", "LocalDS_1")):
        ivd = bed.vcsim.create_ivd(name, 2, ds)
        snap = bed.vcsim.create_snapshot(ivd, name)
        src = bed.root / f"{name}.raw"
        src.write_bytes(name.encode() * (2 * MiB // len(name)) + bytes(2 * MiB % len(name)))
        place_image(bed.images, ivd, snap, src)
        out[name] = (ivd, snap)
    return out


def cli(bed: Bed, *args: str, server: bool = False) -> subprocess.CompletedProcess[str]:
    v = bed.vcsim
    conn = ["--server", v.server, "--user", v.user, "--ca-file", str(v.ca_file)] if server else []
    return subprocess.run([*IVDFS, *args, *conn], env=bed.env(), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip


def disk(mp: Path, ivd: Ivd, snap: str) -> Path:
    return mp / ivd.datastore_name / ivd.id / snap / "disk.raw"


def test_umount_refuses_while_files_are_open(
    bed: Bed, ivds: dict[str, tuple[Ivd, str]], tmp_path: Path
) -> None:
    ivd, snap = ivds["safe-a"]
    m = Mount(bed, tmp_path / "mnt")
    mp = m.mountpoint
    with open(disk(mp, ivd, snap), "rb") as f:
        f.read(4096)
        r = cli(bed, "umount", str(mp))
        assert r.returncode == 8, r.stderr
        assert f"(pid {os.getpid()})" in r.stderr and "disk.raw" in r.stderr
        assert "--force" in r.stderr and "--lazy" in r.stderr
        assert mounted_at(mp) and m.proc.poll() is None
        # The reader is not cut off.
        assert len(f.read(MiB)) == MiB
    # A working directory holds it too.
    holder = subprocess.Popen(["sleep", "60"], cwd=mp / ivd.datastore_name)
    try:
        r = cli(bed, "umount", str(mp))
        assert r.returncode == 8 and "working directory" in r.stderr and "sleep" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    r = cli(bed, "umount", str(mp))
    assert r.returncode == 0, r.stderr
    assert m.proc.wait(timeout=30) == 0 and not mounted_at(mp)


def test_umount_lazy_and_force(bed: Bed, ivds: dict[str, tuple[Ivd, str]], tmp_path: Path) -> None:
    ivd, snap = ivds["safe-b"]
    # --lazy: detached at once, the open file goes on reading, the process ends after it.
    m = Mount(bed, tmp_path / "lazy")
    f = open(disk(m.mountpoint, ivd, snap), "rb")
    f.read(4096)
    r = cli(bed, "umount", "--lazy", str(m.mountpoint))
    assert r.returncode == 0 and "detached" in r.stdout, r.stderr
    assert not mounted_at(m.mountpoint)
    assert len(f.read(MiB)) == MiB and m.proc.poll() is None
    f.close()
    assert m.proc.wait(timeout=30) == 0
    # --force: the daemon stops; the reader gets an error, never wrong bytes or a hang.
    m = Mount(bed, tmp_path / "force")
    with open(disk(m.mountpoint, ivd, snap), "rb", buffering=0) as g:
        g.read(4096)
        r = cli(bed, "umount", "--force", str(m.mountpoint))
        assert r.returncode == 0, r.stderr
        assert m.proc.wait(timeout=30) == 0 and not mounted_at(m.mountpoint)
        # Past what the page cache holds, the reader gets an error, never other bytes.
        os.posix_fadvise(g.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError):
            g.read(MiB)


def test_fsname_and_subtype_are_the_users(
    bed: Bed, ivds: dict[str, tuple[Ivd, str]], tmp_path: Path
) -> None:
    m = Mount(bed, tmp_path / "mnt", "-o", "subtype=vsphere,fsname=snapshots")
    line = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                if f" {m.mountpoint} " in ln)  # fmt: skip
    assert " fuse.vsphere snapshots " in line
    # umount knows it by its journal, whatever it is called.
    r = cli(bed, "umount", str(m.mountpoint))
    assert r.returncode == 0, r.stderr
    assert m.proc.wait(timeout=30) == 0


def test_a_new_snapshot_is_found_by_its_id_and_refresh_relists(
    bed: Bed, ivds: dict[str, tuple[Ivd, str]], tmp_path: Path
) -> None:
    """With listings kept for an hour, "create, then read" works at once, and `ivdfs refresh`
    lists a directory again on demand."""
    ivd, snap = ivds["safe-a"]
    with Mount(bed, tmp_path / "mnt", "--refresh", "3600") as m:
        ivd_dir = m.mountpoint / ivd.datastore_name / ivd.id
        assert snap in os.listdir(ivd_dir)
        new = bed.vcsim.create_snapshot(ivd, "made after mounting")
        place_image(bed.images, ivd, new, bed.root / "safe-a.raw")
        # By its exact path: asked from vCenter although the listing is fresh.
        assert disk(m.mountpoint, ivd, new).stat().st_size == 2 * MiB
        other = bed.vcsim.create_snapshot(ivd, "another")
        assert other not in os.listdir(ivd_dir)
        r = cli(bed, "refresh", str(ivd_dir))
        assert r.returncode == 0 and "refreshed" in r.stdout, r.stderr
        assert other in os.listdir(ivd_dir)
        r = cli(bed, "refresh", str(tmp_path))
        assert r.returncode == 2 and "not a directory of an ivdfs mount" in r.stderr
        assert m.unmount() == 0
        for s in (new, other):
            bed.vcsim.delete_snapshot(ivd, s)


def test_subset_mount(bed: Bed, ivds: dict[str, tuple[Ivd, str]], tmp_path: Path) -> None:
    ivd, snap = ivds["safe-b"]
    with Mount(bed, tmp_path / "one-ds", "--datastore", "LocalDS_1") as m:
        assert sorted(os.listdir(m.mountpoint)) == [".ivdfs", "LocalDS_1", "by-name"]
        assert m.unmount() == 0
    with Mount(bed, tmp_path / "one-ivd", "--ivd", "safe-b") as m:
        mp = m.mountpoint
        assert os.listdir(mp / "LocalDS_1") == [ivd.id]
        assert os.listdir(mp / "LocalDS_0") == []
        assert os.listdir(mp / "by-name") == ["safe-b"]
        assert disk(mp, ivd, snap).stat().st_size == 2 * MiB
        assert m.unmount() == 0
    r = subprocess.run(bed.mount_args(tmp_path / "one-ivd", "--ivd", "no-such"), env=bed.env(),
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 10 and "no IVD with UUID or name 'no-such'" in r.stderr


def test_owner_and_mode_options(bed: Bed, ivds: dict[str, tuple[Ivd, str]], tmp_path: Path) -> None:
    ivd, snap = ivds["safe-a"]
    with Mount(bed, tmp_path / "mnt", "-o", "uid=1234,gid=5678,umask=027") as m:
        d = disk(m.mountpoint, ivd, snap)
        for path, mode in ((d, 0o440), (d.parent, 0o550), (m.mountpoint / "by-name", 0o550)):
            st = path.stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 5678, mode)
        # default_permissions: the kernel enforces these modes (root still reads).
        assert len(d.read_bytes()) == 2 * MiB
        opts = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                    if f" {m.mountpoint} " in ln)  # fmt: skip
        assert "default_permissions" in opts and "uid=1234" not in opts
        assert m.unmount() == 0


def test_dot_entries_ctime_and_daemon_cwd(
    bed: Bed, ivds: dict[str, tuple[Ivd, str]], tmp_path: Path
) -> None:
    ivd, _ = ivds["safe-b"]
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = subprocess.run(bed.mount_args(mp), env=bed.env(), capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        rec = journal.find(mp)
        assert rec is not None
        # The daemon keeps no directory of its caller busy.
        assert os.readlink(f"/proc/{rec.pid}/cwd") == "/"
        listing = subprocess.run(["ls", "-a", str(mp / ivd.datastore_name)], capture_output=True,
                                 text=True, check=True).stdout.split()  # fmt: skip
        assert listing[:2] == [".", ".."]
        ivd_dir = mp / ivd.datastore_name / ivd.id
        os.listdir(ivd_dir)  # loaded: its creation time is known now
        created = json.loads((ivd_dir / "info.json").read_text())["create_time"]
        from datetime import datetime, timedelta

        since = datetime.fromisoformat(created) - datetime(1970, 1, 1, tzinfo=UTC)
        assert ivd_dir.stat().st_mtime_ns == since // timedelta(microseconds=1) * 1000
    finally:
        assert cli(bed, "umount", str(mp)).returncode == 0


@pytest.mark.killed_mount
@pytest.mark.allow_log("Fatal Python error", "Segmentation fault", "Current thread",
                       "Thread 0x", "File ", "line ")  # fmt: skip
def test_a_crash_leaves_a_trace_in_the_log(
    bed: Bed, ivds: dict[str, tuple[Ivd, str]], tmp_path: Path
) -> None:
    m = Mount(bed, tmp_path / "mnt")
    m.proc.send_signal(signal.SIGSEGV)
    m.proc.wait(timeout=30)
    assert "Fatal Python error: Segmentation fault" in m.log()
    r = cli(bed, "umount", str(m.mountpoint))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not mounted_at(m.mountpoint)


def test_generated_files_are_never_torn(bed: Bed, tmp_path: Path) -> None:
    """Concurrent opens of the statistics file each get one whole document."""
    with Mount(bed, tmp_path / "mnt") as m:
        stats = m.mountpoint / ".ivdfs" / "stats"
        bad: list[str] = []

        def reader() -> None:
            for _ in range(150):
                text = stats.read_text()
                try:
                    json.loads(text)
                except ValueError:
                    bad.append(text)

        threads = [threading.Thread(target=reader) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert bad == []
        assert m.unmount() == 0


def test_abbreviated_options_are_refused(bed: Bed) -> None:
    r = cli(bed, "ls", "--insec")
    assert r.returncode == 2 and "unrecognized arguments: --insec" in r.stderr
