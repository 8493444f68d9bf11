"""`ivdfs check`: validate a configuration without mounting, one line per step.

Steps: certificate (TLS verification or the pinned thumbprint), login, VDDK (load, version,
optional symbols, InitEx), VDDK's vSphere plugin (libvddkVimAccess.so, which VDDK loads during
InitEx and whose failure it only logs), VixMntapi (whether libvixMntapi.so.1 loads: it needs
libfuse2), with ``--volumes guestfs`` libguestfs (KVM or TCG, as a mount would decide, and
how long one appliance took to boot), a test ConnectEx/Open/Read of one IVD snapshot if
there is one, and per ``--datastore-path NAME=DIR``: DIR a read-only directory, a snapshot's
VMDK found under it with its chain, and its first 64 KiB read in VDDK's local-file mode.
Each failure keeps the exit code `ivdfs mount` would give for it; the first failure's code is
the result. VixMntapi is needed only for `--volumes vixmntapi`: otherwise its failure is a
warning that leaves the exit code alone.
Main thread only (VDDK's InitEx and Open/Close want one thread; this is it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ivdfs.commands.common import Report
from ivdfs.config import ServerConfig, VddkOptions
from ivdfs.datastore.access import DirectAccess, DirectFile, NotDirect, check_directory
from ivdfs.datastore.identity import ChainChanged
from ivdfs.errors import (
    BackendError,
    IvdfsError,
    LoginRefused,
    NotFound,
    NotSupported,
    Unreachable,
    UserError,
)
from ivdfs.inventory.model import DiskTarget, Ivd, Snapshot
from ivdfs.inventory.tls import probe_certificate, tls_context
from ivdfs.inventory.vsphere import VSphere
from ivdfs.units import SECTOR_SIZE
from ivdfs.vddk import oneshot
from ivdfs.vddk.connection import DiskHandle, ServerTarget
from ivdfs.vddk.errors import VddkLoadError, VddkPluginError
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.mntapi import Mntapi

TEST_READ_BYTES = 64 * 1024


def check(
    server: ServerConfig,
    vddk: VddkOptions | None,
    transport: str | None,
    volumes: str = "none",
    datastore_paths: Sequence[tuple[str, Path]] = (),
) -> int:
    """`vddk` None: no VDDK directory was configured (reported as the vddk step's failure).
    `volumes`: the --volumes mode the mount would use (VixMntapi must load for vixmntapi).
    `datastore_paths`: --datastore-path NAME=DIR, each checked as a mount would use it."""
    report = Report()
    vs = VSphere(server)
    lib: VddkLibrary | None = None
    loaded: VddkLibrary | None = None  # even when InitEx was undone: VixMntapi lies beside it
    plugin_error: VddkPluginError | None = None
    logged_in = False
    try:
        try:
            thumbprint = probe_certificate(server, tls_context(server))
            how = (
                "NOT verified (--insecure)"
                if server.insecure
                else "matches the pinned thumbprint"
                if server.thumbprint
                else "verified"
            )
            report.ok(f"{server.host}:{server.port} {how}; SHA-1 {thumbprint}", "certificate")
            vs.connect()
            logged_in = True
            report.ok(f"{server.user} on {vs.about}", "login")
        except IvdfsError as e:
            report.error(e, "login" if isinstance(e, LoginRefused) else "certificate")

        try:
            if vddk is None:
                raise VddkLoadError("no VDDK directory: use --vddk-libdir DIR or IVDFS_VDDK_LIBDIR")
            try:
                lib = loaded = oneshot.load(vddk)
            except VddkPluginError as e:
                # InitEx was undone; the library still says where VixMntapi lies.
                plugin_error, loaded = e, VddkLibrary(vddk.libdir)
            missing = loaded.missing_optional
            report.ok(
                f"{loaded.path} (VDDK {loaded.soversion}); optional functions "
                + (f"missing: {', '.join(missing)}" if missing else "all present"),
                "vddk",
            )
        except VddkLoadError as e:
            report.error(e, "vddk")
        if plugin_error is not None:
            report.error(plugin_error, "plugin")  # nothing that talks to vSphere can work
        elif lib is not None:
            report.ok(_plugin_text(), "plugin")
        else:
            report.skip("needs the VDDK library", "plugin")
        _vixmntapi(report, loaded, needed=volumes == "vixmntapi")
        if volumes == "guestfs":
            _guestfs(report)

        if logged_in and lib is not None and vddk is not None:
            _test_read(report, vs, lib, server, vddk, transport)
        else:
            report.skip("needs a login and a VDDK library", "read")
        for name, directory in datastore_paths:
            step = f"datastore-path {name}"
            if logged_in and lib is not None:
                _direct_read(report, step, vs, lib, name, directory)
            else:
                report.skip("needs a login and a VDDK library", step)
    finally:
        if lib is not None:
            lib.exit()
        vs.close()
    if report.failures:
        step, first, _ = report.failures[0]
        print(f"ivdfs: check failed at {step}: {first}", file=sys.stderr)
    return report.code


def _vixmntapi(report: Report, lib: VddkLibrary | None, needed: bool) -> None:
    if lib is None:
        report.skip("needs the VDDK library", "vixmntapi")
        return
    try:
        mntapi = Mntapi(lib)
    except VddkLoadError as e:
        if needed:
            report.error(e, "vixmntapi")
        else:
            report.warn(f"{e} (needed only for --volumes vixmntapi)", "vixmntapi")
        return
    report.ok(f"{mntapi.path} loads: --volumes vixmntapi can use it", "vixmntapi")


def _guestfs(report: Report) -> None:
    """libguestfs installed, KVM or TCG (as a mount would decide), and one real boot."""
    from ivdfs.volumes import guestfs

    missing = guestfs.missing_prerequisites()
    if missing is not None:
        report.error(UserError(f"{missing}; install {guestfs.PACKAGES}"), "guestfs")
        return
    accelerator = guestfs.probe_accelerator()
    try:
        seconds, features = guestfs.boot_test(accelerator)
    except RuntimeError as e:
        failure = UserError(f"an appliance did not boot under {accelerator.describe()}: {e}")
        report.error(failure, "guestfs")
        return
    supported, lacking = guestfs.describe_features(features)
    text = f"an appliance booted in {seconds:.1f} s under {accelerator.describe()}; {supported}"
    if lacking is None:
        report.ok(text, "guestfs")
    else:
        report.warn(f"{text}; {lacking}", "guestfs")


def _plugin_text() -> str:
    """Where the plugin was loaded from, if this process has it mapped."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and "/libvddkVimAccess.so" in fields[5]:
                return f"vSphere plugin {fields[5].strip()} loaded"
    return "VDDK reported no failure loading its vSphere plugin libvddkVimAccess.so"


def _first_snapshot(vs: VSphere) -> tuple[Ivd, Snapshot] | None:
    for ds in vs.datastores():
        for ivd_id in vs.list_ivds(ds):
            ivd = vs.ivd(ds, ivd_id)
            snaps = vs.snapshots(ivd)
            if snaps:
                return ivd, snaps[0]
    return None


def _test_read(
    report: Report,
    vs: VSphere,
    lib: VddkLibrary,
    server: ServerConfig,
    vddk: VddkOptions,
    transport: str | None,
) -> None:
    try:
        found = _first_snapshot(vs)
    except BackendError as e:
        report.error(Unreachable(f"listing IVDs: {e}"), "read")
        return
    if found is None:
        report.skip("no IVD has a snapshot to test with", "read")
        return
    ivd, snap = found
    where = ServerTarget.of(server, vs.thumbprint, vddk.nfc_host_port)
    try:
        with oneshot.handle(lib, where, DiskTarget.of(ivd, snap), transport) as handle:
            n = min(TEST_READ_BYTES, handle.capacity_bytes) // SECTOR_SIZE * SECTOR_SIZE
            if n:
                handle.read_into(0, bytearray(n))
        via = handle.transport or "VDDK"
        report.ok(f"{n} bytes of IVD {ivd.name} ({ivd.id}) snapshot {snap.id} via {via}", "read")
    except BackendError as e:
        report.error(e, "read")


# Snapshots `ivdfs check` tries per --datastore-path before it says none could be read: one
# IVD's files may be missing or mid-consolidation without the datastore being unusable.
DIRECT_TRIES = 10


def _direct_read(
    report: Report, step: str, vs: VSphere, lib: VddkLibrary, name: str, directory: Path
) -> None:
    """--datastore-path NAME=DIR as a mount would use it: DIR a read-only directory, NAME a
    datastore, a snapshot's file found under DIR with its chain (the newest snapshot of each
    IVD in turn, up to DIRECT_TRIES), and its first 64 KiB read through VDDK's local-file
    mode."""
    try:
        root = check_directory(name, directory)
    except UserError as e:
        report.error(e, step)
        return
    access = DirectAccess({name: root})
    first_failure = ""
    tried = 0
    try:
        stores = [d for d in vs.datastores() if name in (d.name, d.moref)]
        if not stores:
            raise NotFound(f"vCenter has no datastore {name}")
        ds = stores[0]
        for ivd_id in vs.list_ivds(ds):
            if tried >= DIRECT_TRIES:
                break
            ivd = vs.ivd(ds, ivd_id)
            snaps = vs.snapshots(ivd)
            if not snaps:
                continue
            tried += 1
            snap = snaps[-1]
            path = vs.snapshot_path(ivd.id, ds, snap.id)
            try:
                direct = access.locate(ds.name, ds.moref, path)
            except (NotDirect, ChainChanged) as e:
                first_failure = first_failure or f"{path} of IVD {ivd.name} ({ivd.id}): {e}"
                continue
            _read_directly(report, step, lib, directory, ivd, snap, direct)
            return
    except (BackendError, NotFound, NotSupported) as e:
        report.error(e, step)
        return
    if not tried:
        report.skip(f"{directory}: no IVD on datastore {ds.name} has a snapshot to test with",
                    step)  # fmt: skip
        return
    report.error(UserError(f"{directory}: no snapshot of {tried} tried is readable here; "
                           f"first: {first_failure}"), step)  # fmt: skip


def _read_directly(
    report: Report,
    step: str,
    lib: VddkLibrary,
    directory: Path,
    ivd: Ivd,
    snap: Snapshot,
    direct: DirectFile,
) -> None:
    handle = DiskHandle(lib, None, DiskTarget.of(ivd, snap), path=str(direct.file))
    try:
        handle.open()
        n = min(TEST_READ_BYTES, handle.capacity_bytes) // SECTOR_SIZE * SECTOR_SIZE
        if n:
            handle.read_into(0, bytearray(n))
    except BackendError as e:
        report.error(e, step)
        return
    finally:
        try:
            handle.close()
        except BackendError as e:
            report.warn(f"closing {direct.file}: {e}", step)
    links = len(direct.identity.links)
    report.ok(
        f"{directory}: {direct.file} ({links} link{'s' if links != 1 else ''}), snapshot "
        f"{snap.id} of IVD {ivd.name}: {n} bytes read directly",
        step,
    )
