"""Inventory at scale (issue 11): a vCenter with the VSLM endpoint, listed through a mount and
`ivdfs ls`, compared with what the test bed created; one re-login for a whole pool of threads.

Speed is the benchmark's business (scripts/bench --only inventory); these tests check that the
fast paths give exactly what the per-IVD calls give.
"""

from __future__ import annotations

import json
import logging
import os
import pty
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyVmomi import vim

from tests.mounting import IVDFS, Bed, Mount
from tests.testbed.vsphere import PopulatedIvd, Vcsim, bulk_specs


@pytest.fixture(scope="module")
def vslm_bed(built_testbed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    v = Vcsim(vslm=True, api_version="7.0.2.0", populate=bulk_specs(45)).start()
    root = tmp_path_factory.mktemp("vslm")
    (root / "images").mkdir()
    try:
        yield Bed(v, root)
    finally:
        v.stop()


def ns(t: object) -> int:
    return int(t.timestamp() * 1e9)  # type: ignore[attr-defined]


def on(bed: Bed, ds: str) -> list[PopulatedIvd]:
    return [p for p in bed.vcsim.populated if p.ivd.datastore_name == ds]


# The populated IVDs have no images: a snapshot directory's probe finds no disk.
@pytest.mark.allow_log(r"A file was not found \[VixError 4\]")
def test_a_mount_with_vslm_lists_what_was_created(vslm_bed: Bed, tmp_path: Path) -> None:
    v = vslm_bed.vcsim
    with Mount(vslm_bed, tmp_path / "mnt", "--vcenter-connections", "5") as m:
        mp = m.mountpoint
        assert sorted(os.listdir(mp / "by-name")) == sorted(p.ivd.name for p in v.populated)
        for ds in ("LocalDS_0", "LocalDS_1", "LocalDS_2"):
            expected = {p.ivd.id: p for p in on(vslm_bed, ds)}
            assert sorted(os.listdir(mp / ds)) == sorted(expected)
            for ivd_id, p in sorted(expected.items()):
                # The IVD's creation time, known from the datastore's listing alone.
                assert os.stat(mp / ds / ivd_id).st_mtime_ns == ns(p.create_time)
                snaps = {s.id: s for s in p.snapshots}
                assert sorted(os.listdir(mp / ds / ivd_id)) == sorted([*snaps, "info.json"])
                for sid, s in snaps.items():
                    assert os.stat(mp / ds / ivd_id / sid).st_mtime_ns == ns(s.create_time)
        # info.json holds the whole record, not the listing's summary: a snapshot's info.json
        # read first (before its IVD's) too.
        vsom = v.content.vStorageObjectManager
        with_snapshots = [p for p in on(vslm_bed, "LocalDS_1") if p.snapshots]
        for p, first in ((on(vslm_bed, "LocalDS_1")[0], None), (with_snapshots[-1], "snapshot")):
            ivd_dir = mp / "LocalDS_1" / p.ivd.id
            if first == "snapshot":
                snap = json.loads((ivd_dir / p.snapshots[0].id / "info.json").read_text())
                doc = snap["ivd"]
            else:
                doc = json.loads((ivd_dir / "info.json").read_text())
            record = vsom.RetrieveVStorageObject(
                id=vim.vslm.ID(id=p.ivd.id),
                datastore=vim.Datastore(p.ivd.datastore_moref, v.si._stub),
            )
            assert doc["provisioning"] == record.config.backing.provisioningType
            assert doc["backing_file"] == record.config.backing.filePath
            assert doc["name"] == p.ivd.name and doc["uuid"] == p.ivd.id
        stats = json.loads((mp / ".ivdfs" / "stats").read_text())["tree"]
        # Listing the IVD directories one after another was read ahead, by the pool but one.
        assert stats["read_ahead_used"] > 0 and stats["read_ahead_workers"] == 4
        assert m.unmount() == 0


def ls(bed: Bed, *args: str) -> object:
    v = bed.vcsim
    r = subprocess.run(
        [*IVDFS, "ls", *args, "--json", "--server", v.server, "--user", v.user,
         "--ca-file", str(v.ca_file)],
        env=bed.env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_ls_with_vslm(vslm_bed: Bed) -> None:
    listed = ls(vslm_bed, "LocalDS_2")
    expected = on(vslm_bed, "LocalDS_2")
    assert isinstance(listed, list)
    assert {d["uuid"]: (d["name"], d["snapshots"]) for d in listed} == {
        p.ivd.id: (p.ivd.name, len(p.snapshots)) for p in expected
    }
    everything = ls(vslm_bed, "--all")
    assert isinstance(everything, list)
    assert {d["uuid"]: [s["id"] for s in d["snapshots"]] for d in everything} == {
        p.ivd.id: [s.id for s in sorted(p.snapshots, key=lambda s: s.create_time)]
        for p in vslm_bed.vcsim.populated
    }


def test_ls_all_shows_progress_on_a_terminal_only(vslm_bed: Bed) -> None:
    """A long listing counts on a terminal (stderr), and the table on stdout stays clean; with
    stderr not a terminal nothing but the table is written."""
    v = vslm_bed.vcsim
    argv = [*IVDFS, "ls", "--all", "--server", v.server, "--user", v.user,
            "--ca-file", str(v.ca_file)]  # fmt: skip
    controller, terminal = pty.openpty()
    try:
        r = subprocess.run(argv, env=vslm_bed.env(), stdout=subprocess.PIPE, stderr=terminal,
                           stdin=subprocess.DEVNULL, text=True, timeout=60)  # fmt: skip
        os.close(terminal)
        said = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            said += chunk
    finally:
        os.close(controller)
    assert r.returncode == 0
    total = len(v.populated)
    assert f"listing IVDs ... {total}, done" in said.decode(), said
    assert len(r.stdout.splitlines()) > total and "..." not in r.stdout
    plain = subprocess.run(argv, env=vslm_bed.env(), capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)  # fmt: skip
    assert plain.returncode == 0 and plain.stderr == "" and plain.stdout == r.stdout


def test_one_relogin_for_the_whole_pool(vslm_bed: Bed, caplog: pytest.LogCaptureFixture) -> None:
    """Eight threads that all find the session gone log in again once, and all get answers."""
    from ivdfs.config import Secret, ServerConfig
    from ivdfs.inventory.model import Datastore
    from ivdfs.inventory.vsphere import VSphere

    v = vslm_bed.vcsim
    host, port = v.server.split(":")
    vs = VSphere(ServerConfig(host, int(port), v.user, Secret(v.password), Path(v.ca_file)), 8)
    vs.connect()
    try:
        helpers = v.content.sessionManager.currentSession.key
        others = [s.key for s in v.content.sessionManager.sessionList if s.key != helpers]
        v.content.sessionManager.TerminateSession(sessionId=others)
        items = [(Datastore(p.ivd.datastore_name, p.ivd.datastore_moref), p.ivd.id)
                 for p in v.populated[:24]]  # fmt: skip
        with caplog.at_level(logging.INFO, logger="ivdfs.inventory.session"):
            found = vs.session.map(lambda x: vs.snapshots_of(*x), items)
        assert [len(f) for f in found] == [len(p.snapshots) for p in v.populated[:24]]
        relogins = [r for r in caplog.records if "logging in again" in r.getMessage()]
        assert len(relogins) == 1
        # The VSLM endpoint follows the new session too.
        assert len(vs.summaries(Datastore("LocalDS_0", items[0][0].moref))) > 0
    finally:
        vs.close()


def test_a_silent_vcenter_costs_one_login_attempt_not_one_per_thread(
    vslm_bed: Bed, caplog: pytest.LogCaptureFixture
) -> None:
    """vCenter stalls (frozen): eight calls that time out together share one attempt to log
    in again and its failure, instead of each trying its own and waiting its own deadline in
    turn (a listing would stall for minutes)."""
    from concurrent.futures import ThreadPoolExecutor

    from ivdfs.config import Secret, ServerConfig
    from ivdfs.errors import BackendError
    from ivdfs.inventory.model import Datastore
    from ivdfs.inventory.vsphere import VSphere

    v = vslm_bed.vcsim
    host, port = v.server.split(":")
    server = ServerConfig(host, int(port), v.user, Secret(v.password), Path(v.ca_file),
                          timeout=1.0)  # fmt: skip
    vs = VSphere(server, 8)
    vs.connect()
    items = [(Datastore(p.ivd.datastore_name, p.ivd.datastore_moref), p.ivd.id)
             for p in v.populated[:8]]  # fmt: skip

    def ask(item: tuple[Datastore, str]) -> str:
        try:
            vs.snapshots_of(*item)
        except BackendError as e:
            return str(e)
        return "answered"

    try:
        v.freeze()
        try:
            with caplog.at_level(logging.INFO, logger="ivdfs.inventory.session"):
                with ThreadPoolExecutor(8) as pool:
                    answers = list(pool.map(ask, items))
        finally:
            v.thaw()
        assert all("within 1 s (--vcenter-timeout)" in a for a in answers), answers
        relogins = [r for r in caplog.records if "logging in again" in r.getMessage()]
        assert len(relogins) == 1, [r.getMessage() for r in relogins]
    finally:
        vs.close()
