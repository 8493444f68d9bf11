"""The test bed's vSphere extensions, checked through pyVmomi exactly as a client sees them.

Start-up population, the delay on inventory queries, the VSLM endpoint (paging, batches,
associations, versions, session), ESX mode (HostVStorageObjectManager) and changed block
tracking computed from the stand-in images. Each server serves a module (start-up ~0.3 s).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import http.client
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect
from pyVmomi import SoapStubAdapter, vim, vmodl, vslm

from tests.mounting import wait_for
from tests.testbed.vsphere import (
    Ivd,
    IvdSpec,
    SnapshotSpec,
    Vcsim,
    bulk_specs,
    place_image,
    vslm_version,
)

MiB = 1 << 20
BLOCK = 64 << 10
T0 = datetime.datetime(2024, 3, 1, 12, 0, tzinfo=datetime.UTC)


def _vid(ivd: Ivd | str) -> Any:
    return vim.vslm.ID(id=ivd if isinstance(ivd, str) else ivd.id)


# -- population ---------------------------------------------------------------------------

SPECS = [
    IvdSpec("plain", 8, "LocalDS_0", T0),
    IvdSpec(
        "snapped",
        16,
        "LocalDS_1",
        T0 + datetime.timedelta(hours=1),
        snapshots=(
            SnapshotSpec("first", T0 + datetime.timedelta(hours=2)),
            SnapshotSpec("second", T0 + datetime.timedelta(hours=3)),
        ),
    ),
    IvdSpec(
        "tracked",
        8,
        "LocalDS_2",
        T0,
        cbt=True,
        snapshots=(SnapshotSpec("cbt-1", T0),),
        attachments=(("vm-1001", 2000), ("vm-1002", 2001)),
    ),
    *bulk_specs(27),
]


@pytest.fixture(scope="module")
def vc(built_testbed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    images = tmp_path_factory.mktemp("images")
    with Vcsim(
        vslm=True,
        api_version="7.0.2.0",
        vslm_page_limit=7,
        populate=SPECS,
        images_dir=images,
        cbt_max_span=1 * MiB,
        cbt_max_areas=3,
    ) as v:
        yield v


def _config(obj: Any) -> dict[str, Any]:
    """A VStorageObject as a client reads it, with what differs per IVD taken out."""
    c = obj.config
    return {
        "type": type(obj).__name__,
        "keepAfterDeleteVm": c.keepAfterDeleteVm,
        "relocationDisabled": c.relocationDisabled,
        "nativeSnapshotSupported": c.nativeSnapshotSupported,
        "changedBlockTrackingEnabled": c.changedBlockTrackingEnabled,
        "consumptionType": list(c.consumptionType),
        "consumerId": list(c.consumerId),
        "iofilter": list(c.iofilter),
        "backing": type(c.backing).__name__,
        "provisioningType": c.backing.provisioningType,
        "parent": c.backing.parent,
        "deltaSizeInMB": c.backing.deltaSizeInMB,
        "path": re.sub(r"fcd/[0-9a-f]{32}(-\d{6})?\.vmdk", "fcd/LINK.vmdk", c.backing.filePath),
        "datastore": c.backing.datastore._moId,
        "hasBackingObjectId": bool(c.backing.backingObjectId),
    }


def test_populated_ivds_are_what_the_server_reports(vc: Vcsim) -> None:
    assert [p.ivd.name for p in vc.populated] == [s.name for s in SPECS]
    ids = [p.ivd.id for p in vc.populated]
    assert len(set(ids)) == len(ids)
    vsom = vc.content.vStorageObjectManager
    stores = dict(vc.datastores())
    for spec, p in zip(SPECS, vc.populated, strict=True):
        assert p.ivd.datastore_name == spec.datastore
        assert p.ivd.datastore_moref == stores[spec.datastore]
        assert p.ivd.capacity_bytes == spec.capacity_mb * MiB
        assert p.create_time == spec.create_time
        ds = vim.Datastore(p.ivd.datastore_moref, vc.si._stub)
        assert p.ivd.id in [i.id for i in vsom.ListVStorageObject(ds)]
        obj = vsom.RetrieveVStorageObject(id=_vid(p.ivd), datastore=ds)
        assert (obj.config.name, obj.config.capacityInMB) == (spec.name, spec.capacity_mb)
        assert obj.config.createTime == spec.create_time
        assert obj.config.changedBlockTrackingEnabled is spec.cbt
        info = vsom.RetrieveSnapshotInfo(id=_vid(p.ivd), datastore=ds)
        assert [s.id.id for s in info.snapshots] == [s.id for s in p.snapshots]
        assert [(s.description, s.createTime) for s in info.snapshots] == [
            (s.description, s.create_time) for s in spec.snapshots
        ]
        for s in p.snapshots:
            assert vc.snapshot_details(p.ivd, s.id)[1] == s.change_id
            assert bool(s.change_id) is spec.cbt


def test_populated_ivds_look_like_created_ones(vc: Vcsim) -> None:
    vsom = vc.content.vStorageObjectManager
    made = vc.create_ivd("made", 8, datastore="LocalDS_0")
    try:
        snap = vc.create_snapshot(made, "made-snap")
        populated = vc.populated[0].ivd  # "plain", 8 MiB on LocalDS_0
        ds = vim.Datastore(made.datastore_moref, vc.si._stub)
        a = vsom.RetrieveVStorageObject(id=_vid(made), datastore=ds)
        b = vsom.RetrieveVStorageObject(id=_vid(populated), datastore=ds)
        assert _config(a) == _config(b)
        info = vsom.RetrieveSnapshotInfo(id=_vid(made), datastore=ds).snapshots[0]
        other = vc.populated[1]
        ds1 = vim.Datastore(other.ivd.datastore_moref, vc.si._stub)
        pinfo = vsom.RetrieveSnapshotInfo(id=_vid(other.ivd), datastore=ds1).snapshots[0]
        assert type(info) is type(pinfo)
        assert info.id.id == snap and bool(info.backingObjectId) and bool(pinfo.backingObjectId)
        # Snapshot disk paths follow one pattern too.
        path = vc.snapshot_details(made, snap)[0]
        ppath = vc.snapshot_details(other.ivd, other.snapshots[0].id)[0]
        # The snapshot froze the base; the running disk is the next link (store.go).
        assert re.fullmatch(r"\[LocalDS_0\] fcd/[0-9a-f]{32}\.vmdk", path)
        assert re.fullmatch(r"\[LocalDS_1\] fcd/[0-9a-f]{32}\.vmdk", ppath)
        assert a.config.backing.filePath == path.removesuffix(".vmdk") + "-000001.vmdk"
    finally:
        vc.delete_ivd(made)


def test_bulk_specs_half_have_snapshots() -> None:
    specs = bulk_specs(500)
    with_snaps = [s for s in specs if s.snapshots]
    assert len(with_snaps) == 250
    assert {len(s.snapshots) for s in with_snaps} == {1, 2, 3}
    assert {s.datastore for s in specs} == {"LocalDS_0", "LocalDS_1", "LocalDS_2"}
    assert len({s.name for s in specs}) == 500


def test_bad_populate_spec_is_a_clear_startup_error(built_testbed: None) -> None:
    with pytest.raises(RuntimeError, match=r"no datastore \"LocalDS_9\""):
        Vcsim(datastores=1, populate=[IvdSpec("x", 8, "LocalDS_9")]).start()


def test_restart_does_not_populate_again(built_testbed: None) -> None:
    with Vcsim(datastores=1, populate=[IvdSpec("once", 8)]) as v:
        first = v.populated
        v.kill_server()
        v.restart_server()
        ds = vim.Datastore(dict(v.datastores())["LocalDS_0"], v.si._stub)
        assert v.content.vStorageObjectManager.ListVStorageObject(ds) == []
        assert v.populated == first


# -- the VSLM endpoint ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vsom_vslm(vc: Vcsim) -> Any:
    return vc.connect_vslm().RetrieveContent().vStorageObjectManager


def test_vslm_service_content(vc: Vcsim) -> None:
    content = vc.connect_vslm().RetrieveContent()
    assert content.aboutInfo.apiVersion == "7.0.2.0"
    assert content.aboutInfo.instanceUuid == vc.content.about.instanceUuid
    assert isinstance(content.vStorageObjectManager, vslm.vso.VStorageObjectManager)
    assert vc.connect().RetrieveContent().about.apiVersion == "7.0.2.0"


def test_vslm_paging_is_complete_ascending_and_without_duplicates(
    vc: Vcsim, vsom_vslm: Any
) -> None:
    q = vslm.vso.VStorageObjectQuerySpec
    every = sorted(p.ivd.id for p in vc.populated)
    pages: list[list[str]] = []
    last = None
    while True:
        query = (
            []
            if last is None
            else [q(queryField="id", queryOperator="greaterThan", queryValue=[last])]
        )
        res = vsom_vslm.VslmListVStorageObjectForSpec(query=query, maxResult=100)
        ids = [i.id for i in res.id]
        assert ids == [r.id.id for r in res.queryResults]
        pages.append(ids)
        if res.allRecordsReturned:
            break
        assert len(ids) == 7  # the server's page limit, below maxResult
        last = ids[-1]
    flat = [i for page in pages for i in page]
    assert flat == every  # ascending, complete, no duplicates
    assert len(pages) == -(-len(every) // 7)

    res = vsom_vslm.VslmListVStorageObjectForSpec(query=[], maxResult=3)
    assert (len(res.id), res.allRecordsReturned) == (3, False)
    res = vsom_vslm.VslmListVStorageObjectForSpec(query=[], maxResult=len(every) + 1)
    assert res.allRecordsReturned is False  # the page limit still applies


def test_vslm_filter_by_datastore_matches_vim_listing(vc: Vcsim, vsom_vslm: Any) -> None:
    vsom = vc.content.vStorageObjectManager
    for name, moref in vc.datastores():
        ds = vim.Datastore(moref, vc.si._stub)
        vim_ids = sorted(i.id for i in vsom.ListVStorageObject(ds))
        results = list(vc.vslm_list(vsom_vslm, datastore_moref=moref, page=5))
        assert [r.id.id for r in results] == vim_ids, name
        for r in results:
            obj = vsom.RetrieveVStorageObject(id=r.id, datastore=ds)
            assert (r.name, r.capacityInMB, r.createTime) == (
                obj.config.name,
                obj.config.capacityInMB,
                obj.config.createTime,
            )
            assert r.diskPath == obj.config.backing.filePath


def test_vslm_query_operators(vc: Vcsim, vsom_vslm: Any) -> None:
    q = vslm.vso.VStorageObjectQuerySpec

    def names(*specs: Any) -> list[str]:
        return sorted(r.name for r in vc.vslm_list(vsom_vslm, query=specs))

    assert names(q(queryField="name", queryOperator="equals", queryValue=["plain", "tracked"])) == [
        "plain",
        "tracked",
    ]
    assert names(q(queryField="name", queryOperator="startsWith", queryValue=["pv-0001"])) == [
        f"pv-{i:05d}" for i in range(10, 20)
    ]
    populated = {p.ivd.name for p in vc.populated}
    small = names(q(queryField="capacity", queryOperator="lessThan", queryValue=["16"]))
    assert populated.intersection(small) == {"plain", "tracked"}
    after = (T0 + datetime.timedelta(minutes=30)).isoformat()
    late = names(q(queryField="createTime", queryOperator="greaterThan", queryValue=[after]))
    assert populated.intersection(late) == {"snapped"}
    ds2 = dict(vc.datastores())["LocalDS_2"]
    assert "tracked" in names(
        q(queryField="datastoreMoId", queryOperator="equals", queryValue=[ds2]),
        q(queryField="name", queryOperator="notEquals", queryValue=["x"]),
    )
    for bad in (
        q(queryField="colour", queryOperator="equals", queryValue=["x"]),
        q(queryField="name", queryOperator="like", queryValue=["x"]),
        q(queryField="capacity", queryOperator="contains", queryValue=["1"]),
        q(queryField="name", queryOperator="equals", queryValue=[]),
    ):
        with pytest.raises(vmodl.fault.InvalidArgument):
            vsom_vslm.VslmListVStorageObjectForSpec(query=[bad], maxResult=10)
    with pytest.raises(vmodl.fault.InvalidArgument):
        vsom_vslm.VslmListVStorageObjectForSpec(query=[], maxResult=0)


def test_vslm_batch_retrieval_with_per_id_faults(vc: Vcsim, vsom_vslm: Any) -> None:
    vsom = vc.content.vStorageObjectManager
    wanted = [p.ivd.id for p in vc.populated[:5]] + ["no-such-ivd"] + [vc.populated[1].ivd.id]
    res = vsom_vslm.VslmRetrieveVStorageObjects(ids=[_vid(i) for i in wanted])
    assert [r.id.id for r in res] == wanted
    missing = res[5]
    assert isinstance(missing.error, vim.fault.NotFound) and missing.name is None
    for r, p in zip(res[:5], vc.populated[:5], strict=True):
        assert r.error is None
        ds = vim.Datastore(p.ivd.datastore_moref, vc.si._stub)
        obj = vsom.RetrieveVStorageObject(id=_vid(p.ivd), datastore=ds)
        info = vsom.RetrieveSnapshotInfo(id=_vid(p.ivd), datastore=ds)
        assert (r.name, r.capacityInMB, r.createTime) == (
            obj.config.name,
            obj.config.capacityInMB,
            obj.config.createTime,
        )
        assert r.backingObjectId.id == obj.config.backing.backingObjectId
        assert [(s.snapshotId.id, s.description, s.backingObjectId.id) for s in r.snapshotInfo] == [
            (s.id.id, s.description, s.backingObjectId) for s in info.snapshots
        ]
    # The single-object calls agree with vim's.
    p = vc.populated[1]
    ds = vim.Datastore(p.ivd.datastore_moref, vc.si._stub)
    assert vsom_vslm.VslmRetrieveVStorageObject(id=_vid(p.ivd)).config.name == "snapped"
    assert [s.id.id for s in vsom_vslm.VslmRetrieveSnapshotInfo(id=_vid(p.ivd)).snapshots] == [
        s.id.id for s in vsom.RetrieveSnapshotInfo(id=_vid(p.ivd), datastore=ds).snapshots
    ]
    details = vsom_vslm.VslmRetrieveSnapshotDetails(
        id=_vid(p.ivd), snapshotId=_vid(p.snapshots[0].id)
    )
    assert details.path == vc.snapshot_details(p.ivd, p.snapshots[0].id)[0]
    # VSLM 7.0.2's diskPath fields name the same files as the vim calls.
    (r,) = vsom_vslm.VslmRetrieveVStorageObjects(ids=[_vid(p.ivd)])
    assert r.diskPath == vc.backing_path(p.ivd)
    assert [s.diskPath for s in r.snapshotInfo] == [
        vc.snapshot_details(p.ivd, s.id)[0] for s in p.snapshots
    ]
    with pytest.raises(vim.fault.NotFound):
        vsom_vslm.VslmRetrieveVStorageObject(id=_vid("no-such-ivd"))
    with pytest.raises(vim.fault.NotFound):
        vsom_vslm.VslmRetrieveSnapshotInfo(id=_vid("no-such-ivd"))


def test_associations_in_one_call(vc: Vcsim, vsom_vslm: Any) -> None:
    tracked, plain = vc.populated[2].ivd, vc.populated[0].ivd
    res = vsom_vslm.VslmRetrieveVStorageObjectAssociations(
        ids=[_vid(tracked), _vid(plain), _vid("no-such-ivd")]
    )
    assert [r.id.id for r in res] == [tracked.id, plain.id, "no-such-ivd"]
    assert [(a.vmId, a.diskKey) for a in res[0].vmDiskAssociation] == [
        ("vm-1001", 2000),
        ("vm-1002", 2001),
    ]
    assert (list(res[1].vmDiskAssociation), res[1].fault) == ([], None)
    assert isinstance(res[2].fault, vim.fault.NotFound)

    spec = vim.vslm.vcenter.RetrieveVStorageObjSpec
    res = vc.content.vStorageObjectManager.RetrieveVStorageObjectAssociations(
        ids=[
            spec(id=_vid(tracked), datastore=vim.Datastore(tracked.datastore_moref, vc.si._stub)),
            spec(id=_vid(tracked), datastore=vim.Datastore(plain.datastore_moref, vc.si._stub)),
        ]
    )
    assert [(a.vmId, a.diskKey) for a in res[0].vmDiskAssociations] == [
        ("vm-1001", 2000),
        ("vm-1002", 2001),
    ]
    assert isinstance(res[1].fault, vim.fault.NotFound)  # right id, wrong datastore


def test_vslm_shares_state_with_vim(vc: Vcsim, vsom_vslm: Any) -> None:
    made = vc.create_ivd("shared", 8, datastore="LocalDS_1")
    snap = vc.create_snapshot(made, "via-vim")
    (r,) = vsom_vslm.VslmRetrieveVStorageObjects(ids=[_vid(made)])
    assert (r.name, [s.snapshotId.id for s in r.snapshotInfo]) == ("shared", [snap])
    vc.rename_ivd(made, "renamed")
    assert vsom_vslm.VslmRetrieveVStorageObject(id=_vid(made)).config.name == "renamed"
    vc.delete_ivd(made)
    (r,) = vsom_vslm.VslmRetrieveVStorageObjects(ids=[_vid(made)])
    assert isinstance(r.error, vim.fault.NotFound)


def test_vslm_answers_with_the_clients_version(vc: Vcsim) -> None:
    ivd = vc.populated[1].ivd  # two snapshots
    seen = {}
    for version in ("vslm.version.version14", "vslm.version.version15", "vslm.version.v7_0_2_0"):
        vsom = vc.connect_vslm(version=version).RetrieveContent().vStorageObjectManager
        (r,) = vsom.VslmRetrieveVStorageObjects(ids=[_vid(ivd)])
        seen[version] = (
            r.backingObjectId is not None,
            len(r.snapshotInfo),
            [s.snapshotId is not None for s in r.snapshotInfo],
            r.diskPath is not None,
        )
    assert seen == {
        "vslm.version.version14": (False, 0, [], False),
        "vslm.version.version15": (True, 2, [False, False], False),
        "vslm.version.v7_0_2_0": (True, 2, [True, True], True),
    }
    assert vslm_version("6.7.2") == "vslm.version.version14"
    assert vslm_version("6.7.3") == "vslm.version.version15"
    assert vslm_version("8.0.3.0") == "vslm.version.v7_0_2_0"
    with pytest.raises(ValueError, match=r"6\.7\.2"):
        vslm_version("6.7")


def test_vslm_version_newer_than_the_server_is_refused(built_testbed: None) -> None:
    with Vcsim(vslm=True, api_version="6.7.2", datastores=1) as v:
        assert v.connect_vslm().RetrieveContent().aboutInfo.apiVersion == "6.7.2"
        with pytest.raises(vmodl.fault.InvalidRequest, match=r"urn:vslm/6\.7\.3"):
            v.connect_vslm(version="vslm.version.version15").RetrieveContent()


def test_vslm_needs_the_vim_session_in_the_soap_header(vc: Vcsim) -> None:
    si = vc.connect()
    try:
        session = si._stub.GetSessionId()
        assert si._stub.cookie.startswith(f'vmware_soap_session="{session}"')

        def call(ctx: dict[str, str], http_cookie: str = "") -> Any:
            stub = SoapStubAdapter(
                host=vc.host,
                port=vc.port,
                path="/vslm/sdk",
                version=vslm_version(vc.api_version),
                sslContext=vc.ssl_context(),
                requestContext=ctx,
            )
            stub.cookie = http_cookie
            return vslm.ServiceInstance("ServiceInstance", stub).RetrieveContent()

        assert call({"vcSessionCookie": session}).aboutInfo.apiVersion == "7.0.2.0"
        for ctx, cookie in (
            ({}, ""),
            ({}, si._stub.cookie),  # the HTTP cookie alone is not enough here
            ({"vcSessionCookie": "0123-bogus"}, ""),
            ({"vcSessionCookie": f'"{session}"'}, ""),  # quotes are not part of the id
        ):
            with pytest.raises(vim.fault.NotAuthenticated):
                call(ctx, cookie)
        si.content.sessionManager.Logout()
        with pytest.raises(vim.fault.NotAuthenticated):
            call({"vcSessionCookie": session})
    finally:
        Disconnect(si)


def test_vslm_endpoint_off_by_default_and_needs_6_7_2(built_testbed: None) -> None:
    with Vcsim(datastores=1) as v:
        conn = http.client.HTTPSConnection(v.host, v.port, context=v.ssl_context())
        conn.request("POST", "/vslm/sdk", body=b"<x/>")
        assert conn.getresponse().status == 404
        conn.close()
    with pytest.raises(RuntimeError, match=r"6\.7\.2"):
        Vcsim(vslm=True, api_version="6.7.1", datastores=1).start()
    with pytest.raises(RuntimeError, match="ESXi host has none"):
        Vcsim(vslm=True, api_version="6.7.2", esx=True, datastores=1).start()


# -- delays --------------------------------------------------------------------------------

DELAY_MS = 250


def delay_lines(v: Vcsim, what: str) -> list[str]:
    """The methods the launcher delayed (its "inventory-delay begin|end METHOD" lines)."""
    text = (v.tmpdir / "vcsim.log").read_text()
    return [ln.split()[2] for ln in text.splitlines() if ln.startswith(f"inventory-delay {what} ")]


def delayed_by(v: Vcsim, fn: Any) -> list[str]:
    """The methods the launcher delayed while `fn` ran: no clock, its own word."""
    before = len(delay_lines(v, "end"))
    fn()
    return delay_lines(v, "end")[before:]


def test_inventory_delay_applies_to_inventory_methods_only(
    built_testbed: None, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    spec = IvdSpec("d", 8, cbt=True, snapshots=(SnapshotSpec("a"), SnapshotSpec("b")))
    with Vcsim(
        inventory_delay_ms=DELAY_MS,
        vslm=True,
        api_version="7.0.2.0",
        images_dir=images,
        populate=[spec],
    ) as v:
        (p,) = v.populated
        a, b = p.snapshots
        image = tmp_path / "img.raw"
        image.write_bytes(b"x" * 4096)
        place_image(images, p.ivd, a.id, image)
        place_image(images, p.ivd, b.id, image)
        vsom = v.content.vStorageObjectManager
        ds = vim.Datastore(p.ivd.datastore_moref, v.si._stub)
        vid = _vid(p.ivd)
        vs = v.connect_vslm().RetrieveContent().vStorageObjectManager
        spec_q = vslm.vso.VStorageObjectQuerySpec
        slow = {
            "ListVStorageObject": lambda: vsom.ListVStorageObject(ds),
            "RetrieveVStorageObject": lambda: vsom.RetrieveVStorageObject(id=vid, datastore=ds),
            "RetrieveSnapshotInfo": lambda: vsom.RetrieveSnapshotInfo(id=vid, datastore=ds),
            "RetrieveSnapshotDetails": lambda: v.snapshot_details(p.ivd, b.id),
            "QueryChangedDiskAreas": lambda: v.changed_areas(p.ivd, b.id, a.change_id),
            "RetrieveVStorageObjectAssociations": lambda: vsom.RetrieveVStorageObjectAssociations(
                ids=[vim.vslm.vcenter.RetrieveVStorageObjSpec(id=vid, datastore=ds)]
            ),
            "VslmListVStorageObjectForSpec": lambda: vs.VslmListVStorageObjectForSpec(
                query=[spec_q(queryField="name", queryOperator="equals", queryValue=["d"])],
                maxResult=10,
            ),
            "VslmRetrieveVStorageObjects": lambda: vs.VslmRetrieveVStorageObjects(ids=[vid]),
            "VslmRetrieveVStorageObject": lambda: vs.VslmRetrieveVStorageObject(id=vid),
            "VslmRetrieveVStorageObjectAssociations": (
                lambda: vs.VslmRetrieveVStorageObjectAssociations(ids=[vid])
            ),
            "VslmRetrieveSnapshotInfo": lambda: vs.VslmRetrieveSnapshotInfo(id=vid),
            "VslmRetrieveSnapshotDetails": lambda: vs.VslmRetrieveSnapshotDetails(
                id=vid, snapshotId=_vid(b.id)
            ),
            "VslmQueryChangedDiskAreas": lambda: vs.VslmQueryChangedDiskAreas(
                id=vid, snapshotId=_vid(b.id), startOffset=0, changeId="*"
            ),
        }
        fast = {
            "Login": lambda: Disconnect(v.connect()),
            "CurrentTime": lambda: v.si.CurrentTime(),
            "VStorageObjectCreateSnapshot_Task": lambda: v.create_snapshot(p.ivd, "c"),
            "CreateDisk_Task": lambda: v.create_ivd("fast", 8),
            "SetVStorageObjectControlFlags": lambda: v.set_cbt(p.ivd, True),
            "VslmRetrieveContent": lambda: v.connect_vslm().RetrieveContent(),
        }

        took = {name: delayed_by(v, fn) for name, fn in {**slow, **fast}.items()}
        # Each slow call was delayed (as itself), no fast one was: the launcher says so.
        assert {n for n, d in took.items() if d} == set(slow), took

        # Delays overlap: 8 parallel queries on 8 sessions are all inside their delay at
        # once (held at the gate until the eighth arrives), not one after another.
        sessions = [v.connect() for _ in range(8)]
        gate = v.tmpdir / "faults" / "inventory.gate"
        gate.touch()
        try:
            calls = [
                (s.RetrieveContent().vStorageObjectManager, vim.Datastore(ds._moId, s._stub))
                for s in sessions
            ]
            begun = len(delay_lines(v, "begin"))
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                done = pool.map(
                    lambda c: c[0].RetrieveVStorageObject(id=vid, datastore=c[1]), calls
                )
                wait_for(lambda: len(delay_lines(v, "begin")) - begun == 8, what="8 in the delay")
                assert delay_lines(v, "end")[begun:] == []  # none left it while the gate stood
                gate.unlink()
                assert len(list(done)) == 8
        finally:
            gate.unlink(missing_ok=True)
            for s in sessions:
                Disconnect(s)


def test_inventory_delay_in_esx_mode(built_testbed: None) -> None:
    spec = IvdSpec("e", 8, snapshots=(SnapshotSpec("a"),))
    with Vcsim(esx=True, inventory_delay_ms=DELAY_MS, populate=[spec], datastores=1) as v:
        (p,) = v.populated
        vsom = v.content.vStorageObjectManager
        ds = vim.Datastore(p.ivd.datastore_moref, v.si._stub)
        vid = _vid(p.ivd)
        slow = {
            "HostListVStorageObject": lambda: vsom.HostListVStorageObject(datastore=ds),
            "HostRetrieveVStorageObject": lambda: vsom.HostRetrieveVStorageObject(
                id=vid, datastore=ds
            ),
            "HostVStorageObjectRetrieveSnapshotInfo": (
                lambda: vsom.HostVStorageObjectRetrieveSnapshotInfo(id=vid, datastore=ds)
            ),
        }
        fast = {
            "HostCreateDisk_Task": lambda: v.create_ivd("fast", 8),
            "HostVStorageObjectCreateSnapshot_Task": lambda: v.create_snapshot(p.ivd, "b"),
            "HostSetVStorageObjectControlFlags": lambda: v.set_cbt(p.ivd, True),
        }
        took = {name: delayed_by(v, fn) for name, fn in {**slow, **fast}.items()}
        assert {n for n, d in took.items() if d} == set(slow), took


# -- ESX mode ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def esx(built_testbed: None) -> Iterator[Vcsim]:
    with Vcsim(
        esx=True, populate=[IvdSpec("pre", 8, "LocalDS_1", snapshots=(SnapshotSpec("p"),))]
    ) as v:
        yield v


def test_esx_identity(esx: Vcsim) -> None:
    si = esx.connect()
    try:
        content = si.RetrieveContent()
        about = content.about
        assert (about.apiType, about.apiVersion) == ("HostAgent", "6.7")
        assert about.fullName.startswith("VMware ESXi 6.7.0")
        assert si._stub.version == "vim.version.version12"
        assert si._stub.cookie.startswith('vmware_soap_session="')
        assert isinstance(content.vStorageObjectManager, vim.vslm.host.VStorageObjectManager)
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datacenter], True)
        assert [dc.name for dc in view.view] == ["ha-datacenter"]
        assert [ds.name for ds in view.view[0].datastore] == ["LocalDS_0", "LocalDS_1", "LocalDS_2"]
    finally:
        Disconnect(si)
    with pytest.raises(vim.fault.InvalidLogin):
        esx.connect(password=esx.password + "x")


def test_esx_ivds_and_snapshots_through_the_host_manager(esx: Vcsim) -> None:
    vsom = esx.content.vStorageObjectManager
    a = esx.create_ivd("host-a", 16, datastore="LocalDS_0")
    b = esx.create_ivd("host-b", 8, datastore="LocalDS_1")
    ds_a = vim.Datastore(a.datastore_moref, esx.si._stub)
    ds_b = vim.Datastore(b.datastore_moref, esx.si._stub)
    assert a.id in [i.id for i in vsom.HostListVStorageObject(datastore=ds_a)]
    assert a.id not in [i.id for i in vsom.HostListVStorageObject(datastore=ds_b)]
    pre = esx.populated[0]
    assert {pre.ivd.id, b.id} <= {i.id for i in vsom.HostListVStorageObject(datastore=ds_b)}

    obj = vsom.HostRetrieveVStorageObject(id=_vid(a), datastore=ds_a)
    assert (obj.config.name, obj.config.capacityInMB) == ("host-a", 16)
    assert re.fullmatch(r"\[LocalDS_0\] fcd/[0-9a-f]{32}\.vmdk", obj.config.backing.filePath)
    with pytest.raises(vim.fault.NotFound):
        vsom.HostRetrieveVStorageObject(id=_vid(a), datastore=ds_b)

    s1 = esx.create_snapshot(a, "one")
    s2 = esx.create_snapshot(a, "two")
    info = vsom.HostVStorageObjectRetrieveSnapshotInfo(id=_vid(a), datastore=ds_a)
    assert [(s.id.id, s.description) for s in info.snapshots] == [(s1, "one"), (s2, "two")]
    base = obj.config.backing.filePath.removesuffix(".vmdk")
    assert esx.backing_path(a) == f"{base}-000002.vmdk"  # a host names the files as vCenter
    esx.delete_snapshot(a, s1)
    assert esx.snapshots(a) == [s2]
    assert esx.snapshots(pre.ivd) == [pre.snapshots[0].id]
    esx.rename_ivd(b, "host-b2")
    assert vsom.HostRetrieveVStorageObject(id=_vid(b), datastore=ds_b).config.name == "host-b2"
    esx.set_cbt(b, True)
    assert vsom.HostRetrieveVStorageObject(
        id=_vid(b), datastore=ds_b
    ).config.changedBlockTrackingEnabled
    esx.delete_ivd(a)
    assert a.id not in [i.id for i in vsom.HostListVStorageObject(datastore=ds_a)]


def test_esx_refuses_what_only_vcenter_has(esx: Vcsim) -> None:
    ref = esx.content.vStorageObjectManager._moId
    as_vcenter = vim.vslm.vcenter.VStorageObjectManager(ref, esx.si._stub)
    ds = vim.Datastore(esx.datastores()[0][1], esx.si._stub)
    refused = (vmodl.fault.MethodNotFound, vmodl.fault.ManagedObjectNotFound)
    with pytest.raises(refused):
        as_vcenter.ListVStorageObject(datastore=ds)
    with pytest.raises(refused):
        as_vcenter.RetrieveSnapshotDetails(id=_vid("x"), datastore=ds, snapshotId=_vid("y"))
    with pytest.raises(refused):
        as_vcenter.QueryChangedDiskAreas(
            id=_vid("x"), datastore=ds, snapshotId=_vid("y"), startOffset=0, changeId="*"
        )
    conn = http.client.HTTPSConnection(esx.host, esx.port, context=esx.ssl_context())
    conn.request("POST", "/vslm/sdk", body=b"<x/>")
    assert conn.getresponse().status == 404
    conn.close()


# -- changed block tracking ----------------------------------------------------------------


def _write(path: Path, size: int, edits: list[tuple[int, bytes]]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for off, data in edits:
            f.seek(off)
            f.write(data)
    return path


def _extents(blocks: list[int], lo: int = 0) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b in sorted(blocks):
        start = max(b, lo)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + b + BLOCK - start)
        else:
            out.append((start, b + BLOCK - start))
    return out


def _diff(a: Path, b: Path, size: int) -> list[tuple[int, int]]:
    da = a.read_bytes().ljust(size, b"\0")
    db = b.read_bytes().ljust(size, b"\0")
    return _extents([o for o in range(0, size, BLOCK) if da[o : o + BLOCK] != db[o : o + BLOCK]])


def _allocated(path: Path, size: int) -> list[tuple[int, int]]:
    blocks = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            blocks.update(range(data // BLOCK * BLOCK, hole, BLOCK))
            off = hole
    finally:
        os.close(fd)
    return _extents([b for b in blocks if b < size])


CAP = 8 * MiB
BASE = [(0, b"boot" * 1024), (3 * MiB, os.urandom(300_000)), (6 * MiB + 5, b"z" * 70_000)]
EDITS = [
    (100, b"head"),  # inside the first block
    (BLOCK - 2, b"span"),  # across a block boundary
    (3 * MiB + 1000, b"\0" * 200_000),  # data zeroed
    (6 * MiB + 5, b"z" * 70_000),  # rewritten with the same bytes: no change
    (CAP - 10, b"tail"),  # the last block
    *[(k * 140_000 + 1_100_000, b"q") for k in range(7)],  # scattered: 7 areas in 1 MiB
]


@pytest.fixture(scope="module")
def cbt_ivd(vc: Vcsim, tmp_path_factory: pytest.TempPathFactory) -> tuple[Ivd, list[str], Path]:
    """A CBT-enabled IVD with three snapshots: base, base+EDITS, and an empty disk."""
    src = tmp_path_factory.mktemp("cbt-src")
    ivd = vc.create_ivd("cbt", CAP // MiB)
    vc.set_cbt(ivd, True)
    snaps = [vc.create_snapshot(ivd, d) for d in ("base", "edited", "empty")]
    images = Path(vc._args[vc._args.index("-images") + 1])
    _write(src / "base.raw", CAP, BASE)
    _write(src / "edited.raw", CAP, BASE + EDITS)
    _write(src / "empty.raw", CAP, [])
    for sid, name in zip(snaps, ("base", "edited", "empty"), strict=True):
        place_image(images, ivd, sid, src / f"{name}.raw")
    return ivd, snaps, images


def test_changed_areas_equal_a_direct_comparison(vc: Vcsim, cbt_ivd: Any) -> None:
    ivd, (base, edited, empty), images = cbt_ivd
    img = {s: images / ivd.id / f"{s}.raw" for s in (base, edited, empty)}
    c_base = vc.snapshot_details(ivd, base)[1]
    c_edited = vc.snapshot_details(ivd, edited)[1]
    assert c_base and c_edited and c_base != c_edited

    want = _diff(img[base], img[edited], CAP)
    assert (0, BLOCK * 2) in want and (CAP - BLOCK, BLOCK) in want
    assert not any(s <= 6 * MiB + BLOCK < s + n for s, n in want)  # same bytes: unchanged
    assert vc.all_changed_areas(ivd, edited, c_base) == want
    assert vc.all_changed_areas(ivd, empty, c_edited) == _diff(img[edited], img[empty], CAP)
    assert vc.all_changed_areas(ivd, empty, c_base) == _diff(img[base], img[empty], CAP)

    vs = vc.connect_vslm().RetrieveContent().vStorageObjectManager
    got: list[tuple[int, int]] = []
    off = 0
    while off < CAP:
        info = vs.VslmQueryChangedDiskAreas(
            id=_vid(ivd), snapshotId=_vid(edited), startOffset=off, changeId=c_base
        )
        got += [(a.start, a.length) for a in info.changedArea]
        off = info.startOffset + info.length
    assert got == want


def test_star_is_the_allocated_extents(vc: Vcsim, cbt_ivd: Any) -> None:
    ivd, (base, edited, empty), images = cbt_ivd
    for sid in (base, edited):
        want = _allocated(images / ivd.id / f"{sid}.raw", CAP)
        assert want and vc.all_changed_areas(ivd, sid, "*") == want
    assert vc.all_changed_areas(ivd, empty, "*") == []


def test_changed_areas_come_in_pieces(vc: Vcsim, cbt_ivd: Any) -> None:
    ivd, (base, edited, _), _ = cbt_ivd
    c_base = vc.snapshot_details(ivd, base)[1]
    off, calls, truncated = 0, 0, 0
    while off < CAP:
        info = vc.changed_areas(ivd, edited, c_base, off)
        calls += 1
        areas = [(a.start, a.length) for a in info.changedArea]
        assert info.startOffset == off and 0 < info.length <= MiB  # -cbt-max-span
        assert len(areas) <= 3  # -cbt-max-areas
        assert all(off <= s and s + n <= off + info.length for s, n in areas)
        if len(areas) == 3 and info.length < min(MiB, CAP - off):
            truncated += 1
            assert areas[-1][0] + areas[-1][1] == off + info.length
        off = info.startOffset + info.length
    assert off == CAP and calls > CAP // MiB and truncated >= 1
    # An unaligned start is answered from there.
    info = vc.changed_areas(ivd, edited, c_base, 512)
    assert info.startOffset == 512 and info.changedArea[0].start == 512


def test_changed_areas_refusals(vc: Vcsim, cbt_ivd: Any, tmp_path: Path) -> None:
    ivd, (base, edited, empty), _ = cbt_ivd
    c_base = vc.snapshot_details(ivd, base)[1]
    c_empty = vc.snapshot_details(ivd, empty)[1]
    for start in (CAP, -512, 100, CAP + MiB):
        with pytest.raises(vmodl.fault.InvalidArgument):
            vc.changed_areas(ivd, edited, c_base, start)
    for change in (c_empty, "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1", "", "bogus"):
        with pytest.raises(vmodl.fault.InvalidArgument):
            vc.changed_areas(ivd, edited, change)
    with pytest.raises(vim.fault.NotFound):
        vc.changed_areas(ivd, "no-such-snapshot", "*")

    # Another IVD's change id is not this one's.
    other = vc.populated[2]  # "tracked", CBT on, one snapshot
    with pytest.raises(vmodl.fault.InvalidArgument):
        vc.changed_areas(ivd, edited, other.snapshots[0].change_id)

    # A snapshot whose image is missing: a loud test-bed error, not "no changes".
    with pytest.raises(vim.fault.FileNotFound, match="vcsim test bed"):
        vc.changed_areas(other.ivd, other.snapshots[0].id, "*")


def test_cbt_off_and_reset(vc: Vcsim, tmp_path: Path) -> None:
    images = Path(vc._args[vc._args.index("-images") + 1])
    vsom = vc.content.vStorageObjectManager
    ivd = vc.create_ivd("switch", 2)
    ds = vim.Datastore(ivd.datastore_moref, vc.si._stub)

    def cbt_enabled() -> bool:
        obj = vsom.RetrieveVStorageObject(id=_vid(ivd), datastore=ds)
        return bool(obj.config.changedBlockTrackingEnabled)

    image = _write(tmp_path / "x.raw", 2 * MiB, [(0, b"x")])
    untracked = vc.create_snapshot(ivd, "before CBT")
    place_image(images, ivd, untracked, image)
    assert not cbt_enabled() and vc.snapshot_details(ivd, untracked)[1] == ""
    with pytest.raises(vim.fault.FileFault):
        vc.changed_areas(ivd, untracked, "*")

    vc.set_cbt(ivd, True)
    assert cbt_enabled()
    s1, s2 = vc.create_snapshot(ivd, "1"), vc.create_snapshot(ivd, "2")
    for s in (s1, s2):
        place_image(images, ivd, s, image)
    c1 = vc.snapshot_details(ivd, s1)[1]
    assert vc.all_changed_areas(ivd, s2, c1) == []
    with pytest.raises(vim.fault.FileFault):  # taken while CBT was off
        vc.changed_areas(ivd, untracked, "*")

    # A change id outlives its snapshot.
    vc.delete_snapshot(ivd, s1)
    assert vc.all_changed_areas(ivd, s2, c1) == []

    vc.set_cbt(ivd, False)
    assert not cbt_enabled()
    with pytest.raises(vim.fault.FileFault):
        vc.changed_areas(ivd, s2, c1)

    vc.set_cbt(ivd, True)  # a new epoch: what was tracked before is gone
    s3 = vc.create_snapshot(ivd, "3")
    place_image(images, ivd, s3, image)
    with pytest.raises(vmodl.fault.InvalidArgument):
        vc.changed_areas(ivd, s3, c1)
    with pytest.raises(vim.fault.FileFault):
        vc.changed_areas(ivd, s2, "*")
    assert vc.all_changed_areas(ivd, s3, "*") == [(0, BLOCK)]
    vc.delete_ivd(ivd)


def test_cbt_defaults_and_no_images(built_testbed: None, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    spec = IvdSpec("d", 64, cbt=True, snapshots=(SnapshotSpec("a"),))
    with Vcsim(images_dir=images, populate=[spec], datastores=1) as v:
        (p,) = v.populated
        place_image(
            images,
            p.ivd,
            p.snapshots[0].id,
            _write(tmp_path / "a.raw", 64 * MiB, [(40 * MiB, b"a")]),
        )
        info = v.changed_areas(p.ivd, p.snapshots[0].id, "*")
        assert (info.startOffset, info.length) == (0, 16 * MiB)  # default span
        assert v.all_changed_areas(p.ivd, p.snapshots[0].id, "*") == [(40 * MiB, BLOCK)]
    with Vcsim(populate=[spec], datastores=1) as v:
        (p,) = v.populated
        with pytest.raises(vmodl.fault.NotSupported, match="without -images"):
            v.changed_areas(p.ivd, p.snapshots[0].id, "*")
