"""`ivdfs check`: validate a configuration without mounting, one line per step.

Steps: certificate (TLS verification or the pinned thumbprint), login, VDDK (load, version,
optional symbols, InitEx), VDDK's vSphere plugin (libvddkVimAccess.so, which VDDK loads during
InitEx and whose failure it only logs), VixMntapi (whether libvixMntapi.so.1 loads: it needs
libfuse2), with ``--volumes guestfs`` libguestfs (KVM or TCG, as a mount would decide, and
how long one appliance took to boot), and a test ConnectEx/Open/Read of one IVD snapshot if
there is one.
Each failure keeps the exit code `ivdfs mount` would give for it; the first failure's code is
the result. VixMntapi is needed only for `--volumes vixmntapi`: otherwise its failure is a
warning that leaves the exit code alone.
Main thread only (VDDK's InitEx and Open/Close want one thread; this is it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ivdfs.commands.admin import VddkOptions
from ivdfs.config import ServerConfig
from ivdfs.errors import BackendError, ExitCode, IvdfsError, LoginRefused, Unreachable, UserError
from ivdfs.inventory.model import DiskTarget, Ivd, Snapshot
from ivdfs.inventory.tls import probe_certificate, tls_context
from ivdfs.inventory.vsphere import VSphere
from ivdfs.units import SECTOR_SIZE
from ivdfs.vddk import _cdefs
from ivdfs.vddk.connection import DiskHandle
from ivdfs.vddk.errors import VddkLoadError, VddkPluginError
from ivdfs.vddk.library import VddkLibrary
from ivdfs.vddk.mntapi import Mntapi

TEST_READ_BYTES = 64 * 1024


@dataclass
class Report:
    failures: list[tuple[str, IvdfsError]] = field(default_factory=list)

    def ok(self, step: str, text: str) -> None:
        print(f"ok    {step:<12} {text}", flush=True)

    def fail(self, step: str, error: IvdfsError) -> None:
        print(f"FAIL  {step:<12} {error}", flush=True)
        self.failures.append((step, error))

    def skip(self, step: str, text: str) -> None:
        print(f"skip  {step:<12} {text}", flush=True)

    def warn(self, step: str, text: str) -> None:
        print(f"warn  {step:<12} {text}", flush=True)


def check(
    server: ServerConfig, vddk: VddkOptions | None, transport: str | None, volumes: str = "none"
) -> int:
    """`vddk` None: no VDDK directory was configured (reported as the vddk step's failure).
    `volumes`: the --volumes mode the mount would use (VixMntapi must load for vixmntapi)."""
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
            report.ok("certificate", f"{server.host}:{server.port} {how}; SHA-1 {thumbprint}")
            vs.connect()
            logged_in = True
            report.ok("login", f"{server.user} on {vs.about}")
        except IvdfsError as e:
            report.fail("login" if isinstance(e, LoginRefused) else "certificate", e)

        try:
            if vddk is None:
                raise VddkLoadError("no VDDK directory: use --vddk-libdir DIR or IVDFS_VDDK_LIBDIR")
            lib, plugin_error = _load(vddk)
            loaded = lib
            missing = sorted(set(_cdefs.OPTIONAL) - lib.optional)
            report.ok(
                "vddk",
                f"{lib.path} (VDDK {lib.soversion}); optional functions "
                + (f"missing: {', '.join(missing)}" if missing else "all present"),
            )
        except VddkLoadError as e:
            report.fail("vddk", e)
            lib = None
        if plugin_error is not None:
            report.fail("plugin", plugin_error)
            lib = None  # InitEx was undone: nothing that talks to vSphere can work
        elif lib is not None:
            report.ok("plugin", _plugin_text())
        else:
            report.skip("plugin", "needs the VDDK library")
        _vixmntapi(report, loaded, needed=volumes == "vixmntapi")
        if volumes == "guestfs":
            _guestfs(report)

        if logged_in and lib is not None and vddk is not None:
            _test_read(report, vs, lib, server, vddk, transport)
        else:
            report.skip("read", "needs a login and a VDDK library")
    finally:
        if lib is not None:
            lib.exit()
        vs.close()
    if report.failures:
        step, first = report.failures[0]
        print(f"ivdfs: check failed at {step}: {first}", file=sys.stderr)
        return first.exit_code
    return ExitCode.OK


def _load(vddk: VddkOptions) -> tuple[VddkLibrary, VddkPluginError | None]:
    """The initialised library, or the library and its plugin failure (InitEx undone)."""
    lib = VddkLibrary(vddk.libdir)
    try:
        lib.init(vddk.config_file)
    except VddkPluginError as e:
        return lib, e
    return lib, None


def _vixmntapi(report: Report, lib: VddkLibrary | None, needed: bool) -> None:
    if lib is None:
        report.skip("vixmntapi", "needs the VDDK library")
        return
    try:
        mntapi = Mntapi(lib)
    except VddkLoadError as e:
        if needed:
            report.fail("vixmntapi", e)
        else:
            report.warn("vixmntapi", f"{e} (needed only for --volumes vixmntapi)")
        return
    report.ok("vixmntapi", f"{mntapi.path} loads: --volumes vixmntapi can use it")


def _guestfs(report: Report) -> None:
    """libguestfs installed, KVM or TCG (as a mount would decide), and one real boot."""
    from ivdfs.volumes import guestfs

    missing = guestfs.missing_prerequisites()
    if missing is not None:
        report.fail("guestfs", UserError(f"{missing}; install {guestfs.PACKAGES}"))
        return
    accelerator = guestfs.probe_accelerator()
    try:
        seconds = guestfs.boot_test(accelerator)
    except RuntimeError as e:
        report.fail(
            "guestfs",
            UserError(f"an appliance did not boot under {accelerator.describe()}: {e}"),
        )
        return
    report.ok("guestfs", f"an appliance booted in {seconds:.1f} s under {accelerator.describe()}")


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
        report.fail("read", Unreachable(f"listing IVDs: {e}"))
        return
    if found is None:
        report.skip("read", "no IVD has a snapshot to test with")
        return
    ivd, snap = found
    target = DiskTarget.of(ivd, snap)
    handle = DiskHandle(lib, vddk.server(server, vs.thumbprint), target, transport)
    try:
        handle.open()
        n = min(TEST_READ_BYTES, handle.capacity_bytes) // SECTOR_SIZE * SECTOR_SIZE
        if n:
            handle.read_into(0, bytearray(n))
        report.ok(
            "read",
            f"{n} bytes of IVD {ivd.name} ({ivd.id}) snapshot {snap.id} "
            f"via {handle.transport or 'VDDK'}",
        )
    except BackendError as e:
        report.fail("read", e)
    finally:
        try:
            handle.close()
        except BackendError:
            pass  # the read's own failure is the one to report
