"""The test bed's vCenter: our vcsim launcher and the tests.testbed.vsphere helpers.

One vcsim serves the whole module (start-up takes ~0.3 s); each test only adds objects.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from pyVim.connect import Disconnect
from pyVmomi import vim, vmodl

from tests import mounting
from tests.mounting import Bed
from tests.testbed.vsphere import Ivd, Vcsim, place_image, record_ivd


@pytest.fixture(scope="module")
def vcsim() -> Iterator[Vcsim]:
    with Vcsim() as server:
        yield server


def test_tls_verified_with_ca_and_thumbprint_matches(vcsim: Vcsim) -> None:
    assert vcsim.url == f"https://127.0.0.1:{vcsim.port}/sdk"
    assert vcsim.server == f"127.0.0.1:{vcsim.port}"
    pem = ssl.get_server_certificate((vcsim.host, vcsim.port))
    der = ssl.PEM_cert_to_DER_cert(pem)
    assert der == ssl.PEM_cert_to_DER_cert(vcsim.cert_file.read_text())
    digest = hashlib.sha1(der).hexdigest().upper()
    assert vcsim.thumbprint == ":".join(digest[i : i + 2] for i in range(0, 40, 2))

    si = vcsim.connect()
    try:
        about = si.RetrieveContent().about
        assert (about.apiType, about.apiVersion) == ("VirtualCenter", "6.7")
        assert si._stub.version == "vim.version.version12"
    finally:
        Disconnect(si)


def test_wrong_credentials_are_refused(vcsim: Vcsim) -> None:
    assert vcsim.user == "backup@vsphere.local"
    with pytest.raises(vim.fault.InvalidLogin):
        vcsim.connect(password=vcsim.password + "x")
    with pytest.raises(vim.fault.InvalidLogin):
        vcsim.connect(user="user", password="pass")  # vcsim's default login


def test_certificate_not_signed_by_ca_fails_verification() -> None:
    with Vcsim(self_signed=True, datastores=1) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            server.connect()
        # The thumbprint is still that of the served certificate.
        der = ssl.PEM_cert_to_DER_cert(server.cert_file.read_text())
        assert server.thumbprint.replace(":", "") == hashlib.sha1(der).hexdigest().upper()
    assert server.returncode == 0  # SIGTERM is a clean exit


def test_ivds_and_snapshots(vcsim: Vcsim) -> None:
    stores = vcsim.datastores()
    names = [name for name, _ in stores]
    assert names[:2] == ["LocalDS_0", "LocalDS_1"]
    assert len(set(stores)) == len(stores) >= 2

    before = datetime.datetime.now(datetime.UTC)
    a = vcsim.create_ivd("disk-a", 64, datastore="LocalDS_0")
    b = vcsim.create_ivd("disk-b", 16, datastore="LocalDS_1")
    assert (a.datastore_name, b.datastore_name) == ("LocalDS_0", "LocalDS_1")
    assert (a.datastore_moref, b.datastore_moref) == (stores[0][1], stores[1][1])
    assert a.capacity_bytes == 64 << 20
    s1 = vcsim.create_snapshot(a, "first")
    s2 = vcsim.create_snapshot(a, "second")
    assert vcsim.snapshots(a) == [s1, s2]
    assert vcsim.snapshots(b) == []

    # What ivdfs itself will call, through an independent connection.
    si = vcsim.connect()
    try:
        vsom = si.RetrieveContent().vStorageObjectManager
        ds_a = vim.Datastore(a.datastore_moref, si._stub)
        ds_b = vim.Datastore(b.datastore_moref, si._stub)
        assert a.id in [i.id for i in vsom.ListVStorageObject(ds_a)]
        assert b.id in [i.id for i in vsom.ListVStorageObject(ds_b)]
        assert a.id not in [i.id for i in vsom.ListVStorageObject(ds_b)]

        obj = vsom.RetrieveVStorageObject(id=vim.vslm.ID(id=a.id), datastore=ds_a)
        assert (obj.config.name, obj.config.capacityInMB) == ("disk-a", 64)
        assert obj.config.backing.filePath == f"[LocalDS_0] fcd/{a.id}.vmdk"
        assert obj.config.backing.datastore._moId == a.datastore_moref

        info = vsom.RetrieveSnapshotInfo(id=vim.vslm.ID(id=a.id), datastore=ds_a)
        assert [s.id.id for s in info.snapshots] == [s1, s2]
        assert [s.description for s in info.snapshots] == ["first", "second"]
        times = [s.createTime for s in info.snapshots]
        assert before - datetime.timedelta(seconds=5) <= times[0] <= times[1]

        vcsim.delete_snapshot(a, s1)
        info = vsom.RetrieveSnapshotInfo(id=vim.vslm.ID(id=a.id), datastore=ds_a)
        assert [s.id.id for s in info.snapshots] == [s2]
        with pytest.raises(vmodl.fault.InvalidArgument):
            vcsim.delete_snapshot(a, s1)

        vcsim.delete_ivd(b)
        assert b.id not in [i.id for i in vsom.ListVStorageObject(ds_b)]
    finally:
        Disconnect(si)


def test_place_image_keeps_holes_and_is_read_only(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    with src.open("wb") as f:
        f.write(b"head")
        f.seek(32 << 20)
        f.write(b"tail")
    ivd = Ivd("ivd-1", "one", "LocalDS_0", "datastore-11", 32 << 20)
    dest = place_image(tmp_path / "images", ivd, "snap-1", src)
    assert dest == tmp_path / "images" / "ivd-1" / "snap-1.raw"
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_blocks * 512 < 1 << 20
    assert dest.stat().st_mode & 0o222 == 0
    assert dest.stat().st_ino != src.stat().st_ino
    assert sorted(p.name for p in dest.parent.iterdir()) == ["datastore", "snap-1.raw"]
    assert (dest.parent / "datastore").read_text() == "datastore-11\n"
    with pytest.raises(FileExistsError):
        place_image(tmp_path / "images", ivd, "snap-1", src)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["datastore", "snap-1.raw"]
    with pytest.raises(ValueError, match="datastore"):
        record_ivd(tmp_path / "images", "ivd-1", "datastore-12")


def test_launcher_exits_cleanly_on_stdin_eof() -> None:
    with Vcsim(datastores=1) as server:
        proc = server._proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()
        try:
            assert proc.wait(timeout=10) == 0
        except subprocess.TimeoutExpired:
            pytest.fail("vcsim ignored stdin EOF")


def test_log_marks_check_every_bed_and_a_used_bed_needs_a_log(tmp_path: Path) -> None:
    """conftest's standin_log_clean (mounting.LogMarks): a bed the test builds is checked from
    its first line, a log recreated under the same name from its start, and a bed that a
    mount of the test used but that has no log fails."""
    v = Vcsim()  # never started: the beds only need somewhere to record IVDs
    start = "1 tid=1 InitEx major=8\n"
    old = Bed(v, tmp_path / "old")
    old.root.mkdir()
    old.standin_log.write_text(start + "2 tid=1 VIOLATION write handle=1\n")  # before the test
    marks = mounting.LogMarks()
    used = SimpleNamespace(bed=None, log=lambda: "")
    try:
        marks.check()  # the old violation was before the marks
        new = Bed(v, tmp_path / "new")
        new.root.mkdir()
        new.standin_log.write_text(start + "3 tid=1 VIOLATION write handle=2\n")
        with pytest.raises(AssertionError, match="VIOLATION write handle=2"):
            marks.check()
        new.standin_log.write_text(start)
        old.standin_log.unlink()  # a test that unlinks the log; a mount makes it anew
        old.standin_log.write_text(start + "4 tid=1 PrepareForAccess id=x err=0\n")
        with pytest.raises(AssertionError, match="PrepareForAccess without EndAccess"):
            marks.check()
        old.standin_log.write_text(start)
        marks.check()
        used.bed = new
        mounting.STARTED.append(used)  # type: ignore[arg-type]
        new.standin_log.unlink()
        with pytest.raises(AssertionError, match="no stand-in log"):
            marks.check()
    finally:
        marks.close()
        if used in mounting.STARTED:
            mounting.STARTED.remove(used)  # type: ignore[arg-type]
        mounting.BEDS[:] = [b for b in mounting.BEDS if b.vcsim is not v]
