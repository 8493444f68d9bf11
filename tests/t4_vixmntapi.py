"""`--volumes vixmntapi` as VMware's VixMntapi really behaves (issue 23), on the stand-in
libvixMntapi that models it (tests/testbed/mntapi/vixmntapi.c):

- OpenDisks FUSE-mounts each disk at /run/vmware/fuse/<n> (served by a forked copy of the
  caller) and CloseDiskSet fails to unmount it (24009), as the real library does on this kind of
  host: ivdfs unmounts what VixMntapi leaves, at unmount, on SIGINT and in the recovery of a
  killed mount (also one killed in the middle of OpenDisks);
- every volume VixMntapi lists is mounted or has volumes/<n>.error with its code and text; a
  disk it lists no volume on says so in volumes/.error;
- VixMntapi_Init gets VixDiskLib_InitEx's configuration file, so volumes are mounted in ivdfs's
  private tmpDirectory.
Every check of a guest volume compares file contents with the image's manifest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ivdfs import journal
from tests.mounting import (
    IVDFS,
    Bed,
    Mount,
    alive,
    call_lines,
    fuse_servers,
    loop_devices_of,
    mounted_at,
    mounts_under,
    sha256_file,
    umount,
    vixmntapi_mounts,
    wait_for,
)
from tests.t4_restore import Disk, check_volume
from tests.testbed import images as imgs
from tests.testbed.vsphere import place_image

killed = pytest.mark.killed_mount


@pytest.fixture(scope="module")
def disks(bed: Bed) -> dict[str, Disk]:
    src = bed.root / "vixmntapi-src"
    src.mkdir()
    out = {}
    for kind, build, size in (("gpt", imgs.gpt_disk, 64), ("bare", imgs.bare_fs_disk, 32)):
        manifest = build(src / f"{kind}.img", size)
        ivd = bed.vcsim.create_ivd(f"mntapi-{kind}", size, "LocalDS_0")
        snap = bed.vcsim.create_snapshot(ivd, kind)
        place_image(bed.images, ivd, snap, manifest.path)
        out[kind] = Disk(kind, ivd, snap, manifest, sha256_file(manifest.path))
    return out


def ours(lines: list[str]) -> set[str]:
    """The FUSE mounts the stand-in's OpenDisks made for this test (its call log names them)."""
    return {o["fuse"] for o in call_lines(lines, "Mntapi_OpenDisks") if o["err"] == "0"}


def private_dir(lines: list[str]) -> Path:
    """ivdfs's private VDDK directory, from VixMntapi_Init's tmpDirectory."""
    (init,) = call_lines(lines, "Mntapi_Init")
    return Path(init["tmpDirectory"]).parent


def check_disks(bed: Bed, mp: Path, disks: dict[str, Disk], scratch: Path) -> Path:
    """Every volume of the GPT disk mounted with its files, the bare disk explained; returns
    VixMntapi's tmpDirectory (Init runs at the first listing of a volumes/ directory)."""
    gpt = disks["gpt"]
    vols = gpt.snapdir(mp) / "volumes"
    names = [str(i + 1) for i in range(len(gpt.parts))]
    assert sorted(os.listdir(vols)) == names
    tmp = private_dir(bed.log_lines()) / "tmp"
    for n, part in zip(names, gpt.parts, strict=True):
        target = Path(os.readlink(vols / n))
        assert target.parent == tmp, "VixMntapi did not get ivdfs's tmpDirectory"
        check_volume(vols / n, part, scratch)
    # A filesystem spanning a disk without a partition table: VixMntapi lists no volume.
    bare = disks["bare"].snapdir(mp) / "volumes"
    assert os.listdir(bare) == [".error"]
    assert "VixMntapi lists no volume" in (bare / ".error").read_text()
    return tmp


@pytest.mark.parametrize("how", ["fusermount", "SIGINT"])
def test_volumes_mounted_and_vixmntapis_own_mounts_undone(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path, how: str
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    before = vixmntapi_mounts()
    with Mount(bed, mountpoint, "--volumes", "vixmntapi") as m:
        tmp = check_disks(bed, mountpoint, disks, tmp_path)
        lines = bed.log_lines()
        (init,) = call_lines(lines, "Mntapi_Init")
        (initex,) = call_lines(lines, "InitEx")
        assert init["configFile"] == initex["configFile"] != "(null)"
        assert tmp.parent.name.startswith(f"ivdfs-{m.proc.pid}-vddk-")
        made = ours(bed.log_lines())
        assert len(made) == 2 and made <= vixmntapi_mounts() - before
        rec = journal.find(mountpoint)
        assert rec is not None
        assert {p for e in rec.vixmntapi for p in e["fuse"]} == made
        assert str(tmp.parent) in rec.run_dirs
        served_by = fuse_servers(m.proc.pid)
        assert len(served_by) == 2  # a forked server per disk
        assert m.unmount(how) == 0, m.log()
    lines = bed.log_lines()
    # VixMntapi could not unmount them (as on this host); ivdfs did, and said so once each.
    closes = call_lines(lines, "Mntapi_CloseDiskSet")
    assert len(closes) == 2 and {c["err"] for c in closes} == {"24009"}
    (exit_line,) = call_lines(lines, "Mntapi_Exit")
    assert exit_line["fuse_left"] == "2"
    assert m.log().count("which VixMntapi left mounted") == 2
    assert not made & vixmntapi_mounts()
    wait_for(lambda: not [p for p in served_by if alive(p)], what="the forked servers to end")
    assert not [p for p in made if Path(p).exists() or Path(p + ".info").exists()]
    assert not tmp.parent.exists()
    assert mounts_under(tmp.parent) == [] and loop_devices_of(mountpoint, bed.images) == []
    assert journal.find(mountpoint) is None
    for d in disks.values():
        assert sha256_file(bed.images / d.ivd.id / f"{d.snapshot}.raw") == d.sha256


def test_a_volume_vixmntapi_cannot_mount_says_why(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    """The real library's answer on this kernel (24010) for every volume: each one listed gets
    volumes/<n>.error with VixMntapi's code and text, and nothing is logged as a warning (the
    .error files say it)."""
    bed.standin_log.unlink(missing_ok=True)
    gpt = disks["gpt"]
    with Mount(bed, mountpoint, "--volumes", "vixmntapi",
               VDDK_STANDIN_MNTAPI_MOUNT_FAILS="all") as m:  # fmt: skip
        vols = gpt.snapdir(mountpoint) / "volumes"
        names = [f"{i + 1}.error" for i in range(len(gpt.parts))]
        assert sorted(os.listdir(vols)) == names
        for n in names:
            text = (vols / n).read_text()
            assert "[VixError 24010]" in text
            assert "does not have any partitions that the host system knows how to mount" in text
        # The disk's own data is untouched by all this.
        assert sha256_file(gpt.snapdir(mountpoint) / "disk.raw") == gpt.sha256
        made = ours(bed.log_lines())
        assert m.unmount("ivdfs") == 0, m.log()
    assert not made & vixmntapi_mounts()
    failed = [v for v in call_lines(bed.log_lines(), "Mntapi_MountVolume") if v["err"] != "0"]
    assert len(failed) == len(gpt.parts) and {v["err"] for v in failed} == {"24010"}


def test_a_vixmntapi_that_unmounts_its_disks_itself(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    """As VMware documents it: CloseDiskSet unmounts; ivdfs then has nothing to undo."""
    bed.standin_log.unlink(missing_ok=True)
    with Mount(bed, mountpoint, "--volumes", "vixmntapi",
               VDDK_STANDIN_MNTAPI_UMOUNT="works") as m:  # fmt: skip
        check_disks(bed, mountpoint, disks, tmp_path)
        made = ours(bed.log_lines())
        assert made <= vixmntapi_mounts()
        assert m.unmount("ivdfs") == 0, m.log()
    closes = call_lines(bed.log_lines(), "Mntapi_CloseDiskSet")
    assert {c["err"] for c in closes} == {"0"}
    assert "which VixMntapi left mounted" not in m.log()
    assert not made & vixmntapi_mounts()


def assert_recovered(
    bed: Bed, mp: Path, pid: int, made: set[str], served_by: set[int], tmp_root: Path
) -> None:
    r = subprocess.run([*IVDFS, "status", str(mp), "--json"], env=bed.env(), capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    (doc,) = json.loads(r.stdout)
    assert doc["state"] == "dead" and set(doc["vixmntapi_mounts"]) == made
    r = umount(bed, mp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and "Traceback" not in r.stderr
    for path in made:
        assert f"unmounted VixMntapi's disk mount {path}" in r.stdout
    assert not made & vixmntapi_mounts()
    wait_for(lambda: not [p for p in served_by if alive(p)], what="the forked servers to end")
    assert not mounted_at(mp) and os.listdir(mp) == []
    assert loop_devices_of(mp, bed.images) == [] and mounts_under(tmp_root) == []
    assert not list(tmp_root.parent.glob(f"ivdfs-{pid}-*"))
    assert journal.find(mp) is None


@killed
def test_killed_with_vixmntapi_volumes_mounted(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    m = Mount(bed, mountpoint, "--volumes", "vixmntapi")
    tmp = check_disks(bed, mountpoint, disks, tmp_path)
    made = ours(bed.log_lines())
    served_by = fuse_servers(m.proc.pid)
    assert len(served_by) == 2
    pid = m.proc.pid
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=30)
    assert made <= vixmntapi_mounts() and mounts_under(tmp)  # what the kill left
    assert_recovered(bed, mountpoint, pid, made, served_by, tmp.parent)


@killed
def test_killed_in_the_middle_of_open_disks(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    """Killed while OpenDisks runs, after VixMntapi mounted the disk but before ivdfs could
    note where: recovery finds the mount by the IVD id in VixMntapi's .info file."""
    bed.standin_log.unlink(missing_ok=True)
    release = tmp_path / "release"
    m = Mount(bed, mountpoint, "--volumes", "vixmntapi",
              VDDK_STANDIN_MNTAPI_HOLD_OPEN=str(release))  # fmt: skip
    gpt = disks["gpt"]
    lister = subprocess.Popen(["ls", str(gpt.snapdir(mountpoint) / "volumes")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(lambda: bool(call_lines(bed.log_lines(), "Mntapi_Hold")), what="OpenDisks")
    (hold,) = call_lines(bed.log_lines(), "Mntapi_Hold")
    made = {hold["fuse"]}
    rec = journal.find(mountpoint)
    assert rec is not None and rec.vixmntapi == [
        {"ivd": gpt.ivd.id, "snapshot": gpt.snapshot, "name": gpt.ivd.id, "fuse": []}
    ]
    served_by = fuse_servers(m.proc.pid)
    assert len(served_by) == 1
    pid = m.proc.pid
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=30)
    release.touch()
    assert made <= vixmntapi_mounts()
    assert_recovered(bed, mountpoint, pid, made, served_by, private_dir(bed.log_lines()))
    # The forked server held a copy of the dead daemon's /dev/fuse: the listing waited for it
    # (not ENOTCONN at once, as without VixMntapi) until recovery ended the server.
    assert lister.wait(timeout=30) != 0
