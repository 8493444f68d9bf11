"""`ivdfs umount` and `ivdfs end-access`: running ivdfs as a service, and crash recovery.

Main thread only; both block (on the ivdfs process ending, or on VDDK).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ivdfs import mountinfo
from ivdfs.config import ACCESS_IDENTITY, ServerConfig
from ivdfs.errors import BackendError, ExitCode, UserError
from ivdfs.inventory.vsphere import VSphere
from ivdfs.vddk.connection import Access, DiskTarget, ServerTarget
from ivdfs.vddk.library import VddkLibrary

log = logging.getLogger(__name__)

FSTYPE = "fuse.ivdfs"


def mount_type(path: Path) -> str | None:
    """The filesystem type mounted at `path` (the topmost mount), or None."""
    entry = mountinfo.find(path)
    return entry.fstype if entry is not None else None


def _is_ivdfs_mount_process(pid: int, mountpoint: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    args = [os.fsdecode(a) for a in argv if a]
    runs_ivdfs = any(a == "ivdfs" or a.endswith("/ivdfs") for a in args[:3])
    if not runs_ivdfs or "mount" not in args:
        return False
    # The mountpoint is an argument, relative to the process's working directory.
    return any(os.path.normpath(cwd / a) == str(mountpoint) for a in args[1:] if a)


def find_mount_process(mountpoint: Path) -> int | None:
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and _is_ivdfs_mount_process(int(entry), mountpoint):
            return int(entry)
    return None


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has finished; only its parent's wait is missing


def umount(mountpoint: Path, timeout: float) -> int:
    mp = Path(os.path.abspath(mountpoint.expanduser()))
    kind = mount_type(mp)
    if kind is None:
        raise UserError(f"{mp} is not mounted", ExitCode.MOUNTPOINT)
    if kind != FSTYPE:
        raise UserError(f"{mp} is not an ivdfs mount (it is {kind})", ExitCode.MOUNTPOINT)
    pid = find_mount_process(mp)
    r = subprocess.run(
        ["fusermount3", "-u", str(mp)], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if r.returncode != 0:
        reason = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"status {r.returncode}"
        if pid is None or "busy" not in reason.lower():
            raise UserError(f"cannot unmount {mp}: {reason}", ExitCode.MOUNTPOINT)
        # Busy: with --volumes kernel, guest filesystems hold our files open and only ivdfs
        # can take them down first; SIGTERM makes it detach them, then unmount itself.
        log.info("%s is busy; asking ivdfs (pid %d) to detach its volumes and stop", mp, pid)
        os.kill(pid, signal.SIGTERM)
    if pid is None:
        return ExitCode.OK  # mounted by other means (another namespace): nothing to wait for
    # The process still closes VDDK handles, ends access and deletes --snapshot-now snapshots.
    deadline = time.monotonic() + timeout
    delay = 0.01
    while _running(pid):
        if time.monotonic() > deadline:
            raise UserError(
                f"unmounted {mp}, but its ivdfs process {pid} is still running after "
                f"{timeout:.0f} s",
                ExitCode.INTERNAL,
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    if mount_type(mp) == FSTYPE:
        raise UserError(f"cannot unmount {mp}: it is still busy", ExitCode.MOUNTPOINT)
    return ExitCode.OK


def end_access(server: ServerConfig, libdir: Path, ivd_text: str) -> int:
    vs = VSphere(server)
    try:
        thumbprint = vs.connect()
        ivd = vs.find_ivd(ivd_text)
        try:
            lib = VddkLibrary(libdir)
            lib.init()
        except BackendError as e:
            raise UserError(str(e), ExitCode.VDDK) from None
        try:
            s = server
            access = Access(
                lib,
                ServerTarget(s.host, s.port, s.user, s.password, thumbprint),
                DiskTarget(ivd.id, ivd.datastore.moref),
                ACCESS_IDENTITY,
            )
            try:
                access.recover()
            except BackendError as e:
                raise UserError(str(e), ExitCode.VDDK) from None
        finally:
            lib.exit()
        print(f"ended VDDK access to IVD {ivd.name} ({ivd.id}) on {ivd.datastore.name}")
        log.info("EndAccess for IVD %s done", ivd.id)
        return ExitCode.OK
    finally:
        vs.close()
        sys.stdout.flush()
