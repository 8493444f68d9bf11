"""vCenter trouble during a mount: expired sessions, outages, restarts (issue 5)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.mounting import IVDFS, Bed, Mount
from tests.testbed.vsphere import Vcsim, https_server, place_image

MiB = 1 << 20


def make_snapshot(bed: Bed, name: str, ds: str = "LocalDS_0") -> tuple[Path, str]:
    v = bed.vcsim
    ivd = v.create_ivd(name, 2, ds)
    snap = v.create_snapshot(ivd, name)
    src = bed.root / f"{name}.raw"
    src.write_bytes(hashlib.sha256(name.encode()).digest() * (2 * MiB // 32))
    place_image(bed.images, ivd, snap, src)
    return Path(ds) / ivd.id / snap / "disk.raw", hashlib.sha256(src.read_bytes()).hexdigest()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def own_bed(built_testbed: None, tmp_path: Path) -> Bed:
    """A vcsim of this test's own, since the test stops or disturbs it."""
    v = Vcsim().start()
    (tmp_path / "images").mkdir()
    bed = Bed(v, tmp_path)
    yield bed  # type: ignore[misc]
    v.stop()


def test_terminated_session_logs_in_again(own_bed: Bed, tmp_path: Path) -> None:
    first, digest1 = make_snapshot(own_bed, "one")
    with Mount(own_bed, tmp_path / "mnt") as m:
        assert sha(m.mountpoint / first) == digest1
        content = own_bed.vcsim.content
        mine = content.sessionManager.currentSession.key
        others = [s.key for s in content.sessionManager.sessionList if s.key != mine]
        assert others, "ivdfs holds no session?"
        content.sessionManager.TerminateSession(sessionId=others)
        # A listing not yet loaded needs vCenter again: it must log in transparently.
        second, digest2 = make_snapshot(own_bed, "two", "LocalDS_1")
        assert sha(m.mountpoint / second) == digest2
        assert m.unmount() == 0
    assert "logging in again" in m.log()
    assert m.unexpected_log_records() == []


@pytest.mark.allow_log("cannot reach", "Connection refused", "vCenter", "listing", "refreshing")
def test_vcenter_outage_and_restart(own_bed: Bed, tmp_path: Path) -> None:
    first, digest1 = make_snapshot(own_bed, "one")
    v = own_bed.vcsim
    other = v.create_ivd("not-looked-at", 1, first.parts[0])
    with Mount(own_bed, tmp_path / "mnt") as m:
        mp = m.mountpoint
        disk = mp / first
        f = open(disk, "rb")
        try:
            assert hashlib.sha256(f.read(MiB)).digest()
            assert other.id in os.listdir(mp / first.parts[0])  # listed, its record not asked
            v.kill_server()
            # A lookup in an IVD whose record and snapshots were never asked: both queries
            # fail at once; EIO with one line that names vCenter, not a bug's traceback.
            with pytest.raises(OSError) as e:
                os.stat(mp / first.parts[0] / other.id / "no-such-snapshot")
            assert e.value.errno == errno.EIO
            # Cached listings keep working, reads of an open disk keep working ...
            assert first.parts[1] in os.listdir(mp / first.parts[0])
            f.seek(0)
            assert hashlib.sha256(f.read()).hexdigest() == digest1
            # ... and what needs vCenter fails with EIO, not a hang or a dead mount.
            with pytest.raises(OSError) as e:
                os.listdir(mp / "LocalDS_1")
            assert e.value.errno == errno.EIO
            v.restart_server()
            # The restarted simulator has an empty inventory but answers again.
            assert os.listdir(mp / "LocalDS_2") == []
        finally:
            f.close()
        assert m.unmount() == 0
    log = m.log()
    assert "listing IVDs on LocalDS_1" in log and "Traceback" not in log
    assert "unexpected error" not in log and "ExceptionGroup" not in log


@pytest.mark.allow_log("certificate changed since mounting", "listing IVDs on")
def test_a_renewed_certificate_is_not_logged_in_to(own_bed: Bed, tmp_path: Path) -> None:
    """vCenter comes back with another certificate that the CA still vouches for: ivdfs does
    not log in again (VDDK goes on pinning the thumbprint seen at mount time); what needs
    vCenter fails with EIO, and the log says why."""
    v = own_bed.vcsim
    with Mount(own_bed, tmp_path / "mnt") as m:
        assert os.listdir(m.mountpoint / "LocalDS_0") == []  # logged in, answered
        before = v.thumbprint
        v.kill_server()
        v.renew_certificate()
        v.restart_server()
        assert v.thumbprint != before
        with pytest.raises(OSError) as e:
            os.listdir(m.mountpoint / "LocalDS_1")
        assert e.value.errno == errno.EIO
        assert m.unmount() == 0
    assert "the server certificate changed since mounting" in m.log()


def test_a_server_that_never_answers_fails_after_the_timeout(tmp_path: Path) -> None:
    """A server that completes the TLS handshake and then says nothing (a vCenter stalled
    after accepting): ivdfs gives up after --vcenter-timeout with one line, never hangs, at
    the version discovery before any login as at every later call."""
    with https_server(tmp_path, silent=True) as (port, ca):
        r = subprocess.run(
            [*IVDFS, "ls", "--server", f"127.0.0.1:{port}", "--user", "u", "--ca-file", str(ca),
             "--vcenter-timeout", "1"],
            env={**os.environ, "IVDFS_PASSWORD": "pw"}, capture_output=True, text=True,
            timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "within 1 s" in r.stderr, r.stderr
