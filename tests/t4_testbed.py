"""The test bed's vCenter: our vcsim launcher and the tests.testbed.vsphere helpers.

One vcsim serves the whole module (start-up takes ~0.3 s); each test only adds objects.
"""

from __future__ import annotations

import datetime
import hashlib
import random
import re
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
from tests.testbed.vddkprobe import SINGLE_LINK, STANDIN_LIBRARY, Job, probe
from tests.testbed.vmdk import Layout
from tests.testbed.vsphere import Ivd, Vcsim, datastore_file, place_chain, place_image, record_ivd

MiB = 1 << 20


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
        # ESXi's file names: a stem of its own, the running disk two snapshots on.
        path = re.fullmatch(
            r"\[LocalDS_0\] fcd/([0-9a-f]{32})-000002\.vmdk", obj.config.backing.filePath
        )
        assert path is not None and a.id.replace("-", "") not in path[1]
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


def test_snapshot_files_are_named_and_consolidated_as_on_esxi(vcsim: Vcsim) -> None:
    """A snapshot freezes the running link and starts the next one; deleting a snapshot merges
    its link's child into it (store.go). RetrieveSnapshotDetails is callable at API 6.7."""
    ivd = vcsim.create_ivd("chain", 8, datastore="LocalDS_1")
    m = re.fullmatch(r"\[LocalDS_1\] fcd/([0-9a-f]{32})\.vmdk", vcsim.backing_path(ivd))
    assert m is not None
    stem = f"[LocalDS_1] fcd/{m[1]}"

    def files() -> tuple[list[str], str]:
        snaps = [vcsim.snapshot_details(ivd, s)[0] for s in vcsim.snapshots(ivd)]
        return [p.removeprefix(stem) for p in snaps], vcsim.backing_path(ivd).removeprefix(stem)

    s1, s2, s3 = (vcsim.create_snapshot(ivd, f"s{k}") for k in (1, 2, 3))
    assert files() == ([".vmdk", "-000001.vmdk", "-000002.vmdk"], "-000003.vmdk")
    vcsim.delete_snapshot(ivd, s2)  # -000002 is merged into -000001, which s3 now names
    assert files() == ([".vmdk", "-000001.vmdk"], "-000003.vmdk")
    vcsim.delete_snapshot(ivd, s3)  # the running disk is merged into s3's link
    assert files() == ([".vmdk"], "-000001.vmdk")
    s4 = vcsim.create_snapshot(ivd, "s4")  # the lowest free number
    assert files() == ([".vmdk", "-000001.vmdk"], "-000002.vmdk")
    vcsim.delete_snapshot(ivd, s1)  # the base takes its child in
    assert files() == ([".vmdk"], "-000002.vmdk")
    assert vcsim.snapshots(ivd) == [s4]
    vcsim.delete_ivd(ivd)


def _images(folder: Path, count: int, seed: int) -> list[Path]:
    """`count` 8 MiB images, each a few 64 KiB grains on from the one before."""
    rng = random.Random(seed)
    data = bytearray(8 * MiB)
    out = []
    for k in range(count):
        for _ in range(6):
            g = rng.randrange(128)
            data[g * 65536 : (g + 1) * 65536] = rng.randbytes(65536)
        out.append(folder / f"image{k}.raw")
        out[-1].write_bytes(data)
    return out


@pytest.mark.parametrize("layout", ["sparse", "flat"])
def test_place_chain_puts_every_snapshot_where_vcenter_says(
    vcsim: Vcsim, built_testbed: None, tmp_path: Path, layout: Layout
) -> None:
    ivd = vcsim.create_ivd(f"direct-{layout}", 8, datastore="LocalDS_0")
    snaps = [vcsim.create_snapshot(ivd, f"s{k}") for k in range(3)]
    images = _images(tmp_path, 4, seed=len(layout))
    ds = tmp_path / "LocalDS_0"
    links = place_chain(vcsim, ivd, ds, images[:3], current=images[3], layout=layout)
    assert [link.descriptor.parent for link in links] == [ds / "fcd"] * 4

    def read_back() -> dict[str, str]:
        """SHA-256 of what the stand-in reads at each snapshot's path and at the backing."""
        paths = [vcsim.snapshot_details(ivd, s)[0] for s in vcsim.snapshots(ivd)]
        paths.append(vcsim.backing_path(ivd))
        files = [str(datastore_file(ds, "LocalDS_0", p)) for p in paths]
        seen = probe(STANDIN_LIBRARY, [Job(f) for f in files] + [Job(files[-1], flags=SINGLE_LINK)])
        assert seen[-1].num_links == 1 and seen[-2].num_links == len(files)
        return {p: s.sha256 or "" for p, s in zip(paths, seen, strict=False)}

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert list(read_back().values()) == [sha(p) for p in images]
    # A deletion consolidates: s2's file now holds s3's image, the old link is gone.
    vcsim.delete_snapshot(ivd, snaps[1])
    before = sorted(p.name for p in (ds / "fcd").iterdir())
    place_chain(vcsim, ivd, ds, [images[0], images[2]], current=images[3], layout=layout)
    after = sorted(p.name for p in (ds / "fcd").iterdir())
    assert set(before) - set(after) == {links[2].descriptor.name}
    assert list(read_back().values()) == [sha(images[0]), sha(images[2]), sha(images[3])]
    with pytest.raises(ValueError, match="not a path on datastore"):
        datastore_file(ds, "LocalDS_1", vcsim.backing_path(ivd))
    with pytest.raises(ValueError, match="leaves the datastore"):
        datastore_file(ds, "LocalDS_0", "[LocalDS_0] fcd/../../etc/passwd")
    vcsim.delete_ivd(ivd)
