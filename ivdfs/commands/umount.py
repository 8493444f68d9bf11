"""`ivdfs umount`: stop a mount without cutting off its readers, and undo a dead one.

A live mount is unmounted like umount(8) would: when programs hold files (or a working
directory) inside it or inside its guest volumes, it refuses with exit 8 and names them, unless
`--force` (the daemon stops anyway; they get I/O errors) or `--lazy` (detached now, ended when
the last file closes). The only holders it stops by itself are ivdfs's own guest volumes (the
daemon detaches them on SIGTERM). It then waits for the daemon to finish its teardown and
reports a daemon that died on the way (with where its log is), undoing what that one left. A
mount whose process is already gone is undone from its journal (`commands.recover`). A mount
is recognised by its journal and process, which a custom fsname/subtype does not change.

Main thread only; blocking.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
from pathlib import Path

from ivdfs import journal, mountinfo
from ivdfs.commands import recover
from ivdfs.errors import ExitCode, MountpointError, UserError
from ivdfs.processes import holders

log = logging.getLogger(__name__)

FSTYPE = "fuse.ivdfs"


class StillRunning(UserError):
    """The mount is gone but its process is not: its teardown hangs (exit 1)."""

    exit_code = ExitCode.INTERNAL


def _fusermount(mp: Path, lazy: bool) -> str | None:
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mp)]
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or [f"status {r.returncode}"])[-1]


def umount(
    mountpoint: Path, timeout: float, force: bool, lazy: bool, connection: recover.Connection
) -> int:
    mp = Path(os.path.abspath(mountpoint.expanduser()))
    rec = journal.find(mp)
    if rec is None:
        return _without_journal(mp)
    if not rec.alive:
        print(
            f"ivdfs: the process of {mp} (pid {rec.pid}) is gone; undoing what it held", flush=True
        )
        return recover.recover(rec, connection)
    start = rec.doc.get("pid_start")
    if mountinfo.find(mp) is not None:
        err = _fusermount(mp, lazy)
        if err is not None:
            if "busy" not in err.lower():
                raise MountpointError(f"cannot unmount {mp}: {err}")
            roots = [str(mp), *recover.run_dirs(rec)]
            own = {rec.pid, *recover.leftovers(rec).helpers}
            users = holders(roots, own | {os.getpid()})
            if users and not force:
                names = "; ".join(str(h) for h in users[:5])
                more = f" and {len(users) - 5} more" if len(users) > 5 else ""
                raise MountpointError(
                    f"{mp} is busy: {names}{more}; stop them first, or use --force (they get "
                    "I/O errors) or --lazy (the mount ends when they are done)"
                )
            # Only ivdfs's own guest volumes (or --force): the daemon detaches them first.
            log.info(
                "%s is busy with its guest volumes; asking ivdfs (pid %d) to stop", mp, rec.pid
            )
            os.kill(rec.pid, signal.SIGTERM)
        elif lazy:
            print(f"detached {mp}; ivdfs (pid {rec.pid}) ends when its last file is closed")
            return ExitCode.OK
    if not recover.wait_gone(rec.pid, start, timeout):
        raise StillRunning(
            f"{mp} is unmounted, but its ivdfs process {rec.pid} is still running after "
            f"{timeout:.0f} s"
        )
    return _outcome(mp, rec, connection)


def _outcome(mp: Path, rec: journal.Record, connection: recover.Connection) -> int:
    """After the daemon ended: a clean end removed its journal; anything else is reported."""
    after = journal.find(mp)
    if after is None:
        if mountinfo.find(mp) is not None:
            raise MountpointError(f"cannot unmount {mp}: it is still busy")
        return ExitCode.OK
    where = f"; see its log {after.doc['log']}" if after.doc.get("log") else ""
    if after.doc.get("state") == "exited":
        print(
            f"ivdfs: the mount of {mp} ended with status {after.doc.get('exit_code')} and "
            f"left things behind{where}; undoing them",
            flush=True,
        )
    else:
        print(
            f"ivdfs: the ivdfs process of {mp} (pid {rec.pid}) died before finishing its "
            f"teardown (killed or crashed){where}; undoing what it held",
            flush=True,
        )
    code = recover.recover(after, connection)
    return code if code != ExitCode.OK else ExitCode.INTERNAL


def _without_journal(mp: Path) -> int:
    entry = mountinfo.find(mp)
    if entry is None:
        try:
            os.stat(mp)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise MountpointError(
                    f"{mp} is a dead FUSE mount that ivdfs has no journal of; "
                    f"clear it with fusermount3 -u -z {mp}"
                ) from None
        raise MountpointError(f"{mp} is not mounted")
    if entry.fstype != FSTYPE:
        raise MountpointError(f"{mp} is not an ivdfs mount (it is {entry.fstype})")
    # An ivdfs mount without a journal (another mount namespace, or another user's runtime
    # directory): unmount it; its own process finishes the teardown.
    err = _fusermount(mp, False)
    if err is not None:
        raise MountpointError(f"cannot unmount {mp}: {err}")
    return ExitCode.OK
