"""The holdings journal's own rules, in-process (issue 25 #1): what a clean exit keeps, which
entry a release strikes, and how a dead mount and its appliances are told from strangers that
were given their pids. The mounts that write and undo journals are in t4_recover; these are
the cases a kill can reach only by chance (a pid reused, two entries of one IVD, an appliance
left running at exit)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ivdfs import journal
from ivdfs.commands.recover import appliance_processes

KINDS = {
    "snapshots": {"ivd": "i1", "description": "ivdfs-1"},
    "prepared": {"ivd": "i1", "datastore": "datastore-7"},
    "run_dirs": "/run/ivdfs/volumes-1",
    "vixmntapi": {"ivd": "i1", "snapshot": "s1", "name": "i1", "fuse": []},
    "appliances": {"helper": 1, "helper_start": "1", "qemu": 2, "qemu_start": "2"},
}


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runtime directory of the test's own (root's is /run/ivdfs, shared with real mounts)."""
    d = tmp_path / "run"
    monkeypatch.setattr(journal, "runtime_dir", lambda: d)
    return d


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_clean_exit_keeps_the_journal_while_anything_is_held(runtime: Path, kind: str) -> None:
    """Whatever is still held at exit (an appliance's qemu as much as a snapshot) keeps the
    file, so that `ivdfs umount` finds it; with nothing held it goes."""
    j = journal.Journal(runtime / "mnt")
    j.add(kind, KINDS[kind])
    assert j.finish(3) == [kind]
    doc = json.loads(j.path.read_text())
    assert (doc["state"], doc["exit_code"], doc[kind]) == ("exited", 3, [KINDS[kind]])
    j2 = journal.Journal(runtime / "mnt2")
    j2.add(kind, KINDS[kind])
    j2.drop_value(kind, KINDS[kind])
    assert j2.finish(0) == [] and not j2.path.exists()


def test_a_release_strikes_only_its_own_entry(runtime: Path) -> None:
    """Two VixMntapi mounts of one IVD's two snapshots: dropping one leaves the other (a match
    on every field, not on any); EndAccess strikes the IVD's prepared entry."""
    j = journal.Journal(runtime / "mnt")
    for snap in ("s1", "s2"):
        j.add("vixmntapi", {"ivd": "i1", "snapshot": snap, "name": "i1", "fuse": []})
    j.drop("vixmntapi", {"ivd": "i1", "snapshot": "s1"})
    assert [e["snapshot"] for e in j.record().vixmntapi] == ["s2"]
    j.prepared("i1", "datastore-7")
    j.prepared("i2", "datastore-7")
    j.ended("i1")
    assert j.record().prepared == [{"ivd": "i2", "datastore": "datastore-7"}]


def test_a_reused_pid_is_not_the_mount(tmp_path: Path) -> None:
    """A journal is alive only while its pid has the start time it recorded: a dead mount's pid
    given to another process is a dead mount, whose holdings `ivdfs umount` undoes."""
    me, start = os.getpid(), journal.process_start(os.getpid())
    doc = {"format": journal.FORMAT, "mountpoint": str(tmp_path), "pid": me}
    assert journal.Record(tmp_path / "j", {**doc, "pid_start": start}).alive
    assert not journal.Record(tmp_path / "j", {**doc, "pid_start": str(int(start or 0) + 1)}).alive


def test_an_appliance_is_killed_only_with_its_start_time(tmp_path: Path) -> None:
    """Recovery stops an appliance's helper and qemu by pid only when the pid still has the
    start time journaled: never a stranger that got the pid, nor one with no start recorded."""
    with subprocess.Popen(["sleep", "60"]) as p:
        try:
            start = journal.process_start(p.pid)
            assert start is not None

            def found(**appliance: object) -> list[int]:
                doc = {"mountpoint": str(tmp_path), "pid": 1, "appliances": [appliance]}
                return appliance_processes(journal.Record(tmp_path / "j", doc))

            assert found(helper=p.pid, helper_start=start) == [p.pid]
            assert found(qemu=p.pid, qemu_start=start) == [p.pid]
            assert found(helper=p.pid, helper_start=str(int(start) + 1)) == []
            assert found(qemu=p.pid) == []
        finally:
            p.kill()
