"""The cheap checks before a mount acquires anything: the mountpoint and the -o options.

Role: `check_mountpoint` refuses a mountpoint that is missing, not an empty directory, already
mounted, or left behind by a killed ivdfs (its journal says what `ivdfs umount` must undo), and
a /dev/fuse we may not use. `fuse_options` turns -o into libfuse's options and the look of the
files (owner, mask), refusing whatever could make the mount writable or that libfuse would
reject only after the mount was reported ready. Each failure is one UserError line.

Concurrency: pure, or reads of the filesystem; main thread, before anything starts.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ivdfs import journal, mountinfo
from ivdfs.errors import FuseError, MountpointError, UserError
from ivdfs.fs.operations import Presentation


@dataclass(frozen=True)
class FuseOptions:
    libfuse: tuple[str, ...]
    look: Presentation


# FUSE options a user may add with -o; anything that could make the mount writable, or that
# libfuse would reject at INIT (after we reported the mount ready), is refused up front.
ALLOWED_FUSE_OPTIONS = {
    "allow_other",
    "allow_root",
    "default_permissions",
    "noatime",
    "nodev",
    "nosuid",
    "noexec",
    "ro",
    "auto_unmount",
}
# fsname=/subtype= replace ours; uid=/gid=/umask= are ivdfs's own (as sshfs and rclone).
NAMED_OPTIONS = ("fsname", "subtype", "uid", "gid", "umask")


def fuse_options(options: tuple[str, ...], dir_timeout: float, block_size: int) -> FuseOptions:
    named: dict[str, str] = {}
    flags: list[str] = []
    for opt in options:
        key, eq, value = opt.partition("=")
        if eq and key in NAMED_OPTIONS:
            if not value or not value.isascii() or "," in value:
                raise UserError(f"-o {opt}: a non-empty ASCII value without commas is needed")
            named[key] = value
        elif opt in ALLOWED_FUSE_OPTIONS:
            if opt not in flags:
                flags.append(opt)
        elif opt in ("rw", "suid", "dev"):
            raise UserError(f"-o {opt} is not allowed: ivdfs mounts are read-only and safe")
        else:
            raise UserError(
                f"unsupported FUSE option -o {opt}; supported: "
                f"{', '.join(sorted(ALLOWED_FUSE_OPTIONS))}, "
                + ", ".join(f"{k}=" for k in NAMED_OPTIONS)
            )
    try:
        uid = int(named.get("uid", os.getuid()))
        gid = int(named.get("gid", os.getgid()))
        umask = int(named.get("umask", "022"), 8)
    except ValueError:
        raise UserError("-o uid=, gid= take numbers and umask= an octal mask") from None
    if not (0 <= uid < 2**32 and 0 <= gid < 2**32 and 0 <= umask <= 0o777):
        raise UserError("-o uid=, gid= or umask= out of range")
    libfuse = [
        f"fsname={named.get('fsname', 'ivdfs')}",
        f"subtype={named.get('subtype', 'ivdfs')}",
        "ro",
        # The kernel checks permissions against the modes ivdfs reports (uid/gid/umask).
        "default_permissions",
    ]
    libfuse += [f for f in flags if f not in libfuse]
    look = Presentation(uid, gid, umask, dir_timeout, block_size)
    return FuseOptions(tuple(libfuse), look)


def check_mountpoint(mp: Path) -> None:
    stale = journal.find(mp)
    if stale is not None:
        if stale.alive:
            raise MountpointError(f"{mp} is already served by ivdfs (pid {stale.pid})")
        raise MountpointError(
            f"{mp} has the leftovers of an ivdfs mount whose process (pid {stale.pid}) died; "
            f"run `{stale.umount_advice()}` first, which undoes them"
        )
    try:
        st = mp.stat()
    except FileNotFoundError:
        raise MountpointError(f"mountpoint {mp} does not exist") from None
    except OSError as e:
        hint = (
            "; a FUSE mount there has died: clear it with fusermount3 -u"
            if e.errno == errno.ENOTCONN
            else ""
        )
        raise MountpointError(f"mountpoint {mp}: {e.strerror}{hint}") from None
    if mountinfo.find(mp) is not None or os.path.ismount(mp):
        raise MountpointError(f"mountpoint {mp} is already a mount point")
    if not stat.S_ISDIR(st.st_mode):
        raise MountpointError(f"mountpoint {mp} is not a directory")
    try:
        if any(os.scandir(mp)):
            raise MountpointError(f"mountpoint {mp} is not empty")
    except PermissionError:
        raise MountpointError(f"mountpoint {mp}: permission denied") from None
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise FuseError(
            "no permission to use /dev/fuse (is the fuse3 package installed and "
            "are you allowed to use it?)"
        )
