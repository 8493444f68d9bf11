"""A standalone ESXi host (no vCenter): the same user-level tests as against a vCenter.

The module's `vcsim` is the test bed in ESX mode (`Vcsim(esx=True)`: About.apiType
"HostAgent", datacenter ha-datacenter, IVDs through HostVStorageObjectManager), so the tests
imported from t4_cli run unchanged against a host: `ls` (tables and JSON), `snapshot
create/delete`, `--snapshot-now` with both ways of unmounting, and a mount reading disk.raw.
`ivdfs check` must name the kind of server, VDDK must be given the host's own datastore
morefs, and what a host cannot do (changed areas) says so in one line.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import Bed, Mount, call_lines
from tests.t4_check import check, step
from tests.t4_cli import (  # noqa: F401  (the fixture and tests run here again, on a host)
    cli,
    fails,
    ivds,
    test_log_is_one_line_per_event_without_secrets_or_ceip,
    test_ls_tables_and_json_match_the_api,
    test_snapshot_create_delete_round_trip,
    test_snapshot_now_deletes_exactly_its_snapshots,
)
from tests.testbed.vsphere import Ivd, Vcsim

HOST_REASON = "an ESXi host has no changed-block query for IVDs"


@pytest.fixture(scope="module")
def vcsim(built_testbed: None) -> Iterator[Vcsim]:
    with Vcsim(esx=True) as v:
        yield v


def test_check_names_the_host(bed: Bed, ivds: dict[str, Ivd]) -> None:  # noqa: F811
    r = check(bed)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [step(r, s) for s in ("certificate", "login", "vddk", "read")] == ["ok"] * 4
    login = next(ln for ln in r.stdout.splitlines() if ln.split()[1:2] == ["login"])
    assert "ESXi host)" in login, login
    assert ivds["alpha"].id in r.stdout
    r = check(bed, IVDFS_PASSWORD="wrong")
    assert r.returncode == 4 and step(r, "login") == "FAIL", r.stdout + r.stderr


@pytest.mark.allow_log(rf"ERROR .*open: .*{HOST_REASON}")
def test_a_host_reads_disks_and_says_it_has_no_changed_areas(
    bed: Bed,
    ivds: dict[str, Ivd],  # noqa: F811  (the fixture imported above)
    mountpoint: Path,
) -> None:
    alpha = ivds["alpha"]
    nightly, weekly = bed.vcsim.snapshots(alpha)
    before = len(bed.log_lines())
    with Mount(bed, mountpoint) as m:
        snapdir = mountpoint / alpha.datastore_name / alpha.id / weekly
        assert (snapdir / "disk.raw").read_bytes() == (bed.root / "img").read_bytes()
        info = json.loads((snapdir / "info.json").read_bytes())
        assert info["ivd"]["datastore_moref"] == alpha.datastore_moref
        changes = snapdir / "changes"
        assert sorted(os.listdir(changes)) == [f"{nightly}.json", f"{nightly}.raw"]
        doc = json.loads((changes / f"{nightly}.json").read_bytes())
        assert HOST_REASON in doc["error"] and "extents" not in doc
        with pytest.raises(OSError) as e, open(changes / f"{nightly}.raw", "rb"):
            pass
        assert e.value.errno == errno.EIO
        assert m.unmount() == 0
    # VDDK was pointed at the host's datastore (its ha-datacenter moref), by IVD and snapshot.
    connects = call_lines(bed.log_lines()[before:], "ConnectEx")
    assert connects and all(c["ds"] == alpha.datastore_moref for c in connects)
    assert {c["ssid"] for c in connects} == {weekly}
    fails(cli(bed, "changes", "alpha", nightly, weekly), 12, HOST_REASON)
