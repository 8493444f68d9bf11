"""--volumes fuse: guest filesystems parsed by userspace drivers only, never the host kernel.

Role: each recognised filesystem is handed to a FUSE driver that runs as its own process and
reads our own window file of it (``partN.raw``, ``disk.raw`` for a filesystem spanning the
disk, ``lv-<vg>-<lv>.raw``) inside our FUSE mount: no loop device, and no kernel filesystem
driver ever sees the guest's bytes (the kernel only passes FUSE requests). A malformed
filesystem can crash that driver, not the host.
- ext2/3/4: ``fuse2fs -o ro,norecovery`` (e2fsprogs; no journal replay);
- NTFS: ``ntfs-3g -o ro``;
- FAT: ``fusefat -o ro``.
Anything else (XFS, btrfs, exFAT...) has no userspace driver here and gets
``volumes/<name>.error`` saying to use ``--volumes guestfs``, which parses it inside a VM.

Mounts live in a private run directory (0700) like the kernel mode's. Unmounting waits for each
driver process to end (it holds a file of our mount open until then), so that our own unmount
is not busy. Recovery of a killed mount finds the drivers by the mountpoint in their command
line (`ivdfs.commands.recover`).

Concurrency contract: trio thread only; every command runs through `trio.run_process` (the
drivers read through the FUSE mount this thread serves). One lock serialises attaching and
teardown; nothing is attached after teardown began.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import trio

from ivdfs import mountinfo
from ivdfs.processes import naming
from ivdfs.volumes import host
from ivdfs.volumes.base import NOT_MOUNTED, WHOLE_DISK, Candidate, VolumeAnswer, VolumeRequest

log = logging.getLogger(__name__)

# filesystem -> (driver, its options): read-only, no journal replay.
DRIVERS = {
    "ext2": ("fuse2fs", "ro,norecovery"),
    "ext3": ("fuse2fs", "ro,norecovery"),
    "ext4": ("fuse2fs", "ro,norecovery"),
    "ntfs": ("ntfs-3g", "ro"),
    "vfat": ("fusefat", "ro"),
}
PACKAGES = {"fuse2fs": "fuse2fs", "ntfs-3g": "ntfs-3g", "fusefat": "fusefat"}


def source_file(request: VolumeRequest, c: Candidate) -> Path:
    """Our own file holding exactly candidate `c`'s bytes."""
    if c.path is not None:
        return c.path
    if c.number == WHOLE_DISK:
        return request.disk_path
    return request.disk_path.with_name(f"part{c.number}.raw")


def refusal(fs: str | None) -> str | None:
    """Why `fs` is not mounted in this mode, or None if a driver is installed for it."""
    if fs is None:
        return "no recognised filesystem"
    if fs in NOT_MOUNTED:
        return NOT_MOUNTED[fs]
    if fs not in DRIVERS:
        return f"{fs} has no userspace driver here: use --volumes guestfs, which reads it in a VM"
    driver = DRIVERS[fs][0]
    if shutil.which(driver) is None:
        return f"{fs} needs {driver} (Debian package {PACKAGES[driver]}), which is not installed"
    return None


@dataclass
class _Mounted:
    target: Path
    driver: str


class FuseVolumes:
    def __init__(self, run_root: Path | None = None) -> None:
        self.run_dir = host.run_directory(run_root)
        have = sorted({d for d, _ in DRIVERS.values() if shutil.which(d)})
        log.info("volumes: userspace drivers %s", ", ".join(have) or "none installed")
        self._mounted: list[_Mounted] = []
        self._lock = trio.Lock()
        self._closed = False

    async def attach(self, request: VolumeRequest) -> VolumeAnswer:
        where = f"IVD {request.ivd.id} snapshot {request.snapshot.id}"
        mounted: dict[str, str] = {}
        refused: dict[str, str] = {}
        for c in request.candidates:
            name = c.volume_name
            reason = refusal(c.fs)
            if reason is not None:
                refused[name] = reason
                log.info("%s: volume %s skipped: %s", where, name, reason)
                continue
            assert c.fs is not None
            async with self._lock:
                if self._closed:
                    refused[name] = "not mounted: ivdfs is shutting down"
                    continue
                driver, opts = DRIVERS[c.fs]
                target = self.run_dir / host.mount_point_name(request, name)
                target.mkdir(mode=0o700)
                source = source_file(request, c)
                try:
                    await host.run_command([driver, "-o", opts, str(source), str(target)])
                except (OSError, RuntimeError, trio.TooSlowError) as e:
                    # A driver that died half way may leave its mount behind.
                    with trio.CancelScope(shield=True):
                        await self._unmount(_Mounted(target, driver))
                    refused[name] = f"mount failed: {e}"
                    log.warning("%s: volume %s (%s) not mounted: %s", where, name, c.fs, e)
                    continue
                self._mounted.append(_Mounted(target, driver))
            mounted[name] = str(target)
            log.info("%s: volume %s (%s) mounted read-only at %s by %s (%s, userspace)", where,
                     name, c.fs, target, driver, opts)  # fmt: skip
        return VolumeAnswer(mounted, refused)

    async def _unmount(self, m: _Mounted) -> None:
        if _is_mount(m.target):
            await host.run_command(["fusermount3", "-u", str(m.target)])
        # The driver keeps its image (a file of our mount) open until it has exited.
        with trio.fail_after(host.COMMAND_TIMEOUT):
            delay = 0.005
            while await trio.to_thread.run_sync(naming, [str(m.target)]):
                await trio.sleep(delay)
                delay = min(delay * 2, 0.1)
        m.target.rmdir()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            async with self._lock:
                self._closed = True
                for m in reversed(list(self._mounted)):
                    try:
                        await self._unmount(m)
                    except (OSError, RuntimeError, trio.TooSlowError) as e:
                        log.error("cannot unmount %s (%s): %s", m.target, m.driver, e)
                    else:
                        self._mounted.remove(m)
                host.remove_run_directory(self.run_dir)

    def close_blocking(self) -> None:
        """After the FUSE loop ended (error paths): lazy unmounts; the drivers then end."""
        self._closed = True
        for m in reversed(list(self._mounted)):
            if _is_mount(m.target):
                host.run_blocking(["fusermount3", "-u", "-z", str(m.target)])
            self._mounted.remove(m)
            host.remove_mount_point(m.target)
        host.remove_run_directory(self.run_dir)


def _is_mount(path: Path) -> bool:
    return mountinfo.find(path) is not None
