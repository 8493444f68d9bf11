"""Mount orchestration: cheap checks first, then library, vCenter, tree, FUSE, ordered teardown.

Concurrency: runs on the main thread. Detaching forks before anything starts threads or calls
VDDK's InitEx (VDDK wants InitEx after any fork); the parent waits on a pipe until the child's
mount is ready, so start-up errors still reach the terminal with a non-zero exit.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from ivdfs import mountinfo
from ivdfs.config import ACCESS_IDENTITY, MountConfig
from ivdfs.errors import BackendError, ExitCode, NotFound, UserError
from ivdfs.fs.operations import FILE_TIMEOUT, Operations
from ivdfs.inventory.model import Ivd, Snapshot
from ivdfs.inventory.snapshot_now import TemporarySnapshots
from ivdfs.inventory.vsphere import VSphere
from ivdfs.io import stats as io_stats
from ivdfs.io.block_cache import BlockCache, scan_segment_bytes
from ivdfs.io.prefetch import DEFAULT_IN_FLIGHT as PREFETCH_IN_FLIGHT
from ivdfs.io.prefetch import Prefetcher
from ivdfs.io.readahead import raise_read_ahead
from ivdfs.tree.tree import Tree
from ivdfs.vddk.connection import DiskTarget, ServerTarget
from ivdfs.vddk.errors import VddkLoadError
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.retry import RetryingDisk
from ivdfs.vddk.worker import OpenDisk, VddkService
from ivdfs.volumes import setup as volumes_setup
from ivdfs.volumes.base import VolumeBackend

log = logging.getLogger(__name__)

# /.ivdfs/stats: run-time statistics, readable by whoever can read the mount.
STATS_DIR = ".ivdfs"
# Kernel read-ahead of the mount, in blocks (raised through sysfs when permitted).
READ_AHEAD_BLOCKS = 4

# FUSE options a user may add with -o; anything that could make the mount writable is refused.
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
ALLOWED_FUSE_PREFIXES = ("fsname=", "subtype=", "max_read=")


def check_fuse_options(options: tuple[str, ...]) -> None:
    for opt in options:
        if opt in ALLOWED_FUSE_OPTIONS or opt.startswith(ALLOWED_FUSE_PREFIXES):
            continue
        if opt in ("rw", "suid", "dev"):
            raise UserError(f"-o {opt} is not allowed: ivdfs mounts are read-only and safe")
        raise UserError(
            f"unsupported FUSE option -o {opt}; supported: "
            f"{', '.join(sorted(ALLOWED_FUSE_OPTIONS))}, fsname=, subtype="
        )


def check_mountpoint(mp: Path) -> None:
    try:
        st = mp.stat()
    except FileNotFoundError:
        raise UserError(f"mountpoint {mp} does not exist", ExitCode.MOUNTPOINT) from None
    except OSError as e:
        raise UserError(f"mountpoint {mp}: {e.strerror}", ExitCode.MOUNTPOINT) from None
    if mountinfo.find(mp) is not None or os.path.ismount(mp):
        raise UserError(f"mountpoint {mp} is already a mount point", ExitCode.MOUNTPOINT)
    import stat as stat_mod

    if not stat_mod.S_ISDIR(st.st_mode):
        raise UserError(f"mountpoint {mp} is not a directory", ExitCode.MOUNTPOINT)
    try:
        if any(os.scandir(mp)):
            raise UserError(f"mountpoint {mp} is not empty", ExitCode.MOUNTPOINT)
    except PermissionError:
        raise UserError(f"mountpoint {mp}: permission denied", ExitCode.MOUNTPOINT) from None
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UserError(
            "no permission to use /dev/fuse (is the fuse3 package installed and "
            "are you allowed to use it?)",
            ExitCode.FUSE,
        )


class VddkDiskSource:
    """Adapts VddkService to the tree's DiskSource protocol."""

    def __init__(self, service: VddkService) -> None:
        self.service = service

    async def open(self, ivd: Ivd, snapshot: Snapshot) -> RetryingDisk[OpenDisk]:
        target = DiskTarget(ivd.id, ivd.datastore.moref, snapshot.id)
        return RetryingDisk(self.service, target, await self.service.open(target))


def run(cfg: MountConfig, ready: Callable[[], None] | None = None) -> int:
    """Mount and serve until unmounted or signalled. Raises UserError for start-up failures."""
    check_mountpoint(cfg.mountpoint)
    check_fuse_options(cfg.fuse_options)
    try:
        lib = VddkLibrary(cfg.vddk_libdir)
    except VddkLoadError as e:
        raise UserError(str(e), ExitCode.VDDK) from None
    volumes_factory = volumes_setup.prepare(cfg.volumes, lib)

    vs = VSphere(cfg.server)
    service: VddkService | None = None
    volumes: VolumeBackend | None = None
    temporary = TemporarySnapshots(vs)
    try:
        thumbprint = vs.connect()
        try:
            lib.init()
        except Exception as e:
            raise UserError(f"VDDK initialisation failed: {e}", ExitCode.VDDK) from None
        # Last of the start-up steps that can fail cheaply; every later failure, and the
        # unmount, deletes exactly these snapshots in the `finally` below.
        temporary.create(cfg.snapshot_now, str(cfg.mountpoint))
        s = cfg.server
        service = VddkService(
            lib,
            ServerTarget(s.host, s.port, s.user, s.password, thumbprint),
            ACCESS_IDENTITY,
            cfg.transport_modes,
            handles_per_disk=cfg.vddk_handles,
            use_async=cfg.use_async,
        )
        cache = BlockCache(
            cfg.cache_size, scan_segment_bytes(cfg.cache_size, cfg.block_size, cfg.prefetch)
        )
        tree = Tree(vs, VddkDiskSource(service), cache, cfg.block_size, refresh=cfg.refresh)
        if volumes_factory is not None:
            volumes = volumes_factory(service)
            tree.volumes, tree.mountpoint = volumes, cfg.mountpoint
        prefetcher = Prefetcher(min(cfg.prefetch, PREFETCH_IN_FLIGHT)) if cfg.prefetch else None
        tree.prefetcher, tree.max_prefetch = prefetcher, cfg.prefetch
        stats_dir = tree.add_dir(tree.root, STATS_DIR)
        tree.add_generated(stats_dir, "stats", lambda: io_stats.render(lib, cache, prefetcher))
        # The kernel keeps directory entries as long as the tree keeps a listing (no refresh:
        # as long as file attributes), so new and deleted entries show up together.
        dir_timeout = cfg.refresh if cfg.refresh > 0 else FILE_TIMEOUT
        ops = Operations(tree, dir_timeout=dir_timeout, block_size=cfg.block_size)
        options = {"fsname=ivdfs", "subtype=ivdfs", "ro", "default_permissions", *cfg.fuse_options}
        try:
            pyfuse3.init(ops, str(cfg.mountpoint), options)
        except RuntimeError as e:
            raise UserError(f"cannot mount on {cfg.mountpoint}: {e}", ExitCode.FUSE) from None
        log.info("mounted %s on %s", cfg.server.host, cfg.mountpoint)
        if ready is not None:
            ready()
        clean = False
        try:
            trio.run(
                _serve,
                prefetcher,
                lambda: _log_stats(lib, cache, True, prefetcher),
                volumes,
                lambda: _tune_read_ahead(cfg),
            )
            clean = True
        finally:
            # Unmount only on a clean exit: after a crash the mountpoint stays visibly broken
            # ("Transport endpoint is not connected") instead of looking like an empty snapshot.
            still_mounted = mountinfo.find(cfg.mountpoint) is not None
            pyfuse3.close(unmount=clean and still_mounted)
            if clean:
                log.info("unmounted %s", cfg.mountpoint)
        _log_stats(lib, cache, cfg.debug, prefetcher)
        return ExitCode.OK
    finally:
        # Volumes go first: VixMntapi needs the VDDK control thread and must Exit before
        # VixDiskLib does. Kernel volumes were normally detached in _stop_on_signal while FUSE
        # still served; after a crash this runs once the FUSE connection is gone.
        # Each step runs even when an earlier one failed: a stuck volume must not cost the
        # EndAccess calls (vMotion) or leave --snapshot-now snapshots behind.
        steps: list[tuple[str, Callable[[], object]]] = []
        if volumes is not None:
            steps.append(("detaching volumes", volumes.close_blocking))
        if service is not None:
            steps.append(("closing VDDK handles", service.close_all))
        # After every handle is closed: vSphere may refuse to delete a snapshot in use.
        steps += [
            ("deleting --snapshot-now snapshots", temporary.delete_all),
            ("VixDiskLib_Exit", lib.exit),
            ("logging out of vCenter", vs.close),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as e:
                log.error("%s failed: %s", what, e)


async def _serve(
    prefetcher: Prefetcher | None,
    log_stats: Callable[[], None],
    volumes: VolumeBackend | None = None,
    after_init: Callable[[], None] | None = None,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, volumes)
        nursery.start_soon(_stats_on_signal, log_stats)
        if after_init is not None:
            nursery.start_soon(trio.to_thread.run_sync, after_init)
        if prefetcher is not None:
            # Owned by this nursery: the cancel below ends every outstanding prefetch.
            await nursery.start(prefetcher.run)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def _tune_read_ahead(cfg: MountConfig) -> None:
    """Runs in a thread once the loop serves requests: the kernel sets a FUSE mount's
    read-ahead when INIT is answered, undoing an earlier change, and a stat of the mount
    returns only after INIT."""
    try:
        os.stat(cfg.mountpoint)
    except OSError as e:
        log.debug("read-ahead left alone: %s", e)
        return
    # Whole-block requests with several in flight, instead of the default 128 KiB.
    raise_read_ahead(cfg.mountpoint, READ_AHEAD_BLOCKS * cfg.block_size // 1024)


async def _stats_on_signal(log_stats: Callable[[], None]) -> None:
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            log_stats()


async def _stop_on_signal(volumes: VolumeBackend | None = None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            if volumes is not None:
                # While pyfuse3.main still serves: loop devices read through this mount, and
                # their umount/detach would hang (and FUSE stay busy) if nobody answered.
                await volumes.aclose()
            pyfuse3.terminate()
            return


def _log_stats(
    lib: VddkLibrary, cache: BlockCache, debug: bool, prefetcher: Prefetcher | None = None
) -> None:
    io_stats.log_stats(log, logging.INFO if debug else logging.DEBUG, lib, cache, prefetcher)


def daemonize_and_run(cfg: MountConfig) -> int:
    """Fork; the child mounts and reports readiness (or its error) to the waiting parent."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            msg = pipe.read().decode("utf-8", "replace")
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

    os.close(r)
    os.setsid()

    def ready() -> None:
        os.write(w, b"OK")
        os.close(w)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    code: int = ExitCode.INTERNAL
    try:
        code = run(cfg, ready)
    except UserError as e:
        _report(w, e.exit_code, e.message)
        code = e.exit_code
    except NotFound as e:  # e.g. --snapshot-now names no IVD
        _report(w, ExitCode.NOT_FOUND, str(e))
        code = ExitCode.NOT_FOUND
    except BackendError as e:  # vCenter failed an operation at start-up
        _report(w, ExitCode.VSPHERE, str(e))
        code = ExitCode.VSPHERE
    except BaseException as e:
        _report(w, ExitCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        log.exception("internal error")
    os._exit(int(code))


def _report(w: int, code: int, message: str) -> None:
    try:
        os.write(w, f"ERR {int(code)}\t{message}".encode())
        os.close(w)
    except OSError:
        pass  # already reported ready; the error goes to the log only
