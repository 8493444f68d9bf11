"""Direct datastore access (issue 24): `ivdfs mount --datastore-path NAME=DIR` reads snapshots
from their VMDK chains under DIR through VDDK's local-file mode, past NFC.

The IVDs' chains are written where vCenter (vcsim) says their files are, as ESXi names them
(tests/testbed/vsphere.py place_chain), under a datastore folder that the tests bind-mount
read-only. The stand-in VDDK has no raw image of these snapshots, so a read that went over the
network instead would fail: what reads, reads directly. Parametrized with the real-VDDK tier
(IVDFS_TEST_VDDK): VMware's own library reads the same chains (its bridge passes local-file
connections through untouched).

What is held to account: every snapshot byte-exact; no NFC connection and no PrepareForAccess
for them; nothing written under DIR (the stand-in, like VDDK, would make lock files on a
writable one); a writable or missing DIR refused with exit 3; snapshots not under DIR read
over the network, with one log line per datastore, or EIO with --transport file; a link
rewritten or removed under a reader gives EIO and never bytes from before and after in one
read, in both tiers a chain rewritten between reads fails every later read; `ivdfs check`
says per datastore what it found.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import realvddk
from tests.mounting import IVDFS, Bed, Mount, call_lines, mounted_at, read_only_view, wait_for
from tests.testbed import vmdk
from tests.testbed.vsphere import Ivd, Vcsim, place_chain, place_image

MiB = 1 << 20
GRAIN = vmdk.GRAIN_SECTORS * 512
SIZE = 16 * MiB
DS = "LocalDS_0"
OTHER_DS = "LocalDS_1"

LIBDIRS = [
    pytest.param("standin", id="standin"),
    pytest.param("real", id="real-vddk", marks=pytest.mark.real_vddk),
]


def images(folder: Path, count: int, seed: int) -> list[Path]:
    """`count` disk images, each some grains on from the one before (a few of them zeroed)."""
    rng = random.Random(seed)
    data = bytearray(SIZE)
    for _ in range(40):
        g = rng.randrange(SIZE // GRAIN)
        data[g * GRAIN : (g + 1) * GRAIN] = rng.randbytes(GRAIN)
    out = []
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        if k:
            for _ in range(12):
                g = rng.randrange(SIZE // GRAIN)
                data[g * GRAIN : (g + 1) * GRAIN] = rng.randbytes(GRAIN)
            g = rng.randrange(SIZE // GRAIN)
            data[g * GRAIN : (g + 1) * GRAIN] = bytes(GRAIN)
        out.append(folder / f"image{k}.raw")
        out[-1].write_bytes(data)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(folder.rglob("*"))
    }


@dataclass
class Chain:
    ivd: Ivd
    snaps: list[str]  # oldest first
    images: list[Path]  # of each snapshot, then of the running disk
    links: list[vmdk.Link]

    def disk(self, mountpoint: Path, k: int) -> Path:
        return mountpoint / self.ivd.datastore_name / self.ivd.id / self.snaps[k] / "disk.raw"


def make_chain(vcsim: Vcsim, ds_dir: Path, work: Path, name: str, layout: vmdk.Layout,
               snaps: int = 3, seed: int = 1, datastore: str = DS) -> Chain:  # fmt: skip
    ivd = vcsim.create_ivd(name, SIZE // MiB, datastore)
    ids = [vcsim.create_snapshot(ivd, f"{name}-{k}") for k in range(snaps)]
    imgs = images(work / name, snaps + 1, seed)
    links = place_chain(vcsim, ivd, ds_dir, imgs[:snaps], current=imgs[snaps], layout=layout)
    return Chain(ivd, ids, imgs, links)


@pytest.fixture(scope="module")
def datastore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The datastore's folder (the writable original) ..."""
    return tmp_path_factory.mktemp("datastore") / DS


@pytest.fixture(scope="module")
def ro(datastore: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """... and its read-only view, what --datastore-path names."""
    datastore.mkdir(exist_ok=True)
    with read_only_view(datastore, tmp_path_factory.mktemp("ro") / DS) as view:
        yield view


def make_bed(vcsim: Vcsim, root: Path, which: str) -> Bed:
    (root / "images").mkdir(parents=True, exist_ok=True)
    if which == "real":
        return Bed(vcsim, root, libdir=realvddk.REAL_LIBDIR)
    return Bed(vcsim, root)


@pytest.fixture(scope="module")
def chains(
    vcsim: Vcsim, datastore: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Chain]:
    work = tmp_path_factory.mktemp("images")
    datastore.mkdir(exist_ok=True)
    return {
        layout: make_chain(vcsim, datastore, work, f"direct-{layout}", layout, seed=len(layout))
        for layout in ("sparse", "flat")
    }


def direct_args(ro: Path) -> tuple[str, str]:
    return ("--datastore-path", f"{DS}={ro}")


# --- reading ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", LIBDIRS)
def test_every_snapshot_reads_byte_exact_directly_and_nothing_is_written(
    vcsim: Vcsim, chains: dict[str, Chain], datastore: Path, ro: Path, tmp_path: Path, which: str
) -> None:
    bed = make_bed(vcsim, tmp_path / "bed", which)
    before = listing(datastore)
    mp = tmp_path / "mnt"
    with Mount(bed, mp, *direct_args(ro)) as m:
        for c in chains.values():
            for k in range(len(c.snaps)):
                assert sha(c.disk(mp, k)) == sha(c.images[k]), (c.ivd.name, k)
            prov = json.loads((c.disk(mp, 0).parent / "info.json").read_text())["provenance"]
            assert prov["read"] == "direct"
            assert prov["datastore_file"] == str(ro / "fcd" / c.links[0].descriptor.name)
        stats = json.loads((mp / ".ivdfs" / "stats").read_text())
        assert stats["direct"]["opens"] >= 6 and stats["direct"]["changed"] == 0
        assert stats["direct"]["checks"] > 0 and stats["disks"]["prepares"] == 0
        r = subprocess.run([*IVDFS, "status", str(mp), "--json"], env=bed.env(),
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        want_direct = {f"{c.ivd.id}/{s}" for c in chains.values() for s in c.snaps}
        assert set(json.loads(r.stdout)[0]["read_directly"]) == want_direct
        assert m.unmount() == 0
    assert listing(datastore) == before  # no lock file, nothing touched
    lines = bed.log_lines()
    ids = {c.ivd.id for c in chains.values()}
    assert not [p for p in call_lines(lines, "PrepareForAccess") if p["id"] in ids]
    assert not [c for c in call_lines(lines, "ConnectEx") if c.get("id") in ids]
    opened = {o["path"] for o in call_lines(lines, "Open") if o["err"] == "0"}
    want = {str(ro / "fcd" / link.descriptor.name) for c in chains.values() for link in c.links[:3]}
    assert want <= opened
    assert m.unexpected_log_records() == []


def test_a_writable_or_missing_directory_is_refused(
    bed: Bed, chains: dict[str, Chain], datastore: Path, tmp_path: Path
) -> None:
    before = listing(datastore)
    mp = tmp_path / "mnt"
    mp.mkdir()
    for directory, says in [
        (datastore, "is on a writable mount, and VDDK would write lock files there"),
        (tmp_path / "gone", "No such file or directory"),
    ]:
        args = bed.mount_args(mp, "--foreground", "--datastore-path", f"{DS}={directory}")
        r = subprocess.run(args, env=bed.env(), capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)  # fmt: skip
        assert r.returncode == 3, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ivdfs: --datastore-path {DS}={directory}")
        assert says in lines[0]
        if "writable" in says:
            assert "mount -o remount,bind,ro" in lines[0]
        assert not mounted_at(mp)
    assert listing(datastore) == before


@pytest.mark.allow_log(r"reading over the network", r"not read \(--transport file")
def test_snapshots_not_under_dir_fall_back_to_the_network_or_fail_with_file_transport(
    vcsim: Vcsim, bed: Bed, datastore: Path, ro: Path, tmp_path: Path
) -> None:
    """An IVD on another datastore, and one whose files are not in the folder, read over the
    network (one log line per datastore and reason); with --transport file, EIO."""
    src = tmp_path / "src"
    elsewhere = vcsim.create_ivd("direct-elsewhere", SIZE // MiB, OTHER_DS)
    missing = vcsim.create_ivd("direct-missing", SIZE // MiB, DS)
    imgs = images(src, 1, 5)
    snaps = {}
    for ivd in (elsewhere, missing):
        snaps[ivd.id] = vcsim.create_snapshot(ivd, "s")
        place_image(bed.images, ivd, snaps[ivd.id], imgs[0])
    mp = tmp_path / "mnt"

    def disk(ivd: Ivd) -> Path:
        return mp / ivd.datastore_name / ivd.id / snaps[ivd.id] / "disk.raw"

    with Mount(bed, mp, *direct_args(ro)) as m:
        for ivd in (elsewhere, missing):
            assert sha(disk(ivd)) == sha(imgs[0])
            info = json.loads((disk(ivd).parent / "info.json").read_text())
            assert info["provenance"]["read"] == "network"
        assert m.unmount() == 0
    fallbacks = [ln for ln in m.log().splitlines() if "reading over the network" in ln]
    assert len(fallbacks) == 1 and f"datastore {DS}:" in fallbacks[0], fallbacks
    with Mount(bed, mp, *direct_args(ro), "--transport", "file") as m:
        for ivd in (missing, elsewhere, missing):
            with pytest.raises(OSError) as e:
                disk(ivd).read_bytes()
            assert e.value.errno == errno.EIO
        assert m.unmount() == 0
    refused = [ln for ln in m.log().splitlines() if "not read (--transport file" in ln]
    # Once per datastore and reason, however many reads failed.
    assert len(refused) == 2, refused
    assert any(f"datastore {DS}:" in ln and f"no {ro}/fcd/" in ln for ln in refused)
    assert any(f"datastore {OTHER_DS}:" in ln and "no --datastore-path" in ln for ln in refused)


# --- never mixed bytes --------------------------------------------------------------------


# After a removal the snapshot is looked up again: vCenter still names the file, which is not
# there, so it is read over the network, where the stand-in has no image of it.
@pytest.mark.allow_log(r"changed \(", r"injected stall", r"fuse_reply_", r"A file was not found")
@pytest.mark.parametrize("how", ["rewritten", "in-place", "removed"])
def test_a_link_changed_under_a_reader_fails_the_read_and_never_mixes_bytes(
    vcsim: Vcsim, bed: Bed, datastore: Path, ro: Path, tmp_path: Path, how: str
) -> None:
    """A VDDK read is held (an injected stall) while the chain changes under it: the link
    renamed over by a new file as consolidation writes it, written in place, or removed. That
    read, and every later one of the snapshot, fails with EIO; no read returns other bytes than
    the snapshot's own."""
    c = make_chain(vcsim, datastore, tmp_path, f"direct-{how}", "flat", snaps=2, seed=len(how))
    mp = tmp_path / "mnt"
    target = c.disk(mp, 1)  # the chain base <- -000001
    want = c.images[1].read_bytes()
    stall = {"VDDK_STANDIN_STALL_NTH": "3", "VDDK_STANDIN_STALL_MS": "1500"}
    with Mount(bed, mp, *direct_args(ro), "--cache-size", "4M", "--prefetch", "0",
               **stall) as m:  # fmt: skip
        results: list[tuple[int, bytes | int]] = []

        def reader() -> None:
            fd = os.open(target, os.O_RDONLY | os.O_DIRECT)
            try:
                for off in range(0, SIZE, MiB):
                    try:
                        results.append((off, os.pread(fd, MiB, off)))
                    except OSError as e:
                        results.append((off, e.errno))
            finally:
                os.close(fd)

        t = threading.Thread(target=reader)
        t.start()
        wait_for(lambda: "injected stall" in m.log(), what="the stalled read")
        if how == "rewritten":
            other = images(tmp_path / "other", 2, 99)
            vmdk.write_chain(c.links[0].descriptor.parent,
                             [c.links[0].descriptor.name, c.links[1].descriptor.name],
                             other, layout="flat", seed=3)  # fmt: skip
        elif how == "in-place":
            with open(c.links[0].extents[0], "r+b") as f:
                f.write(os.urandom(SIZE))
        else:
            c.links[1].descriptor.unlink()
        t.join(timeout=60)
        assert not t.is_alive()
        offsets = [off for off, _ in results]
        assert offsets == list(range(0, SIZE, MiB))
        failed = [off for off, r in results if r == errno.EIO]
        # Reads before the stalled one succeed; from it on, all fail (a suffix).
        assert failed and failed == offsets[offsets.index(failed[0]) :], failed
        assert 0 < failed[0] <= 3 * MiB, failed
        for off, r in results:
            assert r == errno.EIO or r == want[off : off + MiB], off
        log = m.log()
        assert "changed (" in log
        assert m.unmount() == 0


@pytest.mark.allow_log(r"changed \(")
@pytest.mark.parametrize("which", LIBDIRS)
def test_a_chain_rewritten_between_reads_fails_every_later_read(
    vcsim: Vcsim, datastore: Path, ro: Path, tmp_path: Path, which: str
) -> None:
    """Both tiers (the real library holds its files open as the stand-in does): the chain is
    rewritten as a consolidation would leave it (new files renamed over the old ones) after
    half the disk was read; the other half, and the first half again past every cache, fail
    with EIO, and one log line names the file."""
    c = make_chain(vcsim, datastore, tmp_path, f"direct-between-{which}", "sparse", snaps=2,
                   seed=7)  # fmt: skip
    bed = make_bed(vcsim, tmp_path / "bed", which)
    mp = tmp_path / "mnt"
    want = c.images[1].read_bytes()
    # No read-ahead: what was read before the change stays the only thing cached (blocks read
    # and confirmed before a change are the snapshot's own, and may be served until the next
    # VDDK read finds the change; then they are dropped).
    with Mount(bed, mp, *direct_args(ro), "--prefetch", "0") as m:
        fd = os.open(c.disk(mp, 1), os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, SIZE // 2, 0) == want[: SIZE // 2]
            other = images(tmp_path / "other", 2, 11)
            vmdk.write_chain(c.links[0].descriptor.parent,
                             [c.links[0].descriptor.name, c.links[1].descriptor.name],
                             other, layout="sparse", seed=5)  # fmt: skip
            for off in (SIZE // 2, 0):
                with pytest.raises(OSError) as e:
                    os.pread(fd, MiB, off)
                assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
        stats = json.loads((mp / ".ivdfs" / "stats").read_text())
        assert stats["direct"]["changed"] == 1
        assert m.unmount() == 0
    changed = [ln for ln in m.log().splitlines() if "changed (" in ln]
    assert len(changed) == 1 and str(ro / "fcd") in changed[0], changed


# --- changes without CBT -----------------------------------------------------------------


@pytest.mark.parametrize("which", LIBDIRS)
def test_changes_come_from_the_links_own_grains_without_cbt(
    vcsim: Vcsim, chains: dict[str, Chain], tmp_path: Path, ro: Path, which: str
) -> None:
    """CBT is off for these IVDs: changes/<previous>.json lists the grains written in the
    snapshot's own link (source delta-grains), and <previous>.raw reads this snapshot's bytes
    there and zeros elsewhere."""
    bed = make_bed(vcsim, tmp_path / "bed", which)
    mp = tmp_path / "mnt"
    with Mount(bed, mp, *direct_args(ro)) as m:
        for c in chains.values():
            for k in (1, 2):
                changes = c.disk(mp, k).parent / "changes"
                doc = json.loads((changes / f"{c.snaps[k - 1]}.json").read_text())
                assert doc["source"] == "delta-grains", doc
                want: list[list[int]] = []
                for g in sorted(c.links[k].grains):
                    if want and want[-1][0] + want[-1][1] == g * GRAIN:
                        want[-1][1] += GRAIN
                    else:
                        want.append([g * GRAIN, GRAIN])
                assert [[e["offset"], e["length"]] for e in doc["extents"]] == want
                raw = (changes / f"{c.snaps[k - 1]}.raw").read_bytes()
                image = c.images[k].read_bytes()
                expect = bytearray(SIZE)
                for off, n in want:
                    expect[off : off + n] = image[off : off + n]
                assert raw == expect
        assert m.unmount() == 0


# --- check -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", LIBDIRS)
def test_check_says_per_datastore_what_it_found(
    vcsim: Vcsim, chains: dict[str, Chain], datastore: Path, ro: Path, tmp_path: Path, which: str
) -> None:
    """`ivdfs check --datastore-path`: per datastore, DIR usable, one snapshot's file found
    with its chain, its first 64 KiB read through VDDK's local-file mode; a writable DIR
    fails that step with exit 3. (Other steps read over the network, which this bed's
    stand-in cannot serve for every IVD: only the datastore-path lines are held here.)"""
    bed = make_bed(vcsim, tmp_path / "bed", which)
    v = bed.vcsim
    before = listing(datastore)
    for directory, mark in [(ro, "ok"), (datastore, "FAIL")]:
        args = [*IVDFS, "check", "--server", v.server, "--user", v.user, "--ca-file",
                str(v.ca_file), "--vddk-libdir", str(bed.libdir), "--datastore-path",
                f"{DS}={directory}"]  # fmt: skip
        r = subprocess.run(args, env=bed.env(), capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)  # fmt: skip
        lines = [ln for ln in r.stdout.splitlines() if f"datastore-path {DS}" in ln]
        assert len(lines) == 1 and lines[0].split()[0] == mark, r.stdout + r.stderr
        if mark == "ok":
            assert "65536 bytes read directly" in lines[0] and str(ro / "fcd") in lines[0]
        else:
            assert "writable mount" in lines[0]
            assert r.returncode == 3 or "check failed at read" in r.stderr, r.stderr
    assert listing(datastore) == before
