"""Real mounts on VMware's own VDDK (issue 23): the real-VDDK tier.

ivdfs gets `--vddk-libdir tests/testbed/build/realvddk`, VMware's lib64 with our bridge as
libvixDiskLib (tests/realvddk.py): every read, allocation query and error comes from the real
library, on VMDK chains that it wrote itself, one link per snapshot. vcsim still plays vCenter.
The bridge writes the stand-in's call log, so the shared checks (no VIOLATION, every
PrepareForAccess ended, every handle closed) run on it, and the tests read it to see which
sectors ivdfs asked for.

Every test here is marked `real_vddk`: without IVDFS_TEST_VDDK they are skipped (conftest).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ivdfs import journal
from tests import realvddk
from tests.mounting import (
    IVDFS,
    REPO,
    Bed,
    Mount,
    alive,
    call_lines,
    fuse_servers,
    mounted_at,
    sha256_file,
    vixmntapi_mounts,
)
from tests.realvddk import GRAIN, ChainDisk
from tests.testbed import images as imgs
from tests.testbed.vsphere import Vcsim

pytestmark = pytest.mark.real_vddk

MiB = 1 << 20
SECTOR = 512
GRAIN_SECTORS = GRAIN // SECTOR


@pytest.fixture(scope="module")
def bed(vcsim: Vcsim, tmp_path_factory: pytest.TempPathFactory) -> Bed:
    """The test bed with the bridge to the real library as ivdfs's VDDK."""
    root = tmp_path_factory.mktemp("vmware-bed")
    (root / "images").mkdir()
    return Bed(vcsim, root, libdir=realvddk.REAL_LIBDIR)


def derive(src: Path, dst: Path, writes: list[tuple[int, bytes]]) -> Path:
    """A copy of `src` with `writes` (offset, bytes) applied: the next snapshot's bytes."""
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        for off, data in writes:
            os.pwrite(f.fileno(), data, off)
    return dst


def first_data(path: Path, start: int, end: int) -> int:
    """The offset of the first data (per SEEK_DATA) of `path` in [start, end)."""
    with open(path, "rb") as f:
        off = os.lseek(f.fileno(), start, os.SEEK_DATA)
    assert start <= off < end, f"no data in {path} between {start} and {end}"
    return off


@dataclass(frozen=True)
class Disks:
    chain: ChainDisk  # MBR, three links
    manifest: imgs.DiskManifest  # the chain's partitions (the same in every snapshot)
    odd: ChainDisk  # not a whole MiB, holes, two links
    lvm: ChainDisk  # GPT + LVM, one link
    lvm_manifest: imgs.DiskManifest
    victim: ChainDisk  # for the killed mount


@pytest.fixture(scope="module")
def disks(bed: Bed) -> Disks:
    src = bed.root / "src"
    src.mkdir()
    rnd = random.Random(23)

    def noise(n: int) -> bytes:
        return rnd.randbytes(n)

    m = imgs.mbr_disk(src / "mbr-1.raw", 64)
    p1, p5, p6 = (next(p for p in m.partitions if p.number == n) for n in (1, 5, 6))
    # Link 2: new data in a hole of partition 1, a data grain of partition 5 zeroed, a changed
    # sector; link 3: more in partition 6, in the gap between 5 and 6 (in no window), and in
    # the grain after link 2's new data.
    zeroed = first_data(m.path, p5.start + GRAIN, p5.start + p5.length) // GRAIN * GRAIN
    s2 = derive(m.path, src / "mbr-2.raw", [
        (p1.start + 12 * MiB, noise(3 * GRAIN)), (zeroed, bytes(GRAIN)),
        (p1.start + 5 * SECTOR, noise(SECTOR)),
    ])  # fmt: skip
    s3 = derive(s2, src / "mbr-3.raw", [
        (p6.start + 7 * MiB + 4096, noise(MiB)), (p5.start + p5.length + MiB // 2, noise(GRAIN)),
        (p1.start + 12 * MiB + GRAIN, noise(GRAIN)),
    ])  # fmt: skip
    chain = realvddk.add_chain(bed, "vmw-chain", [m.path, s2, s3])

    # 24 MiB + 128 KiB + 3 sectors, data in MiBs 0-2, part of MiB 10, and the tail.
    odd1 = src / "odd-1.raw"
    size = 24 * MiB + 128 * 1024 + 3 * SECTOR
    with open(odd1, "wb") as f:
        f.truncate(size)
        for off, data in [(0, noise(3 * MiB)), (10 * MiB, noise(100_000)),
                          (size - 3 * SECTOR, noise(3 * SECTOR))]:  # fmt: skip
            os.pwrite(f.fileno(), data, off)
    odd2 = derive(odd1, src / "odd-2.raw", [
        (MiB, bytes(MiB)), (16 * MiB + 512, noise(70_000)), (size - SECTOR, noise(SECTOR)),
    ])  # fmt: skip
    odd = realvddk.add_chain(bed, "vmw-odd", [odd1, odd2])

    lm = imgs.lvm_disk(src / "lvm.raw")
    lvm = realvddk.add_chain(bed, "vmw-lvm", [lm.path])
    victim = realvddk.add_chain(bed, "vmw-victim", [src / "odd-1.raw"])
    return Disks(chain, m, odd, lvm, lm, victim)


def sha256_bytes(path: Path, start: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = os.path.getsize(path) - start if length is None else length
        while left > 0 and (b := f.read(min(MiB, left))):
            h.update(b)
            left -= len(b)
    return h.hexdigest()


# --- what the bridge's call log says ivdfs asked for ---------------------------------------


@dataclass
class HandleLog:
    """One handle of the bridge's call log: the VMDK it opened, its queries and reads."""

    vmdk: str
    queried: list[tuple[int, int, int]]  # (start, sectors, chunk) of each accepted query
    runs: list[tuple[int, int]]  # allocated runs the real library answered
    reads: list[tuple[int, int]]  # (start, sectors) of each Read / ReadAsync


def handles_of(lines: list[str]) -> dict[str, HandleLog]:
    out: dict[str, HandleLog] = {}
    for o in call_lines(lines, "Open"):
        if o["err"] == "0":
            out[o["handle"]] = HandleLog(o["file"], [], [], [])
    for q in call_lines(lines, "QueryAllocatedBlocks"):
        assert q["err"] == "0", q  # the real library accepted every query
        h = out[q["handle"]]
        h.queried.append((int(q["start"]), int(q["n"]), int(q["chunk"])))
        assert "runs_truncated" not in q
        for run in filter(None, q.get("runs", "").split(",")):
            start, length = run.split("+")
            h.runs.append((int(start), int(length)))
    for r in call_lines(lines, "Read") + call_lines(lines, "ReadAsync"):
        out[r["handle"]].reads.append((int(r["start"]), int(r["n"])))
    return out


def chunks(runs: list[tuple[int, int]], chunk: int) -> set[int]:
    return {c for s, n in runs for c in range(s // chunk, (s + n) // chunk)}


def assert_holes_unread(disk: ChainDisk, i: int, log: HandleLog) -> int:
    """The real library's answers merged the links (every chunk holding a grain that any
    link up to snapshot `i` wrote, and no other), and ivdfs read no sector of a chunk that it
    learnt was a hole. Returns how many hole chunks ivdfs skipped."""
    assert log.queried, "ivdfs asked for no allocation"
    grains = disk.allocated(i)
    skipped = 0
    for start, n, chunk in log.queried:
        span = range(start // chunk, (start + n) // chunk)
        want = {g * GRAIN_SECTORS // chunk for g in grains} & set(span)
        got = chunks(log.runs, chunk) & set(span)
        assert got == want, f"{log.vmdk}: allocated chunks of {chunk} sectors"
        holes = set(span) - got
        for rs, rn in log.reads:
            hit = {c for c in holes if rs < (c + 1) * chunk and c * chunk < rs + rn}
            assert not hit, f"{log.vmdk}: read {rs}+{rn} covers hole chunks {sorted(hit)}"
        skipped += len(holes)
    return skipped


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ReadAsync", "Read"])
def test_every_snapshot_of_a_chain_reads_byte_exact_without_reading_a_hole(
    bed: Bed, disks: Disks, mountpoint: Path, mode: str
) -> None:
    """Three links; ivdfs sees a network transport (from the bridge) and reads through
    ReadAsync, which the real library completes inline, or with --no-async through Read."""
    bed.standin_log.unlink(missing_ok=True)
    d = disks.chain
    args = ("--no-async",) if mode == "Read" else ()
    with Mount(bed, mountpoint, *args) as m:
        for i, link in enumerate(d.links):
            assert sha256_file(d.snapdir(mountpoint, i) / "disk.raw") == sha256_bytes(link.raw)
        assert m.unmount() == 0
    lines = bed.log_lines()
    assert {t["mode"] for t in call_lines(lines, "GetTransportMode")} == {"nbdssl"}
    assert {t["real"] for t in call_lines(lines, "GetTransportMode")} == {"file"}
    other = "Read" if mode == "ReadAsync" else "ReadAsync"
    assert call_lines(lines, mode) and not call_lines(lines, other)
    if mode == "ReadAsync":  # completed inline, before ReadAsync returned, every one
        assert {r["mode"] for r in call_lines(lines, "ReadAsync")} == {"inline"}
        assert {r["inline"] for r in call_lines(lines, "ReadAsyncDone")} == {"1"}
    handles = handles_of(lines)
    by_vmdk = {str(link.vmdk): i for i, link in enumerate(d.links)}
    seen = set()
    for log in handles.values():
        i = by_vmdk[log.vmdk]
        seen.add(i)
        assert assert_holes_unread(d, i, log) > 0  # the chain has holes, and they were skipped
    assert seen == {0, 1, 2}
    assert m.unexpected_log_records() == []


def test_an_odd_sized_disk_reads_to_its_last_sector_and_skips_its_holes(
    bed: Bed, disks: Disks, mountpoint: Path
) -> None:
    """24 MiB + 128 KiB + 3 sectors over two links: no whole MiB, no whole chunk at the end
    (the real library refuses to query it; ivdfs reads it), and MiBs of holes."""
    bed.standin_log.unlink(missing_ok=True)
    d = disks.odd
    with Mount(bed, mountpoint) as m:
        for i, link in enumerate(d.links):
            raw = d.snapdir(mountpoint, i) / "disk.raw"
            assert raw.stat().st_size == link.raw.stat().st_size == link.capacity * SECTOR
            assert raw.stat().st_size % MiB
            assert sha256_file(raw) == sha256_bytes(link.raw)
            tail = link.raw.read_bytes()[-3 * SECTOR :]
            with open(raw, "rb") as f:  # the last sectors on their own
                assert os.pread(f.fileno(), 3 * SECTOR, (link.capacity - 3) * SECTOR) == tail
        assert m.unmount() == 0
    handles = handles_of(bed.log_lines())
    assert len(handles) == 2
    for log in handles.values():
        i = [str(link.vmdk) for link in d.links].index(log.vmdk)
        assert assert_holes_unread(d, i, log) >= 10
        # The partial last chunk is read, never queried.
        assert max(s + n for s, n, _ in log.queried) < d.links[i].capacity
        assert max(s + n for s, n in log.reads) == d.links[i].capacity
    assert m.unexpected_log_records() == []


def test_partition_windows_and_lvm_volumes_read_byte_exact(
    bed: Bed, disks: Disks, mountpoint: Path
) -> None:
    d, lvm = disks.chain, disks.lvm
    with Mount(bed, mountpoint) as m:
        for i, link in enumerate(d.links):
            snapdir = d.snapdir(mountpoint, i)
            parts = {p.number: p for p in disks.manifest.partitions}
            assert {n for n in os.listdir(snapdir) if n.startswith("part")} == {
                f"part{n}.raw" for n in parts
            }
            for n, p in parts.items():
                assert sha256_file(snapdir / f"part{n}.raw") == sha256_bytes(
                    link.raw, p.start, p.length
                ), f"snapshot {i + 1} partition {n}"
        snapdir = lvm.snapdir(mountpoint, 0)
        lvs = [lv for lv in disks.lvm_manifest.lvs if lv.sha256]
        assert lvs
        for lv in lvs:
            dm = f"{lv.vg.replace('-', '--')}-{lv.name.replace('-', '--')}"
            assert sha256_file(snapdir / f"lv-{dm}.raw") == lv.sha256, lv.name
        for p in disks.lvm_manifest.partitions:
            assert sha256_file(snapdir / f"part{p.number}.raw") == sha256_bytes(
                lvm.links[0].raw, p.start, p.length
            )
        assert m.unmount() == 0
    assert m.unexpected_log_records() == []


def ivdfs_cmd(bed: Bed, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    v = bed.vcsim
    return subprocess.run(
        [*IVDFS, command, "--server", v.server, "--user", v.user, "--ca-file", str(v.ca_file),
         "--vddk-libdir", str(bed.libdir), *args],
        env=bed.env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_ivdfs_hash_equals_sha256sum(bed: Bed, disks: Disks, mountpoint: Path) -> None:
    d = disks.odd
    r = ivdfs_cmd(bed, "hash", "--algorithm", "sha256", d.ivd.id, d.snapshots[1])
    assert r.returncode == 0, r.stderr
    digest = r.stdout.split()[0]
    assert digest == sha256_bytes(d.links[1].raw)
    with Mount(bed, mountpoint) as m:
        raw = d.snapdir(mountpoint, 1) / "disk.raw"
        out = subprocess.run(["sha256sum", str(raw)], capture_output=True, text=True, check=True)
        assert out.stdout.split()[0] == digest
        assert m.unmount() == 0
    c = disks.chain
    r = ivdfs_cmd(bed, "hash", "--algorithm", "sha256", "--partition", "5", c.ivd.id,
                  c.snapshots[2])  # fmt: skip
    assert r.returncode == 0, r.stderr
    p5 = next(p for p in disks.manifest.partitions if p.number == 5)
    assert r.stdout.split()[0] == sha256_bytes(c.links[2].raw, p5.start, p5.length)


@pytest.mark.killed_mount
def test_a_killed_mount_is_recovered_by_ivdfs_umount(
    bed: Bed, disks: Disks, mountpoint: Path
) -> None:
    d = disks.victim
    m = Mount(bed, mountpoint)
    with open(d.snapdir(mountpoint, 0) / "disk.raw", "rb") as f:
        assert f.read(MiB) == d.links[0].raw.read_bytes()[:MiB]  # opened: the IVD is prepared
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=30)
    assert mounted_at(mountpoint)  # dead, still mounted
    r = ivdfs_cmd(bed, "umount", str(mountpoint))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"EndAccess for IVD {d.ivd.id}" in r.stdout
    assert not mounted_at(mountpoint) and os.listdir(mountpoint) == []
    # The real library still opens the VMDK the dead process had open (its lock is stale).
    with Mount(bed, mountpoint) as m2:
        assert sha256_file(d.snapdir(mountpoint, 0) / "disk.raw") == sha256_bytes(d.links[0].raw)
        assert m2.unmount() == 0


@pytest.mark.parametrize("how", ["ivdfs", "SIGTERM"])
def test_volumes_of_the_real_vixmntapi_are_mounted_or_explained_and_nothing_is_left(
    bed: Bed, disks: Disks, mountpoint: Path, how: str
) -> None:
    """`--volumes vixmntapi` on VMware's own VixMntapi: every volume it lists is mounted (its
    files as the image's manifest says) or has volumes/<n>.error with VixMntapi's code; its
    own FUSE mount of the disk (/run/vmware/fuse/<n>, which its CloseDiskSet fails to unmount
    on this kind of host) is gone after the unmount, and so is its forked server."""
    d, manifest = disks.chain, disks.manifest
    parts = sorted((p for p in manifest.partitions if p.fs), key=lambda p: p.number)
    with Mount(bed, mountpoint, "--volumes", "vixmntapi") as m:
        vols = d.snapdir(mountpoint, 0) / "volumes"
        names = sorted(os.listdir(vols))
        listed = sorted(n.removesuffix(".error") for n in names)
        assert listed == [str(i + 1) for i in range(len(parts))], names
        for n, part in zip(listed, parts, strict=True):
            if n in names:  # mounted: its files are the image's
                for rel, digest in part.files.items():
                    assert sha256_file(vols / n / rel) == digest, f"volume {n}: {rel}"
            else:
                assert "[VixError " in (vols / f"{n}.error").read_text()
        rec = journal.find(mountpoint)
        assert rec is not None
        made = {p for e in rec.vixmntapi for p in e["fuse"]}
        assert len(made) == 1 and made <= vixmntapi_mounts()
        servers = fuse_servers(m.proc.pid)
        assert servers, "VixMntapi serves its mount from a forked copy of ivdfs"
        assert m.unmount(how) == 0, m.log()
    assert not made & vixmntapi_mounts()
    deadline = time.monotonic() + 20
    while [p for p in servers if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in servers if alive(p)], "VixMntapi's server outlived the mount"
    assert journal.find(mountpoint) is None
    assert m.unexpected_log_records() == []


# --- the real VixMntapi on a bridged connection, below ivdfs (what it does by itself) -------


def test_the_real_vixmntapi_loads_from_the_libdir_and_opens_through_the_bridge(
    bed: Bed, disks: Disks, tmp_path: Path
) -> None:
    """libvixMntapi.so.1 (DT_NEEDED libvixDiskLib.so.7.0.2) binds the bridge's versioned
    symbols, and VixMntapi_OpenDisks on a vStorageObject connection reaches the real library
    through it. Run in a private mount namespace: VixMntapi FUSE-mounts the disk under
    /run/vmware/fuse and does not always unmount it."""
    bed.standin_log.unlink(missing_ok=True)
    d = disks.chain
    env = bed.env(LD_LIBRARY_PATH=str(realvddk.REAL_LIBDIR / "lib64"))
    argv = ["unshare", "-m", "--propagation", "private", sys.executable, "-m",
            "tests.t4_vmware_vddk", d.ivd.id, d.ivd.datastore_moref, d.snapshots[2]]  # fmt: skip
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.splitlines()[-1])
    try:
        vddk = realvddk.vddk_dir()
        assert vddk is not None
        assert doc["loaded"] == os.path.realpath(vddk / "lib64" / "libvixMntapi.so.1")
        # The bridge, and behind it (its RTLD_DEEPBIND dlopen) the real one.
        real = os.path.realpath(realvddk.real_library(vddk))
        bridge = str(realvddk.REAL_LIBDIR / "lib64" / Path(real).name)
        assert doc["libvixDiskLib mapped"] == sorted([bridge, real])
        assert doc["Init"] == 0 and doc["OpenDisks"] == 0, doc
        assert doc["volumes"] == len(disks.manifest.partitions)  # 1, 5 and 6
        assert doc["servers left after umount"] == 0, doc
    finally:
        for n in doc.get("fuse", []):  # what this run left on the shared /run and /tmp
            Path(f"/run/vmware/fuse/{n}.info").unlink(missing_ok=True)
            for p in (Path(f"/run/vmware/fuse/{n}"), *Path("/tmp/vmware-root").glob(f"{n}_*")):
                if p.is_dir():
                    p.rmdir()
    lines = bed.log_lines()
    # Values with blanks are quoted in the log: split as a shell would.
    opens = [dict(p.split("=", 1) for p in shlex.split(ln)[3:] if "=" in p)
             for ln in lines if ln.split()[2] == "Open"]  # fmt: skip
    assert [(o["path"], o["file"], o["flags"]) for o in opens] == [
        (f"[{d.ivd.datastore_moref}] VStorageObject:{d.ivd.id}", str(d.links[2].vmdk), "4")
    ]
    assert call_lines(lines, "GetConnectParams")
    assert any(r["handle"] == opens[0]["handle"] for r in call_lines(lines, "Read"))


def fuse_mounts_of_vixmntapi() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith("/run/vmware/fuse/")]


def namespace_mates() -> list[int]:
    """Other processes in this (private, new) mount namespace: VixMntapi's forked FUSE
    servers."""
    mine = os.readlink("/proc/self/ns/mnt")
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == mine:
                    out.append(int(entry))
            except OSError:
                continue
    return out


def vixmntapi_check(ivd: str, datastore: str, snapshot: str) -> dict[str, object]:
    """In a private mount namespace: VixMntapi_Init, OpenDisks on an ivdfs connection,
    GetVolumeHandles, CloseDiskSet, Exit; what each answered and what VixMntapi left behind,
    which is then cleaned up here (its FUSE mounts unmounted, its FUSE servers gone)."""
    from ivdfs.config import Secret
    from ivdfs.vddk import mntapi
    from ivdfs.vddk.connection import Connection, DiskTarget, ServerTarget
    from ivdfs.vddk.library import VddkLibrary, log_callbacks

    lib = VddkLibrary(realvddk.REAL_LIBDIR)
    lib.init()
    path = mntapi.find_mntapi(realvddk.REAL_LIBDIR)
    mnt = mntapi.ffi.dlopen(str(path))
    ffi = mntapi.ffi
    doc: dict[str, object] = {"loaded": os.path.realpath(path)}
    with open("/proc/self/maps", encoding="utf-8") as f:
        maps = {ln.split()[-1] for ln in f if "libvixDiskLib" in ln}
    doc["libvixDiskLib mapped"] = sorted(maps)
    callbacks = log_callbacks(logging.getLogger("vixmntapi"))
    doc["Init"] = mnt.VixMntapi_Init(1, 0, *callbacks, str(realvddk.REAL_LIBDIR).encode(), ffi.NULL)
    server = ServerTarget("127.0.0.1", 443, "user", Secret("password"), "AA:BB")
    conn = Connection(lib, server, DiskTarget(ivd, datastore, snapshot))
    conn.open()
    name = ffi.new("char[]", ivd.encode())
    names = ffi.new("const char *[1]", [name])
    out = ffi.new("VixDiskSetHandle *")
    before = set(fuse_mounts_of_vixmntapi())
    doc["OpenDisks"] = mnt.VixMntapi_OpenDisks(ffi.cast("VixDiskLibConnection", conn.conn), names,
                                               1, 4, out)  # fmt: skip
    made = [p for p in fuse_mounts_of_vixmntapi() if p not in before]
    doc["fuse"] = [Path(p).name for p in made]
    doc["servers"] = len(namespace_mates())
    if doc["OpenDisks"] == 0:
        count = ffi.new("size_t *")
        handles = ffi.new("VixVolumeHandle **")
        doc["GetVolumeHandles"] = mnt.VixMntapi_GetVolumeHandles(out[0], count, handles)
        doc["volumes"] = int(count[0])
        mnt.VixMntapi_FreeVolumeHandles(handles[0])
        doc["CloseDiskSet"] = mnt.VixMntapi_CloseDiskSet(out[0])
    conn.close()
    mnt.VixMntapi_Exit()
    lib.exit()
    doc["fuse left after Exit"] = [Path(p).name for p in made if p in fuse_mounts_of_vixmntapi()]
    doc["servers left after Exit"] = len(namespace_mates())
    for p in made:  # only this namespace's copies: the host never saw them
        subprocess.run(["umount", "-l", p], check=False)
    deadline = time.monotonic() + 20
    while namespace_mates() and time.monotonic() < deadline:
        time.sleep(0.05)
    doc["servers left after umount"] = len(left := namespace_mates())
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return doc


@pytest.fixture(autouse=True)
def no_mount_left(mountpoint: Path) -> Iterator[None]:
    yield
    assert not mounted_at(mountpoint)


if __name__ == "__main__":
    print(json.dumps(vixmntapi_check(*sys.argv[1:4])))
