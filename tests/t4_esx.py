"""A standalone ESXi host (no vCenter): the same user-level tests as against a vCenter.

The module's `vcsim` is the test bed in ESX mode (`Vcsim(esx=True)`: About.apiType
"HostAgent", datacenter ha-datacenter, IVDs through HostVStorageObjectManager), so the tests
imported from t4_cli run unchanged against a host: `ls` (tables and JSON), `snapshot
create/delete`, `--snapshot-now` with both ways of unmounting, and a mount reading disk.raw.
`ivdfs check` must name the kind of server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mounting import Bed
from tests.t4_check import check, step
from tests.t4_cli import (  # noqa: F401  (the fixture and tests run here again, on a host)
    ivds,
    test_log_is_one_line_per_event_without_secrets_or_ceip,
    test_ls_tables_and_json_match_the_api,
    test_snapshot_create_delete_round_trip,
    test_snapshot_now_deletes_exactly_its_snapshots,
)
from tests.testbed.vsphere import Ivd, Vcsim


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
