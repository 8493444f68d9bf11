"""Real mounts against a VDDK laid out like VMware's (issue 9): the search path, the children's
environment, allocation queries within the real rules, no reconnect loop on permanent errors,
and `ivdfs check` on a lib64 whose plugin cannot load.

The stand-in's lib64 is VDDK 8.0.1's layout (tests/testbed/standin/README.md): no RPATH
anywhere, InitEx dlopen()s libvddkVimAccess.so by bare name (and the plugin needs libvmacore.so,
found only in lib64), OpenSSL 3 bundled. Nothing here sets LD_LIBRARY_PATH for ivdfs, as a user
would not: ivdfs has to arrange it itself.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sysconfig
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mounting import (
    IVDFS,
    VDDK_LIBDIR,
    Bed,
    Mount,
    assert_standin_log_clean,
    call_lines,
    fuse_mounts,
    mounted_at,
    sha256_file,
    wait_for,
)
from tests.testbed import images as imgs
from tests.testbed.vsphere import Ivd, place_image

MiB = 1 << 20
LIB64 = VDDK_LIBDIR / "lib64"
USER_LIBS = "/opt/ivdfs-test/user-libs"  # an LD_LIBRARY_PATH of the user's own


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No search path and no CA overrides from the machine: ivdfs must cope on its own."""
    for name in ("LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class Disk:
    ivd: Ivd
    snapshot: str
    path: Path  # the source image
    partitions: tuple[imgs.PartitionManifest, ...] = ()

    def raw(self, mountpoint: Path) -> Path:
        return mountpoint / self.ivd.datastore_name / self.ivd.id / self.snapshot / "disk.raw"


def add_disk(
    bed: Bed, name: str, image: Path, partitions: tuple[imgs.PartitionManifest, ...] = ()
) -> Disk:
    ivd = bed.vcsim.create_ivd(name, (image.stat().st_size + MiB - 1) // MiB, "LocalDS_0")
    snap = bed.vcsim.create_snapshot(ivd, name)
    place_image(bed.images, ivd, snap, image)
    return Disk(ivd, snap, image, partitions)


@pytest.fixture(scope="module")
def disks(bed: Bed) -> dict[str, Disk]:
    src = bed.root / "real-src"
    src.mkdir()
    imgs.random_disk(src / "full.img", 8, seed=21)
    imgs.random_disk(src / "big.img", 16, seed=23)
    # Half allocated, and 24.5 MiB + 512 bytes: no whole number of blocks or chunks. The tail
    # past the last whole MiB holds data after a hole.
    odd = src / "odd.img"
    imgs.sparse_disk(odd, 24, 0.5, seed=22)
    with open(odd, "r+b") as f:
        f.truncate((24 << 20) + (128 << 10))
        f.seek(0, os.SEEK_END)
        f.write(os.urandom((384 << 10) + 512))
    gpt = imgs.gpt_disk(src / "gpt.img", 64)  # ext4, FAT32 and NTFS (ntfs-3g stays running)
    return {
        "full": add_disk(bed, "real-full", src / "full.img"),
        "big": add_disk(bed, "real-big", src / "big.img"),
        "odd": add_disk(bed, "real-odd", odd),
        "gpt": add_disk(bed, "real-gpt", gpt.path, tuple(gpt.partitions)),
    }


def maps_of(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        return {ln.split(maxsplit=5)[5].strip() for ln in f if len(ln.split(maxsplit=5)) == 6}


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(e.split("=", 1) for e in raw.decode("utf-8", "replace").split("\0") if "=" in e)


def test_a_mount_reads_right_without_a_search_path_from_the_user(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    d = disks["full"]
    with Mount(bed, mountpoint) as m:
        assert sha256_file(d.raw(mountpoint)) == sha256_file(d.path)
        pid = m.proc.pid
        # ivdfs re-executed itself with lib64 on the path (the loader reads it at exec only).
        assert environ_of(pid)["LD_LIBRARY_PATH"] == str(LIB64)
        maps = maps_of(pid)
        assert str(LIB64 / "libvddkVimAccess.so.8.0.1") in maps
        assert str(LIB64 / "libvmacore.so") in maps
        # Python's ssl and hashlib run on VDDK's OpenSSL: the vCenter login verified vcsim's
        # certificate with it, and the SHA-1 thumbprint VDDK checked was computed with it.
        assert {str(LIB64 / "libssl.so.3"), str(LIB64 / "libcrypto.so.3")} <= maps
        init = call_lines(bed.log_lines(), "InitEx")[0]
        private = Path(init["configFile"]).parent
        assert init["plugin"] == "loaded" and init["tmpDirectory"] == str(private / "tmp")
        assert private.stat().st_mode & 0o777 == 0o700
        assert m.unmount() == 0
    assert not private.exists(), "VDDK's private tmpDirectory outlived the mount"
    assert m.unexpected_log_records() == []
    connects = call_lines(bed.log_lines(), "ConnectEx")
    assert connects and all(c["thumb"] == bed.vcsim.thumbprint for c in connects)
    assert_standin_log_clean(bed, {d.ivd.id})


def ntfs3g_processes(volume_dir: Path) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"ntfs-3g") and str(volume_dir).encode() in argv:
                out.append(int(entry))
    return out


@pytest.mark.parametrize("password", ["environment", "file"])
def test_children_of_the_daemon_inherit_the_users_environment_not_vddks(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path, password: str
) -> None:
    """ntfs-3g (for --volumes kernel) lives as long as the mount: it must not run with VDDK's
    libraries on its search path, its LD_LIBRARY_PATH is the user's own, and it never sees
    IVDFS_PASSWORD, whether that held the password or a --password-file did."""
    bed.standin_log.unlink(missing_ok=True)
    d = disks["gpt"]
    extra: list[str] = []
    mount_env = {"LD_LIBRARY_PATH": USER_LIBS}
    if password == "file":
        pw = tmp_path / "pw"
        pw.write_text(bed.vcsim.password)
        pw.chmod(0o600)
        extra = ["--password-file", str(pw)]
        mount_env["IVDFS_PASSWORD"] = "a-stale-password-the-file-overrides"
    m = Mount(bed, mountpoint, "--volumes", "kernel", *extra, **mount_env)
    try:
        assert environ_of(m.proc.pid)["LD_LIBRARY_PATH"] == f"{LIB64}:{USER_LIBS}"
        vols = d.raw(mountpoint).parent / "volumes"
        number = next(p.number for p in d.partitions if p.fs == "ntfs")
        assert str(number) in os.listdir(vols)  # listing volumes/ mounts them
        ntfs = Path(os.readlink(vols / str(number)))
        wait_for(lambda: bool(ntfs3g_processes(ntfs)), what="the ntfs-3g process")
        for pid in ntfs3g_processes(ntfs):
            env = environ_of(pid)
            assert env.get("LD_LIBRARY_PATH") == USER_LIBS
            assert not [k for k in env if k.startswith("IVDFS_")]  # no marker, no password
            assert not [p for p in maps_of(pid) if p.startswith(str(LIB64))]
    finally:
        if m.proc.poll() is None:
            assert m.unmount("SIGTERM") == 0, m.log()
    assert m.unexpected_log_records(allowed=("partition table", "no recognised filesystem")) == []
    assert_standin_log_clean(bed, {d.ivd.id})


def read_requests(bed: Bed) -> list[dict[str, str]]:
    lines = bed.log_lines()
    return call_lines(lines, "Read") + call_lines(lines, "ReadAsync")


@pytest.mark.parametrize("block_kib", [1024, 256])
def test_a_half_allocated_odd_sized_disk_reads_only_its_data_and_its_tail(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, block_kib: int
) -> None:
    """VDDK refuses to query the partial last chunk; ivdfs must neither ask (a refused query
    used to switch the whole map off, so every hole was read) nor skip the tail's data."""
    bed.standin_log.unlink(missing_ok=True)
    d = disks["odd"]
    bs = block_kib << 10
    data = d.path.read_bytes()
    blocks = [data[i : i + bs] for i in range(0, len(data), bs)]
    last_whole = len(data) // bs * bs  # the chunk is the block: queries end here
    expected = {i for i, b in enumerate(blocks) if any(b) or (i + 1) * bs > last_whole}
    with Mount(bed, mountpoint, "--block-size", f"{block_kib}K") as m:
        with open(d.raw(mountpoint), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(data).hexdigest()
        assert m.unmount() == 0
    starts = sorted({int(r["start"]) * 512 // bs for r in read_requests(bed)})
    assert starts == sorted(expected)
    read_bytes = sum(int(r["n"]) * 512 for r in read_requests(bed))
    allocated = sum(len(b) for b in blocks if any(b))
    assert allocated <= read_bytes <= allocated + bs  # the data, plus at most the tail block
    assert read_bytes < len(data) * 3 // 4
    qab = call_lines(bed.log_lines(), "QueryAllocatedBlocks")
    assert qab and all(q["err"] == "0" and q["chunk"] == str(bs // 512) for q in qab)
    assert max(int(q["start"]) + int(q["n"]) for q in qab) * 512 == last_whole
    assert m.unexpected_log_records() == []
    assert_standin_log_clean(bed, {d.ivd.id})  # no VIOLATION: no query VDDK would refuse


def read_all(path: Path) -> OSError | None:
    try:
        with open(path, "rb", buffering=0) as f:
            while f.read(MiB):
                pass
    except OSError as e:
        return e
    return None


# After the first reads the connection drops (36); the reopen's ConnectEx or Open then fails.
PERMANENT = [
    ({"VDDK_STANDIN_FAIL_OPEN_CODE": "3014", "VDDK_STANDIN_FAIL_OPEN_AFTER": "1"}, "3014"),
    ({"VDDK_STANDIN_FAIL_OPEN_CODE": "16053", "VDDK_STANDIN_FAIL_OPEN_AFTER": "1"}, "16053"),
    ({"VDDK_STANDIN_FAIL_OPEN_CODE": "35", "VDDK_STANDIN_FAIL_OPEN_AFTER": "1"}, "35"),
    ({"VDDK_STANDIN_FAIL_CONNECT_CODE": "35", "VDDK_STANDIN_FAIL_CONNECT_AFTER": "1"}, "35"),
]


@pytest.mark.allow_log("injected", "is lost", "VixError 36", r"VixError (3014|16053|35)",
                       "fuse_reply_", "reopening and retrying")  # fmt: skip
@pytest.mark.parametrize(("env", "code"), PERMANENT,
                         ids=["open-3014", "open-16053", "open-35", "connect-35"])  # fmt: skip
def test_permanent_errors_cause_no_reconnect_loop(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, env: dict[str, str], code: str
) -> None:
    """Every reconnect is a fresh vCenter login: after a refused login or a missing privilege,
    more attempts only risk locking the account."""
    bed.standin_log.unlink(missing_ok=True)
    d = disks["full"]
    with Mount(bed, mountpoint, "--prefetch", "0", VDDK_STANDIN_DROP_AFTER="2", **env) as m:
        err = read_all(d.raw(mountpoint))
        assert err is not None and err.errno == errno.EIO
        assert read_all(d.raw(mountpoint)) is not None  # again, later: still no new login
        assert m.unmount() == 0
    lines = bed.log_lines()
    connects = call_lines(lines, "ConnectEx")
    assert len(connects) == 2, connects  # the first, and one reconnect that failed for good
    failed = call_lines(lines, "Open" if "OPEN" in next(iter(env)) else "ConnectEx")
    assert failed[-1]["err"] == code
    assert f"VixError {code}" in m.log() and "not reconnecting" in m.log()
    # pyfuse3 may fail to answer read-ahead requests the kernel gave up on meanwhile.
    expected = ("injected", "is lost", "VixError 36", f"VixError {code}", "fuse_reply_")
    assert m.unexpected_log_records(allowed=expected) == []


@pytest.mark.allow_log("injected", "is lost", "VixError 36", "handle was closed", "fuse_reply_",
                       "reopening and retrying")  # fmt: skip
def test_transient_errors_are_still_retried(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    d = disks["full"]
    env = {"VDDK_STANDIN_FAIL_OPEN_CODE": "36", "VDDK_STANDIN_FAIL_OPEN_AFTER": "1"}
    with Mount(bed, mountpoint, "--prefetch", "0", VDDK_STANDIN_DROP_AFTER="2", **env) as m:
        err = read_all(d.raw(mountpoint))
        assert err is not None and err.errno == errno.EIO
        assert m.unmount() == 0
    connects = call_lines(bed.log_lines(), "ConnectEx")
    assert len(connects) >= 4  # the first, and three reconnects for the failing block
    # pyfuse3 may fail to answer read-ahead requests the kernel gave up on meanwhile.
    expected = ("injected", "is lost", "VixError 36", "handle was closed", "fuse_reply_")
    assert m.unexpected_log_records(allowed=expected) == []


def lib64_without(tmp_path: Path, *prefixes: str) -> Path:
    """A copy of the stand-in's VDDK directory whose lib64 lacks the named files."""
    root = tmp_path / "vddk"
    (root / "lib64").mkdir(parents=True)
    for entry in LIB64.iterdir():
        if entry.name.startswith(prefixes):
            continue
        if entry.is_symlink():
            (root / "lib64" / entry.name).symlink_to(os.readlink(entry))
        else:
            shutil.copy2(entry, root / "lib64" / entry.name)
    return root


def ivdfs(bed: Bed, *args: str, libdir: Path = VDDK_LIBDIR) -> subprocess.CompletedProcess[str]:
    v = bed.vcsim
    argv = [*IVDFS, args[0], "--server", v.server, "--user", v.user, "--ca-file", str(v.ca_file),
            "--vddk-libdir", str(libdir), *args[1:]]  # fmt: skip
    return subprocess.run(argv, env=bed.env(), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def step(r: subprocess.CompletedProcess[str], name: str) -> str:
    return next(ln for ln in r.stdout.splitlines() if ln.split()[1:2] == [name])


def test_check_shows_where_the_plugin_was_loaded_from(bed: Bed, disks: dict[str, Disk]) -> None:
    r = ivdfs(bed, "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert step(r, "plugin").split()[0] == "ok"
    assert str(LIB64 / "libvddkVimAccess.so.8.0.1") in step(r, "plugin")


@pytest.mark.parametrize(
    ("missing", "named"),
    [(("libvddkVimAccess.so",), "libvddkVimAccess.so"), (("libvmacore.so",), "libvmacore.so")],
    ids=["no-plugin", "no-bundled-library"],
)
def test_check_reports_a_plugin_that_did_not_load(
    bed: Bed, disks: dict[str, Disk], tmp_path: Path, missing: tuple[str, ...], named: str
) -> None:
    r = ivdfs(bed, "check", libdir=lib64_without(tmp_path, *missing))
    assert r.returncode == 7, r.stdout + r.stderr
    line = step(r, "plugin")
    assert line.startswith("FAIL") and named in line and "cannot open shared object" in line
    assert "hint:" in line and "LD_LIBRARY_PATH" in line
    assert step(r, "vddk").startswith("ok") and step(r, "read").startswith("skip")
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("ivdfs:")] == [
        f"ivdfs: check failed at plugin: {line.split(None, 2)[2]}"
    ]
    assert "Traceback" not in r.stderr


def test_mount_fails_at_once_when_the_plugin_did_not_load(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    r = ivdfs(bed, "mount", str(mountpoint), libdir=lib64_without(tmp_path, "libvmacore.so"))
    assert r.returncode == 7, r.stderr
    assert "could not load its vSphere plugin" in r.stderr and "libvmacore.so" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("ivdfs:")]) == 1
    assert "Traceback" not in r.stderr
    assert not mounted_at(mountpoint) and str(mountpoint) not in fuse_mounts()


def run(bed: Bed, argv: list[str], libfuse2: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `argv`; without `libfuse2`, with libfuse.so.2 hidden from it (a private mount
    namespace with /dev/null bound over it): VixMntapi cannot load, as VMware's cannot on a
    host without libfuse2."""
    if not libfuse2:
        libfuse = os.path.realpath(
            Path("/usr/lib", sysconfig.get_config_var("MULTIARCH"), "libfuse.so.2"))  # fmt: skip
        shell = 'mount --bind /dev/null "$0" && exec "$@"'
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", shell, libfuse, *argv]
    return subprocess.run(argv, env=bed.env(), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_vixmntapi_volumes_without_libfuse2_fail_at_once_naming_it(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path
) -> None:
    v = bed.vcsim
    argv = [*IVDFS, "mount", "--server", v.server, "--user", v.user, "--ca-file",
            str(v.ca_file), "--vddk-libdir", str(VDDK_LIBDIR), "--volumes", "vixmntapi",
            str(mountpoint)]  # fmt: skip
    r = run(bed, argv, libfuse2=False)
    assert r.returncode == 7, r.stderr
    assert "libvixMntapi.so.1" in r.stderr and "needs libfuse2" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("libfuse2", "volumes", "code", "outcome"),
    [
        (True, (), 0, "ok"),
        (False, (), 0, "warn"),
        (True, ("--volumes", "vixmntapi"), 0, "ok"),
        (False, ("--volumes", "vixmntapi"), 7, "FAIL"),
    ],
    ids=["libfuse2", "no-libfuse2", "libfuse2-asked", "no-libfuse2-asked"],
)
def test_check_says_whether_vixmntapi_loads_and_fails_only_when_asked_for(
    bed: Bed, disks: dict[str, Disk], libfuse2: bool, volumes: tuple[str, ...], code: int,
    outcome: str,
) -> None:  # fmt: skip
    v = bed.vcsim
    argv = [*IVDFS, "check", "--server", v.server, "--user", v.user, "--ca-file",
            str(v.ca_file), "--vddk-libdir", str(VDDK_LIBDIR), *volumes]  # fmt: skip
    r = run(bed, argv, libfuse2)
    assert r.returncode == code, r.stdout + r.stderr
    line = step(r, "vixmntapi")
    assert line.split()[0] == outcome, line
    assert "libvixMntapi.so.1" in line
    if libfuse2:
        assert "--volumes vixmntapi can use it" in line
    else:
        assert "needs libfuse2" in line
    assert [step(r, s).split()[0] for s in ("vddk", "plugin", "read")] == ["ok"] * 3
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ivdfs:")]
    assert errors == (
        [f"ivdfs: check failed at vixmntapi: {line.split(None, 2)[2]}"] if code else []
    )
    assert "Traceback" not in r.stderr


# --- bytes in flight per handle within ESXi's NFC session memory ---------------------------

READERS = 4
# Long enough that requests pile up: the readers' and the prefetcher's reads all wait at once.
PILE_UP = {"VDDK_STANDIN_LATENCY_US": "50000"}


def read_in_parallel(path: Path, readers: int = READERS) -> list[bytes | OSError]:
    """Each of `readers` threads reads its own slice of the file, all at once."""
    part = path.stat().st_size // readers
    out: list[bytes | OSError] = [b""] * readers

    def run(i: int) -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(i * part)
                chunks = []
                while (left := part - sum(map(len, chunks))) and (b := f.read(min(MiB, left))):
                    chunks.append(b)
                out[i] = b"".join(chunks)
        except OSError as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a reader hung"
    return out


def most_bytes_in_flight(lines: list[str]) -> int:
    """The most bytes any one handle had queued, from the call log: a ReadAsync line is
    written once its bytes are held, a ReadAsyncDone line once they are given back."""
    held: dict[str, int] = defaultdict(int)
    most = 0
    for line in lines:
        parts = line.split()
        if parts[2:3] not in (["ReadAsync"], ["ReadAsyncDone"]):
            continue
        f = dict(p.split("=", 1) for p in parts[3:] if "=" in p)
        if parts[2] == "ReadAsync" and f.get("mode") == "queued":
            held[f["handle"]] += int(f["n"]) * 512
            most = max(most, held[f["handle"]])
        elif parts[2] == "ReadAsyncDone" and f.get("inline") == "0":
            held[f["handle"]] -= int(f["n"]) * 512
    return most


@pytest.mark.parametrize(
    ("in_flight", "block", "limit"),
    [("2M", "1M", 2 * MiB), ("1M", "2M", MiB)],
    ids=["two-blocks", "block-larger-than-the-bound"],
)
def test_bytes_in_flight_stay_within_the_nfc_session_memory(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, in_flight: str, block: str, limit: int
) -> None:
    """Concurrent readers and read-ahead against a slow server fill --max-in-flight up to the
    server's limit and never past it; a block larger than the bound is read in parts."""
    bed.standin_log.unlink(missing_ok=True)
    d = disks["big"]
    env = {**PILE_UP, "VDDK_STANDIN_NFC_SESSION_BYTES": str(limit)}
    args = ("--max-in-flight", in_flight, "--block-size", block)
    with Mount(bed, mountpoint, *args, **env) as m:
        parts = read_in_parallel(d.raw(mountpoint))
        assert m.unmount() == 0
    assert all(isinstance(p, bytes) for p in parts), parts
    got = b"".join(p for p in parts if isinstance(p, bytes))
    assert hashlib.sha256(got).hexdigest() == sha256_file(d.path)
    lines = bed.log_lines()
    assert most_bytes_in_flight(lines) == limit  # the requests did pile up, to the bound
    # One VDDK request is a block, or a part of one that fits the bound.
    assert max(int(r["n"]) for r in read_requests(bed)) * 512 == MiB
    assert m.unexpected_log_records() == []
    assert_standin_log_clean(bed, {d.ivd.id})  # no VIOLATION nfc-session-memory


@pytest.mark.allow_log("NFC memory of its session", "nfc-session-memory", "VixError 2",
                       "Out of memory", "reopening and retrying", "fuse_reply_")  # fmt: skip
def test_more_in_flight_than_the_nfc_session_memory_is_caught(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    """The same workload with --max-in-flight above the server's limit: the stand-in, as
    strict as ESXi, refuses the request past it and reports the violation."""
    log = tmp_path / "over.log"  # its own call log: the violation is what this test wants
    d = disks["big"]
    env = {**PILE_UP, "VDDK_STANDIN_NFC_SESSION_BYTES": str(2 * MiB), "VDDK_STANDIN_LOG": str(log)}
    with Mount(bed, mountpoint, "--max-in-flight", "4M", "--block-size", "1M", **env) as m:
        read_in_parallel(d.raw(mountpoint))  # failures are expected: the server refused reads
        assert m.unmount() == 0
    lines = log.read_text().splitlines()
    over = [ln for ln in lines if ln.split()[2:4] == ["VIOLATION", "nfc-session-memory"]]
    assert over, "no request went past the NFC session's memory"
    assert "VixError 2" in m.log()  # ivdfs saw the refusal


# --- VMware's order around a temporary snapshot --------------------------------------------


class AccessGate:
    """Releases the stand-in's held PrepareForAccess/EndAccess calls (VDDK_STANDIN_HOLD_ACCESS)
    one by one, after noting vCenter's snapshots of `ivd` while each call is under way: what
    exists then was created before the call, and what is gone was deleted before it."""

    def __init__(self, bed: Bed, ivd: Ivd, path: Path) -> None:
        self.bed, self.ivd, self.path = bed, ivd, path
        self.seen: list[tuple[str, list[str]]] = []  # (function, snapshots during it)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        path.write_text("0")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + 120
            while not self._stop.is_set() and time.monotonic() < deadline:
                for hold in call_lines(self.bed.log_lines(), "Hold")[len(self.seen) :]:
                    self.seen.append((hold["func"], self.bed.vcsim.snapshots(self.ivd)))
                    self.path.write_text(str(len(self.seen)))
                self._stop.wait(0.005)
        except BaseException as e:  # reported by close()
            self.error = e

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.error is not None:
            raise self.error


def test_snapshot_now_prepares_before_creating_and_ends_access_after_deleting(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    """VMware's order for a temporary snapshot: PrepareForAccess, create, read, delete,
    EndAccess. Each access call is held until vCenter's snapshots were looked at."""
    bed.standin_log.unlink(missing_ok=True)
    d = disks["full"]
    before = bed.vcsim.snapshots(d.ivd)
    gate = AccessGate(bed, d.ivd, tmp_path / "release")
    try:
        with Mount(bed, mountpoint, "--snapshot-now", d.ivd.id,
                   VDDK_STANDIN_HOLD_ACCESS=str(gate.path)) as m:  # fmt: skip
            listed = set(os.listdir(d.raw(mountpoint).parent.parent)) - {"info.json"}
            assert m.unmount() == 0, m.log()
    finally:
        gate.close()
    temporary = listed - set(before)
    assert len(temporary) == 1, listed  # the mount showed the snapshot it made
    assert [f for f, _ in gate.seen] == ["PrepareForAccess", "EndAccess"]
    assert gate.seen[0][1] == before, "the snapshot was created before PrepareForAccess"
    assert gate.seen[1][1] == before, "EndAccess came before the snapshot was deleted"
    lines = bed.log_lines()
    assert [a["err"] for a in call_lines(lines, "PrepareForAccess")] == ["0"]
    assert [a["err"] for a in call_lines(lines, "EndAccess")] == ["0"]
    assert bed.vcsim.snapshots(d.ivd) == before
    assert m.unexpected_log_records() == []


# --- --vddk-config and --nfc-host-port reach VDDK from every command that loads it ---------

NFC_PORT = "9902"


def vddk_config(tmp_path: Path) -> tuple[Path, Path]:
    """A VDDK config file of the user's, and the tmpDirectory it names."""
    tmp = tmp_path / "vddk-tmp"
    tmp.mkdir(mode=0o700)
    conf = tmp_path / "vixDiskLib.conf"
    conf.write_text(f'# the user\'s own\ntmpDirectory = "{tmp}"\n')
    return conf, tmp


def tuning(conf: Path) -> tuple[str, ...]:
    return ("--vddk-config", str(conf), "--nfc-host-port", NFC_PORT)


def assert_tuned(bed: Bed, conf: Path, tmp: Path, *calls: str) -> None:
    """Every InitEx got the user's config file (and VDDK used its tmpDirectory), and every one
    of `calls` carried the NFC port."""
    lines = bed.log_lines()
    inits = call_lines(lines, "InitEx")
    assert inits and all(i["configFile"] == str(conf) and i["err"] == "0" for i in inits)
    assert all(i["tmpDirectory"] == str(tmp) for i in inits)
    assert list(tmp.glob("vixDiskLib-standin-*.log")), "VDDK did not use the config's tmpDirectory"
    for fn in calls:
        entries = call_lines(lines, fn)
        assert entries, f"no {fn} call"
        assert all(e["nfcHostPort"] == NFC_PORT for e in entries), entries


def test_check_hands_vddk_config_and_nfc_port_to_vddk(
    bed: Bed, disks: dict[str, Disk], tmp_path: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    conf, tmp = vddk_config(tmp_path)
    r = ivdfs(bed, "check", *tuning(conf))
    assert r.returncode == 0, r.stdout + r.stderr
    assert step(r, "read").startswith("ok")
    assert_tuned(bed, conf, tmp, "ConnectEx")


def test_end_access_hands_vddk_config_and_nfc_port_to_vddk(
    bed: Bed, disks: dict[str, Disk], tmp_path: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    conf, tmp = vddk_config(tmp_path)
    d = disks["full"]
    r = ivdfs(bed, "end-access", *tuning(conf), d.ivd.id)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_tuned(bed, conf, tmp, "EndAccess")
    assert [e["id"] for e in call_lines(bed.log_lines(), "EndAccess")] == [d.ivd.id]


def test_mount_hands_vddk_config_and_nfc_port_to_vddk(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    bed.standin_log.unlink(missing_ok=True)
    conf, tmp = vddk_config(tmp_path)
    d = disks["full"]
    with Mount(bed, mountpoint, *tuning(conf)) as m:
        assert sha256_file(d.raw(mountpoint)) == sha256_file(d.path)
        assert m.unmount() == 0
    assert_tuned(bed, conf, tmp, "ConnectEx", "PrepareForAccess", "EndAccess")
    assert conf.exists() and tmp.is_dir()  # the user's, not ivdfs's to remove


@pytest.mark.killed_mount
def test_umount_of_a_dead_mount_hands_vddk_config_and_nfc_port_to_vddk(
    bed: Bed, disks: dict[str, Disk], mountpoint: Path, tmp_path: Path
) -> None:
    """The EndAccess that `ivdfs umount` does for a killed mount goes through VDDK as the user
    configured it."""
    d = disks["full"]
    m = Mount(bed, mountpoint)
    with open(d.raw(mountpoint), "rb") as f:
        assert f.read(MiB) == d.path.read_bytes()[:MiB]  # opened: its IVD is prepared
    m.proc.kill()
    m.proc.wait(timeout=30)
    bed.standin_log.unlink()  # from here on: only the recovering process
    conf, tmp = vddk_config(tmp_path)
    r = ivdfs(bed, "umount", *tuning(conf), str(mountpoint))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"EndAccess for IVD {d.ivd.id}" in r.stdout
    assert_tuned(bed, conf, tmp, "EndAccess")


@pytest.fixture(autouse=True)
def no_mount_left(mountpoint: Path) -> Iterator[None]:
    yield
    assert not mounted_at(mountpoint)
