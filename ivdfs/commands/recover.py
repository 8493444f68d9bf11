"""Undoing a dead mount: what a killed ivdfs left attached, mounted, prepared or snapshotted.

Role: `leftovers` finds, from the kernel and the journal, what a mount's guest volumes left:
libguestfs appliances (helper and qemu processes, checked by start time), mounts under its run
directories (and the FUSE drivers serving them: ntfs-3g, fusefat, fuse2fs), loop devices whose
backing file is inside the mountpoint, VixMntapi's own FUSE mounts of the disks it opened
(journaled, or found by the disk name in VixMntapi's .info files when the mount was killed during
OpenDisks) and the loop devices on them, and the FUSE mount itself. `recover` undoes those, then
(with a vCenter session and VDDK, only if the journal holds any) deletes the temporary
snapshots and calls EndAccess for every prepared IVD, VMware's order. Each step prints one
line; what cannot be undone is named with the command that would undo it. The journal is
removed only when nothing is left.

Concurrency: main thread; blocking (commands, vCenter, VDDK).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ivdfs import journal, mountinfo
from ivdfs.commands.common import Report
from ivdfs.config import ACCESS_IDENTITY, ServerConfig, VddkOptions
from ivdfs.errors import BackendError, ExitCode, IvdfsError, NotFound, UserError, exit_code_of
from ivdfs.inventory.model import Datastore, DiskTarget, Ivd
from ivdfs.inventory.vsphere import VSphere
from ivdfs.processes import naming, under
from ivdfs.rundirs import remove_tree
from ivdfs.vddk import mntapi, oneshot
from ivdfs.vddk.connection import ServerTarget

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 60.0
SYS_BLOCK = Path("/sys/block")

# Resolves the connection options (flags, environment, config file) when they are needed; the
# argument is the VDDK directory the mount used, for when none is configured.
Connection = Callable[[Path | None], tuple[ServerConfig, VddkOptions]]


@dataclass
class Leftovers:
    volume_mounts: list[str] = field(default_factory=list)  # deepest first
    helpers: list[int] = field(default_factory=list)  # FUSE drivers serving them
    loops: list[str] = field(default_factory=list)  # /dev/loopN
    vixmntapi: list[str] = field(default_factory=list)  # VixMntapi's /run/vmware/fuse/<n>
    fuse_mounted: bool = False


def run_dirs(rec: journal.Record) -> list[str]:
    dirs = set(rec.run_dirs)
    # A crash between mkdtemp and the journal write: the name says whose it is.
    for base in (Path("/run"), Path("/tmp")):
        with contextlib.suppress(OSError):
            dirs |= {str(p) for p in base.glob(f"ivdfs-{rec.pid}-*")}
    return sorted(dirs)


def loop_devices_under(root: str) -> list[str]:
    out = []
    for dev in sorted(SYS_BLOCK.glob("loop*")):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        # The kernel appends " (deleted)" when the backing file is gone.
        if under(backing.removesuffix(" (deleted)"), root):
            out.append(f"/dev/{dev.name}")
    return out


def appliance_processes(rec: journal.Record) -> list[int]:
    """The --volumes guestfs helpers and their qemu processes that the journal names and that
    still run (the same pid and start time: a pid the system reused is not ours)."""
    out = []
    for a in rec.appliances:
        for kind in ("helper", "qemu"):
            pid, start = a.get(kind), a.get(f"{kind}_start")
            if pid and start and journal.process_start(int(pid)) == start:
                out.append(int(pid))
    return out


def leftovers(rec: journal.Record) -> Leftovers:
    found = Leftovers()
    roots = run_dirs(rec)
    mounts = [
        e.mountpoint for e in mountinfo.entries() if any(under(e.mountpoint, r) for r in roots)
    ]
    found.volume_mounts = sorted(set(mounts), key=len, reverse=True)
    found.vixmntapi = vixmntapi_mounts(rec)
    found.loops = loop_devices_under(str(rec.mountpoint))
    for path in found.vixmntapi:
        found.loops += loop_devices_under(path)
    # Appliances first: their qemu reads disk.raw of the dead mount, their helper serves a
    # volume mount; then FUSE drivers of volumes (ntfs-3g, fusefat, fuse2fs).
    found.helpers = appliance_processes(rec)
    found.helpers += [
        p for p in naming(found.volume_mounts + found.loops) if p not in found.helpers
    ]
    entry = mountinfo.find(rec.mountpoint)
    found.fuse_mounted = entry is not None and entry.fstype.startswith("fuse")
    return found


def vixmntapi_mounts(rec: journal.Record) -> list[str]:
    """VixMntapi's FUSE mounts of the disks the mount opened that are still mounted."""
    now = mntapi.fuse_mounts()
    paths: set[str] = set()
    for entry in rec.vixmntapi:
        journaled = [str(p) for p in entry.get("fuse", [])]
        if journaled:
            paths |= {p for p in journaled if p in now}
        elif entry.get("name"):
            # Killed during OpenDisks, before it noted the path: VixMntapi's .info files.
            paths |= set(mntapi.fuse_mounts_of(str(entry["name"])))
    return sorted(paths)


def _cmd(argv: list[str]) -> str | None:
    """Run a command; None if it worked, else its reason."""
    try:
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or [f"status {r.returncode}"])[-1]


def undo_local(rec: journal.Record, report: Report) -> None:
    """Appliances, volume mounts, their helpers, loop devices, temporary files and the FUSE
    mount: no credentials needed."""
    found = leftovers(rec)
    appliances = set(appliance_processes(rec))
    starts = {pid: journal.process_start(pid) for pid in appliances}
    for pid in [p for p in found.helpers if p in appliances]:
        with contextlib.suppress(ProcessLookupError):
            name = _comm(pid)
            os.kill(pid, signal.SIGKILL)
            report.ok(f"stopped appliance process {pid} ({name})")
    for pid in appliances:
        if not wait_gone(pid, starts[pid], COMMAND_TIMEOUT):
            report.fail(f"appliance process {pid} does not end", f"kill -9 {pid}")
    found.helpers = [p for p in found.helpers if p not in appliances]
    for mp in found.volume_mounts:
        err = _cmd(["umount", "--lazy", mp])
        if err is None:
            report.ok(f"unmounted guest volume {mp}")
        else:
            report.fail(f"guest volume {mp}: {err}", f"umount --lazy {mp}")
    for pid in found.helpers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a FUSE driver reading a dead mount never finishes
            report.ok(f"stopped volume driver process {pid}")
    for loop in found.loops:
        err = _cmd(["losetup", "--detach", loop])
        if err is None:
            report.ok(f"detached {loop}")
        else:
            report.fail(f"{loop}: {err}", f"losetup --detach {loop}")
    for path in found.vixmntapi:
        err = mntapi.unmount_fuse(path)  # its server, a forked copy of the dead mount, exits
        if err is None:
            report.ok(f"unmounted VixMntapi's disk mount {path}")
        else:
            report.fail(f"VixMntapi's disk mount {path}: {err}", f"umount --lazy {path}")
    if not mntapi.fuse_mounts() & set(found.vixmntapi):
        for entry in rec.vixmntapi:
            _journal_drop(rec, "vixmntapi", entry, report)
    for a in rec.appliances:
        tmp = a.get("tmp")
        if tmp and Path(tmp).exists():
            # libguestfs's overlay and sockets: files of its own, never a mount.
            shutil.rmtree(tmp, ignore_errors=True)
            if Path(tmp).exists():
                report.fail(f"cannot remove {tmp}", f"rm -r {tmp}")
                continue
            report.ok(f"removed the appliance's temporary files {tmp}")
        _journal_drop(rec, "appliances", a, report)
    for d in run_dirs(rec):
        existed = os.path.lexists(d)
        err = remove_tree(d)
        if err is not None:
            # Kept in the journal: the next `ivdfs umount` finds it again.
            report.fail(f"{d}: {err}", f"umount what is under {d}, then rm -r {d}")
            continue
        if existed:
            report.ok(f"removed {d}")
        _journal_drop(rec, "run_dirs", d, report)
    if found.fuse_mounted:
        err = _cmd(["fusermount3", "-u", "-z", str(rec.mountpoint)])
        if err is not None:
            err = _cmd(["umount", "--lazy", str(rec.mountpoint)])
        if err is None:
            report.ok(f"unmounted the dead FUSE mount {rec.mountpoint}")
        else:
            report.fail(f"{rec.mountpoint}: {err}", f"fusermount3 -u -z {rec.mountpoint}")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"


def _journal_drop(rec: journal.Record, kind: str, value: object, report: Report) -> None:
    """Strike one undone thing from the journal. A journal that cannot be written is said
    (the thing stays listed, and the next umount finds it undone already), never hidden."""
    items = rec.doc.get(kind, [])
    rec.doc[kind] = [i for i in items if i != value]
    try:
        _save(rec)
    except OSError as e:
        report.fail(
            f"cannot update the journal {rec.path}: {e.strerror or e}",
            f"check {rec.path.parent}, then run ivdfs umount {rec.mountpoint} again",
        )


def _save(rec: journal.Record) -> None:
    tmp = rec.path.with_name(f".{rec.path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec.doc, indent=1), encoding="utf-8")
    os.replace(tmp, rec.path)


def undo_remote(rec: journal.Record, connection: Connection, report: Report) -> None:
    """Temporary snapshots, then EndAccess: needs vCenter and VDDK."""
    if not rec.snapshots and not rec.prepared:
        return
    try:
        known = rec.doc.get("vddk_libdir")
        server, vddk = connection(Path(known) if known else None)
    except UserError as e:
        # No (usable) connection options: the mount's own server and certificate.
        left_behind(rec, report, e, rec.connection_options())
        return
    options = journal.connection_options(server)
    vs = VSphere(server)
    try:
        try:
            thumbprint = vs.connect()
        except IvdfsError as e:
            left_behind(rec, report, e, options)
            return
        for s in rec.snapshots:
            _delete_snapshot(vs, rec, s, report, options)
        if rec.prepared:
            _end_access(rec, server, thumbprint, vddk, report)
    finally:
        vs.close()


def left_behind(rec: journal.Record, report: Report, e: IvdfsError, options: list[str]) -> None:
    """Nothing on vCenter could be undone (`e` says why): name each thing the journal still
    holds, and the one command that undoes them all once the reason is fixed."""
    again = journal.advice("umount", str(rec.mountpoint), options=options)
    code = exit_code_of(e)
    for s in rec.snapshots:
        snap = s.get("snapshot") or "(being created)"
        report.fail(f"snapshot {snap} of IVD {s['ivd']} left: {e}", again, code)
    for p in rec.prepared:
        report.fail(f"IVD {p['ivd']} left prepared (vMotion disabled): {e}", again, code)


# How long recovery waits for a snapshot creation its process left running; after that it
# says so, and `ivdfs umount` again finishes the job.
CREATE_TASK_WAIT = 300.0


def _ivd(vs: VSphere, ivd_id: str, moref: str) -> Ivd:
    for ds in vs.datastores():
        if ds.moref == moref:
            return vs.ivd(ds, ivd_id)
    return vs.ivd(Datastore(moref, moref), ivd_id)


def _delete_snapshot(
    vs: VSphere, rec: journal.Record, s: dict[str, str], report: Report, options: list[str]
) -> None:
    snap_id = s.get("snapshot")
    try:
        ivd = _ivd(vs, s["ivd"], s["datastore"])
        if not snap_id and s.get("task"):
            # Killed while the task ran: what it made is looked for once it has ended.
            # Looking earlier would miss a snapshot the task makes later.
            what = f"the interrupted creation of a snapshot of IVD {ivd.id}"
            report.ok(f"waiting for {what} (task {s['task']}) to end")
            vs.wait_task_ended(s["task"], what, CREATE_TASK_WAIT)
        existing = vs.snapshots(ivd)
        if not snap_id:
            # The description (mount and pid) names what the interrupted task made.
            matches = [x.id for x in existing if x.description == s["description"]]
            if not matches:
                report.ok(f"no snapshot of IVD {ivd.id} was left by the interrupted creation")
                _journal_drop(rec, "snapshots", s, report)
                return
            snap_id = matches[0]
        if snap_id not in {x.id for x in existing}:
            # The mount deleted it before it died (servers fault a missing snapshot variously).
            raise NotFound(snap_id)
        vs.delete_snapshot(ivd, snap_id)
        report.ok(f"deleted snapshot {snap_id} of IVD {ivd.id} ({ivd.name})")
    except NotFound:
        report.ok(f"snapshot {snap_id} of IVD {s['ivd']} was already gone")
    except IvdfsError as e:
        remedy = (
            journal.advice("snapshot", "delete", s["ivd"], snap_id, options=options)
            if snap_id
            else journal.advice("umount", str(rec.mountpoint), options=options)
        )
        what = f"snapshot {snap_id or '(being created)'} of IVD {s['ivd']}"
        report.fail(f"{what}: {e}", remedy, exit_code_of(e))
        return
    _journal_drop(rec, "snapshots", s, report)


def _end_access(
    rec: journal.Record,
    server: ServerConfig,
    thumbprint: str,
    vddk: VddkOptions,
    report: Report,
) -> None:
    # A journal from before the identity was recorded: the only one ivdfs ever used.
    identity = str(rec.doc.get("identity") or ACCESS_IDENTITY)
    options = [*journal.connection_options(server), *vddk.options()]
    try:
        lib = oneshot.load(vddk)
    except BackendError as e:
        for p in rec.prepared:
            report.fail(
                f"IVD {p['ivd']} left prepared: VDDK: {e}",
                journal.advice("end-access", p["ivd"], options=options),
            )
        return
    try:
        where = ServerTarget.of(server, thumbprint, vddk.nfc_host_port)
        for p in rec.prepared:
            try:
                oneshot.end_access(lib, where, DiskTarget(p["ivd"], p["datastore"]), identity)
            except BackendError as e:
                remedy = journal.advice("end-access", p["ivd"], options=options)
                report.fail(f"EndAccess for IVD {p['ivd']}: {e}", remedy)
                continue
            report.ok(f"EndAccess for IVD {p['ivd']} (vMotion enabled again)")
            _journal_drop(rec, "prepared", p, report)
    finally:
        lib.exit()


def recover(rec: journal.Record, connection: Connection) -> int:
    """Undo everything a dead mount holds; 0 only when nothing is left."""
    report = Report(default_code=ExitCode.MOUNTPOINT)
    undo_local(rec, report)
    try:
        undo_remote(rec, connection, report)
    except IvdfsError as e:  # the server went away half way: what is left is named
        left_behind(rec, report, e, rec.connection_options())
    if report.failures:
        return report.code
    with contextlib.suppress(FileNotFoundError):
        rec.path.unlink()
    return ExitCode.OK


def wait_gone(pid: int, start: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while journal.process_start(pid) == start and start is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return True
