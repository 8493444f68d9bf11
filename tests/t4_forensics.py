"""Forensic inspection through real mounts (issue 18): evidence hashes of what was served,
`ivdfs hash` checked by sha256sum -c inside the mount, provenance in info.json, and the
hash-chained access journal (exact ranges by pid and path, tampering, SIGTERM, SIGKILL,
continuation, fail closed)."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ivdfs import __version__
from tests.mounting import IVDFS, VDDK_LIBDIR, Bed, Mount, call_lines, mounted_at, wait_for
from tests.testbed.images import DataManifest, random_disk, sparse_disk
from tests.testbed.vsphere import Ivd, place_image

MiB = 1 << 20
FLUSH_WAIT = 20.0  # seconds: the journal writes a long open's reads every 5 s


@dataclass(frozen=True)
class Disk:
    ivd: Ivd
    snapshot: str
    image: Path
    parts: dict[int, tuple[int, int]]  # number -> (start, length) in bytes
    allocated: tuple[int, ...] = ()  # 1 MiB blocks holding data (sparse disk)

    @property
    def rel(self) -> str:
        return f"{self.ivd.datastore_name}/{self.ivd.id}/{self.snapshot}"

    def path(self, mp: Path, name: str = "disk.raw") -> Path:
        return mp / self.rel / name

    def data(self, number: int | None = None) -> bytes:
        raw = self.image.read_bytes()
        if number is None:
            return raw
        start, length = self.parts[number]
        return raw[start : start + length]


def gpt_random_disk(path: Path, size_mb: int, seed: int) -> DataManifest:
    """Random data with a GPT of two partitions written over it (parted keeps the rest)."""
    m = random_disk(path, size_mb, seed)
    subprocess.run(
        ["parted", "-s", str(path), "mklabel", "gpt",
         "mkpart", "one", "1MiB", f"{size_mb // 2}MiB",
         "mkpart", "two", f"{size_mb // 2}MiB", f"{size_mb - 1}MiB"],
        check=True, capture_output=True,
    )  # fmt: skip
    return m


def gpt_layout(path: Path) -> dict[int, tuple[int, int]]:
    out = subprocess.run(
        ["parted", "-s", "-m", str(path), "unit", "B", "print"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    parts = {}
    for line in out.splitlines():
        f = line.split(":")
        if f[0].isdigit():
            parts[int(f[0])] = (int(f[1].rstrip("B")), int(f[3].rstrip("B")))
    return parts


@pytest.fixture(scope="module")
def disks(bed: Bed) -> dict[str, Disk]:
    src = bed.root / "forensics-src"
    src.mkdir()
    out: dict[str, Disk] = {}
    for name, size_mb, seed in (("parted", 24, 181), ("plain", 12, 182)):
        ivd = bed.vcsim.create_ivd(f"evidence-{name}", size_mb, "LocalDS_0")
        snap = bed.vcsim.create_snapshot(ivd, f"seized {name}")
        image = src / f"{name}.raw"
        if name == "parted":
            gpt_random_disk(image, size_mb, seed)
            parts = gpt_layout(image)
        else:
            random_disk(image, size_mb, seed)
            parts = {}
        place_image(bed.images, ivd, snap, image)
        out[name] = Disk(ivd, snap, image, parts)
    ivd = bed.vcsim.create_ivd("evidence-sparse", 32, "LocalDS_1")
    snap = bed.vcsim.create_snapshot(ivd, "sparse")
    m = sparse_disk(src / "sparse.raw", 32, 0.4, seed=183)
    place_image(bed.images, ivd, snap, m.path)
    out["sparse"] = Disk(ivd, snap, m.path, {}, m.allocated)
    return out


def digests(data: bytes) -> dict[str, bytes]:
    return {
        "user.ivdfs.sha256": hashlib.sha256(data).hexdigest().encode(),
        "user.ivdfs.md5": hashlib.md5(data).hexdigest().encode(),
    }


def xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name)
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return None


def hash_xattrs(path: Path) -> dict[str, bytes]:
    out = {}
    for name in ("user.ivdfs.sha256", "user.ivdfs.md5"):
        value = xattr(path, name)
        if value is not None:
            out[name] = value
    return out


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=120)


# --- evidence hashes -------------------------------------------------------------------------


def test_sequential_reads_leave_hashes_and_other_reads_none(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    d, plain = disks["parted"], disks["plain"]
    with Mount(bed, mountpoint, "--hashes") as m:
        disk = d.path(mountpoint)
        # A look before imaging (`file -s`): the kernel keeps these pages, and the imaging
        # open after it must still reach every byte.
        subprocess.run(["head", "-c", "4096", str(disk)], stdout=subprocess.DEVNULL, check=True)
        assert hash_xattrs(disk) == {}
        r = run("sha256sum", str(disk))
        assert r.stdout.split()[0] == hashlib.sha256(d.data()).hexdigest()
        assert hash_xattrs(disk) == digests(d.data())
        assert "user.ivdfs.sha256" in os.listxattr(disk)
        # A partition window, read by dd in odd-sized blocks.
        part1 = d.path(mountpoint, "part1.raw")
        assert hash_xattrs(part1) == {}
        r = run("dd", f"if={part1}", "of=/dev/null", "bs=96k")
        assert r.returncode == 0, r.stderr
        assert hash_xattrs(part1) == digests(d.data(1))
        doc = json.loads((disk.parent / "info.json").read_text())
        assert doc["hashes"] == {
            "disk.raw": {**{k[11:]: v.decode() for k, v in digests(d.data()).items()},
                         "bytes": len(d.data())},
            "part1.raw": {**{k[11:]: v.decode() for k, v in digests(d.data(1)).items()},
                          "bytes": d.parts[1][1]},
        }  # fmt: skip
        # part2.raw read whole in random order, within the reordering InOrder bridges (16 MiB):
        # the hash is over the bytes in file order, so still the right one.
        part2 = d.path(mountpoint, "part2.raw")
        p2 = d.data(2)
        offsets = list(range(0, len(p2), 256 * 1024))
        random.Random(3).shuffle(offsets)
        with open(part2, "rb", buffering=0) as f:
            for off in offsets:
                assert os.pread(f.fileno(), 256 * 1024, off) == p2[off : off + 256 * 1024]
        assert hash_xattrs(part2) == digests(p2)
        # A random reader of a larger disk: no hash.
        sparse = disks["sparse"]
        data = sparse.data()
        offsets = list(range(0, len(data), 256 * 1024))
        random.Random(4).shuffle(offsets)
        with open(sparse.path(mountpoint), "rb", buffering=0) as f:
            for off in offsets:
                assert os.pread(f.fileno(), 256 * 1024, off) == data[off : off + 256 * 1024]
        assert hash_xattrs(sparse.path(mountpoint)) == {}
        # The plain disk read half way, then closed: no hash either. O_DIRECT, so that the
        # kernel's read-ahead does not read the rest anyway.
        half = len(plain.data()) // 2
        buf = mmap.mmap(-1, half)
        fd = os.open(plain.path(mountpoint), os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.preadv(fd, [buf], 0) == half
        finally:
            os.close(fd)
            buf.close()
        assert hash_xattrs(plain.path(mountpoint)) == {}
        info = json.loads((plain.path(mountpoint).parent / "info.json").read_text())
        assert info["hashes"] == {}
        assert m.unmount() == 0
    log = m.log()
    assert f"{d.rel}/disk.raw: sha256 {hashlib.sha256(d.data()).hexdigest()}" in log


def test_without_hashes_none_are_computed(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    """Hashing is asked for (--hashes): a plain mount keeps its CPU and page cache."""
    d = disks["plain"]
    with Mount(bed, mountpoint) as m:
        disk = d.path(mountpoint)
        assert run("sha256sum", str(disk)).returncode == 0
        assert hash_xattrs(disk) == {}
        assert m.unmount() == 0


def test_provenance_in_info_json_and_attributes(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    d = disks["parted"]
    before = datetime.now(UTC)
    with Mount(bed, mountpoint, "--hashes") as m:
        snapdir = d.path(mountpoint).parent
        os.listdir(snapdir)  # the listing probes the disk
        after = datetime.now(UTC)
        doc = json.loads((snapdir / "info.json").read_text())
        prov = doc["provenance"]
        size = len(d.data())
        assert prov["server"] == bed.vcsim.server
        assert prov["server_thumbprint"] == bed.vcsim.thumbprint
        assert prov["ivd_uuid"] == d.ivd.id and prov["ivd_name"] == "evidence-parted"
        assert prov["datastore"] == d.ivd.datastore_name
        assert prov["datastore_moref"] == d.ivd.datastore_moref
        assert prov["backing_file"] == doc["ivd"]["backing_file"] != ""
        assert prov["snapshot_id"] == d.snapshot
        assert prov["snapshot_description"] == "seized parted"
        assert prov["snapshot_create_time"] == doc["snapshot"]["create_time"] is not None
        assert prov["capacity_bytes"] == size and prov["capacity_sectors"] * 512 == size
        assert prov["sector_size"] == 512 and prov["ivdfs_version"] == __version__
        read_at = datetime.fromisoformat(prov["read_at"])
        assert read_at.utcoffset() is not None and before <= read_at <= after
        disk = d.path(mountpoint)
        assert os.getxattr(disk, "user.ivdfs.server") == bed.vcsim.server.encode()
        assert os.getxattr(disk, "user.ivdfs.server_thumbprint") == bed.vcsim.thumbprint.encode()
        assert os.getxattr(disk, "user.ivdfs.capacity_sectors") == str(size // 512).encode()
        assert os.getxattr(disk, "user.ivdfs.read_at") == prov["read_at"].encode()
        # Probed once: the time stays what it was.
        assert json.loads((snapdir / "info.json").read_text())["provenance"] == prov
        assert m.unmount() == 0


# --- ivdfs hash ------------------------------------------------------------------------------


def hash_cmd(bed: Bed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IVDFS, "hash", "--server", bed.vcsim.server, "--user", bed.vcsim.user,
         "--ca-file", str(bed.vcsim.ca_file), "--vddk-libdir", str(VDDK_LIBDIR), *args],
        capture_output=True, text=True, env=bed.env(), timeout=120,
    )  # fmt: skip


def test_hash_command_output_checks_inside_the_mount(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    d, sparse = disks["parted"], disks["sparse"]
    bed.standin_log.unlink(missing_ok=True)
    md5 = hash_cmd(bed, sparse.ivd.id, sparse.snapshot, "--algorithm", "md5")
    assert md5.returncode == 0, md5.stderr
    assert md5.stdout == f"{hashlib.md5(sparse.data()).hexdigest()}  {sparse.rel}/disk.raw\n"
    # Holes were not read: VDDK served exactly the allocated blocks of the sparse disk.
    lines = bed.log_lines()
    reads = sorted(
        int(r["start"]) * 512 // MiB
        for r in call_lines(lines, "Read") + call_lines(lines, "ReadAsync")
    )
    assert reads == list(sparse.allocated)
    assert len(call_lines(lines, "PrepareForAccess")) == len(call_lines(lines, "EndAccess")) == 1
    both = hash_cmd(bed, d.ivd.id, d.snapshot)
    assert both.returncode == 0, both.stderr
    assert both.stdout.splitlines() == [
        f"SHA256 ({d.rel}/disk.raw) = {hashlib.sha256(d.data()).hexdigest()}",
        f"MD5 ({d.rel}/disk.raw) = {hashlib.md5(d.data()).hexdigest()}",
    ]
    part = hash_cmd(bed, "evidence-parted", d.snapshot, "--partition", "2", "--algorithm", "sha256")
    assert part.returncode == 0, part.stderr
    assert part.stdout == f"{hashlib.sha256(d.data(2)).hexdigest()}  {d.rel}/part2.raw\n"
    missing = hash_cmd(bed, d.ivd.id, d.snapshot, "--partition", "7")
    assert missing.returncode == 10 and missing.stdout == ""
    assert missing.stderr.startswith("ivdfs: ") and "no partition 7 (partitions: 1, 2)" in (
        missing.stderr
    )
    assert len(missing.stderr.splitlines()) == 1

    sums = tmp_path / "SHA256SUMS"
    sums.write_text(both.stdout + part.stdout)
    md5sums = tmp_path / "MD5SUMS"
    md5sums.write_text(both.stdout + md5.stdout)
    with Mount(bed, mountpoint, "--hashes") as m:
        r = run("sha256sum", "-c", str(sums), cwd=mountpoint)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count(": OK") == 2
        r = run("md5sum", "-c", str(md5sums), cwd=mountpoint)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count(": OK") == 2
        # The by-product hashes of those reads agree with the command.
        assert hash_xattrs(d.path(mountpoint)) == digests(d.data())
        assert m.unmount() == 0


def test_hash_command_stopped_by_sigterm_still_ends_access(
    bed: Bed, disks: dict[str, Disk]
) -> None:
    d = disks["parted"]
    bed.standin_log.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [*IVDFS, "hash", "--server", bed.vcsim.server, "--user", bed.vcsim.user,
         "--ca-file", str(bed.vcsim.ca_file), "--vddk-libdir", str(VDDK_LIBDIR),
         d.ivd.id, d.snapshot],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=bed.env(VDDK_STANDIN_LATENCY_US="100000"),
    )  # fmt: skip
    wait_for(lambda: len(call_lines(bed.log_lines(), "ReadAsync")) >= 2, what="reads")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == "" and err == "ivdfs: interrupted\n"
    lines = bed.log_lines()
    # Closed, then EndAccess: the conftest check pairs Prepare and EndAccess, Open and Close.
    assert [ln.split()[2] for ln in lines if ln.split()[2] in ("Close", "EndAccess")] == [
        "Close",
        "EndAccess",
    ]


# --- the audit journal -----------------------------------------------------------------------

READER = """
import os, sys
for spec in sys.argv[1:]:
    path, *pairs = spec.split(",")
    fd = os.open(path, os.O_RDONLY)
    for pair in pairs:
        off, n = (int(x) for x in pair.split(":"))
        os.pread(fd, n, off)
    os.close(fd)
print(os.getpid(), flush=True)
sys.stdin.read()  # hold on until told, so the pid is not reused meanwhile
"""


def journal(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def verify(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IVDFS, "audit", "verify", str(path), *extra], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def union(pairs: list[tuple[int, int]], size: int) -> list[list[int]]:
    out: list[list[int]] = []
    for s, e in sorted((s, min(e, size)) for s, e in pairs if s < size):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def test_journal_lists_exactly_what_each_process_read(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    d = disks["parted"]
    log = tmp_path / "audit.jsonl"
    size, p1 = len(d.data()), d.parts[1][1]
    wanted = {
        "disk.raw": [(0, 4096), (10 * MiB + 17, 300_000), (10 * MiB + 100_000, 5000),
                     (size - 1000, 5000)],
        "part1.raw": [(512, 1), (3 * MiB, 2 * MiB), (p1 - 10, 100)],
    }  # fmt: skip
    with Mount(bed, mountpoint, "--hashes", "--audit-log", str(log)) as m:
        specs = [
            ",".join([str(d.path(mountpoint, name))] + [f"{o}:{n}" for o, n in pairs])
            for name, pairs in wanted.items()
        ]
        reader = subprocess.Popen([sys.executable, "-c", READER, *specs], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert reader.stdout is not None and reader.stdin is not None
        pid = int(reader.stdout.readline())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        # A process that only lists and reads attributes leaves no open record.
        os.listxattr(d.path(mountpoint))
        reader.stdin.close()
        reader.wait(timeout=30)
        assert m.unmount() == 0
    docs = journal(log)
    assert docs[0]["event"] == "start" and docs[-1]["event"] == "stop"
    start = docs[0]
    assert start["server"] == bed.vcsim.server and start["user"] == bed.vcsim.user
    assert start["thumbprint"] == bed.vcsim.thumbprint and start["version"] == __version__
    assert start["mountpoint"] == str(mountpoint) and start["pid"] == m.proc.pid
    assert docs[-1]["reason"] == "unmounted"
    opens = [e for e in docs if e["event"] == "open"]
    assert [(e["path"], e["pid"]) for e in opens] == [(f"{d.rel}/{name}", pid) for name in wanted]
    for e in opens:
        assert (e["uid"], e["gid"], e["comm"]) == (os.getuid(), os.getgid(), comm)
    for name, pairs in wanted.items():
        path = f"{d.rel}/{name}"
        limit = size if name == "disk.raw" else p1
        read = [e for e in docs if e["event"] in ("read", "close") and e["path"] == path]
        assert read[-1]["event"] == "close" and read[-1]["pid"] == pid
        got: list[tuple[int, int]] = [(s, e) for r in read for s, e in r["ranges"]]
        assert union(got, limit) == union([(o, o + n) for o, n in pairs], limit), name
    r = verify(log)
    assert r.returncode == 0, r.stderr
    assert f"intact, {len(docs)} lines" in r.stdout
    assert f"head: line {len(docs)} sha256 {docs[-1]['hash']}" in r.stdout
    assert f"{d.rel}/part1.raw" in r.stdout and f" {pid} " in r.stdout
    summary = json.loads(verify(log, "--json").stdout)
    disk_reads = next(x for x in summary["reads"] if x["path"] == f"{d.rel}/disk.raw")
    assert disk_reads["pid"] == pid and disk_reads["ranges"] == union(
        [(o, o + n) for o, n in wanted["disk.raw"]], size
    )

    # Editing, deleting or swapping any line of it breaks the chain at that line.
    lines = log.read_bytes().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    for i in range(len(lines)):
        edited = lines[i].replace(b'"event":"', b'"event":"x', 1)
        for what, changed in (
            ("edit", [*lines[:i], edited, *lines[i + 1 :]]),
            ("delete", lines[:i] + lines[i + 1 :]),
            ("swap", lines[:i] + lines[i + 1 : i + 2] + [lines[i]] + lines[i + 2 :]),
        ):
            if what != "edit" and i == len(lines) - 1:
                continue  # the last line: only the noted head shows it (below)
            bad.write_bytes(b"".join(changed))
            r = verify(bad)
            assert r.returncode == 1, (what, i)
            assert f"broken at line {i + 1}:" in r.stderr, (what, i, r.stderr)
    bad.write_bytes(b"".join(lines[:-1]))
    assert verify(bad).returncode == 0
    r = verify(bad, "--head", docs[-1]["hash"])
    assert r.returncode == 1 and "recorded head" in r.stderr


def test_journal_is_complete_after_sigterm(
    bed: Bed, disks: dict[str, Disk], tmp_path: Path
) -> None:
    d = disks["plain"]
    log = tmp_path / "audit.jsonl"
    m = Mount(
        bed, tmp_path / "mnt", "--hashes", "--audit-log", str(log), VDDK_STANDIN_LATENCY_US="20000"
    )
    reader = subprocess.Popen(["dd", f"if={d.path(m.mountpoint)}", "of=/dev/null", "bs=64k"],
                              stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(lambda: any(e["event"] == "open" for e in journal(log)), what="the open record")
    assert m.unmount("SIGTERM") == 0, m.log()
    reader.wait(timeout=30)
    docs = journal(log)
    assert verify(log).returncode == 0
    assert docs[-1]["event"] == "stop" and docs[-1]["reason"] == "SIGTERM"
    close = [e for e in docs if e["event"] == "close"]
    assert [e["pid"] for e in close] == [reader.pid]
    assert sum(e["bytes"] for e in docs if e["event"] in ("read", "close")) > 0


@pytest.mark.killed_mount
def test_journal_is_complete_up_to_a_sigkill(
    bed: Bed, disks: dict[str, Disk], tmp_path: Path
) -> None:
    d = disks["plain"]
    log = tmp_path / "audit.jsonl"
    mp = tmp_path / "mnt"
    m = Mount(bed, mp, "--hashes", "--audit-log", str(log))
    disk = str(d.path(mp))
    # One reader that came and went, one that holds the file open after reading.
    done = subprocess.run([sys.executable, "-c", READER, f"{disk},0:8192"], input="",
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    gone = int(done.stdout)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, disk], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout is not None
    held = int(holder.stdout.readline())

    def recorded() -> bool:
        events = {(e["event"], e.get("pid")) for e in journal(log)}
        return {("close", gone), ("open", held), ("read", held)} <= events

    try:
        # Every event before the kill is on disk: the open at once, the ranges within 5 s.
        wait_for(recorded, timeout=FLUSH_WAIT, what="the journal records")
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    r = verify(log)
    assert r.returncode == 0, r.stderr
    assert "no stop record" in r.stdout
    docs = journal(log)
    reads = [e for e in docs if e["event"] == "read" and e["pid"] == held]
    assert union([(s, e) for r_ in reads for s, e in r_["ranges"]], 1 << 40) == [[MiB, 3 * MiB]]
    # The next mount continues the journal after checking it; `ivdfs umount` undoes the dead one.
    r = subprocess.run(
        [*IVDFS, "umount", str(mp), "--server", bed.vcsim.server, "--user", bed.vcsim.user,
         "--ca-file", str(bed.vcsim.ca_file), "--vddk-libdir", str(VDDK_LIBDIR)],
        capture_output=True, text=True, env=bed.env(), timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not mounted_at(mp)
    with Mount(bed, mp, "--hashes", "--audit-log", str(log)) as again:
        # Served (INIT answered) before the unmount: a stat still waiting for INIT keeps the
        # mount busy.
        assert d.ivd.datastore_name in os.listdir(mp)
        assert again.unmount() == 0
    after = journal(log)
    assert after[: len(docs)] == docs and after[len(docs)]["event"] == "start"
    r = verify(log, "--json")
    assert r.returncode == 0, r.stderr
    sessions = json.loads(r.stdout)["sessions"]
    assert [s["stop"] is None for s in sessions] == [True, False]


HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.pread(fd, 2 * 1024 * 1024, 1024 * 1024)
print(os.getpid(), flush=True)
sys.stdin.read()
"""


def test_a_damaged_journal_stops_the_mount(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    log = tmp_path / "audit.jsonl"
    with Mount(bed, mountpoint, "--hashes", "--audit-log", str(log)) as m:
        disk = disks["plain"].path(mountpoint)
        assert disk.read_bytes() == disks["plain"].data()
        # Direct I/O: no shared mappings (docs/forensics.md says so).
        with open(disk, "rb") as f, pytest.raises(OSError) as e:
            mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ)
        assert e.value.errno == errno.ENODEV
        assert m.unmount() == 0
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:1] + lines[2:]))
    r = subprocess.run(
        bed.mount_args(mountpoint, "--foreground", "--audit-log", str(log)),
        capture_output=True, text=True, env=bed.env(), timeout=60,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert f"--audit-log {log}: the audit log is damaged at line 2:" in r.stderr
    assert not mounted_at(mountpoint)
    link = tmp_path / "link.jsonl"
    link.symlink_to(log)
    r = subprocess.run(
        bed.mount_args(mountpoint, "--foreground", "--audit-log", str(link)),
        capture_output=True, text=True, env=bed.env(), timeout=60,
    )  # fmt: skip
    assert r.returncode == 3 and "symbolic link" in r.stderr


@pytest.mark.allow_log(r"audit log .* cannot write .*fail closed")
def test_a_journal_that_cannot_be_written_fails_every_read(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    """A full filesystem under the journal: opens and reads fail with EIO from then on."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        log = small / "audit.jsonl"
        d = disks["plain"]
        with Mount(bed, mountpoint, "--hashes", "--audit-log", str(log)) as m:
            disk = d.path(mountpoint)
            with open(disk, "rb") as f:
                assert f.read(4096) == d.data()[:4096]
                # Fill the filesystem: the next record cannot be written.
                filler = small / "filler"
                fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    with pytest.raises(OSError) as e:
                        while True:
                            os.write(fd, bytes(4096))
                    assert e.value.errno == errno.ENOSPC
                finally:
                    os.close(fd)
                # Records still fit in the journal's last page for a while; the first one
                # that does not fails its open, and everything after it fails too.
                for _ in range(100):
                    try:
                        open(disk, "rb").close()
                    except OSError as e:
                        assert e.errno == errno.EIO
                        break
                else:
                    raise AssertionError("the journal never filled up")
                with pytest.raises(OSError) as e:
                    os.pread(f.fileno(), 4096, 8192)
                assert e.value.errno == errno.EIO
                with pytest.raises(OSError) as e:
                    open(disks["parted"].path(mountpoint), "rb").close()
                assert e.value.errno == errno.EIO
            assert m.unmount() == 0
        assert "fail closed" in m.log()
        filler.unlink()
        # What was written verifies: intact, or broken only where the full disk cut the
        # last line short.
        r = verify(log)
        n = len(log.read_bytes().splitlines())
        assert r.returncode == 0 or (f"line {n}: incomplete" in r.stderr), r.stderr
    finally:
        subprocess.run(["umount", str(small)], check=True)
