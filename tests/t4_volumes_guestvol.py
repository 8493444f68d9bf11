"""What only --volumes guestfs opens (issue 27): md RAID, LUKS with --volume-key-file, LDM.

The md/LUKS disk (tests.testbed.images.guestvol_disk): partitions 1 and 2 are the members of an
md RAID1 (metadata 1.2, set name ivdfs:mirror) holding an ext4; 3 is a LUKS2 volume that the
test's passphrase opens, 4 one that only another passphrase opens (both made by cryptsetup).
The dynamic disk (images.ldm_disk, our own LDM database): one simple volume holding an NTFS.

In guestfs mode with the key file, the appliances assemble the array (``volumes/md-mirror``)
and the dynamic disk's volume (``volumes/ldm_vol_IvdfsDg0_Volume1``) and open partition 3
read-only (``volumes/3``): every file matches the source tree byte for byte; 4 gets a one-line
``.error`` saying the passphrase does not open it; the passphrase appears in no log, journal,
command line or environment. (Without a key file, an encrypted volume's ``.error`` says to
give one: the guest-volume matrix of t4_volumes_modes holds one, which spares a boot.) The
kernel mode assembles and opens nothing on the host: each partition gets an ``.error`` saying
what it is. The images themselves are checked with mdadm, cryptsetup and ldmtool.

Appliances boot slowly under TCG (15-25 s): the one guestfs test boots both disks' appliances
side by side and reads everything through them.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ivdfs import journal
from tests.mounting import Bed, Mount, mounted_at, mounts_under, sha256_file, wait_for
from tests.testbed import images as imgs
from tests.testbed import ldm
from tests.testbed.vsphere import Ivd, place_image

PASSPHRASE = "ivdfs guest passphrase, one line"
OTHER = "a passphrase ivdfs is not given"
MD = "md-mirror"


@dataclass(frozen=True)
class Guest:
    ivd: Ivd
    snapshot: str
    manifest: imgs.DiskManifest
    sha256: str

    def volumes(self, mp: Path) -> Path:
        return mp / self.ivd.datastore_name / self.ivd.id / self.snapshot / "volumes"

    def files(self, number: int) -> dict[str, str]:
        return next(p.files for p in self.manifest.partitions if p.number == number)


@pytest.fixture(scope="module")
def guest(bed: Bed) -> Guest:
    img = bed.root / "guestvol.img"
    manifest = imgs.guestvol_disk(img, PASSPHRASE, OTHER)
    ivd = bed.vcsim.create_ivd("guestvol", manifest.size >> 20, "LocalDS_0")
    snap = bed.vcsim.create_snapshot(ivd, "g")
    place_image(bed.images, ivd, snap, img)
    return Guest(ivd, snap, manifest, sha256_file(img))


@dataclass(frozen=True)
class Dynamic:
    """A Windows dynamic disk (tests.testbed.ldm) with one simple NTFS volume."""

    ivd: Ivd
    snapshot: str
    manifest: imgs.DiskManifest
    layout: ldm.LdmLayout

    def volumes(self, mp: Path) -> Path:
        return mp / self.ivd.datastore_name / self.ivd.id / self.snapshot / "volumes"


@pytest.fixture(scope="module")
def dynamic(bed: Bed) -> Dynamic:
    img = bed.root / "ldm.img"
    manifest, layout = imgs.ldm_disk(img)
    ivd = bed.vcsim.create_ivd("dynamic", manifest.size >> 20, "LocalDS_0")
    snap = bed.vcsim.create_snapshot(ivd, "d")
    place_image(bed.images, ivd, snap, img)
    return Dynamic(ivd, snap, manifest, layout)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "volume.key"
    path.write_text(PASSPHRASE + "\n")  # the first line is the passphrase, without its newline
    path.chmod(0o600)
    return path


def check_tree(vol: Path, files: dict[str, str], scratch: Path | None = None) -> None:
    """Every file byte for byte, and (given a scratch directory) an rsync copy of the volume."""
    for rel, digest in files.items():
        assert sha256_file(vol / rel) == digest, f"{vol.name}/{rel}"
    if scratch is None:
        return
    dest = scratch / vol.name
    subprocess.run(["rsync", "-a", f"{vol}/", f"{dest}/"], check=True)
    copied = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert set(files) <= copied
    for rel, digest in files.items():
        assert sha256_file(dest / rel) == digest


def no_passphrase_in(pids: list[int], *texts: str) -> None:
    secret = PASSPHRASE.encode()
    for text in texts:
        assert PASSPHRASE not in text
    for pid in pids:
        for what in ("cmdline", "environ"):
            assert secret not in Path(f"/proc/{pid}/{what}").read_bytes(), (pid, what)


def block_devices() -> set[str]:
    """md and device-mapper devices of this host (its kernel may have neither)."""
    return {p.name for p in Path("/sys/block").glob("md*")} | {
        p.name for p in Path("/sys/block").glob("dm-*")
    }


def error_lines(vols: Path) -> dict[str, str]:
    out = {}
    for name in os.listdir(vols):
        if name.endswith(".error"):
            text = (vols / name).read_text()
            assert text.count("\n") == 1 and text.endswith("\n"), (name, text)
            out[name.removesuffix(".error")] = text.strip()
    return out


@pytest.mark.guestfs
@pytest.mark.allow_log("partition table")
def test_guestfs_md_luks_and_ldm(
    bed: Bed, guest: Guest, dynamic: Dynamic, mountpoint: Path, key_file: Path, tmp_path: Path
) -> None:
    """One mount, two appliances booting side by side: the md/LUKS disk and the dynamic disk."""
    mp = mountpoint
    before = block_devices()
    m = Mount(bed, mp, "--volumes", "guestfs", "--idle-timeout", "600",
              "--volume-key-file", str(key_file))  # fmt: skip
    try:
        vols, dyn = guest.volumes(mp), dynamic.volumes(mp)
        with ThreadPoolExecutor(2) as pool:
            listed = list(pool.map(os.listdir, [vols, dyn]))
        assert sorted(listed[0]) == ["3", "4.error", MD]
        assert listed[1] == [dynamic.layout.dm_name]
        check_tree(vols / MD, guest.files(1), tmp_path)
        check_tree(vols / "3", guest.files(3))
        assert error_lines(vols) == {
            "4": "the --volume-key-file passphrase does not open this LUKS volume"
        }
        check_tree(dyn / dynamic.layout.dm_name, dynamic.manifest.partitions[0].files)
        rec = journal.find(mp)
        assert rec is not None and len(rec.appliances) == 2
        # One libguestfs FUSE mount per disk: md, dm-crypt and LDM ran inside the appliances.
        links = [vols / MD, vols / "3", dyn / dynamic.layout.dm_name]
        assert {os.path.dirname(os.readlink(p)) for p in links} == {
            a["mount"] for a in rec.appliances
        }
        assert len(mounts_under(Path(rec.appliances[0]["mount"]).parent)) == 2
        assert block_devices() == before
        pids = [m.proc.pid, *(a[k] for a in rec.appliances for k in ("helper", "qemu"))]
        helper_logs = [(Path(a["tmp"]) / "helper.log").read_text() for a in rec.appliances]
        no_passphrase_in(pids, m.log(), journal.path_for(mp).read_text(), *helper_logs)
        assert m.unmount("ivdfs") == 0, m.log()
    finally:
        if m.proc.poll() is None:
            m.unmount("SIGTERM")
    no_passphrase_in([], m.log(), m.stderr)
    assert not mounted_at(mp) and journal.find(mp) is None
    assert sha256_file(bed.images / guest.ivd.id / f"{guest.snapshot}.raw") == guest.sha256


@pytest.mark.allow_log("partition table", "not mounted")
def test_kernel_mode_leaves_them_alone(
    bed: Bed, guest: Guest, dynamic: Dynamic, mountpoint: Path
) -> None:
    """The host kernel assembles no array or dynamic disk and opens no encrypted volume: no md
    or dm device appears, and each partition says why it is not mounted (the LDM partition
    even though its first volume's NTFS starts where it does)."""
    before = block_devices()
    m = Mount(bed, mountpoint, "--volumes", "kernel")
    try:
        vols = guest.volumes(mountpoint)
        assert sorted(os.listdir(vols)) == ["1.error", "2.error", "3.error", "4.error"]
        md = "an md RAID member: its array is assembled only by --volumes guestfs"
        luks = (
            "an encrypted (LUKS) volume: only --volumes guestfs opens it (with --volume-key-file)"
        )
        assert error_lines(vols) == {"1": md, "2": md, "3": luks, "4": luks}
        assert error_lines(dynamic.volumes(mountpoint)) == {
            "1": "a Windows dynamic disk (LDM) partition: its volumes are assembled only by "
            "--volumes guestfs"
        }
        assert os.listdir(dynamic.volumes(mountpoint)) == ["1.error"]
        assert block_devices() == before
        assert m.unmount("ivdfs") == 0, m.log()
    finally:
        if m.proc.poll() is None:
            m.unmount("SIGTERM")


@contextmanager
def loop(image: Path, start: int, length: int) -> Iterator[str]:
    """A read-only loop device over part of `image`."""
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", "--offset", str(start), "--sizelimit",
         str(length), str(image)], capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


def test_images_are_what_the_tools_read(guest: Guest, dynamic: Dynamic, key_file: Path) -> None:
    """The test bed's own md superblocks and LDM database, read by mdadm and ldmtool (metadata
    only: this host's kernel assembles nothing), and the LUKS volumes by cryptsetup."""
    img = guest.manifest.path
    for p in guest.manifest.partitions[:2]:
        with loop(img, p.start, p.length) as dev:
            out = subprocess.run(["mdadm", "--examine", dev], capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
        assert "Name : ivdfs:mirror" in out and "Raid Level : raid1" in out, out
        assert " - correct" in out and "State : clean" in out and "Array State : AA " in out
    for p, status in zip(guest.manifest.partitions[2:], (0, 2), strict=True):
        with loop(img, p.start, p.length) as dev:
            # The passphrase as typed at cryptsetup's prompt: the key file's first line.
            r = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-", dev],
                               input=key_file.read_text().splitlines()[0], capture_output=True,
                               text=True)  # fmt: skip
        assert r.returncode == status, r.stderr  # 2: no key slot opens with it
    env = {**os.environ, "LC_ALL": "C"}
    img = dynamic.manifest.path
    run = [subprocess.run(["ldmtool", *args], capture_output=True, text=True, env=env,
                          check=True).stdout for args in (
        ["scan", str(img)],
        ["-d", str(img), "show", "volume", dynamic.layout.group_guid, dynamic.layout.volume],
        ["-d", str(img), "show", "partition", dynamic.layout.group_guid, "Disk1-01"],
        ["-d", str(img), "show", "disk", dynamic.layout.group_guid, "Disk1"],
    )]  # fmt: skip
    assert json.loads(run[0]) == [dynamic.layout.group_guid]
    volume, part, disk = (json.loads(out) for out in run[1:])
    assert volume["type"] == "simple" and volume["partitions"] == ["Disk1-01"]
    assert volume["size"] * 512 == dynamic.layout.volume_size
    assert (disk["data-start"] + part["start"]) * 512 == dynamic.layout.volume_offset


@pytest.mark.parametrize(
    ("mode", "extra", "message"),
    [
        ("guestfs", 0o640, "volume key file {key} is readable by group or others; run: chmod 600"),
        ("kernel", 0o600, "--volume-key-file: only --volumes guestfs opens encrypted volumes"),
        ("guestfs", None, "cannot read volume key file {key}: No such file or directory"),
    ],
)
def test_key_file_refused(
    bed: Bed, mountpoint: Path, key_file: Path, mode: str, extra: int | None, message: str
) -> None:
    """A key file others can read, or one the mode would not use, fails the mount at once
    with one line (no appliance boots), never naming the passphrase."""
    if extra is None:
        key_file.unlink()
    else:
        key_file.chmod(extra)
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        bed.mount_args(mountpoint, "--foreground", "--volumes", mode, "--volume-key-file",
                       str(key_file)),
        env=bed.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is not None or mounted_at(mountpoint), timeout=60,
                 what="the mount to be refused")  # fmt: skip
    finally:
        if proc.poll() is None:  # it mounted: the refusal is missing
            proc.terminate()
    out, err = proc.communicate(timeout=60)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert r.returncode != 0 and not mounted_at(mountpoint), r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(key=key_file) in lines[0], r.stderr
    assert PASSPHRASE not in r.stdout + r.stderr
