"""Mount orchestration: the composition root. Cheap checks first, then everything acquired in
order and released in the reverse order, whatever happens.

Role: `run` builds the mount inside an ExitStack (as s3ql's mount.py does): each resource's
release is registered right after it is acquired, and each release step runs even when an
earlier one failed (a stuck volume must not cost the EndAccess calls or leave --snapshot-now
snapshots behind). The holdings journal (`ivdfs.journal`) is the first thing on the stack, so
it is finished last, with the exit code, once everything else was released: what is still held
then stays in it for `ivdfs umount` to undo. The pieces live in rooms of their own: the checks
in `ivdfs.preflight`, signals in `ivdfs.signals`, the kernel's session in `ivdfs.fs.session`,
detaching in `ivdfs.daemon`, logging in `ivdfs.logs`.

Concurrency: runs on the main thread; the trio loop runs on it too, while the mount serves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Callable
from types import TracebackType
from typing import Any

import trio

from ivdfs.config import ACCESS_IDENTITY, MountConfig
from ivdfs.errors import ExitCode, FuseError, Interrupted, IvdfsError, UserError, exit_code_of
from ivdfs.forensics.evidence import Evidence, Source
from ivdfs.forensics.writer import AuditLog, start_fields
from ivdfs.fs.operations import FILE_TIMEOUT, Operations
from ivdfs.fs.session import FuseSession, invalidate_attrs, invalidate_entry
from ivdfs.inventory.snapshot_now import TemporarySnapshots
from ivdfs.inventory.vsphere import VSphere
from ivdfs.io import stats as io_stats
from ivdfs.io.block_cache import BlockCache, scan_segment_bytes
from ivdfs.io.prefetch import DEFAULT_IN_FLIGHT as PREFETCH_IN_FLIGHT
from ivdfs.io.prefetch import Prefetcher
from ivdfs.journal import Journal
from ivdfs.preflight import check_mountpoint, fuse_options
from ivdfs.signals import MountSignals
from ivdfs.tree.catalog import STATS_DIR, Subset
from ivdfs.tree.tree import Tree
from ivdfs.vddk.connection import ServerTarget
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.service import DiskService, ServiceDisks
from ivdfs.volumes import setup as volumes_setup
from ivdfs.volumes.base import Background

log = logging.getLogger(__name__)

# Set to 1, the disk service uses its connection-cap and access policy from before issue 28;
# only scripts/bench sets it, to measure both side by side.
LEGACY_LIFETIME_ENV = "IVDFS_BENCH_LEGACY_LIFETIME"
# What the journal may still hold when the mount ends, as the error names it.
HOLDINGS_NAMES = {
    "snapshots": "temporary snapshots",
    "prepared": "prepared IVDs (vMotion blocked)",
    "run_dirs": "guest volume directories",
    "vixmntapi": "VixMntapi's FUSE mounts",
    "appliances": "libguestfs appliances",
}


def _step(what: str, fn: Callable[[], object]) -> Callable[[], None]:
    """A teardown step whose failure is logged and does not stop the steps after it."""

    def step() -> None:
        try:
            fn()
        except Exception as e:
            log.error("%s failed: %s", what, e, exc_info=not isinstance(e, OSError | UserError))

    return step


def run(cfg: MountConfig, ready: Callable[[], None] | None = None) -> int:
    """Mount and serve until unmounted or signalled. Raises UserError (or Interrupted) for
    start-up failures, after releasing whatever was acquired."""
    signals = MountSignals()
    signals.install()
    ending = _Ending()

    def now_ready() -> None:
        ending.started = True
        if ready is not None:
            ready()

    try:
        with contextlib.ExitStack() as stack:
            try:
                ending.code = _run(cfg, now_ready, signals, stack, ending)
            finally:
                signals.stopping = True  # from here on the ExitStack tears down
    except BaseException as e:
        if ending.started and isinstance(e, IvdfsError) and not isinstance(e, Interrupted):
            # Whoever started the mount is gone or not watching stderr: the log must say it.
            log.error("%s", e)
        raise
    return ending.code


@dataclasses.dataclass
class _Ending:
    """How the mount ended: its exit code, which the journal's end may still change."""

    code: int = ExitCode.OK
    started: bool = False  # reported ready


def _finish_journal(record: Journal, ending: _Ending) -> Callable[..., bool]:
    """The journal's end, first on the stack and so the last release: it goes if nothing is
    held any more, else it stays (with the exit code) for `ivdfs umount`."""

    def finish(
        _type: type[BaseException] | None, exc: BaseException | None, _tb: TracebackType | None
    ) -> bool:
        if exc is not None:
            record.finish(exit_code_of(exc))
            return False
        left = record.finish(ending.code)
        if left and ending.code == ExitCode.OK:
            # The teardown logged each failure with its remedy; the exit status must not
            # say all is well while a snapshot or vMotion block stays behind.
            log.error(
                "the mount ended but left %s behind; `%s` undoes them",
                ", ".join(HOLDINGS_NAMES[k] for k in left),
                record.record().umount_advice(),
            )
            ending.code = ExitCode.VSPHERE if "snapshots" in left else ExitCode.INTERNAL
        return False

    return finish


def _run(
    cfg: MountConfig,
    ready: Callable[[], None],
    signals: MountSignals,
    stack: contextlib.ExitStack,
    ending: _Ending,
) -> int:
    check_mountpoint(cfg.mountpoint)
    options = fuse_options(
        cfg.options, cfg.refresh if cfg.refresh > 0 else FILE_TIMEOUT, cfg.block_size
    )
    lib = VddkLibrary(cfg.vddk_libdir)
    volumes_factory = volumes_setup.prepare(cfg.volume_settings, lib)
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
    stack.push(_finish_journal(record, ending))
    audit = _open_audit(cfg, signals, stack)
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
        on_detach=invalidate_entry,
        on_attrs=invalidate_attrs,
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
    session = FuseSession(cfg.mountpoint, cfg.block_size)
    session.open(ops, options.libfuse)
    stack.callback(_step("unmounting", session.close))
    record.set("state", "serving")
    log.info("mounted %s on %s", s.host, cfg.mountpoint)
    signals.check()
    ready()
    session.clean = False  # until the loop returns: a crash while serving leaves it visible
    try:
        trio.run(_serve, signals, session, service, tree, prefetcher, volumes)
    except Exception as e:
        raise FuseError(f"the FUSE session failed: {e}") from None
    if not ops.initialized:
        raise FuseError(
            f"the kernel ended the FUSE session of {cfg.mountpoint} before it started "
            "(libfuse refused it; see the log)"
        )
    session.clean = True
    if signals.received is None and session.mounted():
        # Nobody unmounted it and no stop signal came: the kernel ended the connection (an
        # abort through /sys/fs/fuse/connections/N/abort). Readers already see ENOTCONN; take
        # the dead mount away rather than leave it behind, and say so.
        raise FuseError(
            f"the FUSE connection of {cfg.mountpoint} was aborted while mounted; unmounted it"
        )
    record.set("state", "stopping")
    log.info("unmounting %s", cfg.mountpoint)
    level = logging.INFO if cfg.debug else logging.DEBUG
    stack.callback(_step("statistics", lambda: io_stats.log_report(log, level, report())))
    return ExitCode.OK


def _open_audit(
    cfg: MountConfig, signals: MountSignals, stack: contextlib.ExitStack
) -> AuditLog | None:
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


async def _serve(
    signals: MountSignals,
    session: FuseSession,
    service: DiskService,
    tree: Tree,
    prefetcher: Prefetcher | None,
    volumes: Any,
) -> None:
    with signals.to_loop():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, session, volumes)
            nursery.start_soon(trio.to_thread.run_sync, session.after_init)
            await nursery.start(service.run)
            await nursery.start(tree.catalog.run)
            await nursery.start(tree.listings.run)
            if prefetcher is not None:
                # Owned by this nursery: the cancel below ends every outstanding prefetch.
                await nursery.start(prefetcher.run)
            if isinstance(volumes, Background):
                await nursery.start(volumes.run)  # guestfs: helpers' events, idle appliances
            await session.serve()
            nursery.cancel_scope.cancel()


async def _stop_on_signal(signals: MountSignals, session: FuseSession, volumes: Any) -> None:
    await signals.wait_for_stop()  # from now on, further signals are logged and ignored
    if volumes is not None:
        # While the session still serves: loop devices read through this mount, and their
        # umount/detach would hang (and FUSE stay busy) if nobody answered.
        await volumes.aclose()
    session.terminate()
