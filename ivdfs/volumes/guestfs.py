"""--volumes guestfs: each snapshot's volumes are mounted inside a libguestfs appliance.

Role: the host kernel never parses guest data in this mode. A snapshot's first access to
``volumes/`` starts one appliance (a small VM that libguestfs boots with qemu) reading that
snapshot's ``disk.raw`` read-only *through our own FUSE mount*; inside it every filesystem that
libguestfs finds (partitions, LVM, md RAID, Windows dynamic disks, and LUKS or BitLocker
volumes that the --volume-key-file passphrase opens) is mounted read-only without journal
replay, and the whole tree is exposed on the host through libguestfs's ``mount_local`` (FUSE)
at a directory of our private run directory. ``volumes/<name>`` links there.

Each appliance runs in a helper process (`guestfs_helper`, started with the system's
python3 because Debian's python3-guestfs is built for it, not for our virtual environment);
it speaks JSON lines on its stdin and stdout. Its temporary files (libguestfs's qcow2 overlay
and sockets) live in a private directory that goes with it; the appliance image itself is
libguestfs's cache (``/var/tmp/.guestfs-0``), built once and shared.

Lifetime: an appliance boots on first access (listing a snapshot directory does not start
one; listing or reading its ``volumes/`` does), and stops when nothing used its mount for
``--idle-timeout`` seconds and no process has a file or working directory in it; reading a
``volumes/<name>`` link (any path walk through it) starts a stopped appliance again. Running
appliances stay within ``--guestfs-memory``: starting one that would exceed it first stops the
idle ones, the one idle longest first, and otherwise waits for one to become idle. Each
appliance is in the mount's journal (helper and qemu process with their start times, mount,
temporary directory) so that `ivdfs umount` can stop those of a killed mount.

KVM or TCG: `probe_accelerator` asks qemu once, at start-up, whether it can run a KVM guest
here (``/dev/kvm`` may exist while KVM fails, e.g. nested without the MSRs qemu wants: "failed
to set MSR 0x10a"); without KVM every appliance is told ``force_tcg``, libguestfs's software
emulation (an appliance then boots in about 15 s instead of 2-3 s).

Concurrency contract: trio thread only. Each appliance has a lock held while it starts or
stops; `run` (the mount's nursery) owns the tasks that read helpers' events and the idle
watch. Blocking work (scanning /proc for users of a mount) goes to worker threads, since
a path walk through our own mount would otherwise deadlock. `close_blocking` runs after trio
has ended and kills whatever is left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ivdfs import mountinfo
from ivdfs.config import Secret
from ivdfs.errors import BackendError
from ivdfs.journal import Journal, process_start
from ivdfs.processes import holders
from ivdfs.volumes.base import NOT_MOUNTED, VolumeAnswer, VolumeRequest
from ivdfs.volumes.host import remove_mount_point, remove_run_directory, run_directory

log = logging.getLogger(__name__)

SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter Debian's python3-guestfs is built for
HELPER = Path(__file__).with_name("guestfs_helper.py")
# libguestfs keeps the appliance it builds from the host's packages here; shared by every
# appliance and every mount (building it takes a while), never a per-appliance temporary file.
CACHE_DIR = "/var/tmp"
APPLIANCE_MIB = 512  # guest memory of one appliance; XFS and btrfs mount fine in it
START_TIMEOUT = 600.0  # a TCG boot on a loaded 2-core machine can take minutes
STOP_TIMEOUT = 60.0
ROOM_TIMEOUT = 600.0  # how long a start waits for the memory budget
IDLE_GRACE = 2.0  # an appliance used this recently is not stopped to make room
QEMU = {"x86_64": ("qemu-system-x86_64", "q35"), "aarch64": ("qemu-system-aarch64", "virt")}

# Mount options inside the appliance: read-only and no journal replay, as in the kernel mode
# (each appliance has its own kernel, so clones of one filesystem need no nouuid or temp fsid).
OPTIONS = {
    "ext2": "ro",
    "ext3": "ro,noload",
    "ext4": "ro,noload",
    "xfs": "ro,norecovery",
    "btrfs": "ro,rescue=nologreplay",
}
# Encrypted volumes are the helper's: it opens them with --volume-key-file or says why not.
REFUSALS = {
    **{k: v for k, v in NOT_MOUNTED.items() if k not in ("crypto_LUKS", "BitLocker")},
    "linux_raid_member": "an md RAID member whose array the appliance did not assemble "
    "(is a member missing?)",
}
PACKAGES = "libguestfs-tools, python3-guestfs and a kernel image (linux-image-amd64)"
# What an appliance can do only when the host has the tool libguestfs copies into it.
FEATURES = {
    "mdadm": ("md RAID", "mdadm"),
    "ldm": ("Windows dynamic disks", "ldmtool"),
    "luks": ("LUKS/BitLocker", "cryptsetup-bin"),
}


def describe_features(features: dict[str, bool]) -> tuple[str, str | None]:
    """What the appliance supports, and what it lacks with the packages to install (or None)."""
    have = [FEATURES[f][0] for f in FEATURES if features.get(f)]
    lack = [f for f in FEATURES if not features.get(f)]
    supported = f"{', '.join(have) or 'no md RAID, dynamic disks or encryption'} supported"
    if not lack:
        return supported, None
    missing = ", ".join(FEATURES[f][0] for f in lack)
    packages = " ".join(FEATURES[f][1] for f in lack)
    return supported, f"appliances cannot open {missing}: install {packages} on this machine"


@dataclass(frozen=True)
class Accelerator:
    """Whether appliances run under KVM or TCG, decided once, and why."""

    kvm: bool
    reason: str

    @property
    def name(self) -> str:
        return "KVM" if self.kvm else "TCG"

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"

    def env(self) -> dict[str, str]:
        return {} if self.kvm else {"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


def probe_accelerator() -> Accelerator:
    """Start qemu with KVM, paused, and quit it at once (about 0.1 s): qemu sets up the vCPU
    and its MSRs before the guest runs, so what fails there fails here. Blocking."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accelerator(False, "no usable /dev/kvm")
    binary, machine = QEMU.get(platform.machine(), ("", ""))
    qemu = shutil.which(binary) if binary else None
    if qemu is None:
        return Accelerator(False, f"no qemu for {platform.machine()} to try KVM with")
    qmp = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
    try:
        r = subprocess.run(
            [qemu, "-accel", "kvm", "-cpu", "host", "-machine", machine, "-nodefaults",
             "-no-user-config", "-display", "none", "-S", "-monitor", "none", "-qmp", "stdio"],
            input=qmp, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return Accelerator(False, f"KVM probe failed: {e}")
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower() or "fail" in ln.lower()]
    if r.returncode != 0 or errors:
        why = errors[0] if errors else f"qemu exited with {r.returncode}"
        return Accelerator(False, f"KVM fails here: {why.removeprefix(qemu + ': ')}")
    return Accelerator(True, "KVM works")


def missing_prerequisites() -> str | None:
    """What keeps libguestfs from running here, as one line naming the packages; None: fine."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing"
    try:
        r = subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import guestfs"], capture_output=True,
                           timeout=60, check=False, stdin=subprocess.DEVNULL)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{SYSTEM_PYTHON} cannot run: {e}"
    if r.returncode != 0:
        return f"{SYSTEM_PYTHON} cannot import guestfs (python3-guestfs)"
    if not list(Path("/boot").glob("vmlinuz-*")):
        return "no kernel image in /boot for the appliance (linux-image-amd64)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (fuse3)"
    return None


class _Lines:
    """JSON lines from a helper's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def next(self) -> dict[str, Any] | None:
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        msg = json.loads(line)
        return msg if isinstance(msg, dict) else None


@dataclass(eq=False)
class _Appliance:
    key: tuple[str, str]
    where: str  # "IVD x snapshot y", for the log
    disk: Path
    mount_dir: Path
    tmp_dir: Path
    state: str = "stopped"  # stopped, starting, running, stopping
    proc: trio.Process | None = None
    lines: _Lines | None = None
    qemu_pid: int = 0
    qemu_start: str | None = None
    last_active: float = 0.0
    answer: VolumeAnswer | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass
class GuestfsStats:
    boots: int = 0
    boot_seconds_last: float = 0.0
    boot_failures: int = 0
    stopped_idle: int = 0
    stopped_for_memory: int = 0
    memory_waits: int = 0


class GuestfsVolumes:
    def __init__(
        self,
        accelerator: Accelerator,
        idle_timeout: float,
        memory_budget: int,
        holdings: Journal | None = None,
        run_root: Path | None = None,
        appliance_mib: int = APPLIANCE_MIB,
        key: Secret | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.idle_timeout = idle_timeout
        self.memory_budget = memory_budget
        self.appliance_bytes = appliance_mib << 20
        self._appliance_mib = appliance_mib
        self._key = key
        self._features_told = False  # what appliances lack is logged once, at the first boot
        self._holdings = holdings
        self.run_dir = run_directory(run_root)
        self._apps: dict[tuple[str, str], _Appliance] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self.stats = GuestfsStats()
        log.info(
            "volumes: guestfs appliances of %d MiB each, at most %d MiB in all, under %s",
            appliance_mib, memory_budget >> 20, accelerator.describe(),
        )  # fmt: skip

    # --- the protocol ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Helpers' event readers and the idle watch live here (the mount's nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._watch_idle()

    async def attach(self, request: VolumeRequest) -> VolumeAnswer:
        if self._closed:
            raise BackendError("shutting down")
        ivd, snap = request.ivd, request.snapshot
        key = (ivd.id, snap.id)
        app = self._apps.get(key)
        if app is None:
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{ivd.id}-{snap.id}")
            app = _Appliance(key, f"IVD {ivd.id} snapshot {snap.id}", request.disk_path,
                             self.run_dir / name, self.run_dir / f"tmp-{name}")  # fmt: skip
            self._apps[key] = app
        async with app.lock:
            if app.state != "running":
                await self._start(app)
            app.last_active = trio.current_time()
            answer = app.answer
        assert answer is not None
        return VolumeAnswer(answer.mounted, answer.refused, wake=self._waker(app))

    def _waker(self, app: _Appliance) -> Callable[[], Awaitable[None]]:
        async def wake() -> None:
            app.last_active = trio.current_time()
            if app.state == "running":
                return
            async with app.lock:
                if self._closed:
                    raise BackendError("shutting down")
                if app.state != "running":
                    log.info("%s: starting its appliance again", app.where)
                    await self._start(app)
                app.last_active = trio.current_time()

        return wake

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            self._closed = True
            for app in list(self._apps.values()):
                async with app.lock:
                    await self._stop(app, "unmounting")
            remove_run_directory(self.run_dir)

    def close_blocking(self) -> None:
        """After trio ended (an error path): kill what is left, undo its mounts and files."""
        self._closed = True
        for app in self._apps.values():
            if app.proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                app.proc.kill()
            self._kill_qemu(app)
            self._cleanup(app)
        remove_run_directory(self.run_dir)

    def report(self) -> dict[str, Any]:
        states = [a.state for a in self._apps.values()]
        return {
            "mode": "guestfs",
            "accelerator": self.accelerator.name,
            "appliances_running": states.count("running"),
            "appliances_starting": states.count("starting"),
            "appliances_known": len(states),
            "appliance_memory": self.appliance_bytes,
            "memory_used": self._memory_used(),
            "memory_budget": self.memory_budget,
            **self.stats.__dict__,
        }

    # --- starting and stopping --------------------------------------------------------------

    def _memory_used(self) -> int:
        return sum(self.appliance_bytes for a in self._apps.values() if a.state != "stopped")

    async def _start(self, app: _Appliance) -> None:
        """Boot `app`'s appliance and mount its volumes (app.lock held)."""
        if self._closed:
            raise BackendError("shutting down")
        await self._make_room(app)
        app.state = "starting"
        try:
            await self._launch(app)
        except BaseException as e:
            self.stats.boot_failures += 1
            with trio.CancelScope(shield=True):
                await self._stop(app, "start failed")
            if isinstance(e, (OSError, ValueError, trio.TooSlowError)):
                raise BackendError(f"the appliance did not start: {e}") from None
            raise

    async def _launch(self, app: _Appliance) -> None:
        app.mount_dir.mkdir(mode=0o700, exist_ok=True)
        app.tmp_dir.mkdir(mode=0o700, exist_ok=True)
        tmp = str(app.tmp_dir)
        env = {**os.environ, **self.accelerator.env(), "TMPDIR": tmp, "XDG_RUNTIME_DIR": tmp,
               "LIBGUESTFS_CACHEDIR": CACHE_DIR}  # fmt: skip
        t0 = trio.current_time()
        with open(app.tmp_dir / "helper.log", "wb") as err:
            proc = await trio.lowlevel.open_process(
                [SYSTEM_PYTHON, "-I", str(HELPER)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True,
            )  # fmt: skip
        app.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        app.lines = _Lines(proc.stdout)
        if self._holdings is not None:
            self._holdings.add("appliances", {
                "helper": proc.pid, "helper_start": process_start(proc.pid),
                "mount": str(app.mount_dir), "tmp": tmp,
            })  # fmt: skip
        request = {"disk": str(app.disk), "mountpoint": str(app.mount_dir),
                   "memsize_mib": self._appliance_mib, "options": OPTIONS,
                   "refusals": REFUSALS,
                   "key": self._key.reveal() if self._key is not None else None}  # fmt: skip
        await proc.stdin.send_all(json.dumps(request).encode() + b"\n")
        with trio.fail_after(START_TIMEOUT):
            launched = await self._expect(app, "launched")
            if not self._features_told:
                self._features_told = True
                _supported, lacking = describe_features(launched.get("features") or {})
                if lacking is not None:
                    log.warning("volumes: %s", lacking)
            app.qemu_pid = int(launched["qemu_pid"])
            app.qemu_start = process_start(app.qemu_pid)
            if self._holdings is not None:
                self._holdings.update("appliances", {"helper": proc.pid}, qemu=app.qemu_pid,
                                      qemu_start=app.qemu_start)  # fmt: skip
            ready = await self._expect(app, "ready")
        seconds = trio.current_time() - t0
        self.stats.boots += 1
        self.stats.boot_seconds_last = round(float(launched["seconds"]), 2)
        mounted = {str(k): str(v) for k, v in ready["mounted"].items()}
        refused = {str(k): str(v) for k, v in ready["refused"].items()}
        app.answer = VolumeAnswer(mounted, refused)
        app.state = "running"
        app.last_active = trio.current_time()
        log.info(
            "%s: appliance (qemu pid %d, %s) booted in %.1f s, volumes ready in %.1f s: "
            "mounted %s%s", app.where, app.qemu_pid, self.accelerator.name,
            float(launched["seconds"]), seconds, ", ".join(sorted(mounted)) or "none",
            "; not mounted: " + "; ".join(f"{k}: {v}" for k, v in sorted(refused.items()))
            if refused else "",
        )  # fmt: skip
        assert self._nursery is not None, "GuestfsVolumes.run is not running"
        self._nursery.start_soon(self._follow, app, proc)

    async def _expect(self, app: _Appliance, event: str) -> dict[str, Any]:
        assert app.lines is not None
        msg = await app.lines.next()
        while msg is not None and msg.get("event") == "active":  # its FUSE loop has started
            msg = await app.lines.next()
        if msg is None:
            raise OSError(f"the helper ended{self._helper_log(app)}")
        if msg.get("event") == "error":
            raise OSError(str(msg.get("message")))
        if msg.get("event") != event:
            raise ValueError(f"unexpected message from the helper: {msg}")
        return msg

    def _helper_log(self, app: _Appliance) -> str:
        try:
            text = (app.tmp_dir / "helper.log").read_text(errors="replace").strip()
        except OSError:
            return ""
        last = text.splitlines()[-1] if text else ""
        return f": {last}" if last else ""

    async def _follow(self, app: _Appliance, proc: trio.Process) -> None:
        """Activity reports of one running helper, until it ends."""
        lines = app.lines
        assert lines is not None
        while True:
            try:
                msg = await lines.next()
            except (trio.ClosedResourceError, trio.BrokenResourceError, ValueError):
                return
            if msg is None or app.proc is not proc:
                break
            if msg.get("event") == "active":
                app.last_active = trio.current_time()
            elif msg.get("event") == "error":
                log.warning("%s: appliance: %s", app.where, msg.get("message"))
        if app.proc is proc and app.state == "running":
            # Nobody asked it to stop: qemu or the helper died (a guest kernel panic, the OOM
            # killer). Undo what is left; the next use of volumes/<name> boots it again.
            log.warning("%s: the appliance ended by itself%s", app.where, self._helper_log(app))
            async with app.lock:
                if app.proc is proc:
                    await self._stop(app, "it had ended")

    async def _stop(self, app: _Appliance, why: str) -> None:
        """Stop `app`'s appliance, if any, and undo its mount and files (app.lock held)."""
        proc = app.proc
        if proc is None:
            app.state = "stopped"
            return
        app.state = "stopping"
        with trio.CancelScope(shield=True):
            assert proc.stdin is not None
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await proc.stdin.send_all(b'{"op": "stop", "lazy": false}\n')
                await proc.stdin.aclose()
            with trio.move_on_after(STOP_TIMEOUT):
                await proc.wait()
            if proc.returncode is None:
                log.error("%s: the appliance did not stop in %.0f s; killing it", app.where,
                          STOP_TIMEOUT)  # fmt: skip
                proc.kill()
                await proc.wait()
            self._kill_qemu(app)
            with trio.move_on_after(STOP_TIMEOUT):
                await _gone(app.qemu_pid, app.qemu_start)
            if mountinfo.find(app.mount_dir) is not None:
                await trio.run_process(["fusermount3", "-u", "-z", str(app.mount_dir)],
                                       check=False, capture_stderr=True)  # fmt: skip
            if proc.stdout is not None:
                await proc.stdout.aclose()
            self._cleanup(app)
        log.info("%s: appliance stopped (%s)", app.where, why)

    def _kill_qemu(self, app: _Appliance) -> None:
        if app.qemu_pid and process_start(app.qemu_pid) == app.qemu_start is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(app.qemu_pid, signal.SIGKILL)

    def _cleanup(self, app: _Appliance) -> None:
        if mountinfo.find(app.mount_dir) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(app.mount_dir)], check=False,
                           capture_output=True, stdin=subprocess.DEVNULL)  # fmt: skip
        shutil.rmtree(app.tmp_dir, ignore_errors=True)
        remove_mount_point(app.mount_dir)
        if self._holdings is not None and app.proc is not None:
            self._holdings.drop("appliances", {"helper": app.proc.pid})
        app.proc = None
        app.lines = None
        app.qemu_pid = 0
        app.state = "stopped"

    # --- idleness and the memory budget -----------------------------------------------------

    async def _held(self, app: _Appliance) -> bool:
        """Does a process have a file, mapping or working directory in the appliance's mount?
        (A worker thread: /proc links of processes inside our mount are read through it.)"""
        own = {os.getpid(), *(p for p in (app.proc.pid if app.proc else 0, app.qemu_pid) if p)}
        found = await trio.to_thread.run_sync(holders, [str(app.mount_dir)], own)
        return bool(found)

    async def _watch_idle(self) -> None:
        tick = min(1.0, max(0.05, self.idle_timeout / 4))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for app in list(self._apps.values()):
                if (
                    app.state != "running"
                    or app.lock.locked()
                    or now - app.last_active < self.idle_timeout
                ):
                    continue
                if await self._held(app):
                    app.last_active = trio.current_time()
                    continue
                async with app.lock:
                    if app.state == "running" and (
                        trio.current_time() - app.last_active >= self.idle_timeout
                    ):
                        await self._stop(app, f"idle for {self.idle_timeout:g} s")
                        self.stats.stopped_idle += 1

    async def _make_room(self, app: _Appliance) -> None:
        """Stop idle appliances, the one idle longest first, until `app` fits the budget;
        wait for one to become idle when none is."""
        deadline = trio.current_time() + ROOM_TIMEOUT
        waited = False
        while self._memory_used() + self.appliance_bytes > self.memory_budget:
            if self._closed:
                raise BackendError("shutting down")
            now = trio.current_time()
            others = [
                a for a in self._apps.values()
                if a is not app and a.state == "running" and not a.lock.locked()
                and now - a.last_active >= IDLE_GRACE
            ]  # fmt: skip
            others.sort(key=lambda a: a.last_active)
            for victim in others:
                if await self._held(victim):
                    continue
                async with victim.lock:
                    if victim.state != "running":
                        continue
                    await self._stop(victim, f"making room for {app.where} (--guestfs-memory)")
                    self.stats.stopped_for_memory += 1
                break
            else:
                if not waited:
                    waited = True
                    self.stats.memory_waits += 1
                    log.info("%s: waiting for an appliance to become idle (--guestfs-memory "
                             "%d MiB)", app.where, self.memory_budget >> 20)  # fmt: skip
                if trio.current_time() > deadline:
                    raise BackendError(
                        f"no room for another appliance within --guestfs-memory "
                        f"({self.memory_budget >> 20} MiB): every running one is in use"
                    )
                await trio.sleep(0.5)


async def _gone(pid: int, start: str | None) -> None:
    delay = 0.01
    while pid and start is not None and process_start(pid) == start:
        await trio.sleep(delay)
        delay = min(delay * 2, 0.2)


def boot_test(
    accelerator: Accelerator, timeout: float = START_TIMEOUT
) -> tuple[float, dict[str, bool]]:
    """Boot one appliance on a scratch disk and stop it (`ivdfs check`): its boot time in
    seconds and its optional features (FEATURES), or RuntimeError saying why it did not boot.
    Blocking."""
    with tempfile.TemporaryDirectory(prefix="ivdfs-check-") as tmp:
        env = {**os.environ, **accelerator.env(), "TMPDIR": tmp, "XDG_RUNTIME_DIR": tmp,
               "LIBGUESTFS_CACHEDIR": CACHE_DIR}  # fmt: skip
        request = {"disk": None, "memsize_mib": APPLIANCE_MIB}
        try:
            r = subprocess.run([SYSTEM_PYTHON, "-I", str(HELPER)], input=json.dumps(request) + "\n",
                               capture_output=True, text=True, env=env, timeout=timeout,
                               check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(str(e)) from None
        for line in r.stdout.splitlines():
            msg = json.loads(line)
            if msg.get("event") == "launched":
                features = {str(k): bool(v) for k, v in (msg.get("features") or {}).items()}
                return float(msg["seconds"]), features
            if msg.get("event") == "error":
                raise RuntimeError(str(msg.get("message")))
        last = r.stderr.strip().splitlines()[-1:] or [f"status {r.returncode}"]
        raise RuntimeError(last[0])
