"""Mount orchestration: cheap checks first, then everything acquired in order and released in
the reverse order, whatever happens.

Role: `run` builds the mount inside an ExitStack (as s3ql's mount.py does): each resource's
release is registered right after it is acquired, and each release step runs even when an
earlier one failed (a stuck volume must not cost the EndAccess calls or leave --snapshot-now
snapshots behind). The journal (`ivdfs.journal`) records what is held, so `ivdfs umount` can
undo a mount whose process was killed. Signals: SIGTERM, SIGINT and SIGHUP stop the mount at any
stage (during start-up: what was acquired is released and the exit is 128+signal); signals that
arrive while stopping are logged and never interrupt the teardown; SIGUSR1 logs statistics.

Concurrency: runs on the main thread. Detaching forks before anything starts threads or calls
VDDK's InitEx (VDDK wants InitEx after any fork); the parent waits on a pipe until the child's
mount is ready, so start-up errors still reach the terminal with a non-zero exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import faulthandler
import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import pyfuse3
import trio

from ivdfs import journal as journal_mod
from ivdfs import mountinfo
from ivdfs.config import ACCESS_IDENTITY, MountConfig
from ivdfs.errors import (
    ExitCode,
    FuseError,
    Interrupted,
    IvdfsError,
    MountpointError,
    UserError,
    exit_code_of,
)
from ivdfs.forensics.evidence import Evidence, Source
from ivdfs.forensics.writer import AuditLog, start_fields
from ivdfs.fs.connection import tune_connection
from ivdfs.fs.operations import FILE_TIMEOUT, Operations, Presentation
from ivdfs.inventory.model import DiskTarget, Ivd, Snapshot
from ivdfs.inventory.snapshot_now import TemporarySnapshots
from ivdfs.inventory.vsphere import VSphere
from ivdfs.io import stats as io_stats
from ivdfs.io.block_cache import BlockCache, scan_segment_bytes
from ivdfs.io.prefetch import DEFAULT_IN_FLIGHT as PREFETCH_IN_FLIGHT
from ivdfs.io.prefetch import Prefetcher
from ivdfs.io.readahead import raise_read_ahead
from ivdfs.journal import Journal
from ivdfs.tree.catalog import STATS_DIR, Subset
from ivdfs.tree.tree import Tree
from ivdfs.vddk.connection import ServerTarget
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.service import DiskService, Slot
from ivdfs.volumes import setup as volumes_setup
from ivdfs.volumes.base import Background

log = logging.getLogger(__name__)

# /.ivdfs/stats: run-time statistics, readable by whoever can read the mount.
# Kernel read-ahead of the mount, in blocks (raised through sysfs when permitted).
READ_AHEAD_BLOCKS = 4
# pyfuse3 worker tasks: requests that wait for a slow disk must not hold up the others.
MAX_FUSE_TASKS = 512
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Set to 1, the disk service uses its connection-cap and access policy from before issue 28;
# only scripts/bench sets it, to measure both side by side.
LEGACY_LIFETIME_ENV = "IVDFS_BENCH_LEGACY_LIFETIME"


class Signals:
    """Stop and statistics signals for the whole life of the process (main thread)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopping = False
        self.log_stats: Callable[[], None] | None = None

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None and not self.stopping:
            self.received = signum
            log.info("received %s; stopping", name)
        else:
            log.warning("received %s while stopping; the teardown goes on", name)

    def _on_usr1(self, _signum: int, _frame: FrameType | None) -> None:
        if self.log_stats is not None:
            self.log_stats()

    def check(self) -> None:
        """Between start-up steps: stop now if asked to."""
        if self.received is not None:
            raise Interrupted(self.received)


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
    stale = journal_mod.find(mp)
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


class ServiceDisk:
    """The tree's view of one snapshot's disk, over the disk service."""

    def __init__(self, service: DiskService, slot: Slot) -> None:
        self._service = service
        self._slot = slot

    async def capacity(self) -> int:
        return await self._service.capacity(self._slot)

    async def sector_size(self) -> int:
        return await self._service.sector_size(self._slot)

    async def read(self, start_sector: int, nbytes: int, background: bool = False) -> bytearray:
        return await self._service.read(self._slot, start_sector, nbytes, background)

    async def allocated(self, start: int, end: int, granularity: int) -> list[tuple[int, int]]:
        return await self._service.allocated(self._slot, start, end, granularity)

    def hold(self) -> None:
        self._service.hold(self._slot)

    def release(self) -> None:
        self._service.release(self._slot)

    def forget(self) -> None:
        self._service.forget(self._slot.target)


class ServiceDisks:
    def __init__(self, service: DiskService) -> None:
        self.service = service

    def disk(self, ivd: Ivd, snapshot: Snapshot) -> ServiceDisk:
        target = DiskTarget.of(ivd, snapshot)
        return ServiceDisk(self.service, self.service.slot(target))


def _step(what: str, fn: Callable[[], object]) -> Callable[[], None]:
    """A teardown step whose failure is logged and does not stop the steps after it."""

    def run() -> None:
        try:
            fn()
        except Exception as e:
            log.error("%s failed: %s", what, e, exc_info=not isinstance(e, OSError | UserError))

    return run


def run(cfg: MountConfig, ready: Callable[[], None] | None = None) -> int:
    """Mount and serve until unmounted or signalled. Raises UserError (or Interrupted) for
    start-up failures, after releasing whatever was acquired."""
    signals = Signals()
    signals.install()
    journal: list[Journal] = []  # set by _run as soon as it exists
    started = False

    def now_ready() -> None:
        nonlocal started
        started = True
        if ready is not None:
            ready()

    try:
        with contextlib.ExitStack() as stack:
            try:
                code = _run(cfg, now_ready, signals, stack, journal)
            finally:
                signals.stopping = True  # from here on the ExitStack tears down
    except BaseException as e:
        if journal:
            journal[0].finish(exit_code_of(e))
        if started and isinstance(e, IvdfsError) and not isinstance(e, Interrupted):
            # Whoever started the mount is gone or not watching stderr: the log must say it.
            log.error("%s", e)
        raise
    if journal:
        left = journal[0].finish(code)
        if left and code == ExitCode.OK:
            # The teardown logged each failure with its remedy; the exit status must not
            # say all is well while a snapshot or vMotion block stays behind.
            what = {"snapshots": "temporary snapshots", "prepared": "prepared IVDs (vMotion "
                    "blocked)", "run_dirs": "guest volume directories",
                    "vixmntapi": "VixMntapi's FUSE mounts",
                    "appliances": "libguestfs appliances"}  # fmt: skip
            log.error(
                "the mount ended but left %s behind; `%s` undoes them",
                ", ".join(what[k] for k in left),
                journal[0].record().umount_advice(),
            )
            code = ExitCode.VSPHERE if "snapshots" in left else ExitCode.INTERNAL
    return code


def _run(
    cfg: MountConfig,
    ready: Callable[[], None] | None,
    signals: Signals,
    stack: contextlib.ExitStack,
    journal: list[Journal],
) -> int:
    check_mountpoint(cfg.mountpoint)
    options = fuse_options(
        cfg.options, cfg.refresh if cfg.refresh > 0 else FILE_TIMEOUT, cfg.block_size
    )
    lib = VddkLibrary(cfg.vddk_libdir)
    volumes_factory = volumes_setup.prepare(cfg.volume_settings, lib)
    audit = _open_audit(cfg, signals, stack)
    s = cfg.server
    record = Journal(
        cfg.mountpoint,
        server=s.host,
        port=s.port,
        user=s.user,
        identity=ACCESS_IDENTITY,
        vddk_libdir=str(cfg.vddk_libdir),
        log=str(cfg.log) if cfg.log else None,
    )
    journal.append(record)
    signals.check()

    vs = VSphere(cfg.server, pool=cfg.vcenter_connections)
    stack.callback(_step("logging out of vCenter", vs.close))
    thumbprint = vs.connect()
    record.set("thumbprint", thumbprint)
    if audit is not None:
        audit.start(**start_fields(server=f"{s.host}:{s.port}", user=s.user,
                                   thumbprint=thumbprint, mountpoint=cfg.mountpoint))  # fmt: skip
    signals.check()
    lib.init(cfg.vddk_config)
    private_dir = lib.private_dir
    if private_dir is not None:
        # VDDK's (and VixMntapi's) tmpDirectory: VixMntapi mounts guest volumes in it.
        record.add("run_dirs", str(private_dir))

    def vddk_exit() -> None:
        lib.exit()  # removes the private directory
        if private_dir is not None and not private_dir.exists():
            record.drop_value("run_dirs", str(private_dir))

    stack.callback(_step("VixDiskLib_Exit", vddk_exit))
    service = DiskService(
        lib,
        ServerTarget(s.host, s.port, s.user, s.password, thumbprint, cfg.nfc_host_port),
        ACCESS_IDENTITY,
        cfg.transport,
        # Not an option: the policy before issue 28, for scripts/bench's side-by-side row.
        dataclasses.replace(cfg.limits, legacy=os.environ.get(LEGACY_LIFETIME_ENV) == "1"),
        holdings=record,
    )
    # After every later step's release: handles, then EndAccess of whatever is still prepared.
    stack.callback(_step("closing VDDK handles", service.close_all))
    subset = Subset(
        frozenset(cfg.datastores) if cfg.datastores else None,
        frozenset(vs.find_ivd(i).id for i in cfg.ivds) if cfg.ivds else None,
    )
    temporary = TemporarySnapshots(vs, service, record)
    # Registered before creating: a failure half way still deletes what was made. Runs before
    # the VDDK teardown, so a crash there cannot leave these snapshots behind.
    stack.callback(_step("deleting --snapshot-now snapshots", temporary.delete_all))
    temporary.create(
        [vs.find_ivd(text) for text in cfg.snapshot_now], str(cfg.mountpoint), signals.check
    )
    signals.check()

    cache = BlockCache(
        cfg.cache_size, scan_segment_bytes(cfg.cache_size, cfg.block_size, cfg.prefetch)
    )
    prefetcher = Prefetcher(min(cfg.prefetch, PREFETCH_IN_FLIGHT)) if cfg.prefetch else None
    volumes = volumes_factory(service, record) if volumes_factory is not None else None
    if volumes is not None:
        stack.callback(_step("detaching volumes", volumes.close_blocking))
    tree = Tree(
        vs,
        ServiceDisks(service),
        cache,
        cfg.tree,
        subset=subset,
        prefetcher=prefetcher,
        volumes=volumes,
        mountpoint=cfg.mountpoint,
        on_detach=_invalidate_entry,
        on_attrs=_invalidate_attrs,
        evidence=Evidence(Source(f"{s.host}:{s.port}", thumbprint), cfg.hashes, audit),
    )
    stats_dir = tree.add_dir(tree.root, STATS_DIR)

    def report() -> dict[str, Any]:
        out = {
            **io_stats.collect(lib, cache, prefetcher),
            "disks": service.report(),
            "tree": tree.report(),
        }
        if isinstance(volumes, Background):
            out["volumes"] = volumes.report()
        return out

    tree.add_generated(stats_dir, "stats", lambda: io_stats.dump(report()))
    signals.log_stats = lambda: io_stats.log_report(log, logging.INFO, report())
    ops = Operations(tree, options.look)
    try:
        # A list, not a set: the order is ours, and a set's would change with the hash seed.
        pyfuse3.init(ops, str(cfg.mountpoint), list(options.libfuse))  # type: ignore[arg-type]
    except RuntimeError as e:
        raise FuseError(f"cannot mount on {cfg.mountpoint}: {e}") from None
    served = _Served()
    stack.callback(_step("unmounting", lambda: _close_fuse(cfg.mountpoint, served)))
    record.set("state", "serving")
    log.info("mounted %s on %s", s.host, cfg.mountpoint)
    signals.check()
    if ready is not None:
        ready()
    served.clean = False  # until the loop returns: a crash while serving leaves it visible
    try:
        trio.run(_serve, signals, service, tree, prefetcher, volumes, lambda: _after_init(cfg))
    except Exception as e:
        raise FuseError(f"the FUSE session failed: {e}") from None
    if not ops.initialized:
        raise FuseError(
            f"the kernel ended the FUSE session of {cfg.mountpoint} before it started "
            "(libfuse refused it; see the log)"
        )
    if signals.received is None and mountinfo.find(cfg.mountpoint) is not None:
        # Nobody unmounted it and no stop signal came: the kernel ended the connection (an
        # abort through /sys/fs/fuse/connections/N/abort). Readers already see ENOTCONN; take
        # the dead mount away rather than leave it behind, and say so.
        served.clean = True
        raise FuseError(
            f"the FUSE connection of {cfg.mountpoint} was aborted while mounted; unmounted it"
        )
    served.clean = True
    record.set("state", "stopping")
    log.info("unmounting %s", cfg.mountpoint)
    stack.callback(
        _step("statistics", lambda: io_stats.log_report(log, _stats_level(cfg), report()))
    )
    return ExitCode.OK


def _open_audit(cfg: MountConfig, signals: Signals, stack: contextlib.ExitStack) -> AuditLog | None:
    """The audit log, verified and locked; it ends (with `stop`) after the unmount, which
    is registered later, so every close is in it."""
    if cfg.audit_log is None:
        return None
    audit = AuditLog.open(cfg.audit_log, not_under=cfg.mountpoint)

    def close(
        _type: type[BaseException] | None, exc: BaseException | None, _tb: TracebackType | None
    ) -> bool:
        if exc is not None:
            reason = f"failed: {exc}"
        elif signals.received is not None:
            reason = signal.Signals(signals.received).name
        else:
            reason = "unmounted"
        try:
            audit.close(reason=reason)
        except Exception as e:
            log.error("closing the audit log failed: %s", e)
        return False

    stack.push(close)
    return audit


@dataclass
class _Served:
    # False only while serving: a start-up error (or signal) before it still unmounts.
    clean: bool = True


def _close_fuse(mountpoint: Path, served: _Served) -> None:
    # Unmount only on a clean exit: after a crash the mountpoint stays visibly broken
    # ("Transport endpoint is not connected") instead of looking like an empty snapshot.
    still_mounted = mountinfo.find(mountpoint) is not None
    pyfuse3.close(unmount=served.clean and still_mounted)
    if served.clean and still_mounted and mountinfo.find(mountpoint) is not None:
        # libfuse leaves a connection that was aborted mounted (its fd reports POLLERR).
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                       stdin=subprocess.DEVNULL, capture_output=True)  # fmt: skip


def _stats_level(cfg: MountConfig) -> int:
    return logging.INFO if cfg.debug else logging.DEBUG


def _invalidate_entry(parent_ino: int, name: str) -> None:
    # Asynchronous (a thread of pyfuse3's): safe from a request handler; the kernel then
    # drops the entry and forgets its inode, which frees the node.
    pyfuse3.invalidate_entry_async(parent_ino, os.fsencode(name), ignore_enoent=True)


def _invalidate_attrs(ino: int) -> None:
    # Attributes only: the page cache stays. Without writeback caching this does not block.
    try:
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except OSError as e:
        log.debug("attributes of inode %d stay cached: %s", ino, e)


async def _serve(
    signals: Signals,
    service: DiskService,
    tree: Tree,
    prefetcher: Prefetcher | None,
    volumes: Any,
    after_init: Callable[[], None],
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, signals, volumes)
        nursery.start_soon(_stats_on_signal, signals)
        nursery.start_soon(trio.to_thread.run_sync, after_init)
        await nursery.start(service.run)
        await nursery.start(tree.catalog.run)
        await nursery.start(tree.listings.run)
        if prefetcher is not None:
            # Owned by this nursery: the cancel below ends every outstanding prefetch.
            await nursery.start(prefetcher.run)
        if isinstance(volumes, Background):
            await nursery.start(volumes.run)  # guestfs: helpers' events, idle appliances
        await pyfuse3.main(max_tasks=MAX_FUSE_TASKS)
        nursery.cancel_scope.cancel()


def _after_init(cfg: MountConfig) -> None:
    """Runs in a thread once the loop serves requests: the kernel sets a FUSE mount's
    read-ahead when INIT is answered, undoing an earlier change, and a stat of the mount
    returns only after INIT."""
    try:
        os.stat(cfg.mountpoint)
    except OSError as e:
        log.debug("FUSE connection left alone: %s", e)
        return
    # Whole-block requests with several in flight, instead of the default 128 KiB.
    raise_read_ahead(cfg.mountpoint, READ_AHEAD_BLOCKS * cfg.block_size // 1024)
    tune_connection(cfg.mountpoint)


async def _stats_on_signal(signals: Signals) -> None:
    with trio.open_signal_receiver(signal.SIGUSR1) as received:
        async for _ in received:
            if signals.log_stats is not None:
                signals.log_stats()


async def _stop_on_signal(signals: Signals, volumes: Any) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as received:
        if signals.received is None:  # one that came before this receiver existed counts too
            async for signum in received:
                signals.received = signum
                log.info("received %s; unmounting", signal.Signals(signum).name)
                break
    # The receiver is closed: from now on, our own handlers log further signals and ignore
    # them, so nothing interrupts the teardown.
    signals.stopping = True
    if volumes is not None:
        # While pyfuse3.main still serves: loop devices read through this mount, and their
        # umount/detach would hang (and FUSE stay busy) if nobody answered.
        await volumes.aclose()
    pyfuse3.terminate()


class _ReadyPipe:
    """The detached child's report to its waiting parent: written once, then closed."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def send(self, text: str) -> bool:
        fd, self._fd = self._fd, None
        if fd is None:
            return False  # already reported; the fd may belong to another file by now
        try:
            os.write(fd, text.encode())
        except OSError:
            pass
        finally:
            os.close(fd)
        return True


def daemonize_and_run(cfg: MountConfig) -> int:
    """Fork; the child mounts and reports readiness (or its error) to the waiting parent."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        return _wait_for_child(pid, r)

    os.close(r)
    os.setsid()
    # Keep no directory of the caller busy (its filesystem could not be unmounted).
    os.chdir("/")
    pipe = _ReadyPipe(w)

    def ready() -> None:
        pipe.send("OK")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    code: int = ExitCode.INTERNAL
    try:
        code = run(cfg, ready)
    except IvdfsError as e:
        code = exit_code_of(e)
        pipe.send(f"ERR {code}\t{e}")  # after the mount was ready, run() logged it
    except BaseException as e:
        code = exit_code_of(e)
        log.exception("internal error")
        pipe.send(f"ERR {code}\tinternal error: {type(e).__name__}: {e}")
    os._exit(int(code))


def _wait_for_child(pid: int, r: int) -> int:
    chunks = []
    with os.fdopen(r, "rb") as f:
        while True:
            try:
                chunk = f.read()
            except KeyboardInterrupt:
                # Ctrl-C reaches only us (the child has its own session): pass it on, and wait
                # for the child to undo its start-up and report.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                continue
            chunks.append(chunk)
            break
    msg = b"".join(chunks).decode("utf-8", "replace")
    if msg.startswith("OK"):
        return ExitCode.OK
    if msg.startswith("ERR "):
        code_text, _, text = msg[4:].partition("\t")
        print(f"ivdfs: {text}", file=sys.stderr)
        return int(code_text)
    _, status = os.waitpid(pid, 0)
    print(
        "ivdfs: the mount process ended before the mount was ready "
        f"(status {os.waitstatus_to_exitcode(status)})",
        file=sys.stderr,
    )
    return ExitCode.INTERNAL


class _AbortedReplies(logging.Filter):
    """pyfuse3 logs an ERROR when it answers a request the kernel no longer waits for (the
    reader was interrupted, or the mount is going away): ENOENT from fuse_reply_*. Nothing was
    lost, so it is worth a debug line, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "fuse_reply_" in record.getMessage():
            if "No such file or directory" in record.getMessage():
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def quiet_aborted_replies() -> None:
    logging.getLogger("pyfuse3").addFilter(_AbortedReplies())


def enable_crash_traces(log_stream: IO[str] | None) -> None:
    """faulthandler writes a Python trace of every thread to the log if VDDK (or anything)
    crashes the process, so a dead mount leaves a reason behind."""
    faulthandler.enable(file=log_stream if log_stream is not None else sys.stderr)
