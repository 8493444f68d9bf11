"""--volumes kernel: ivdfs attaches partitions to read-only loop devices and mounts them itself.

Role: for each recognised filesystem of a snapshot, ``losetup --read-only --offset --sizelimit``
on that snapshot's ``disk.raw`` (or, for an LVM logical volume, its ``lv-<vg>-<lv>.raw``)
*inside our own FUSE mount* (so the loop device reads through the block cache), then a
read-only mount that never writes to the device either and lets any number of snapshots of one
volume mount side by side. Mounts live in a private run directory (mode 0700) and appear as
``volumes/<name>`` symlinks; every candidate that is not mounted gets a one-line reason in the
answer (`VolumeAnswer.refused`) and in the log.

Mount options are chosen once per process by asking the running kernel (`KernelProfile`):
``fsopen(2)``/``fsconfig(2)`` hand each option set to the filesystem's own parser without any
device or mount (filesystems on the new mount API reject an unknown option there with its
message; a bogus option tells when a filesystem still parses late, and the choice then falls
back to what sysfs says or to the first choice). fsopen also loads a modular driver (the
kernel's request_module), so a filesystem missing from /proc/filesystems is not yet missing.
- ext3/ext4 ``ro,noload`` (no journal replay); ext2 ``ro`` (no journal to replay). ext4 has no
  duplicate-UUID check, so clones mount side by side as they are.
- XFS ``ro,norecovery,nouuid``: norecovery skips log recovery, nouuid lets clones with one UUID
  mount together.
- btrfs ``ro,rescue=nologreplay``, or ``ro,nologreplay`` before Linux 5.9 (current kernels
  reject the bare word). Clones of a single-device btrfs share an fsid; from Linux 6.7 the
  kernel gives a second one a temporary fsid by itself (``/sys/fs/btrfs/features/temp_fsid``),
  needing no option. Older kernels cannot: a second btrfs with an fsid we already mounted is
  refused with that reason instead of being handed to the kernel.
- NTFS through ``ntfs-3g -o ro``; FAT through the kernel's vfat when it has one, else the
  userspace ``fusefat`` (read-only unless given ``rw+``); exFAT through the kernel's exfat.
The loop devices are read-only too, so a wrong option fails, never writes. The log names the
driver that really mounted each volume.

Shutdown: the loop devices hold files of our mount open, so the kernel refuses
``fusermount3 -u`` with EBUSY while volumes are attached; SIGTERM/SIGINT/SIGHUP (mount.py) call
`aclose` while the FUSE loop still serves, then unmount FUSE. After a crash, `close_blocking`
runs once the FUSE connection is gone (its I/O fails at once), with lazy unmounts.

Concurrency contract: trio thread only. Every external command runs through
`trio.run_process`, and the one read of our own mount (a btrfs fsid, on old kernels) goes to a
worker thread: a blocking call would deadlock, since losetup, mount and that read go through
our FUSE mount, which this very thread serves. One lock serialises attaching and teardown, and
nothing is attached after teardown began. `KernelProfile.probe` only makes syscalls that touch
no device; it runs once, in the constructor.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ivdfs.volumes import host
from ivdfs.volumes.base import NOT_MOUNTED, Candidate, VolumeAnswer, VolumeRequest

log = logging.getLogger(__name__)

# Option sets per filesystem, preferred first. Each keeps a read-only mount from writing to its
# device (journal replay, log recovery) and lets clones of one volume mount side by side.
OPTION_CHOICES: dict[str, tuple[str, ...]] = {
    "ext2": ("ro",),
    "ext3": ("ro,noload",),
    "ext4": ("ro,noload",),
    "xfs": ("ro,norecovery,nouuid",),
    "btrfs": ("ro,rescue=nologreplay", "ro,nologreplay"),
    "vfat": ("ro",),
    "exfat": ("ro",),
}
_BTRFS_FEATURES = Path("/sys/fs/btrfs/features")
_BTRFS_FSID_OFFSET = 0x10000 + 0x20  # superblock at 64 KiB, fsid 32 bytes into it


def kernel_filesystems() -> set[str]:
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


# --------------------------------------------------------------------------------------------
# What the running kernel accepts

# fsopen/fsconfig (Linux 5.2) have one number on every architecture but alpha (asm-generic).
_SYS_FSOPEN, _SYS_FSCONFIG = 430, 431
_FSOPEN_CLOEXEC = 1
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING = 0, 1
_BOGUS = "ivdfs_probe_no_such_option"


class _FsContext:
    """A filesystem context from fsopen(2): options go to the driver's parser, nothing mounts."""

    _libc: ctypes.CDLL | None = None

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, fs: str) -> _FsContext | int:
        """The context, or the errno: ENODEV no such driver; ENOSYS, EPERM: cannot tell."""
        if platform.machine() == "alpha":
            return errno.ENOSYS
        if cls._libc is None:
            cls._libc = ctypes.CDLL(None, use_errno=True)
        fd = cls._libc.syscall(_SYS_FSOPEN, fs.encode(), _FSOPEN_CLOEXEC)
        return cls(fd) if fd >= 0 else ctypes.get_errno()

    def set(self, option: str) -> str:
        """Empty if the driver took `option` (``key`` or ``key=value``), else its message."""
        key, eq, value = option.partition("=")
        assert self._libc is not None
        if eq:
            rc = self._libc.syscall(_SYS_FSCONFIG, self.fd, _FSCONFIG_SET_STRING, key.encode(),
                                    value.encode(), 0)  # fmt: skip
        else:
            rc = self._libc.syscall(_SYS_FSCONFIG, self.fd, _FSCONFIG_SET_FLAG, key.encode(),
                                    None, 0)  # fmt: skip
        if rc >= 0:
            return ""
        err = ctypes.get_errno()
        try:  # the driver's own words, as "e btrfs: Unknown parameter 'x'\n"
            msg = os.read(self.fd, 512).decode("utf-8", "replace").strip()
            return msg[2:] if msg[:2] in ("e ", "w ") else msg
        except OSError:
            return os.strerror(err)

    def close(self) -> None:
        os.close(self.fd)


def _accepts(fs: str, options: str) -> bool | None:
    """Does `fs` take every option of `options`? None when the kernel cannot tell us."""
    ctx = _FsContext.open(fs)
    if isinstance(ctx, int):
        return None
    try:
        if any(ctx.set(o) for o in options.split(",")):
            return False
        # A driver still on the legacy mount API takes anything here and parses at mount time.
        return None if ctx.set(_BOGUS) == "" else True
    finally:
        ctx.close()


def _has_driver(fs: str, listed: set[str]) -> bool:
    ctx = _FsContext.open(fs)  # loads a modular driver on demand, as mount(2) would
    if isinstance(ctx, int):
        # Without fsopen (before 5.2, or filtered) only what is loaded already is known.
        return ctx != errno.ENODEV and fs in listed
    ctx.close()
    return True


@dataclass(frozen=True)
class KernelProfile:
    """How this kernel mounts each filesystem without writing, and whether btrfs clones can
    mount side by side. Probed once (`probe`); tests may build one to play an older kernel."""

    release: str
    options: dict[str, str]  # filesystem -> option string; only filesystems it has a driver for
    btrfs_clones: bool  # temp-fsid (6.7+): same-fsid single-device btrfs mount side by side
    notes: dict[str, str] = field(default_factory=dict)  # filesystem -> how the choice was made

    @classmethod
    def probe(cls) -> KernelProfile:
        listed = kernel_filesystems()
        options: dict[str, str] = {}
        notes: dict[str, str] = {}
        for fs, choices in OPTION_CHOICES.items():
            if not _has_driver(fs, listed):
                continue
            verdicts = [(c, _accepts(fs, c)) for c in choices]
            chosen = next((c for c, ok in verdicts if ok), None)
            if chosen is None and fs == "btrfs" and any(ok is None for _, ok in verdicts):
                chosen, notes[fs] = _btrfs_from_sysfs(choices)
            if chosen is None:
                if all(ok is False for _, ok in verdicts):
                    notes[fs] = f"the kernel's {fs} rejects {' and '.join(choices)}"
                    continue
                chosen = choices[0]
                notes[fs] = "options not checked (the driver parses them at mount time)"
            options[fs] = chosen
        clones = (_BTRFS_FEATURES / "temp_fsid").exists()
        return cls(platform.release(), options, clones, notes)

    def describe(self) -> str:
        parts = [f"{fs} {opts}" for fs, opts in self.options.items()]
        if "btrfs" in self.options:
            parts.append(
                "btrfs clones get a temporary fsid"
                if self.btrfs_clones
                else "btrfs clones cannot mount side by side (no temp-fsid before Linux 6.7)"
            )
        parts += [f"{fs}: {note}" for fs, note in self.notes.items()]
        missing = [fs for fs in OPTION_CHOICES if fs not in self.options and fs not in self.notes]
        if missing:
            parts.append(f"no kernel driver for {', '.join(missing)}")
        return f"kernel {self.release}: " + "; ".join(parts)


def _btrfs_from_sysfs(choices: tuple[str, ...]) -> tuple[str, str]:
    """btrfs before the new mount API (6.8) parses late; sysfs lists its rescue options."""
    try:
        rescue = (_BTRFS_FEATURES / "supported_rescue_options").read_text().split()
    except OSError:
        rescue = []
    if "nologreplay" in rescue:
        return choices[0], "from /sys/fs/btrfs/features/supported_rescue_options"
    # supported_rescue_options came with rescue= itself (5.9-5.11): without it, the old word.
    return choices[-1], "no rescue= options in sysfs: the old nologreplay"


# --------------------------------------------------------------------------------------------
# The backend


@dataclass
class _Attached:
    loop: str
    mount_dir: Path
    mounted: bool = False
    btrfs_fsid: str = ""  # registered in KernelVolumes._btrfs_fsids while mounted


class VolumeSkipped(Exception):
    """This filesystem cannot be mounted here; the message says why."""


@dataclass(frozen=True)
class _Plan:
    argv: list[str]
    driver: str  # who mounts it, for the log: "the kernel's xfs driver (ro,...)", "fusefat"


class KernelVolumes:
    def __init__(self, run_root: Path | None = None, profile: KernelProfile | None = None) -> None:
        self.profile = profile or KernelProfile.probe()
        log.info("volumes: %s", self.profile.describe())
        self.run_dir = host.run_directory(run_root)
        self._attached: list[_Attached] = []
        self._btrfs_fsids: dict[str, str] = {}  # fsid -> which volume holds it (old kernels)
        self._lock = trio.Lock()
        self._closed = False

    def plan(self, fs: str | None, loop: str, target: Path) -> _Plan:
        """How to mount `fs`, or VolumeSkipped naming why it is not mounted."""
        if fs is None:
            raise VolumeSkipped("no recognised filesystem")
        if fs in NOT_MOUNTED:
            raise VolumeSkipped(NOT_MOUNTED[fs])
        if fs == "ntfs":
            if shutil.which("ntfs-3g") is None:
                raise VolumeSkipped("NTFS needs ntfs-3g, which is not installed")
            return _Plan(["ntfs-3g", "-o", "ro", loop, str(target)], "ntfs-3g (ro)")
        if fs == "vfat" and "vfat" not in self.profile.options:
            if shutil.which("fusefat") is None:
                raise VolumeSkipped("FAT: the kernel has no vfat driver and fusefat is missing")
            return _Plan(["fusefat", "-o", "ro", loop, str(target)], "fusefat (ro, userspace)")
        if fs not in OPTION_CHOICES:
            raise VolumeSkipped(f"{fs} is not a filesystem ivdfs mounts")
        opts = self.profile.options.get(fs)
        if opts is None:
            raise VolumeSkipped(self.profile.notes.get(fs, f"the kernel has no {fs} driver"))
        argv = ["mount", "-t", fs, "-o", opts, loop, str(target)]
        return _Plan(argv, f"the kernel's {fs} driver ({opts})")

    async def attach(self, request: VolumeRequest) -> VolumeAnswer:
        """Mount every candidate that can be; the others come back with their reason. One
        failure is logged and leaves the others."""
        where = f"IVD {request.ivd.id} snapshot {request.snapshot.id}"
        mounted: dict[str, str] = {}
        refused: dict[str, str] = {}
        for c in request.candidates:
            name = c.volume_name
            async with self._lock:
                if self._closed:
                    refused[name] = "not mounted: ivdfs is shutting down"
                    continue
                try:
                    path, driver = await self._attach_one(request, c)
                except VolumeSkipped as e:
                    refused[name] = str(e)
                    log.info("%s: volume %s skipped: %s", where, name, e)
                except (OSError, RuntimeError, trio.TooSlowError) as e:
                    refused[name] = f"mount failed: {e}"
                    log.warning("%s: volume %s (%s) not mounted: %s", where, name, c.fs, e)
                else:
                    mounted[name] = str(path)
                    log.info("%s: volume %s (%s) mounted read-only at %s by %s", where, name,
                             c.fs, path, driver)  # fmt: skip
        return VolumeAnswer(mounted, refused)

    async def _attach_one(self, request: VolumeRequest, c: Candidate) -> tuple[Path, str]:
        self.plan(c.fs, "/dev/loopX", self.run_dir)  # skip early, before any losetup
        source = c.path or request.disk_path
        fsid = ""
        if c.fs == "btrfs" and not self.profile.btrfs_clones:
            fsid = await trio.to_thread.run_sync(_btrfs_fsid, source, c.start)
            if fsid in self._btrfs_fsids:
                raise VolumeSkipped(
                    f"btrfs {fsid} is already mounted from {self._btrfs_fsids[fsid]}; this "
                    "kernel (no temp-fsid, before Linux 6.7) cannot mount a clone beside it"
                )
        mount_dir = self.run_dir / host.mount_point_name(request, c.volume_name)
        mount_dir.mkdir(mode=0o700)
        try:
            out = await host.run_command(
                ["losetup", "--read-only", "--find", "--show", "--offset", str(c.start),
                 "--sizelimit", str(c.length), str(source)],
                capture=True,
            )  # fmt: skip
        except BaseException:
            mount_dir.rmdir()
            raise
        a = _Attached(out.strip(), mount_dir)
        self._attached.append(a)
        try:
            plan = self.plan(c.fs, a.loop, mount_dir)
            await host.run_command(plan.argv)
            a.mounted = True
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._detach(a)
            raise
        if fsid:
            a.btrfs_fsid = fsid
            self._btrfs_fsids[fsid] = f"IVD {request.ivd.id} snapshot {request.snapshot.id}"
        return mount_dir, plan.driver

    async def _detach(self, a: _Attached) -> None:
        if a.mounted:
            await host.run_command(["umount", str(a.mount_dir)])
            a.mounted = False
            self._btrfs_fsids.pop(a.btrfs_fsid, None)
        await host.run_command(["losetup", "--detach", a.loop])
        # A FUSE driver (ntfs-3g, fusefat) may still hold the device for a moment after its
        # unmount; the kernel then detaches it when that last user closes it (autoclear).
        # Wait for that, or our FUSE mount would still be busy when we unmount it.
        await _wait_detached(a.loop)
        self._attached.remove(a)
        a.mount_dir.rmdir()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            async with self._lock:
                self._closed = True
                for a in reversed(list(self._attached)):
                    try:
                        await self._detach(a)
                    except (OSError, RuntimeError, trio.TooSlowError) as e:
                        log.error("cannot detach %s (%s): %s", a.loop, a.mount_dir, e)
                host.remove_run_directory(self.run_dir)

    def close_blocking(self) -> None:
        """After the FUSE loop ended (error paths): lazy unmounts, then detach."""
        self._closed = True
        for a in reversed(list(self._attached)):
            if a.mounted:
                host.run_blocking(["umount", "--lazy", str(a.mount_dir)])
            host.run_blocking(["losetup", "--detach", a.loop])
            a.mounted = False
            self._attached.remove(a)
            host.remove_mount_point(a.mount_dir)
        self._btrfs_fsids.clear()
        host.remove_run_directory(self.run_dir)


def _btrfs_fsid(path: Path, start: int) -> str:
    """The fsid of the btrfs at `start` of `path` (blocking: a worker thread's job)."""
    with open(path, "rb") as f:
        raw = os.pread(f.fileno(), 16, start + _BTRFS_FSID_OFFSET)
    if len(raw) != 16:
        raise OSError(errno.EIO, f"short read of the btrfs superblock of {path}")
    return str(uuid.UUID(bytes=raw))


async def _wait_detached(loop: str, timeout: float = 30.0) -> None:
    backing = Path("/sys/block") / Path(loop).name / "loop" / "backing_file"
    with trio.fail_after(timeout):
        delay = 0.005
        while backing.exists():
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)
