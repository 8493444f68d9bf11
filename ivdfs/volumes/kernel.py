"""--volumes kernel: ivdfs attaches partitions to read-only loop devices and mounts them itself.

Role: for each recognised filesystem of a snapshot, ``losetup --read-only --offset --sizelimit``
on that snapshot's ``disk.raw`` *inside our own FUSE mount* (so the loop device reads through
the block cache), then a read-only mount that never writes to the device either: ext2/3/4
``ro,noload`` (no journal replay), XFS ``ro,norecovery``, btrfs ``ro,nologreplay``, NTFS via
``ntfs-3g -o ro``, FAT via the kernel's vfat when it has one, else the userspace ``fusefat``
(read-only unless given ``rw+``). Anything else is skipped with a log line. Mounts live in a
private run directory (mode 0700) and appear as ``volumes/<n>`` symlinks, n = partition number,
0 for a filesystem spanning the whole disk.

Shutdown: the loop devices hold disk.raw of our mount open, so the kernel refuses
``fusermount3 -u`` with EBUSY while volumes are attached; SIGTERM/SIGINT/SIGHUP (mount.py) call
`aclose` while the FUSE loop still serves, then unmount FUSE. After a crash, `close_blocking`
runs once the FUSE connection is gone (its I/O fails at once), with lazy unmounts.

Concurrency contract: trio thread only. Every external command runs through
`trio.run_process`: a blocking call would deadlock, since losetup and mount read through our
FUSE mount, which this very thread serves. One lock serialises attaching and teardown, and
nothing is attached after teardown began.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from ivdfs.volumes.base import Candidate, VolumeRequest

log = logging.getLogger(__name__)

# Options that keep a read-only mount from writing to its device (journal replay, log
# recovery). The loop devices are read-only too, so a missing option fails, never writes.
KERNEL_OPTIONS = {
    "ext2": "ro",
    "ext3": "ro,noload",
    "ext4": "ro,noload",
    "xfs": "ro,norecovery",
    "btrfs": "ro,nologreplay",
    "vfat": "ro",
}
COMMAND_TIMEOUT = 120.0
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def kernel_filesystems() -> set[str]:
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


@dataclass
class _Attached:
    loop: str
    mount_dir: Path
    mounted: bool = False


class VolumeSkipped(Exception):
    """This filesystem cannot be mounted here; the message says why."""


class KernelVolumes:
    def __init__(self, run_root: Path | None = None) -> None:
        if run_root is None:
            run_root = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"ivdfs-{os.getpid()}-", dir=run_root))
        self.run_dir.chmod(0o700)
        self._attached: list[_Attached] = []
        self._lock = trio.Lock()
        self._closed = False
        self._kernel_fs = kernel_filesystems()

    def command_for(self, fs: str | None, loop: str, target: Path) -> list[str]:
        """The mount command for `fs`, or VolumeSkipped naming why there is none."""
        if fs is None:
            raise VolumeSkipped("no recognised filesystem")
        if fs == "ntfs":
            if shutil.which("ntfs-3g") is None:
                raise VolumeSkipped("NTFS needs ntfs-3g, which is not installed")
            return ["ntfs-3g", "-o", "ro", loop, str(target)]
        if fs == "vfat" and "vfat" not in self._kernel_fs:
            if shutil.which("fusefat") is None:
                raise VolumeSkipped("FAT: the kernel has no vfat driver and fusefat is missing")
            return ["fusefat", "-o", "ro", loop, str(target)]
        opts = KERNEL_OPTIONS.get(fs)
        if opts is None:
            raise VolumeSkipped(f"{fs} is not a filesystem ivdfs mounts")
        if fs not in self._kernel_fs:
            raise VolumeSkipped(f"the kernel has no {fs} driver")
        return ["mount", "-t", fs, "-o", opts, loop, str(target)]

    async def attach(self, request: VolumeRequest) -> dict[int, str]:
        where = f"IVD {request.ivd.id} snapshot {request.snapshot.id}"
        out: dict[int, str] = {}
        for c in request.candidates:
            async with self._lock:
                if self._closed:
                    break
                try:
                    out[c.number] = str(await self._attach_one(request, c))
                except VolumeSkipped as e:
                    log.info("%s: volume %d skipped: %s", where, c.number, e)
                except (OSError, RuntimeError, trio.TooSlowError) as e:
                    log.warning("%s: volume %d (%s) not mounted: %s", where, c.number, c.fs, e)
                else:
                    log.info("%s: volume %d (%s) mounted read-only at %s", where, c.number,
                             c.fs, out[c.number])  # fmt: skip
        return out

    async def _attach_one(self, request: VolumeRequest, c: Candidate) -> Path:
        self.command_for(c.fs, "/dev/loopX", self.run_dir)  # skip early, before any losetup
        name = _SAFE.sub("_", f"{request.ivd.id}-{request.snapshot.id}-{c.number}")
        mount_dir = self.run_dir / name
        mount_dir.mkdir(mode=0o700)
        out = await _run(
            ["losetup", "--read-only", "--find", "--show", "--offset", str(c.start),
             "--sizelimit", str(c.length), str(request.disk_path)],
            capture=True,
        )  # fmt: skip
        a = _Attached(out.strip(), mount_dir)
        self._attached.append(a)
        try:
            await _run(self.command_for(c.fs, a.loop, mount_dir))
            a.mounted = True
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._detach(a)
            raise
        return mount_dir

    async def _detach(self, a: _Attached) -> None:
        if a.mounted:
            await _run(["umount", str(a.mount_dir)])
            a.mounted = False
        await _run(["losetup", "--detach", a.loop])
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
                self._remove_run_dir()

    def close_blocking(self) -> None:
        """After the FUSE loop ended (error paths): lazy unmounts, then detach."""
        self._closed = True
        for a in reversed(list(self._attached)):
            for argv in (["umount", "--lazy", str(a.mount_dir)], ["losetup", "--detach", a.loop]):
                if argv[0] == "umount" and not a.mounted:
                    continue
                proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                                      timeout=COMMAND_TIMEOUT)  # fmt: skip
                if proc.returncode != 0:
                    log.error("%s failed: %s", " ".join(argv), proc.stderr.strip())
            a.mounted = False
            self._attached.remove(a)
            try:
                a.mount_dir.rmdir()
            except OSError as e:
                log.error("cannot remove %s: %s", a.mount_dir, e)
        self._remove_run_dir()

    def _remove_run_dir(self) -> None:
        try:
            self.run_dir.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("cannot remove the run directory %s: %s", self.run_dir, e)


async def _run(argv: Sequence[str], capture: bool = False) -> str:
    """Run a command without blocking trio; RuntimeError with its stderr if it fails.

    stdout is captured only for commands that do not daemonise (losetup): a FUSE driver's
    daemon would inherit the pipe and keep it open for as long as the volume is mounted.
    """
    with tempfile.TemporaryFile() as err:
        with trio.fail_after(COMMAND_TIMEOUT):
            if capture:
                proc = await trio.run_process(
                    list(argv), stdin=subprocess.DEVNULL, stderr=err.fileno(), check=False,
                    capture_stdout=True,
                )  # fmt: skip
            else:
                proc = await trio.run_process(
                    list(argv), stdin=subprocess.DEVNULL, stderr=err.fileno(), check=False,
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
        if proc.returncode != 0:
            err.seek(0)
            text = err.read().decode("utf-8", "replace").strip().replace("\n", " ")
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {text}")
    return proc.stdout.decode() if capture and proc.stdout else ""


async def _wait_detached(loop: str, timeout: float = 30.0) -> None:
    backing = Path("/sys/block") / Path(loop).name / "loop" / "backing_file"
    with trio.fail_after(timeout):
        delay = 0.005
        while backing.exists():
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)
