"""Running `ivdfs mount` for real in a subprocess against vcsim and the stand-in VDDK.

Shared by the t4 tests, scripts/demo and scripts/bench. No sleeps: every wait polls with a
deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import signal
import site
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tests.testbed.images import DataManifest
from tests.testbed.vsphere import TESTBED, Ivd, Vcsim, place_image

REPO = TESTBED.parent.parent
VDDK_LIBDIR = TESTBED / "build" / "vddk"
VDDK6_LIBDIR = TESTBED / "build" / "vddk6"
IVDFS = [sys.executable, "-m", "ivdfs"]
MiB = 1 << 20
_LEVEL = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ")


def is_warning(line: str) -> bool:
    """A WARNING or worse line of an ivdfs log."""
    return bool(_LEVEL.match(line)) or "Traceback" in line


def wait_for(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def mounted_at(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def fuse_mounts() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split()[4] for line in f if " fuse.ivdfs " in line]


# Every Bed made in this process (module fixtures and tests' own); conftest checks their logs.
BEDS: list[Bed] = []


@dataclass
class Bed:
    """A vcsim plus an images directory and a stand-in call log; `libdir` is what ivdfs gets
    as --vddk-libdir (the stand-in's, or the real-VDDK tier's bridge: tests/realvddk.py)."""

    vcsim: Vcsim
    root: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    libdir: Path = VDDK_LIBDIR

    def __post_init__(self) -> None:
        # The stand-in must know every IVD's datastore, images or not (record_ivd).
        self.vcsim.tell_standin(self.images)
        BEDS.append(self)  # conftest's standin_log_clean checks every bed's log, whoever made it

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def standin_log(self) -> Path:
        return self.root / "standin.log"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IVDFS_", "VDDK_"))}
        env.update(
            IVDFS_PASSWORD=self.vcsim.password,
            VDDK_STANDIN_IMAGES=str(self.images),
            VDDK_STANDIN_LOG=str(self.standin_log),
            VDDK_STANDIN_USER=self.vcsim.user,
            VDDK_STANDIN_PASSWORD=self.vcsim.password,
            VDDK_STANDIN_THUMBPRINT=self.vcsim.thumbprint,
            PYTHONPATH=str(REPO),
        )
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def mount_args(self, mountpoint: Path, *extra: str) -> list[str]:
        return [
            *IVDFS, "mount", "--server", self.vcsim.server, "--user", self.vcsim.user,
            "--ca-file", str(self.vcsim.ca_file), "--vddk-libdir", str(self.libdir),
            *extra, str(mountpoint),
        ]  # fmt: skip

    def log_lines(self) -> list[str]:
        if not self.standin_log.exists():
            return []
        return self.standin_log.read_text().splitlines()


# The mounts started by the running test; conftest's checklogs reads their logs afterwards.
STARTED: list[Mount] = []


class Mount:
    """`ivdfs mount -f` in a subprocess; the context exit unmounts and checks exit status 0."""

    def __init__(self, bed: Bed, mountpoint: Path, *extra: str, **env: str) -> None:
        STARTED.append(self)
        self.bed = bed
        self.mountpoint = mountpoint
        self.log_file = mountpoint.parent / f"{mountpoint.name}.ivdfs.log"
        args = bed.mount_args(mountpoint, "--foreground", "--log", str(self.log_file), *extra)
        mountpoint.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            args, env=bed.env(**env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_for(lambda: mounted_at(mountpoint) or self.proc.poll() is not None,
                     what="the mount")  # fmt: skip
        except TimeoutError:
            self.proc.kill()
            raise
        if self.proc.poll() is not None:
            _, err = self.proc.communicate()
            raise RuntimeError(f"ivdfs exited with {self.proc.returncode}: {err}{self.log()}")

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.unmount()

    def unmount(self, how: str = "fusermount") -> int:
        """fusermount3 -u, `ivdfs umount` (which has ivdfs detach guest volumes first), or a
        signal's name; the daemon's exit status."""
        if how == "fusermount":
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=True)
        elif how == "ivdfs":
            r = subprocess.run([*IVDFS, "umount", str(self.mountpoint)], capture_output=True,
                               text=True, env=self.bed.env(), timeout=60)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
        else:
            self.proc.send_signal(getattr(signal, how))
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""
        return self.proc.returncode

    def unexpected_log_records(self, allowed: tuple[str, ...] = ()) -> list[str]:
        """WARNING+ lines that no test asked for (s3ql-style log check)."""
        bad = []
        for line in self.log().splitlines():
            if (" WARNING " in line or " ERROR " in line or " CRITICAL " in line) and not any(
                a in line for a in allowed
            ):
                bad.append(line)
        return bad


def as_nobody(argv: list[str], scratch: Path, *, fuse_mode: int | None = None) -> list[str]:
    """`argv` (an `ivdfs` command: IVDFS + arguments) run as nobody, in a private mount
    namespace that gives it the conditions it needs whatever the host's:

    - Python: the interpreter, the venv's site-packages and the repository are bind-mounted
      under `scratch`, so nobody reaches them even when they live under a home it cannot
      enter (a pyenv under a 0700 /root);
    - `fuse_mode`: /dev/fuse replaced by a node of our own with that mode (0600: nobody may
      not use it; the host's is often 0666, as udev's fuse rule makes it).

    Nothing outside the namespace changes. `scratch` must be a directory nobody can enter."""
    base = Path(sys.base_prefix)
    exe = Path(os.path.realpath(sys.executable))
    site_dirs = [Path(p) for p in site.getsitepackages()]
    py = scratch / "py"
    lines = ["set -e", f"mount -t tmpfs -o mode=0755 ivdfs-nobody {shlex.quote(str(py))}"]
    binds = [(base, py / "base"), (REPO, py / "repo")]
    binds += [(d, py / f"site{i}") for i, d in enumerate(site_dirs)]
    for src, dst in binds:
        q = shlex.quote(str(dst))
        lines += [f"mkdir -p {q}", f"mount --bind {shlex.quote(str(src))} {q}"]
    if fuse_mode is not None:
        node = shlex.quote(str(py / "fuse"))
        lines += [f"mknod -m {fuse_mode:o} {node} c 10 229", f"mount --bind {node} /dev/fuse"]
    interpreter = py / "base" / exe.relative_to(base)
    pythonpath = ":".join(
        [str(py / "repo"), *(str(py / f"site{i}") for i in range(len(site_dirs)))]
    )
    assert argv[: len(IVDFS)] == IVDFS, argv
    command = [str(interpreter), "-m", "ivdfs", *argv[len(IVDFS) :]]
    # A pyenv interpreter finds its libpython through an absolute RUNPATH under the old prefix.
    libpath = shlex.quote(str(py / "base" / "lib"))
    lines.append(
        f"exec env PYTHONPATH={shlex.quote(pythonpath)} LD_LIBRARY_PATH={libpath} "
        "setpriv --reuid=65534 --regid=65534 --clear-groups "
        + " ".join(shlex.quote(a) for a in command)
    )
    py.mkdir(exist_ok=True)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def call_lines(lines: list[str], fn: str) -> list[dict[str, str]]:
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == fn:
            out.append(dict(p.split("=", 1) for p in parts[1:] if "=" in p))
    return out


def check_standin_lines(lines: list[str], killed: object = None) -> None:
    """The stand-in's call log of one test: no rule violation; every PrepareForAccess has its
    EndAccess (per IVD, across processes: a recovery ends what a killed mount prepared); and,
    unless a mount was killed on purpose, every successful ConnectEx and Open closed."""
    violations = [ln for ln in lines if ln.split()[2:3] == ["VIOLATION"]]
    assert not violations, violations
    prepares = Counter(p["id"] for p in call_lines(lines, "PrepareForAccess"))
    ends = Counter(e["id"] for e in call_lines(lines, "EndAccess"))
    assert prepares <= ends, f"PrepareForAccess without EndAccess: {prepares - ends}"
    if killed:
        return
    opens = [o for o in call_lines(lines, "Open") if o["err"] == "0"]
    assert len(opens) == len(call_lines(lines, "Close")), "a handle was never closed"
    connects = [c for c in call_lines(lines, "ConnectEx") if c["err"] == "0"]
    assert len(connects) == len(call_lines(lines, "Disconnect")), "a connection stayed open"


class _LogMark:
    """Where a bed's stand-in log stood when a test began. The file is held open for the
    whole test: a log the test unlinks and a mount creates anew must not get the old one's
    inode number (ext4 and tmpfs hand it out again at once), or its lines would be read from
    the old size on, partly or not at all."""

    def __init__(self, bed: Bed, *, from_start: bool = False) -> None:
        self.bed = bed
        self.held: BinaryIO | None = None
        self.start = 0
        if from_start:
            return
        try:
            self.held = open(bed.standin_log, "rb")
        except FileNotFoundError:
            return
        self.start = self.held.seek(0, os.SEEK_END)

    def new_lines(self) -> list[str] | None:
        """The lines written since; None when there is no log now."""
        try:
            f = open(self.bed.standin_log, "rb")
        except FileNotFoundError:
            return None
        with f:
            if self.held is not None and (
                os.fstat(f.fileno()).st_ino == os.fstat(self.held.fileno()).st_ino
            ):
                f.seek(self.start)
            return f.read().decode("utf-8", "replace").splitlines()

    def close(self) -> None:
        if self.held is not None:
            self.held.close()


class LogMarks:
    """The stand-in logs of every bed (BEDS) as a test began; `check` then checks what each
    gained (check_standin_lines), beds made during the test from their first line. A bed that
    a mount of the test used (STARTED) must have a log: every mount initialises VDDK before
    it is mounted, so no log means the check could not be made."""

    def __init__(self) -> None:
        self._marks = {id(b): _LogMark(b) for b in BEDS}

    def check(self, killed: object = None) -> None:
        used = {id(m.bed) for m in STARTED}
        for bed in list(BEDS):
            mark = self._marks.get(id(bed))
            if mark is None:  # built by the test: all of its log is this test's
                mark = self._marks[id(bed)] = _LogMark(bed, from_start=True)
            lines = mark.new_lines()
            if lines is None:
                assert id(bed) not in used, f"no stand-in log at {bed.standin_log}"
                continue
            check_standin_lines(lines, killed=killed)

    def close(self) -> None:
        for mark in self._marks.values():
            mark.close()


def assert_standin_log_clean(bed: Bed, ivd_ids: set[str]) -> None:
    lines = bed.log_lines()
    assert lines, "the stand-in wrote no call log"
    assert not [ln for ln in lines if " VIOLATION " in ln or ln.split()[2:3] == ["VIOLATION"]]
    assert not call_lines(lines, "Write")
    prepares = call_lines(lines, "PrepareForAccess")
    ends = call_lines(lines, "EndAccess")
    assert sorted(p["id"] for p in prepares) == sorted(e["id"] for e in ends)
    assert {p["id"] for p in prepares} == ivd_ids
    opens = call_lines(lines, "Open")
    closes = call_lines(lines, "Close")
    assert opens and len(opens) == len(closes)
    assert all(o["flags"] == "4" for o in opens)
    assert all(c["readOnly"] == "1" for c in call_lines(lines, "ConnectEx"))
    # Open and Close of each handle on one thread (VDDK's rule).
    open_tid = {o["handle"]: o["tid"] for o in opens}
    assert all(open_tid[c["handle"]] == c["tid"] for c in closes)
    connects = [c for c in call_lines(lines, "ConnectEx") if c["conn"] != "0"]  # 0: it failed
    assert len(call_lines(lines, "Disconnect")) == len(connects)
    assert call_lines(lines, "Exit")


# --- what a test must find gone afterwards (only its own: other suites run meanwhile) -------


def loop_devices_of(*roots: Path) -> list[str]:
    """`losetup -a` lines of loop devices whose backing file lies under one of `roots`."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines() if any(str(r) in ln for r in roots)]


def mounts_under(*dirs: Path | str) -> list[str]:
    """Mount points (from mountinfo) at or below any of `dirs` (or starting with a str)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [ln.split()[4] for ln in f]
    return [
        p
        for p in points
        for d in dirs
        if (p.startswith(d) if isinstance(d, str) else p == str(d) or p.startswith(f"{d}/"))
    ]


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# Where VixMntapi (the real one and the stand-in) FUSE-mounts the disks it opens: <root>/<n>.
VIXMNTAPI_FUSE_ROOT = "/run/vmware/fuse"


def vixmntapi_mounts() -> set[str]:
    """VixMntapi's FUSE mounts, one per disk it opened (not the volumes mounted inside)."""
    root = VIXMNTAPI_FUSE_ROOT + "/"
    return {p for p in mounts_under(root) if "/" not in p[len(root) :]}


def fuse_servers(daemon: int) -> set[int]:
    """Copies of `daemon` (the same command line: forked, never exec'd) other than itself that
    hold /dev/fuse: VixMntapi's servers (the real one forks twice, so they are not children)."""
    cmdline = Path(f"/proc/{daemon}/cmdline").read_bytes()
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == daemon:
            continue
        try:
            if Path(f"/proc/{entry}/cmdline").read_bytes() == cmdline and any(
                os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/fuse"
                for fd in os.listdir(f"/proc/{entry}/fd")
            ):
                out.add(int(entry))
        except OSError:
            continue
    return out


def umount(bed: Bed, mp: Path, *extra: str, server: str | None = None,
           **env: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`ivdfs umount` of a mount whose process died: the recovery, against the bed."""
    v = bed.vcsim
    return subprocess.run(
        [*IVDFS, "umount", str(mp), "--server", server or v.server, "--user", v.user,
         "--ca-file", str(v.ca_file), "--vddk-libdir", str(VDDK_LIBDIR), *extra],
        env=bed.env(**env), capture_output=True, text=True, timeout=180,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def host_vgs(*roots: Path) -> list[str]:
    """The volume groups the host's own LVM (its configuration, not the image builders'
    sandbox) sees on loop devices backed by files under `roots`, as "pv vg uuid" lines. Only
    those: other tests on this machine (another helper's suite, scripts/mutate -j 2) build LVM
    images at the same time, and their sandboxes' loop devices are visible to the host."""
    env = {k: v for k, v in os.environ.items() if k != "LVM_SYSTEM_DIR"}
    env["LVM_SUPPRESS_FD_WARNINGS"] = "1"
    out = subprocess.run(["pvs", "--noheadings", "-o", "pv_name,vg_name,vg_uuid"],
                         capture_output=True, text=True, check=True, env=env)  # fmt: skip
    found = []
    for line in out.stdout.splitlines():
        pv = line.split()[0] if line.split() else ""
        backing = Path("/sys/block") / Path(pv).name / "loop" / "backing_file"
        try:
            source = backing.read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue  # not a loop device (the host's own disks), or gone meanwhile
        if any(source == str(r) or source.startswith(f"{r}/") for r in roots):
            found.append(" ".join(line.split()))
    return sorted(found)


@dataclass(frozen=True)
class DataDisk:
    """A snapshot of random data on the bed: its IVD, snapshot id and what it holds."""

    ivd: Ivd
    snapshot: str
    manifest: DataManifest

    def path(self, mountpoint: Path) -> Path:
        return mountpoint / self.ivd.datastore_name / self.ivd.id / self.snapshot / "disk.raw"


def placed_disks(bed: Bed, *where: tuple[str, str]) -> dict[str, tuple[Ivd, str, Path]]:
    """One 8 MiB IVD of pseudo-random bytes per (name, datastore), with a snapshot placed on the
    bed: name -> (IVD, snapshot id, source image)."""
    out = {}
    for name, ds in where:
        ivd = bed.vcsim.create_ivd(name, 8, ds)
        snap = bed.vcsim.create_snapshot(ivd, name)
        src = bed.root / f"{name}.raw"
        src.write_bytes(hashlib.shake_128(name.encode()).digest(8 << 20))
        place_image(bed.images, ivd, snap, src)
        out[name] = (ivd, snap, src)
    return out


def raw_path(ivd: Ivd, snap: str) -> Path:
    """A snapshot's disk.raw, relative to the mountpoint."""
    return Path(ivd.datastore_name) / ivd.id / snap / "disk.raw"


@contextlib.contextmanager
def read_only_view(folder: Path, mountpoint: Path) -> Iterator[Path]:
    """`folder` bind-mounted read-only at `mountpoint` (as an NFS datastore mounted ro)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(folder), str(mountpoint)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mountpoint)], check=True)
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def most_connections(lines: Iterable[str]) -> int:
    """The most VDDK connections open at once, replayed from a stand-in log in its order."""
    now = top = 0
    for line in lines:
        parts = line.split()
        if parts[2:3] == ["ConnectEx"] and "err=0" in parts:
            now += 1
        elif parts[2:3] == ["Disconnect"]:
            now -= 1
        top = max(top, now)
    return top
