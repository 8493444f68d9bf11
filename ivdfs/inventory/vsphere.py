"""pyvmomi session: TLS checks, login, VStorageObjectManager queries and snapshot tasks.

Concurrency: every method blocks; callers on the trio thread use `trio.to_thread.run_sync`.
One lock serialises use of the SOAP stub, which is not thread-safe, and re-login. Waiting for a
task holds the lock only for each poll, so queries from other threads interleave.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pyVim import connect as pyvim_connect
from pyVmomi import vim, vmodl

from ivdfs.config import ServerConfig
from ivdfs.errors import BackendError, ExitCode, NotFound, UserError
from ivdfs.inventory.model import Datastore, Ivd, Snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")
CONNECT_TIMEOUT = 20.0
TASK_TIMEOUT = 3600.0
# Polls of a task's state start fast (vcsim and small disks finish in milliseconds) and back
# off to this interval, which keeps a long snapshot task from hammering vCenter.
TASK_POLL_MAX = 1.0

# Called while a task runs with the seconds elapsed so far (for progress on a terminal).
Progress = Callable[[float], None]
CALL_TIMEOUT = 120.0


def sha1_thumbprint(der: bytes) -> str:
    digest = hashlib.sha1(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def tls_context(server: ServerConfig) -> ssl.SSLContext:
    """Verified by default; a pinned thumbprint replaces CA checks; --insecure disables both."""
    if server.insecure or server.thumbprint:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context()
    if server.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(server.ca_file))
        except (OSError, ssl.SSLError) as e:
            raise UserError(f"cannot load CA file {server.ca_file}: {e}", ExitCode.TLS) from None
    return ctx


def probe_certificate(server: ServerConfig, ctx: ssl.SSLContext) -> str:
    """Handshake once to verify the certificate and learn its SHA-1 thumbprint for VDDK."""
    try:
        with socket.create_connection((server.host, server.port), timeout=CONNECT_TIMEOUT) as raw:
            with ctx.wrap_socket(raw, server_hostname=server.host) as tls:
                der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as e:
        raise UserError(
            f"TLS certificate of {server.host}:{server.port} failed verification "
            f"({e.verify_message}); add its CA with --ca-file, pin it with --thumbprint, "
            "or (lab only) use --insecure",
            ExitCode.TLS,
        ) from None
    except ssl.SSLError as e:
        raise UserError(
            f"TLS handshake with {server.host}:{server.port} failed: {e}", ExitCode.TLS
        ) from None
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise UserError(
            f"cannot reach {server.host}:{server.port}: {reason}", ExitCode.CONNECT
        ) from None
    if not der:
        raise UserError(f"{server.host}:{server.port} presented no certificate", ExitCode.TLS)
    thumbprint = sha1_thumbprint(der)
    if server.thumbprint and thumbprint != server.thumbprint:
        raise UserError(
            f"certificate thumbprint mismatch for {server.host}: the server presented "
            f"{thumbprint}, --thumbprint pins {server.thumbprint}",
            ExitCode.TLS,
        )
    if server.insecure:
        log.warning(
            "TLS verification disabled (--insecure); server certificate SHA-1 %s", thumbprint
        )
    return thumbprint


class VSphere:
    """A logged-in session to vCenter or ESXi."""

    def __init__(self, server: ServerConfig) -> None:
        self.server = server
        self._lock = threading.RLock()
        self._si: Any = None
        self._content: Any = None
        self.thumbprint = ""
        self.about = ""  # product and API version, once logged in
        self._ctx: ssl.SSLContext | None = None

    # --- session -------------------------------------------------------------------------

    def connect(self) -> str:
        """Check TLS, log in; returns the server certificate's SHA-1 thumbprint."""
        self._ctx = tls_context(self.server)
        self.thumbprint = probe_certificate(self.server, self._ctx)
        self._login()
        return self.thumbprint

    def _login(self) -> None:
        s = self.server
        try:
            self._si = pyvim_connect.SmartConnect(
                host=s.host,
                port=s.port,
                user=s.user,
                pwd=s.password.reveal(),
                sslContext=self._ctx,
                connectionPoolTimeout=-1,
                # A stalled vCenter must not hang listings forever.
                httpConnectionTimeout=CALL_TIMEOUT,
            )
        except vim.fault.InvalidLogin:
            raise UserError(
                f"vCenter at {s.host} rejected user {s.user!r} or its password", ExitCode.AUTH
            ) from None
        except vim.fault.NoPermission as e:
            raise UserError(
                f"user {s.user!r} lacks privileges on {s.host}: {e.msg}", ExitCode.AUTH
            ) from None
        except ssl.SSLError as e:
            raise UserError(f"TLS failure talking to {s.host}: {e}", ExitCode.TLS) from None
        except Exception as e:  # pyvmomi raises many shapes for "this is not vSphere"
            raise UserError(
                f"{s.host}:{s.port} does not answer as a vCenter or ESXi server "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})".rstrip(),
                ExitCode.CONNECT,
            ) from None
        # RetrieveContent, not the `content` property: some servers (vcsim among them) leave
        # vStorageObjectManager out of the property fetch that `content` uses.
        self._content = self._si.RetrieveContent()
        about = self._content.about
        self.about = f"{about.fullName} (API {about.apiVersion})"
        log.info(
            "logged in to %s %s (API %s) as %s",
            about.fullName,
            about.build,
            about.apiVersion,
            s.user,
        )
        if self._content.vStorageObjectManager is None:
            raise UserError(
                f"{s.host} has no VStorageObjectManager (needs vSphere 6.5 or later)",
                ExitCode.CONNECT,
            )

    def close(self) -> None:
        with self._lock:
            if self._si is not None:
                try:
                    pyvim_connect.Disconnect(self._si)
                except Exception as e:  # logout at exit is best effort
                    log.debug("logout failed: %s", e)
                self._si = None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run a query; after an expired session or a broken connection, log in again once."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    return fn()
                except vim.fault.NotAuthenticated:
                    reason = "session expired"
                except vim.fault.NotFound as e:
                    raise NotFound(f"{what}: {e.msg or 'not found'}") from None
                except vmodl.MethodFault as e:
                    raise BackendError(f"{what}: {type(e).__name__}: {e.msg}") from None
                except (OSError, ssl.SSLError, http.client.HTTPException) as e:
                    reason = f"connection failed ({e or type(e).__name__})"
                if attempt == 2:
                    break
                log.info("vCenter %s; logging in again", reason)
                try:
                    # The certificate is checked again: VDDK keeps using the thumbprint seen first.
                    assert self._ctx is not None
                    if probe_certificate(self.server, self._ctx) != self.thumbprint:
                        raise BackendError("the server certificate changed since mounting")
                    self._login()
                except (UserError, BackendError) as e:
                    raise BackendError(f"{what}: {e}") from None
            raise BackendError(f"{what}: vCenter {reason}")

    @property
    def _vsom(self) -> Any:
        return self._content.vStorageObjectManager

    def _ds(self, ds: Datastore) -> Any:
        return vim.Datastore(ds.moref, self._si._stub)

    # --- queries -------------------------------------------------------------------------

    def datastores(self) -> list[Datastore]:
        def run() -> list[Datastore]:
            content = self._content
            view = content.viewManager.CreateContainerView(
                content.rootFolder, [vim.Datastore], True
            )
            try:
                spec = vmodl.query.PropertyCollector.FilterSpec(
                    objectSet=[
                        vmodl.query.PropertyCollector.ObjectSpec(
                            obj=view,
                            skip=True,
                            selectSet=[
                                vmodl.query.PropertyCollector.TraversalSpec(
                                    name="view",
                                    path="view",
                                    skip=False,
                                    type=vim.view.ContainerView,
                                )
                            ],
                        )
                    ],
                    propSet=[
                        vmodl.query.PropertyCollector.PropertySpec(
                            type=vim.Datastore, pathSet=["name"]
                        )
                    ],
                )
                result = content.propertyCollector.RetrieveContents([spec])
            finally:
                view.Destroy()
            out = [
                Datastore(name=str(oc.propSet[0].val), moref=str(oc.obj._moId))
                for oc in result
                if oc.propSet
            ]
            return sorted(out, key=lambda d: d.name)

        return self._call("listing datastores", run)

    def list_ivds(self, datastore: Datastore) -> list[str]:
        def run() -> list[str]:
            ids = self._vsom.ListVStorageObject(datastore=self._ds(datastore)) or []
            return sorted(str(i.id) for i in ids)

        return self._call(f"listing IVDs on {datastore.name}", run)

    def ivd(self, datastore: Datastore, ivd_id: str) -> Ivd:
        def run() -> Ivd:
            obj = self._vsom.RetrieveVStorageObject(
                id=vim.vslm.ID(id=ivd_id), datastore=self._ds(datastore)
            )
            cfg = obj.config
            backing = cfg.backing
            return Ivd(
                id=ivd_id,
                name=str(cfg.name or ""),
                datastore=datastore,
                capacity_bytes=int(cfg.capacityInMB or 0) * 1024 * 1024,
                create_time=cfg.createTime,
                backing_path=str(getattr(backing, "filePath", "") or ""),
                provisioning=str(getattr(backing, "provisioningType", "") or ""),
                # consumerId is 6.7+ and absent from some servers' replies (vcsim 0.24).
                consumers=tuple(
                    str(c.id) for c in (getattr(cfg, "consumerId", None) or []) if c is not None
                ),
            )

        return self._call(f"retrieving IVD {ivd_id}", run)

    def snapshots(self, ivd: Ivd) -> list[Snapshot]:
        def run() -> list[Snapshot]:
            info = self._vsom.RetrieveSnapshotInfo(
                id=vim.vslm.ID(id=ivd.id), datastore=self._ds(ivd.datastore)
            )
            return [
                Snapshot(
                    id=str(s.id.id),
                    ivd_id=ivd.id,
                    create_time=s.createTime,
                    description=str(s.description or ""),
                )
                for s in (info.snapshots or [])
            ]

        return self._call(f"listing snapshots of IVD {ivd.id}", run)

    # --- what users type: names or UUIDs ---------------------------------------------------

    def find_datastore(self, name: str) -> Datastore:
        stores = self.datastores()
        for ds in stores:
            if ds.name == name or ds.moref == name:
                return ds
        names = ", ".join(d.name for d in stores) or "none"
        raise UserError(f"no datastore {name!r} (datastores: {names})", ExitCode.NOT_FOUND)

    def all_ivds(self, datastore: Datastore | None = None) -> list[Ivd]:
        """Every IVD (of one datastore), sorted by name, datastore and id; one query per IVD."""
        stores = [datastore] if datastore is not None else self.datastores()
        out = [self.ivd(ds, i) for ds in stores for i in self.list_ivds(ds)]
        return sorted(out, key=lambda v: (v.name, v.datastore.name, v.id))

    def find_ivd(self, text: str, datastore: Datastore | None = None) -> Ivd:
        """The IVD whose UUID is `text`, else the one IVD named `text`."""
        stores = [datastore] if datastore is not None else self.datastores()
        # A UUID costs one listing per datastore; only a name needs every IVD's record.
        for ds in stores:
            if text in self.list_ivds(ds):
                return self.ivd(ds, text)
        matches = [ivd for ds in stores for ivd in self.all_ivds(ds) if ivd.name == text]
        if len(matches) == 1:
            return matches[0]
        where = f" on datastore {datastore.name}" if datastore is not None else ""
        if not matches:
            raise UserError(f"no IVD with UUID or name {text!r}{where}", ExitCode.NOT_FOUND)
        ids = ", ".join(f"{m.id} on {m.datastore.name}" for m in matches)
        raise UserError(
            f"{len(matches)} IVDs are named {text!r}{where} ({ids}); use the UUID",
            ExitCode.USAGE,
        )

    def find_snapshot(self, ivd: Ivd, snapshot_id: str) -> Snapshot:
        snaps = self.snapshots(ivd)
        for snap in snaps:
            if snap.id == snapshot_id:
                return snap
        raise UserError(
            f"IVD {ivd.name or ivd.id} has no snapshot {snapshot_id!r} "
            f"({len(snaps)} snapshot{'s' if len(snaps) != 1 else ''}: run ivdfs ls "
            f"{ivd.datastore.name} {ivd.id})",
            ExitCode.NOT_FOUND,
        )

    # --- tasks ---------------------------------------------------------------------------

    def wait_task(
        self,
        task: Any,
        what: str,
        progress: Progress | None = None,
        timeout: float = TASK_TIMEOUT,
    ) -> Any:
        """Wait for `task` to end; return its info.result or raise BackendError.

        Reads only info.state, info.result and info.error through the PropertyCollector:
        pyvmomi's WaitForTask deserialises the whole TaskInfo, which fails when info.entity is
        not a ManagedEntity (the VStorageObjectManager's tasks on vcsim). This works on real
        vCenter too.
        """
        pc = vmodl.query.PropertyCollector
        moid = task._moId
        start = time.monotonic()
        interval = 0.01

        def poll() -> dict[str, Any]:
            # Bound to the current stub each time: a re-login in _call replaces it.
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=vim.Task(moid, self._si._stub), skip=False)],
                propSet=[
                    pc.PropertySpec(
                        type=vim.Task, pathSet=["info.state", "info.result", "info.error"]
                    )
                ],
            )
            result = self._content.propertyCollector.RetrievePropertiesEx(
                [spec], pc.RetrieveOptions()
            )
            return {p.name: p.val for o in (result.objects if result else []) for p in o.propSet}

        while True:
            props = self._call(what, poll)
            state = props.get("info.state")
            if state == vim.TaskInfo.State.success:
                return props.get("info.result")
            if state == vim.TaskInfo.State.error:
                fault = props.get("info.error")
                if isinstance(fault, vim.fault.NotFound):
                    raise NotFound(f"{what}: {fault.msg or 'not found'}")
                text = getattr(fault, "msg", "") or type(fault).__name__
                raise BackendError(f"{what} failed: {text}")
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                raise BackendError(f"{what}: task {moid} still {state} after {timeout:.0f} s")
            if progress is not None:
                progress(elapsed)
            time.sleep(interval)
            interval = min(interval * 2, TASK_POLL_MAX)

    def create_snapshot(
        self, ivd: Ivd, description: str, progress: Progress | None = None
    ) -> Snapshot:
        what = f"snapshot of IVD {ivd.name or ivd.id}"
        task = self._call(
            what,
            lambda: self._vsom.VStorageObjectCreateSnapshot_Task(
                id=vim.vslm.ID(id=ivd.id),
                datastore=self._ds(ivd.datastore),
                description=description,
            ),
        )
        result = self.wait_task(task, what, progress)
        snap_id = str(result.id)
        for snap in self.snapshots(ivd):
            if snap.id == snap_id:
                return snap
        return Snapshot(id=snap_id, ivd_id=ivd.id, description=description)

    def delete_snapshot(self, ivd: Ivd, snapshot_id: str, progress: Progress | None = None) -> None:
        what = f"deleting snapshot {snapshot_id} of IVD {ivd.name or ivd.id}"
        task = self._call(
            what,
            lambda: self._vsom.DeleteSnapshot_Task(
                id=vim.vslm.ID(id=ivd.id),
                datastore=self._ds(ivd.datastore),
                snapshotId=vim.vslm.ID(id=snapshot_id),
            ),
        )
        self.wait_task(task, what, progress)
