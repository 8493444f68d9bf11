"""`ivdfs umount` and `ivdfs end-access`: running ivdfs as a service, and crash recovery.

Main thread only; both block (on the ivdfs process ending, or on VDDK).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from ivdfs.config import ACCESS_IDENTITY, ServerConfig
from ivdfs.errors import BackendError, ExitCode, UserError
from ivdfs.inventory.vsphere import VSphere
from ivdfs.vddk.connection import Access, DiskTarget, ServerTarget
from ivdfs.vddk.library import VddkLibrary

log = logging.getLogger(__name__)

FSTYPE = "fuse.ivdfs"


def _unescape(field: str) -> str:
    # /proc/self/mountinfo octal-escapes space, tab, newline and backslash.
    return field.encode().decode("unicode_escape")


def mount_type(path: Path) -> str | None:
    """The filesystem type mounted at `path` (the topmost mount), or None."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) == str(path):
                found = fields[sep + 1]
    return found


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
        raise UserError(f"cannot unmount {mp}: {reason}", ExitCode.MOUNTPOINT)
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
