"""`ivdfs ls`, `snapshot`, `umount`, `end-access`, `--snapshot-now` and the config file, run as
a user types them (subprocesses against vcsim and the stand-in VDDK)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.mounting import IVDFS, VDDK_LIBDIR, Bed, Mount, mounted_at
from tests.testbed.vsphere import Ivd, place_image

MiB = 1024 * 1024


def cli(bed: Bed, *args: str, server: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    conn = ["--server", bed.vcsim.server, "--user", bed.vcsim.user,
            "--ca-file", str(bed.vcsim.ca_file)] if server else []  # fmt: skip
    return subprocess.run(
        [*IVDFS, *args, *conn], env=bed.env(**env), capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r.stdout


def fails(r: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert r.returncode == code, (r.stdout, r.stderr)
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("ivdfs:")]) == 1


@pytest.fixture(scope="module")
def ivds(bed: Bed) -> dict[str, Ivd]:
    v = bed.vcsim
    out = {
        "alpha": v.create_ivd("alpha", 8, "LocalDS_0"),
        "beta": v.create_ivd("beta", 3, "LocalDS_0"),
        "gamma": v.create_ivd("gamma", 2, "LocalDS_1"),
        "twin0": v.create_ivd("twin", 1, "LocalDS_0"),
        "twin1": v.create_ivd("twin", 1, "LocalDS_1"),
    }
    src = bed.root / "img"
    src.write_bytes(os.urandom(8 * MiB))
    for desc in ("nightly", "weekly"):
        snap = v.create_snapshot(out["alpha"], desc)
        place_image(bed.images, out["alpha"], snap, src)
    return out


def columns(header: str) -> list[int]:
    return [m.start() for m in re.finditer(r"\S+", header)]


def test_ls_tables_and_json_match_the_api(bed: Bed, ivds: dict[str, Ivd]) -> None:
    v = bed.vcsim
    stores = json.loads(ok(cli(bed, "ls", "--json")))
    assert [(d["name"], d["moref"]) for d in stores] == sorted(v.datastores())
    counts = {d["name"]: d["ivds"] for d in stores}
    assert counts["LocalDS_0"] == 3 and counts["LocalDS_1"] == 2
    table = ok(cli(bed, "ls")).splitlines()
    assert table[0].split() == ["DATASTORE", "MOREF", "IVDS"]
    assert [ln.split()[0] for ln in table[1:]] == sorted(n for n, _ in v.datastores())

    listed = json.loads(ok(cli(bed, "ls", "LocalDS_0", "--json")))
    assert [d["uuid"] for d in listed] == [ivds[k].id for k in ("alpha", "beta", "twin0")]
    alpha = listed[0]
    assert alpha["name"] == "alpha" and alpha["capacity_bytes"] == 8 * MiB
    assert alpha["datastore"] == "LocalDS_0" and alpha["snapshots"] == 2
    assert alpha["provisioning"] == "thin" and alpha["backing_file"].endswith(".vmdk")
    assert alpha["create_time"] and alpha["attached_vms"] == []

    # The table: aligned columns, one row per IVD.
    rows = ok(cli(bed, "ls", "LocalDS_0")).splitlines()
    assert rows[0].split() == [
        "NAME", "UUID", "CAPACITY", "DATASTORE", "CREATED", "SNAPSHOTS", "ATTACHED"
    ]  # fmt: skip
    starts = columns(rows[0])
    for row in rows[1:]:
        assert [row[s - 1] if s else " " for s in starts] == [" "] * len(starts)
    assert rows[1].split()[:3] == ["alpha", ivds["alpha"].id, "8"]

    # Snapshots, by name and by UUID, match RetrieveSnapshotInfo.
    snaps = json.loads(ok(cli(bed, "ls", "LocalDS_0", "alpha", "--json")))
    assert [s["id"] for s in snaps] == v.snapshots(ivds["alpha"])
    assert [s["description"] for s in snaps] == ["nightly", "weekly"]
    by_uuid = ok(cli(bed, "ls", "LocalDS_0", ivds["alpha"].id))
    assert by_uuid.splitlines()[0].split() == ["SNAPSHOT", "CREATED", "DESCRIPTION"]
    assert all(s["id"] in by_uuid for s in snaps) and "weekly" in by_uuid
    # A name is unique per datastore here, though not across datastores.
    assert json.loads(ok(cli(bed, "ls", "LocalDS_1", "twin", "--json"))) == []

    fails(cli(bed, "ls", "NoSuchDS"), 10, "no datastore 'NoSuchDS'")
    fails(cli(bed, "ls", "LocalDS_0", "nope"), 10, "no IVD with UUID or name 'nope'")


def test_snapshot_create_delete_round_trip(bed: Bed, ivds: dict[str, Ivd]) -> None:
    v = bed.vcsim
    beta = ivds["beta"]
    assert v.snapshots(beta) == []
    snap_id = ok(cli(bed, "snapshot", "create", "beta", "--description", "before upgrade")).strip()
    assert v.snapshots(beta) == [snap_id]
    listed = json.loads(ok(cli(bed, "ls", "LocalDS_0", "beta", "--json")))
    assert [(s["id"], s["description"]) for s in listed] == [(snap_id, "before upgrade")]
    second = ok(cli(bed, "snapshot", "create", beta.id)).strip()
    assert v.snapshots(beta) == [snap_id, second]
    out = ok(cli(bed, "snapshot", "delete", "beta", snap_id))
    assert f"deleted snapshot {snap_id}" in out
    assert v.snapshots(beta) == [second]
    ok(cli(bed, "snapshot", "delete", beta.id, second))
    assert v.snapshots(beta) == []

    fails(cli(bed, "snapshot", "delete", "beta", snap_id), 10, "has no snapshot")
    fails(cli(bed, "snapshot", "create", "no-such-ivd"), 10, "no IVD with UUID or name")
    fails(cli(bed, "snapshot", "create", "twin"), 2, "2 IVDs are named 'twin'")
    fails(cli(bed, "snapshot", "create", "beta", IVDFS_PASSWORD="wrong"), 4, "rejected")
    usage = cli(bed, "snapshot", server=False)
    assert usage.returncode == 2 and "required: ACTION" in usage.stderr
    assert v.snapshots(ivds["twin0"]) == v.snapshots(ivds["twin1"]) == []


def snapshot_dirs(mountpoint: Path, ivd: Ivd) -> list[str]:
    return sorted(
        n for n in os.listdir(mountpoint / ivd.datastore_name / ivd.id) if n != "info.json"
    )


@pytest.mark.parametrize("how", ["umount", "SIGTERM"])
def test_snapshot_now_deletes_exactly_its_snapshots(
    bed: Bed, ivds: dict[str, Ivd], mountpoint: Path, how: str
) -> None:
    v = bed.vcsim
    alpha, gamma = ivds["alpha"], ivds["gamma"]
    before = {i.id: v.snapshots(i) for i in (alpha, gamma)}
    with Mount(bed, mountpoint, "--snapshot-now", "alpha", "--snapshot-now", gamma.id) as m:
        new = {i.id: [s for s in v.snapshots(i) if s not in before[i.id]] for i in (alpha, gamma)}
        assert all(len(n) == 1 for n in new.values())
        assert snapshot_dirs(mountpoint, alpha) == sorted(before[alpha.id] + new[alpha.id])
        assert snapshot_dirs(mountpoint, gamma) == new[gamma.id]
        # Someone else's snapshot made meanwhile is not ours to delete.
        other = v.create_snapshot(gamma, "made by someone else")
        if how == "umount":
            r = cli(bed, "umount", str(mountpoint), server=False)
            assert r.returncode == 0, r.stderr
            # umount returns once the process has finished, deletions included.
            assert m.proc.poll() == 0
        else:
            assert m.unmount("SIGTERM") == 0, m.log()
    assert not mounted_at(mountpoint)
    assert v.snapshots(alpha) == before[alpha.id]
    assert v.snapshots(gamma) == [other]
    assert "deleted snapshot" in m.log()
    assert m.unexpected_log_records() == []
    v.delete_snapshot(gamma, other)


def test_snapshot_now_cleans_up_after_a_start_up_error(
    bed: Bed, ivds: dict[str, Ivd], mountpoint: Path
) -> None:
    v = bed.vcsim
    before = v.snapshots(ivds["alpha"])
    # An option libfuse would reject at INIT, after the mount was reported ready: refused
    # before anything is created.
    r = subprocess.run(
        [*bed.mount_args(mountpoint, "--snapshot-now", "alpha", "-o", "max_read=many", "-f")],
        env=bed.env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    fails(r, 3, "unsupported FUSE option -o max_read=many")
    assert "created snapshot" not in r.stderr
    assert v.snapshots(ivds["alpha"]) == before
    fails(
        subprocess.run(
            bed.mount_args(mountpoint, "--snapshot-now", "nope"),
            env=bed.env(),
            capture_output=True,
            text=True,
            timeout=60,
        ),
        10,
        "no IVD with UUID or name 'nope'",
    )
    assert v.snapshots(ivds["alpha"]) == before


def test_umount_waits_for_a_detached_mount_and_refuses_others(
    bed: Bed, ivds: dict[str, Ivd], tmp_path: Path
) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = subprocess.run(bed.mount_args(mp), env=bed.env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert mounted_at(mp)
    from ivdfs import journal

    rec = journal.find(mp)
    assert rec is not None and rec.alive
    pid = rec.pid
    ok(cli(bed, "umount", str(mp), server=False))
    assert not mounted_at(mp)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()

    fails(cli(bed, "umount", str(mp), server=False), 8, "is not mounted")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mp)], check=True)
    try:
        fails(cli(bed, "umount", str(mp), server=False), 8, "not an ivdfs mount (it is tmpfs)")
    finally:
        subprocess.run(["umount", str(mp)], check=True)


def test_end_access_calls_endaccess_for_that_ivd(bed: Bed, ivds: dict[str, Ivd]) -> None:
    bed.standin_log.unlink(missing_ok=True)
    out = ok(cli(bed, "end-access", "alpha", "--vddk-libdir", str(VDDK_LIBDIR)))
    assert ivds["alpha"].id in out
    ends = [ln for ln in bed.log_lines() if " EndAccess " in ln]
    assert len(ends) == 1 and f"id={ivds['alpha'].id}" in ends[0]
    assert "identity=" in ends[0] and "err=0" in ends[0]
    assert not [ln for ln in bed.log_lines() if " PrepareForAccess " in ln]
    fails(cli(bed, "end-access", "twin", "--vddk-libdir", str(VDDK_LIBDIR)), 2, "use the UUID")
    fails(cli(bed, "end-access", "alpha"), 7, "no VDDK directory")


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_file_and_precedence(bed: Bed, ivds: dict[str, Ivd], tmp_path: Path) -> None:
    v = bed.vcsim
    pw = tmp_path / "ivdfs" / "password"
    pw.parent.mkdir()
    pw.write_text(v.password + "\n")
    pw.chmod(0o600)
    conf = write_config(
        tmp_path / "ivdfs" / "config.toml",
        f'server = "{v.server}"\nuser = "{v.user}"\npassword_file = "password"\n'
        f'ca_file = "{v.ca_file}"\nvddk_libdir = "{VDDK_LIBDIR}"\ncache_size = "64M"\n'
        'refresh = 5\noptions = ["noatime"]\n',
    )
    no_env = {"IVDFS_PASSWORD": ""}
    # The file alone is enough (password_file is relative to the file).
    listed = json.loads(ok(cli(bed, "ls", "--json", "--config", str(conf), server=False, **no_env)))
    assert len(listed) == 3
    # The default location, through XDG_CONFIG_HOME.
    ok(cli(bed, "ls", server=False, XDG_CONFIG_HOME=str(tmp_path), **no_env))
    # Environment beats the file; a flag beats the environment.
    bad_user = write_config(tmp_path / "bad.toml", conf.read_text().replace(v.user, "x@y") + "")
    bad_user.write_text(bad_user.read_text().replace('"password"', f'"{pw}"'))
    fails(cli(bed, "ls", "--config", str(bad_user), server=False, **no_env), 4, "'x@y'")
    ok(cli(bed, "ls", "--config", str(bad_user), server=False, IVDFS_USER=v.user, **no_env))
    fails(
        cli(bed, "ls", "--config", str(bad_user), "--user", "flag@y", server=False,
            IVDFS_USER=v.user, **no_env),
        4,
        "'flag@y'",
    )  # fmt: skip
    # IVDFS_PASSWORD beats the file's password_file.
    fails(
        cli(bed, "ls", "--config", str(conf), server=False, IVDFS_PASSWORD="wrong"), 4, "rejected"
    )
    # A TLS flag replaces the file's TLS settings: --insecure does not contradict its ca_file.
    ok(cli(bed, "ls", "--config", str(conf), "--insecure", server=False, **no_env))

    # Bad files: one line, exit 3.
    for text, fragment in (
        ('password = "secret"\n', "'password' is not accepted"),
        ('sever = "typo"\n', "unknown setting 'sever'"),
        ("insecure = 1\n", "invalid insecure"),
        ("server = [\n", "config file"),
    ):
        f = write_config(tmp_path / "badfile.toml", text)
        fails(cli(bed, "ls", "--config", str(f), server=False), 3, fragment)
    fails(
        cli(bed, "ls", "--config", str(tmp_path / "none.toml"), server=False), 3, "does not exist"
    )

    # mount reads it too, also as `-o config=FILE` (what an fstab line can pass).
    mp = tmp_path / "mnt"
    mp.mkdir()
    fstab_style = [*IVDFS, "mount", str(mp), "-o", f"config={conf},ro"]
    r = subprocess.run(fstab_style, env=bed.env(**no_env), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    try:
        alpha = ivds["alpha"]
        assert sorted(os.listdir(mp / "LocalDS_0" / alpha.id)) == sorted(
            [*v.snapshots(alpha), "info.json"]
        )
        opts = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                    if f" {mp} " in ln)  # fmt: skip
        assert "noatime" in opts
    finally:
        ok(cli(bed, "umount", str(mp), server=False))


def test_log_is_one_line_per_event_without_secrets_or_ceip(
    bed: Bed, ivds: dict[str, Ivd], mountpoint: Path
) -> None:
    alpha = ivds["alpha"]
    snap = bed.vcsim.snapshots(alpha)[0]
    with Mount(bed, mountpoint) as m:
        (mountpoint / "LocalDS_0" / alpha.id / snap / "disk.raw").read_bytes()
        assert m.unmount("SIGTERM") == 0
    log = m.log()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ")
    assert log and all(stamp.match(ln) for ln in log.splitlines())
    assert bed.vcsim.password not in log
    assert "CEIP" not in log  # VDDK's phone-home notice is debug noise
    with Mount(bed, mountpoint, "--debug") as m:
        (mountpoint / "LocalDS_0" / alpha.id / snap / "disk.raw").read_bytes()
        assert m.unmount("SIGTERM") == 0
    assert re.search(r" DEBUG ivdfs\.vddk\.library_messages: .*CEIP", m.log())
    assert bed.vcsim.password not in m.log()


def test_help_of_every_command(bed: Bed) -> None:
    commands = (
        ["ls"],
        ["snapshot", "create"],
        ["snapshot", "delete"],
        ["mount"],
        ["umount"],
        ["status"],
        ["refresh"],
        ["check"],
        ["end-access"],
        ["changes"],
        ["hash"],
        ["audit", "verify"],
    )
    for cmd in commands:
        r = subprocess.run([*IVDFS, *cmd, "--help"], capture_output=True, text=True, env=bed.env())
        assert r.returncode == 0 and "usage: ivdfs" in r.stdout


def test_ls_without_the_optional_associations_call(bed: Bed, ivds: dict[str, Ivd]) -> None:
    """A server that lacks RetrieveVStorageObjectAssociations (MethodNotFound) leaves the
    ATTACHED column empty (null in JSON) instead of failing the whole listing."""
    switch = bed.vcsim.tmpdir / "faults" / "RetrieveVStorageObjectAssociations.missing"
    switch.touch()
    try:
        listed = json.loads(ok(cli(bed, "ls", "LocalDS_0", "--json")))
        assert [d["uuid"] for d in listed] == [ivds[k].id for k in ("alpha", "beta", "twin0")]
        assert all(d["attached_vms"] is None for d in listed)
        rows = ok(cli(bed, "ls", "LocalDS_0")).splitlines()
        assert rows[0].split()[-1] == "ATTACHED" and len(rows) == 4
        assert all(row.split()[-1].isdigit() for row in rows[1:])  # SNAPSHOTS ends each row
    finally:
        switch.unlink()
    assert json.loads(ok(cli(bed, "ls", "LocalDS_0", "--json")))[0]["attached_vms"] == []
