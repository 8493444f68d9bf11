"""The guest-volume matrix in every mode that parses guest data (issue 27): kernel, fuse, guestfs.

One disk (tests.testbed.images.matrix_disk, real mkfs and lvm2) holds ext4, XFS, btrfs, NTFS,
FAT32, an LVM PV with an ext4 LV, an ext4 whose superblock lies about its size and a LUKS2
volume whose passphrase these tests never give (every mode says so); it is served
as two snapshots of one IVD (clones, byte for byte, side by side). In each mode every volume the
mode can read must match the manifest byte for byte (sha256 of every file, and an rsync copy),
every other one must say why in ``volumes/<name>.error``, and after `ivdfs umount` nothing may
be left: no mount under the run directory, no loop device, no driver or qemu process, no
temporary file, the served images unchanged.

`--volumes fuse` and `--volumes guestfs` must never have the host kernel parse guest data: every
mount they make is a FUSE mount (userspace drivers, or libguestfs's mount_local over an
appliance), and no loop device exists. The damaged superblock fails inside the appliance and
leaves the other volumes, and the host, alone.

Appliances boot slowly without KVM (about 15 s under TCG on this kind of machine), so the
guestfs tests (marker ``guestfs``) share boots: the matrix boots two side by side; the lifetime
test boots three times (first access, again after the idle stop, the second snapshot within
the memory budget) and ends with SIGTERM; the recovery test boots one and kills the mount.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from ivdfs import journal
from tests.mounting import (
    IVDFS,
    VDDK_LIBDIR,
    Bed,
    Mount,
    alive,
    host_vgs,
    loop_devices_of,
    mounted_at,
    mounts_under,
    sha256_file,
    umount,
    wait_for,
)
from tests.testbed import images as imgs
from tests.testbed.vsphere import Ivd, place_image

LV = "mxvg-data"
NOT_LVM = "an LVM2 physical volume"
# Partition 8 is LUKS: only guestfs opens it, and only with --volume-key-file (given in
# t4_volumes_guestvol, not here).
HOST_LUKS = "an encrypted (LUKS) volume: only --volumes guestfs opens it (with --volume-key-file)"
NO_KEY = "an encrypted (LUKS) volume: give its passphrase with --volume-key-file"
# What each mode mounts, and what it refuses (name -> the start of its reason).
EXPECTED: dict[str, tuple[set[str], dict[str, str]]] = {
    "kernel": (
        {"1", "2", "3", "4", "5", LV},
        {"6": NOT_LVM, "7": "mount failed: ", "8": HOST_LUKS},
    ),
    "fuse": (
        {"1", "4", "5", LV},
        {
            "2": "xfs has no userspace driver here: use --volumes guestfs",
            "3": "btrfs has no userspace driver here: use --volumes guestfs",
            "6": NOT_LVM,
            "7": "mount failed: fuse2fs",
            "8": HOST_LUKS,
        },
    ),
    "guestfs": ({"1", "2", "3", "4", "5", LV}, {"7": "mount failed: mount_options: ", "8": NO_KEY}),
}


@dataclass(frozen=True)
class Matrix:
    ivd: Ivd
    snapshots: tuple[str, str]
    manifest: imgs.DiskManifest
    sha256: str

    def volumes(self, mp: Path, snap: str) -> Path:
        return mp / self.ivd.datastore_name / self.ivd.id / snap / "volumes"

    def files(self) -> dict[str, dict[str, str]]:
        """Volume name -> its files (relative path -> sha256)."""
        out = {str(p.number): p.files for p in self.manifest.partitions if p.files}
        out[LV] = self.manifest.lvs[0].files
        return out


@pytest.fixture(scope="module")
def matrix(bed: Bed) -> Matrix:
    src = bed.root / "matrix-src"
    src.mkdir()
    manifest = imgs.matrix_disk(src / "matrix.img")
    ivd = bed.vcsim.create_ivd("matrix", manifest.size >> 20, "LocalDS_0")
    snaps = (bed.vcsim.create_snapshot(ivd, "one"), bed.vcsim.create_snapshot(ivd, "two"))
    for snap in snaps:
        place_image(bed.images, ivd, snap, manifest.path)
    return Matrix(ivd, snaps, manifest, sha256_file(manifest.path))


def find(root: Path, rel: str) -> Path:
    """`rel` under `root`, case-insensitively (fusefat shows mcopy's 8.3 names upper case)."""
    p = root
    for part in rel.split("/"):
        names = {n.lower(): n for n in os.listdir(p)}
        p = p / names[part.lower()]
    return p


def mount_table() -> list[tuple[str, str, str]]:
    """(mountpoint, filesystem type, source) of every mount."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for ln in f:
            fields = ln.split()
            sep = fields.index("-")
            out.append((fields[4], fields[sep + 1], fields[sep + 2]))
    return out


def processes_with(text: str, but: int = 0) -> list[int]:
    """Live processes but `but` with `text` inside an argument (a FUSE driver its image)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == but:
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if os.fsencode(text) in argv and state != "Z":
            out.append(int(entry))
    return out


def open_files(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:
            pass
    return out


def stats(mp: Path) -> dict[str, object]:
    return json.loads((mp / ".ivdfs" / "stats").read_text())  # type: ignore[no-any-return]


def volume_stats(mp: Path) -> dict[str, int]:
    return stats(mp)["volumes"]  # type: ignore[return-value]


def run_dirs_of(pid: int) -> list[Path]:
    return sorted(Path("/run").glob(f"ivdfs-{pid}-*"))


def check_matrix(m: Matrix, mp: Path, mode: str, scratch: Path) -> set[Path]:
    """Every volume of both snapshots as `mode` should show it; returns the mounts' targets."""
    mounted, refused = EXPECTED[mode]
    targets: set[Path] = set()
    for snap in m.snapshots:
        vols = m.volumes(mp, snap)
        names = set(os.listdir(vols))
        assert names == mounted | {f"{n}.error" for n in refused}, (snap, sorted(names))
        for n, reason in refused.items():
            text = (vols / f"{n}.error").read_text()
            assert text.startswith(reason), (n, text)
            assert text.count("\n") == 1
        for n in mounted:
            vol = vols / n
            targets.add(Path(os.readlink(vol)))
            files = m.files()[n]
            if mode == "guestfs" and snap != m.snapshots[0]:
                # Every file of the first snapshot; of its clone beside it, one per volume
                # (each file costs round trips through a TCG appliance).
                files = {"needle.txt": files["needle.txt"]}
            for rel, digest in files.items():
                assert sha256_file(find(vol, rel)) == digest, f"{mode} {snap} {n}/{rel}"
            if snap != m.snapshots[0]:
                continue  # one rsync per volume is enough to show a whole-tree copy works
            dest = scratch / f"{snap}-{n}"
            subprocess.run(["rsync", "-a", f"{vol}/", f"{dest}/"], check=True)
            copied = {str(p.relative_to(dest)).lower() for p in dest.rglob("*") if p.is_file()}
            assert {r.lower() for r in files} <= copied
            for rel, digest in files.items():
                assert sha256_file(find(dest, rel)) == digest
    return targets


def assert_nothing_left(bed: Bed, m: Matrix, mp: Path, pid: int, run_dirs: list[Path]) -> None:
    assert not mounted_at(mp)
    assert loop_devices_of(mp, bed.images) == []
    assert mounts_under(*run_dirs) == []
    assert not [d for d in run_dirs if d.exists()], "run directories left behind"
    assert processes_with(str(mp), but=pid) == [], "a driver still names the mount"
    assert journal.find(mp) is None
    for snap in m.snapshots:
        assert sha256_file(bed.images / m.ivd.id / f"{snap}.raw") == m.sha256


# --------------------------------------------------------------------------------------------
# kernel and fuse


@pytest.mark.parametrize("mode", ["kernel", "fuse"])
@pytest.mark.allow_log("not mounted", "partition table")
def test_matrix(bed: Bed, matrix: Matrix, mountpoint: Path, tmp_path: Path, mode: str) -> None:
    vgs = host_vgs(mountpoint, bed.images)
    m = Mount(bed, mountpoint, "--volumes", mode)
    try:
        run_dirs = run_dirs_of(m.proc.pid)
        targets = check_matrix(matrix, mountpoint, mode, tmp_path)
        ours = [t for t in mount_table() if Path(t[0]) in targets]
        assert len(ours) == len(targets) == 2 * len(EXPECTED[mode][0])
        if mode == "fuse":
            # Userspace drivers on our own window files: no loop device, no kernel filesystem.
            assert loop_devices_of(mountpoint) == []
            assert all(fstype.startswith("fuse") for _, fstype, _ in ours), ours
        else:
            # Each loop device ends where its volume does, not at the end of the disk: a
            # filesystem cannot read its neighbours' bytes.
            limits = {
                d.name: int((d / "loop" / "sizelimit").read_text())
                for d in Path("/sys/block").glob("loop*")
                if (d / "loop" / "backing_file").exists()
                and (d / "loop" / "backing_file").read_text().startswith(f"{mountpoint}/")
            }
            assert limits and all(limits.values()), limits
        assert m.unmount("ivdfs") == 0, m.log()
    finally:
        if m.proc.poll() is None:
            m.unmount("SIGTERM")
    assert_nothing_left(bed, matrix, mountpoint, m.proc.pid, run_dirs)
    assert host_vgs(mountpoint, bed.images) == vgs


# --------------------------------------------------------------------------------------------
# guestfs


@pytest.mark.guestfs
@pytest.mark.allow_log("partition table", "the appliance ended by itself", r"appliance: qemu \(pid")
def test_guestfs_matrix(bed: Bed, matrix: Matrix, mountpoint: Path, tmp_path: Path) -> None:
    vgs = host_vgs(mountpoint, bed.images)
    # Reading every volume of two snapshots through TCG appliances takes minutes on a loaded
    # machine: no idle stop meanwhile (the lifetime test covers it).
    m = Mount(bed, mountpoint, "--volumes", "guestfs", "--idle-timeout", "900")
    try:
        run_dirs = run_dirs_of(m.proc.pid)
        # Listing a snapshot directory starts no appliance.
        for snap in matrix.snapshots:
            assert "volumes" in os.listdir(matrix.volumes(mountpoint, snap).parent)
        rec = journal.find(mountpoint)
        assert rec is not None and rec.appliances == []
        doc = stats(mountpoint)["volumes"]
        assert doc["appliances_running"] == 0 and doc["boots"] == 0  # type: ignore[index]
        # Both appliances boot side by side (each first listing of volumes/ starts one).
        with ThreadPoolExecutor(2) as pool:
            listed = pool.map(os.listdir, [matrix.volumes(mountpoint, s) for s in matrix.snapshots])
            assert all(listed)
        targets = check_matrix(matrix, mountpoint, "guestfs", tmp_path)
        ours = [t for t in mount_table() if any(t[0].startswith(f"{d}/") for d in run_dirs)]
        # One libguestfs FUSE mount per snapshot, nothing else: no kernel filesystem, no loop.
        assert len(ours) == 2 and all(fstype == "fuse" for _, fstype, _ in ours), ours
        assert {t.parent for t in targets} == {Path(p) for p, _, _ in ours}
        assert loop_devices_of(mountpoint) == []
        doc = stats(mountpoint)["volumes"]
        assert doc["appliances_running"] == 2 and doc["accelerator"] in ("KVM", "TCG")  # type: ignore[index]
        rec = journal.find(mountpoint)
        assert rec is not None and len(rec.appliances) == 2
        # A qemu per snapshot, reading its disk.raw through our mount.
        pids = [a[k] for a in rec.appliances for k in ("helper", "qemu")]
        assert all(alive(p) for p in pids)
        assert all(any(h.endswith("/disk.raw") for h in open_files(a["qemu"]))
                   for a in rec.appliances)  # fmt: skip
        # An appliance that dies (its qemu killed) is cleaned up; the other one goes on.
        victim = rec.appliances[0]
        os.kill(victim["qemu"], signal.SIGKILL)
        wait_for(lambda: volume_stats(mountpoint)["appliances_running"] == 1, timeout=60,
                 what="the dead appliance's cleanup")  # fmt: skip
        assert not alive(victim["helper"]) and not mounted_at(Path(victim["mount"]))
        assert not Path(victim["tmp"]).exists()
        # (Reading the dead one's links would boot it again: find the survivor in the journal.)
        rec = journal.find(mountpoint)
        assert rec is not None and len(rec.appliances) == 1
        survivor = next(s for s in matrix.snapshots if s in rec.appliances[0]["mount"])
        for n in EXPECTED["guestfs"][0]:
            for rel, digest in matrix.files()[n].items():
                assert sha256_file(find(matrix.volumes(mountpoint, survivor) / n, rel)) == digest
        assert m.unmount("ivdfs") == 0, m.log()
    finally:
        if m.proc.poll() is None:
            m.unmount("SIGTERM")
    log = m.log()
    assert "guestfs appliances run under " in log
    assert log.count("appliance stopped (unmounting)") == 1
    assert log.count("appliance stopped (it had ended)") == 1
    assert_nothing_left(bed, matrix, mountpoint, m.proc.pid, run_dirs)
    assert not [p for p in pids if alive(p)], "an appliance's helper or qemu is still running"
    assert host_vgs(mountpoint, bed.images) == vgs


@dataclass(frozen=True)
class Small:
    """A bare ext4 (quick to inspect) as two snapshots of one IVD."""

    ivd: Ivd
    snapshots: tuple[str, str]
    manifest: imgs.DiskManifest

    def volumes(self, mp: Path, snap: str) -> Path:
        return mp / self.ivd.datastore_name / self.ivd.id / snap / "volumes"


@pytest.fixture(scope="module")
def small(bed: Bed) -> Small:
    img = bed.root / "small-ext4.img"
    manifest = imgs.bare_fs_disk(img, 32, "ext4")
    ivd = bed.vcsim.create_ivd("small", 32, "LocalDS_0")
    snaps = (bed.vcsim.create_snapshot(ivd, "a"), bed.vcsim.create_snapshot(ivd, "b"))
    for snap in snaps:
        place_image(bed.images, ivd, snap, img)
    return Small(ivd, snaps, manifest)


def check_files(vol: Path, manifest: imgs.DiskManifest) -> None:
    assert manifest.whole_disk is not None
    for rel, digest in manifest.whole_disk.files.items():
        assert sha256_file(vol / rel) == digest, rel


@pytest.mark.guestfs
@pytest.mark.killed_mount
def test_guestfs_lifetime_and_recovery(bed: Bed, small: Small, mountpoint: Path) -> None:
    """First access boots, idleness stops, a path walk through volumes/<n> boots again, the
    memory budget stops the idle one first; then the daemon is killed with an appliance
    running, and `ivdfs umount` leaves no qemu, helper, FUSE mount or temporary file."""
    mp = mountpoint
    running: list[int] = []
    a, b = (small.volumes(mp, s) for s in small.snapshots)
    m = Mount(bed, mp, "--volumes", "guestfs", "--idle-timeout", "6", "--guestfs-memory", "512M")
    try:
        run_dirs = run_dirs_of(m.proc.pid)
        assert "volumes" in os.listdir(a.parent) and "volumes" in os.listdir(b.parent)
        assert volume_stats(mp)["boots"] == 0
        rec = journal.find(mp)
        assert rec is not None and rec.appliances == []
        assert os.listdir(a) == ["0"]  # boot 1
        check_files(a / "0", small.manifest)
        target = Path(os.readlink(a / "0"))
        rec = journal.find(mp)
        assert rec is not None and len(rec.appliances) == 1
        first = [rec.appliances[0]["helper"], rec.appliances[0]["qemu"]]
        # Unused for --idle-timeout: stopped, journal entry, processes and mount gone.
        wait_for(lambda: volume_stats(mp)["stopped_idle"] == 1, timeout=60, what="idle stop")
        assert not [p for p in first if alive(p)] and not mounted_at(target.parent)
        rec = journal.find(mp)
        assert rec is not None and rec.appliances == []
        # A path walk through the link reads the link, which boots the appliance again.
        check_files(a / "0", small.manifest)  # boot 2
        assert volume_stats(mp)["boots"] == 2 and mounted_at(target.parent)
        # Room for one appliance only: the idle one (a) stops so that b can start.
        assert os.listdir(b) == ["0"]  # boot 3
        check_files(b / "0", small.manifest)
        doc = volume_stats(mp)
        assert doc["stopped_for_memory"] == 1 and doc["appliances_running"] == 1, doc
        assert doc["memory_used"] == doc["memory_budget"] == 512 << 20
        assert not mounted_at(target.parent)
        r = subprocess.run([*IVDFS, "status", str(mp), "--json"], env=bed.env(),
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        (st,) = json.loads(r.stdout)
        assert len(st["appliances"]) == 2 and st["volumes"]["appliances_running"] == 1
        rec = journal.find(mp)
        assert rec is not None and len(rec.appliances) == 1
        running = [rec.appliances[0]["helper"], rec.appliances[0]["qemu"]]
        tmp = Path(rec.appliances[0]["tmp"])
        assert tmp.is_dir() and tmp.parent in run_dirs
        # A helper notices its mount's death (its stdin ends) and stops its appliance by
        # itself; this one is frozen, as a stuck one would be, so recovery must kill it and
        # its qemu.
        os.kill(running[0], signal.SIGSTOP)
    finally:
        pid = m.proc.pid
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(timeout=30)
        r = umount(bed, mp)  # also after a failure above: no dead mount or qemu left behind
        for p in running:
            if alive(p):  # the recovery failed: do not leave a frozen helper to later tests
                os.kill(p, signal.SIGKILL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
    assert all(f"stopped appliance process {p} " in r.stdout for p in running), r.stdout
    assert not [p for p in running if alive(p)], "qemu or its helper survived the recovery"
    assert not tmp.exists()
    assert mounts_under(*run_dirs) == [] and not [d for d in run_dirs if d.exists()]
    assert not mounted_at(mp) and os.listdir(mp) == []
    assert journal.find(mp) is None
    assert processes_with(str(mp), but=pid) == []


@pytest.mark.guestfs
def test_check_boots_an_appliance(bed: Bed) -> None:
    v = bed.vcsim
    r = subprocess.run(
        [*IVDFS, "check", "--server", v.server, "--user", v.user, "--ca-file", str(v.ca_file),
         "--vddk-libdir", str(VDDK_LIBDIR), "--volumes", "guestfs"],
        env=bed.env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.split()[1:2] == ["guestfs"])
    assert line.startswith("ok") and "an appliance booted in " in line
    # This machine's /dev/kvm fails in qemu ("failed to set MSR"): the check says so.
    assert " s under KVM (KVM works)" in line or " s under TCG (" in line
    # scripts/setup installs mdadm, ldmtool and cryptsetup, which libguestfs copies in.
    assert line.endswith("; md RAID, Windows dynamic disks, LUKS/BitLocker supported"), line
