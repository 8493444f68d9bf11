"""Readable views of a real mount: by-name symlinks, info.json and user.ivdfs.* attributes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.mounting import Bed, Mount, sha256_file
from tests.testbed.vsphere import Ivd, Vcsim, place_image

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def disks(bed: Bed) -> dict[str, tuple[Ivd, list[tuple[str, str]]]]:
    """name -> (IVD, [(snapshot id, sha256 of its image)])."""
    v = bed.vcsim
    out: dict[str, tuple[Ivd, list[tuple[str, str]]]] = {}
    specs = [
        ("db/primary", "LocalDS_0", ["nightly", "nightly"]),  # '/' in a name, twin descriptions
        ("web", "LocalDS_0", ["before upgrade"]),
        ("web", "LocalDS_1", ["other web"]),  # the same IVD name on another datastore
    ]
    for i, (name, ds, descriptions) in enumerate(specs):
        ivd = v.create_ivd(name, 1, ds)
        snaps = []
        for j, desc in enumerate(descriptions):
            snap = v.create_snapshot(ivd, desc)
            data = bytes([i * 16 + j]) * MiB
            src = bed.root / f"{ivd.id}-{snap}"
            src.write_bytes(data)
            place_image(bed.images, ivd, snap, src)
            snaps.append((snap, hashlib.sha256(data).hexdigest()))
        out[f"{name}@{ds}"] = (ivd, snaps)
    return out


def test_by_name_links_resolve_to_the_right_bytes(
    bed: Bed, disks: dict[str, tuple[Ivd, list[tuple[str, str]]]], mountpoint: Path
) -> None:
    with Mount(bed, mountpoint) as m:
        by_name = mountpoint / "by-name"
        names = sorted(os.listdir(by_name))
        # Two IVDs named "web": the older (created first) keeps the plain name.
        web1 = disks["web@LocalDS_1"][0]
        assert names == sorted(["db_primary", "web", f"web~{web1.id[:8]}"])
        for key, link_dir in (
            ("db/primary@LocalDS_0", "db_primary"),
            ("web@LocalDS_0", "web"),
            ("web@LocalDS_1", f"web~{web1.id[:8]}"),
        ):
            ivd, snaps = disks[key]
            entries = sorted(os.listdir(by_name / link_dir))
            assert "latest" in entries and len(entries) == len(snaps) + 1
            for entry in entries:
                link = by_name / link_dir / entry
                target = os.readlink(link)
                assert not target.startswith("/")  # relative: survives bind mounts
                assert target.startswith(f"../../{ivd.datastore_name}/{ivd.id}/")
                assert link.is_symlink() and link.is_dir()
            for snap, digest in snaps:
                matching = [
                    e for e in entries if os.readlink(by_name / link_dir / e).endswith(snap)
                ]
                assert matching, (snap, entries)
                for e in matching:
                    assert sha256_file(by_name / link_dir / e / "disk.raw") == digest
            newest = snaps[-1][0]
            assert os.readlink(by_name / link_dir / "latest").endswith(newest)
        # Two snapshots with one description in one second: the later one gets its id.
        db_entries = sorted(os.listdir(by_name / "db_primary"))
        second = disks["db/primary@LocalDS_0"][1][1][0]
        labels = [e for e in db_entries if e != "latest"]
        assert len(labels) == 2 and all(" nightly" in e for e in labels)
        stamps = {e.split(" ")[0] for e in labels}
        for stamp in stamps:
            datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        if len(stamps) == 1:  # the usual case: both made within one second
            assert any(e.endswith(f"~{second[:8]}") for e in labels)
        assert m.unmount() == 0
    assert m.unexpected_log_records() == []


def test_info_json_and_xattrs(
    bed: Bed, disks: dict[str, tuple[Ivd, list[tuple[str, str]]]], mountpoint: Path
) -> None:
    ivd, snaps = disks["web@LocalDS_0"]
    snap = snaps[0][0]
    with Mount(bed, mountpoint) as m:
        ivd_dir = mountpoint / ivd.datastore_name / ivd.id
        doc = json.loads((ivd_dir / "info.json").read_text())
        assert doc["name"] == "web" and doc["uuid"] == ivd.id
        assert doc["capacity_bytes"] == ivd.capacity_bytes
        assert doc["datastore"] == ivd.datastore_name
        assert doc["datastore_moref"] == ivd.datastore_moref
        assert doc["provisioning"] == "thin"
        # ESXi's names: a stem of its own, the running disk one snapshot on.
        backing = rf"\[{ivd.datastore_name}\] fcd/[0-9a-f]{{32}}-000001\.vmdk"
        assert re.fullmatch(backing, doc["backing_file"])
        assert doc["create_time"] and doc["attached_vms"] == []
        assert [s["id"] for s in doc["snapshots"]] == [snap]
        assert doc["snapshots"][0]["description"] == "before upgrade"

        snap_doc = json.loads((ivd_dir / snap / "info.json").read_text())
        assert snap_doc["ivd"] == {k: v for k, v in doc.items() if k != "snapshots"}
        # The snapshot's own size, what disk.raw has (here the IVD's too).
        size = (ivd_dir / snap / "disk.raw").stat().st_size
        assert snap_doc["snapshot"] == {**doc["snapshots"][0], "capacity_bytes": size}

        disk = ivd_dir / snap / "disk.raw"
        names = os.listxattr(disk)
        assert "user.ivdfs.uuid" in names and "user.ivdfs.snapshot_id" in names
        assert os.getxattr(disk, "user.ivdfs.name") == b"web"
        assert os.getxattr(disk, "user.ivdfs.uuid") == ivd.id.encode()
        assert os.getxattr(disk, "user.ivdfs.snapshot_id") == snap.encode()
        assert os.getxattr(disk, "user.ivdfs.snapshot_description") == b"before upgrade"
        assert os.getxattr(disk, "user.ivdfs.capacity_bytes") == str(size).encode()
        vcenter_size = str(ivd.capacity_bytes).encode()
        assert os.getxattr(disk, "user.ivdfs.ivd_capacity_bytes") == vcenter_size
        # Every field of info.json is an attribute too.
        for key in snap_doc["ivd"]:
            assert f"user.ivdfs.{key}" in names
        with pytest.raises(OSError) as e:
            os.getxattr(disk, "user.ivdfs.nope")
        assert e.value.errno == 61  # ENODATA
        assert os.listxattr(ivd_dir) == []
        assert m.unmount() == 0
    assert m.unexpected_log_records() == []


# Datastore names vSphere allows and the root must survive: ivdfs's own entries, '/', '..',
# control characters (C0 and DEL; C1 CSI \x9b and NEL \x85: SOAP cannot carry ESC) and twins.
HOSTILE_DATASTORES = ["by-name", ".ivdfs", "a/b", "..", "esc\t\x7f[31m\x9b\x85", "twin", "twin"]


def test_hostile_datastore_and_ivd_names(built_testbed: None, tmp_path: Path) -> None:
    """Every datastore shows once, under a safe name that is not ivdfs's own (by-name and
    .ivdfs stay what they are), with its IVDs; an IVD whose name has C1 control characters
    gets a by-name entry without them, and its links resolve to the right bytes."""
    with Vcsim(datastores=len(HOSTILE_DATASTORES), datastore_names=HOSTILE_DATASTORES) as v:
        bed = Bed(v, tmp_path / "bed")
        stores = v.datastores()
        assert [n for n, _ in stores] == HOSTILE_DATASTORES
        ivds: dict[str, tuple[Ivd, str, str]] = {}  # moref -> (IVD, snapshot, sha256)
        for i, (_name, moref) in enumerate(stores):
            ivd = v.create_ivd(f"vm\x85{i}\x9b[2J", 1, moref)
            assert ivd.datastore_moref == moref
            snap = v.create_snapshot(ivd, f"s{i}")
            data = bytes([i + 1]) * MiB
            (tmp_path / f"{i}.raw").write_bytes(data)
            place_image(bed.images, ivd, snap, tmp_path / f"{i}.raw")
            ivds[moref] = (ivd, snap, hashlib.sha256(data).hexdigest())
        mp = tmp_path / "mnt"
        with Mount(bed, mp) as m:
            root = sorted(os.listdir(mp))
            assert "by-name" in root and ".ivdfs" in root
            shown = [n for n in root if n not in ("by-name", ".ivdfs")]
            assert len(shown) == len(HOSTILE_DATASTORES)
            for n in shown:
                assert n.isprintable() and "/" not in n and n not in (".", "..")
            assert "twin" in shown and "a_b" in shown
            assert (mp / ".ivdfs" / "stats").is_file()  # still the mount's own
            by_ds = {}
            for n in shown:
                (ivd_id,) = os.listdir(mp / n)
                by_ds[ivd_id] = n
            assert sorted(by_ds) == sorted(i.id for i, _, _ in ivds.values())
            by_name = sorted(os.listdir(mp / "by-name"))
            assert len(by_name) == len(ivds)
            for entry in by_name:
                assert entry.isprintable() and "\x85" not in entry and "\x9b" not in entry
                link = mp / "by-name" / entry / "latest"
                target = os.readlink(link)
                ds_entry, ivd_id, snap = target.split("/")[2:]
                assert by_ds[ivd_id] == ds_entry
                ivd, want_snap, digest = next(x for x in ivds.values() if x[0].id == ivd_id)
                assert snap == want_snap
                assert sha256_file(link / "disk.raw") == digest
            assert m.unmount() == 0
