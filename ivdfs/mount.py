"""Mount orchestration: cheap checks first, then library, vCenter, tree, FUSE, ordered teardown.

Concurrency: runs on the main thread. Detaching forks before anything starts threads or calls
VDDK's InitEx (VDDK wants InitEx after any fork); the parent waits on a pipe until the child's
mount is ready, so start-up errors still reach the terminal with a non-zero exit.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from ivdfs.config import ACCESS_IDENTITY, MountConfig
from ivdfs.errors import ExitCode, UserError
from ivdfs.fs.operations import Operations
from ivdfs.inventory.model import Ivd, Snapshot
from ivdfs.inventory.vsphere import VSphere
from ivdfs.io.block_cache import BlockCache
from ivdfs.tree.tree import Tree
from ivdfs.vddk.connection import DiskTarget, ServerTarget
from ivdfs.vddk.errors import VddkLoadError
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.retry import RetryingDisk
from ivdfs.vddk.worker import OpenDisk, VddkService

log = logging.getLogger(__name__)

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


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def mounted_paths() -> set[str]:
    paths: set[str] = set()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                # Field 5 is the mount point, with space, tab, newline and backslash as \ooo.
                paths.add(_OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), line.split()[4]))
    except OSError:
        pass
    return paths


def check_mountpoint(mp: Path) -> None:
    try:
        st = mp.stat()
    except FileNotFoundError:
        raise UserError(f"mountpoint {mp} does not exist", ExitCode.MOUNTPOINT) from None
    except OSError as e:
        raise UserError(f"mountpoint {mp}: {e.strerror}", ExitCode.MOUNTPOINT) from None
    if str(mp.resolve()) in mounted_paths() or os.path.ismount(mp):
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

    vs = VSphere(cfg.server)
    service: VddkService | None = None
    try:
        thumbprint = vs.connect()
        try:
            lib.init()
        except Exception as e:
            raise UserError(f"VDDK initialisation failed: {e}", ExitCode.VDDK) from None
        s = cfg.server
        service = VddkService(
            lib,
            ServerTarget(s.host, s.port, s.user, s.password, thumbprint),
            ACCESS_IDENTITY,
            cfg.transport_modes,
        )
        cache = BlockCache(cfg.cache_size)
        tree = Tree(vs, VddkDiskSource(service), cache, cfg.block_size)
        ops = Operations(tree, block_size=cfg.block_size)
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
            trio.run(_serve)
            clean = True
        finally:
            # Unmount only on a clean exit: after a crash the mountpoint stays visibly broken
            # ("Transport endpoint is not connected") instead of looking like an empty snapshot.
            still_mounted = str(cfg.mountpoint.resolve()) in mounted_paths()
            pyfuse3.close(unmount=clean and still_mounted)
            if clean:
                log.info("unmounted %s", cfg.mountpoint)
        _log_stats(lib, cache, cfg.debug)
        return ExitCode.OK
    finally:
        if service is not None:
            service.close_all()
        lib.exit()
        vs.close()


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def _log_stats(lib: VddkLibrary, cache: BlockCache, debug: bool) -> None:
    level = logging.INFO if debug else logging.DEBUG
    for name, st in sorted(lib.stats.snapshot().items()):
        avg = st.bytes // st.calls if st.calls else 0
        log.log(
            level,
            "%s: %d calls, %d errors, %.3f s, %d bytes (avg %d)",
            name,
            st.calls,
            st.errors,
            st.micros / 1e6,
            st.bytes,
            avg,
        )
    c = cache.stats
    log.log(level, "cache: %d hits, %d misses, %d shared misses", c.hits, c.misses, c.shared_misses)


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
