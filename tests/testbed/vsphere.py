"""Test-bed vSphere: a private vcsim (govmomi 0.24) and helpers to populate it.

Used by the t4 tests, scripts/demo and scripts/bench. ``Vcsim`` starts our launcher
(tests/testbed/vcsim/main.go, built by tests/testbed/build.sh) with a throw-away CA and
server certificate made by the ``openssl`` CLI, and offers blocking pyvmomi helpers to
create IVDs and snapshots. ``place_image`` puts the raw image of a snapshot where the
stand-in VDDK library serves it from; ``place_chain`` writes an IVD's VMDK chain (one link per
snapshot, tests/testbed/vmdk.py) under a datastore folder where vCenter's paths say, for reads
in VDDK's local-file mode (issue 24).

Disk files (the launcher's store.go): an IVD's files are ``[ds] fcd/<stem>.vmdk``,
``<stem>-000001.vmdk``, ... with a 32-hex-digit stem unrelated to its id, as on ESXi. The
newest link is the running disk (RetrieveVStorageObject's ``backing.filePath``); a snapshot
freezes it (its RetrieveSnapshotDetails ``path``) and starts the next, numbered with the lowest
number free. Deleting a snapshot consolidates its link's child into its link, as ESXi commits a
VM snapshot (assumed the same for FCDs): the child's file goes, and whoever used it (the next
snapshot, or the running disk) now names the snapshot's link.

Concurrency: a ``Vcsim`` and its helper connection belong to one thread; ``connect()``
returns an independent ServiceInstance that may be used from another thread.

Connecting (pyvmomi 9.1 against this vcsim): ``SmartConnect(host=, port=, user=, pwd=,
sslContext=ssl.create_default_context(cafile=ca_file))`` works. The launcher raises the
advertised API to 6.7, so /sdk/vimServiceVersions.xml names 6.7 and SmartConnect
negotiates ``vim.version.version12`` (6.7), which allows the VStorageObject snapshot
methods. Plain ``Connect()`` would default to ``vim.version.version9`` (5.5) unless given
``version="vim.version.version12"``. Always pass ``sslContext``: without one pyvmomi
silently disables verification for 127.0.0.1/localhost.

vcsim's tasks run synchronously, but their ``info.entity`` is the
VcenterVStorageObjectManager, which is not a ManagedEntity, so pyvmomi cannot deserialize
a whole TaskInfo (``WaitForTask`` fails). ``wait_task`` reads only ``info.state``,
``info.result`` and ``info.error`` through the PropertyCollector.

``si.content`` (pyvmomi fetches it with the undocumented ``Fetch`` method) has
``vStorageObjectManager = None`` on vcsim 0.24, which blanks it for ovftool's sake; the
``si.RetrieveContent()`` call (RetrieveServiceContent) returns it intact.

The session cookie comes quoted, as from real vCenter/ESXi: ``si._stub.cookie`` is
``vmware_soap_session="<id>"; HttpOnly``; ``si._stub.GetSessionId()`` is the bare ``<id>``.

Recipes, exactly as the tests call them (``ds = vim.Datastore(moref, si._stub)``,
``vid = vim.vslm.ID(id=...)``; pyVmomi accepts the vmodl name or the wire name of a method):

vCenter (``vsom = si.RetrieveContent().vStorageObjectManager``, a
vim.vslm.vcenter.VStorageObjectManager): ``ListVStorageObject(datastore=ds)``,
``RetrieveVStorageObject(id=vid, datastore=ds)``, ``RetrieveSnapshotInfo(id=vid,
datastore=ds)``, ``RetrieveSnapshotDetails(id=vid, datastore=ds, snapshotId=sid)`` ->
``.path``, ``.changedBlockTrackingId`` (unset when CBT was off for that snapshot),
``QueryChangedDiskAreas(id=vid, datastore=ds, snapshotId=sid, startOffset=off,
changeId=older_cbt_id_or_star)`` (wire ``VstorageObjectVCenterQueryChangedDiskAreas``) ->
``.startOffset``, ``.length``, ``.changedArea[i].start/.length``,
``SetVStorageObjectControlFlags(id=vid, datastore=ds,
controlFlags=["enableChangedBlockTracking"])`` / ``ClearVStorageObjectControlFlags(...)``,
``RetrieveVStorageObjectAssociations(ids=[vim.vslm.vcenter.RetrieveVStorageObjSpec(id=vid,
datastore=ds)])`` -> ``[i].id, .vmDiskAssociations[j].vmId/.diskKey, .fault``.

ESX (``Vcsim(esx=True)``: About.apiType "HostAgent", datacenter "ha-datacenter";
``vsom`` is a vim.vslm.host.VStorageObjectManager): ``HostCreateDisk_Task(spec=...)``,
``HostListVStorageObject(datastore=ds)``, ``HostRetrieveVStorageObject(id=vid,
datastore=ds)``, ``HostVStorageObjectRetrieveSnapshotInfo(id=vid, datastore=ds)``,
``HostVStorageObjectCreateSnapshot_Task(id=vid, datastore=ds, description=...)``,
``HostVStorageObjectDeleteSnapshot_Task(id=vid, datastore=ds, snapshotId=sid)``,
``HostDeleteVStorageObject_Task(id=vid, datastore=ds)``, ``HostRenameVStorageObject``,
``HostSet/HostClearVStorageObjectControlFlags``. A host has no RetrieveSnapshotDetails and
no QueryChangedDiskAreas for IVDs: the API defines none (pyVmomi's host type lacks them) and
the bed refuses the vCenter wire names on a host.

Faults for a missing IVD are vcsim 0.24's: NotFound from (Host)RetrieveVStorageObject,
InvalidArgument from the snapshot-info, snapshot and delete calls; NotFound from every
method vcsim lacked. ListVStorageObject on an unknown datastore moref answers an empty list
(vcsim's choice; restart_server gives datastores new morefs).

VSLM (``Vcsim(vslm=True, api_version="6.7.3")`` or later; 6.7.2 is vCenter 6.7 U2)::

    from pyVmomi import SoapStubAdapter, vslm
    stub = SoapStubAdapter(host=HOST, port=PORT, path="/vslm/sdk",
                           version="vslm.version.version15",       # see vslm_version()
                           sslContext=ctx,
                           requestContext={"vcSessionCookie": si._stub.GetSessionId()})
    vsom = vslm.ServiceInstance("ServiceInstance", stub).RetrieveContent().vStorageObjectManager
    q = vslm.vso.VStorageObjectQuerySpec
    page = vsom.VslmListVStorageObjectForSpec(
        query=[q(queryField="datastoreMoId", queryOperator="equals", queryValue=[ds_moref])]
              + ([q(queryField="id", queryOperator="greaterThan", queryValue=[last_id])]
                 if last_id else []),
        maxResult=1000)
    # page.allRecordsReturned, page.id[i].id (ascending), page.queryResults[i] (.id,
    # .name, .capacityInMB, .createTime, .datastoreUrl, ...); repeat with the last id
    # until allRecordsReturned.
    vsom.VslmRetrieveVStorageObjects(ids=[vid, ...])   # [i].id, .name, ..., .error (NotFound)
    vsom.VslmRetrieveVStorageObjectAssociations(ids=[vid, ...])  # [i].vmDiskAssociation, .fault
    vsom.VslmRetrieveVStorageObject(id=vid), vsom.VslmRetrieveSnapshotInfo(id=vid),
    vsom.VslmRetrieveSnapshotDetails(id=vid, snapshotId=sid),
    vsom.VslmQueryChangedDiskAreas(id=vid, snapshotId=sid, startOffset=off, changeId=c)

The vim session id goes in the ``vcSessionCookie`` SOAP header (``requestContext``); this
bed ignores the HTTP cookie on /vslm/sdk and refuses (NotAuthenticated) without the
header, and after a vim re-login the new id must be put in the stub's requestContext. A
VSLM version newer than the server's (its vim apiVersion) is refused with a SOAP fault, and
replies hold only that version's fields (``snapshotInfo`` from 6.7.3, snapshot ids and
descriptions in it from 7.0.2.0). Without ``vslm=True`` /vslm/sdk is HTTP 404, as on a
vCenter older than 6.7 U2.

CBT (``images_dir=`` given, CBT on for the IVD): changed areas come in 64 KiB blocks
(``cbt_block``), at most ``cbt_max_span`` bytes (16 MiB) and ``cbt_max_areas`` areas (2000)
per call; loop with ``startOffset = info.startOffset + info.length`` until the capacity.
``changeId="*"`` lists every block holding allocated data of the snapshot's image. CBT off
(or the snapshot taken while it was off) is vim.fault.FileFault; an unknown or stale
changeId (CBT reset since) is vmodl.fault.InvalidArgument. See tests/testbed/vcsim/cbt.go.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import os
import re
import secrets
import selectors
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import SoapStubAdapter, vim, vmodl, vslm

from tests.testbed import vmdk

TESTBED = Path(__file__).resolve().parent
LAUNCHER = TESTBED / "build" / "vcsim"
DEFAULT_USER = "backup@vsphere.local"


@dataclass(frozen=True)
class Ivd:
    id: str
    name: str
    datastore_name: str
    datastore_moref: str
    capacity_bytes: int


@dataclass(frozen=True)
class SnapshotSpec:
    """One snapshot of an IvdSpec; `create_time` None means the launcher's start time."""

    description: str
    create_time: datetime.datetime | None = None


@dataclass(frozen=True)
class IvdSpec:
    """An IVD for ``Vcsim(populate=...)``: made at start-up like CreateDisk_Task would.

    `cbt` enables changed block tracking before the snapshots are taken (so each gets a
    changedBlockTrackingId); `attachments` are (vmId, diskKey) pairs that the association
    calls report (there are no VMs behind them).
    """

    name: str
    capacity_mb: int
    datastore: str = "LocalDS_0"
    create_time: datetime.datetime | None = None
    cbt: bool = False
    snapshots: tuple[SnapshotSpec, ...] = ()
    attachments: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Snapshot:
    id: str
    description: str
    create_time: datetime.datetime
    change_id: str  # changedBlockTrackingId; "" when CBT was off


@dataclass(frozen=True)
class PopulatedIvd:
    """What ``Vcsim(populate=...)`` created for one IvdSpec, in spec order."""

    ivd: Ivd
    create_time: datetime.datetime
    cbt: bool
    snapshots: tuple[Snapshot, ...] = field(default=())


def bulk_specs(
    n: int,
    *,
    datastores: Sequence[str] = ("LocalDS_0", "LocalDS_1", "LocalDS_2"),
    capacity_mb: int = 1024,
    max_snapshots: int = 3,
) -> list[IvdSpec]:
    """A benchmark bed: `n` IVDs "pv-00000".. spread round-robin over `datastores`, every
    other one with 1..`max_snapshots` snapshots (so half have one or more), creation times
    one minute apart from 2024-01-01 UTC. Deterministic."""
    base = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    specs = []
    for i in range(n):
        created = base + datetime.timedelta(minutes=i)
        count = 1 + (i // 2) % max_snapshots if i % 2 == 0 else 0
        snaps = tuple(
            SnapshotSpec(f"snap-{k}", created + datetime.timedelta(hours=k + 1))
            for k in range(count)
        )
        specs.append(
            IvdSpec(
                f"pv-{i:05d}",
                capacity_mb,
                datastores[i % len(datastores)],
                created,
                snapshots=snaps,
            )
        )
    return specs


# pyVmomi's name for the newest VSLM version a server of each vim API version speaks.
_VSLM_VERSIONS = (
    ((7, 0, 2, 0), "vslm.version.v7_0_2_0"),
    ((7, 0, 1, 0), "vslm.version.v7_0_1_0"),
    ((7, 0, 0, 0), "vslm.version.v7_0"),
    ((6, 7, 3), "vslm.version.version15"),
    ((6, 7, 2), "vslm.version.version14"),
)


def vslm_version(api_version: str) -> str:
    """The pyVmomi VSLM version to use against a vCenter of `api_version` (About.apiVersion)."""
    have = tuple(int(p) for p in api_version.split("."))
    for need, name in _VSLM_VERSIONS:
        if have >= need:
            return name
    raise ValueError(f"vCenter API {api_version} has no VSLM endpoint (needs 6.7.2)")


def _iso(t: datetime.datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:
        raise ValueError(f"{t}: give create times with a time zone")
    return t.isoformat()


def _openssl(command: str, cwd: Path) -> None:
    argv = ["openssl", *command.split()]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


_SERVER_EXT = """\
subjectAltName = IP:127.0.0.1, DNS:localhost
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
"""
_KEY = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


def make_certificates(directory: Path, *, self_signed: bool = False) -> tuple[Path, Path, Path]:
    """Create ca.pem and server.pem/server.key for 127.0.0.1 and localhost in `directory`.

    The server certificate is signed by the CA unless `self_signed`, in which case it is
    its own issuer and fails verification against ca.pem. EC P-256 keys: instant to make.
    Returns (ca_file, cert_file, key_file).
    """
    (directory / "server.ext").write_text(_SERVER_EXT)
    _openssl(
        f"req -x509 {_KEY} -days 7 -keyout ca.key -out ca.pem -subj /CN=ivdfs-test-bed-CA"
        " -addext basicConstraints=critical,CA:TRUE"
        " -addext keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    server = f"req {_KEY} -keyout server.key -subj /CN=127.0.0.1"
    if self_signed:
        _openssl(
            f"{server} -x509 -days 7 -out server.pem"
            " -addext subjectAltName=IP:127.0.0.1,DNS:localhost"
            " -addext extendedKeyUsage=serverAuth",
            cwd=directory,
        )
    else:
        _signed_server_certificate(directory)
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


def _signed_server_certificate(directory: Path) -> None:
    """A new server.key and server.pem, signed by the CA in `directory`."""
    _openssl(f"req {_KEY} -keyout server.key -subj /CN=127.0.0.1 -new -out server.csr",
             cwd=directory)  # fmt: skip
    _openssl(
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 7"
        " -extfile server.ext -out server.pem",
        cwd=directory,
    )


def _spec_json(p: IvdSpec) -> dict[str, Any]:
    return {
        "name": p.name,
        "capacityMB": p.capacity_mb,
        "datastore": p.datastore,
        "createTime": _iso(p.create_time),
        "cbt": p.cbt,
        "snapshots": [
            {"description": sn.description, "createTime": _iso(sn.create_time)}
            for sn in p.snapshots
        ],
        "attachments": [{"vmId": vm, "diskKey": key} for vm, key in p.attachments],
    }


def _read_populated(path: Path) -> list[PopulatedIvd]:
    out = []
    for r in json.loads(path.read_text()):
        ivd = Ivd(
            id=r["id"],
            name=r["name"],
            datastore_name=r["datastore"],
            datastore_moref=r["datastoreMoref"],
            capacity_bytes=r["capacityMB"] << 20,
        )
        snaps = tuple(
            Snapshot(
                s["id"],
                s["description"],
                datetime.datetime.fromisoformat(s["createTime"]),
                s["changeId"],
            )
            for s in r["snapshots"]
        )
        out.append(
            PopulatedIvd(ivd, datetime.datetime.fromisoformat(r["createTime"]), r["cbt"], snaps)
        )
    return out


class Vcsim:
    """A private vcsim on 127.0.0.1 with a verified TLS certificate; a context manager.

    Attributes once started: url, host, port, server ("127.0.0.1:PORT"), thumbprint
    (SHA-1, "AA:BB:..."), ca_file, cert_file, user, password, tmpdir, and populated
    (list[PopulatedIvd], spec order). From the constructor: esx, api_version, vslm.
    """

    def __init__(
        self,
        *,
        user: str = DEFAULT_USER,
        password: str | None = None,
        self_signed: bool = False,
        datastores: int = 3,
        delay_ms: int = 0,
        session_idle_timeout: float = 0.0,
        startup_timeout: float = 30.0,
        esx: bool = False,
        api_version: str = "6.7",
        vslm: bool = False,
        vslm_page_limit: int = 1000,
        inventory_delay_ms: int = 0,
        populate: Sequence[IvdSpec] = (),
        images_dir: str | os.PathLike[str] | None = None,
        cbt_block: int = 64 << 10,
        cbt_max_areas: int = 2000,
        cbt_max_span: int = 16 << 20,
        datastore_names: Sequence[str] = (),
    ) -> None:
        """`datastores`: LocalDS_0..N-1; `delay_ms`: added to every SOAP call;
        `session_idle_timeout` (s): vcsim expires idle sessions (0: never).

        `esx`: serve a standalone ESXi host instead of a vCenter (module doc);
        `api_version`: About.apiVersion, "6.7" or later (e.g. "6.7.3", "7.0.2.0");
        `vslm`: serve /vslm/sdk (vCenter, api_version 6.7.2 or later);
        `vslm_page_limit`: the most IDs one VslmListVStorageObjectForSpec returns;
        `inventory_delay_ms`: added to the IVD inventory queries only (list, retrieve,
        snapshot info/details, changed areas, associations, and their Host/VSLM forms);
        `populate`: IVDs made at start-up, listed in `populated` once started;
        `images_dir`: where the stand-in VDDK's images are, for QueryChangedDiskAreas;
        `cbt_*`: its granularity and per-call limits in bytes/areas (module doc);
        `datastore_names`: names for the first datastores instead of LocalDS_<n>, any text.
        """
        self.user = user
        self.password = password if password is not None else secrets.token_urlsafe(16)
        self.self_signed = self_signed
        self.host = "127.0.0.1"
        self.esx = esx
        self.api_version = api_version
        self.vslm = vslm
        self._args = [
            "-ds",
            str(datastores),
            "-delay",
            str(delay_ms),
            "-session-idle",
            f"{session_idle_timeout}s",
            "-api-version",
            api_version,
            "-vslm-page-limit",
            str(vslm_page_limit),
            "-inventory-delay",
            f"{inventory_delay_ms}ms",
            "-cbt-block",
            str(cbt_block),
            "-cbt-max-areas",
            str(cbt_max_areas),
            "-cbt-max-span",
            str(cbt_max_span),
        ]
        if esx:
            self._args.append("-esx")
        if vslm:
            self._args.append("-vslm")
        if images_dir is not None:
            self._args += ["-images", os.fspath(images_dir)]
        self._populate = list(populate)
        self._datastore_names = list(datastore_names)
        self.populated: list[PopulatedIvd] = []
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._si: Any = None
        self._content: Any = None
        self._log: Any = None
        self.returncode: int | None = None  # the launcher's, once stopped (0: clean exit)
        self.facts_dir: Path | None = None  # tell_standin
        self.frozen = False  # stopped by `freeze`
        self.url = self.server = self.thumbprint = ""
        self.port = 0
        self.tmpdir = self.ca_file = self.cert_file = self._key_file = Path()

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> Vcsim:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Vcsim:
        if not os.access(LAUNCHER, os.X_OK):
            raise RuntimeError(f"{LAUNCHER} is missing: run tests/testbed/build.sh")
        self._tmp = tempfile.TemporaryDirectory(prefix="ivdfs-vcsim-")
        self.tmpdir = Path(self._tmp.name)
        try:
            self.ca_file, self.cert_file, self._key_file = make_certificates(
                self.tmpdir, self_signed=self.self_signed
            )
            # vcsim backs each datastore with a directory under TMPDIR: keep them here.
            (self.tmpdir / "datastores").mkdir()
            (self.tmpdir / "faults").mkdir()
            self._args += ["-faults", str(self.tmpdir / "faults")]
            extra: list[str] = []
            if self._datastore_names:
                names = self.tmpdir / "datastore-names.json"
                names.write_text(json.dumps(self._datastore_names))
                self._args += ["-ds-names", str(names)]
            if self._populate:
                spec = self.tmpdir / "populate.json"
                spec.write_text(json.dumps({"ivds": [_spec_json(p) for p in self._populate]}))
                extra = ["-populate", str(spec), "-populated", str(self.tmpdir / "populated.json")]
            self._launch(f"{self.host}:0", extra)
            if self._populate:
                self.populated = _read_populated(self.tmpdir / "populated.json")
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, listen: str, extra: Sequence[str] = ()) -> None:
        env = dict(os.environ, TMPDIR=str(self.tmpdir / "datastores"))
        env.update(VCSIM_USER=self.user, VCSIM_PASSWORD=self.password)
        self._log = (self.tmpdir / "vcsim.log").open("ab")
        # stdin stays an open pipe: the launcher exits on EOF, i.e. when we die.
        self._proc = subprocess.Popen(
            [
                str(LAUNCHER),
                "-listen",
                listen,
                *self._args,
                *extra,
                "-cert",
                str(self.cert_file),
                "-key",
                str(self._key_file),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        info = json.loads(self._read_line(self._startup_timeout))
        self.url, self.port, self.thumbprint = info["url"], info["port"], info["thumbprint"]
        self.server = f"{self.host}:{self.port}"

    def kill_server(self) -> None:
        """Stop the simulator process only (a vCenter outage); `restart_server` brings it back."""
        self._si = None
        self._end_process()

    def restart_server(self) -> None:
        """Start again on the same port and certificate, with an empty inventory (like a
        vCenter whose sessions are gone): `populate` is not applied again."""
        self._launch(f"{self.host}:{self.port}")

    def renew_certificate(self) -> None:
        """A new server key and certificate from the same CA (a vCenter whose certificate was
        renewed: still trusted, another thumbprint); served from the next `restart_server`."""
        assert not self.self_signed
        _signed_server_certificate(self.tmpdir)

    @contextlib.contextmanager
    def failing(self, operation: str) -> Iterator[None]:
        """Inside, every `operation` task ("createSnapshot", "deleteSnapshot") ends in a
        SystemError fault, as a vCenter that cannot do it (the launcher's -faults switch)."""
        switch = self.tmpdir / "faults" / operation
        switch.touch()
        try:
            yield
        finally:
            switch.unlink()

    def lose_reply(self, operation: str) -> Path:
        """The next request starting an `operation` task ("createSnapshot",
        "deleteSnapshot") runs, and its connection is then closed without a reply (the
        launcher's -faults switch). Returns the switch file, which the launcher removes when
        it has lost a reply."""
        switch = self.tmpdir / "faults" / f"{operation}.lost-reply"
        switch.touch()
        return switch

    def freeze(self) -> None:
        """Stop the simulator process (SIGSTOP): connections are accepted by the kernel and
        then hang, as with a vCenter that stalls; `thaw` resumes it."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self._proc is not None and self.frozen:
            self._proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def _read_line(self, timeout: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"vcsim did not start in {timeout} s: {self.log_tail()}")
                if sel.select(remaining):
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        self._proc.wait()
                        raise RuntimeError(
                            f"vcsim exited with {self._proc.returncode}: {self.log_tail()}"
                        )
                    buf += chunk
        return buf.split(b"\n", 1)[0].decode()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.tmpdir / "vcsim.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the launcher, wait for it, and remove the private directory."""
        self.thaw()  # the helpers' logout below would wait forever on a stopped process
        if self._si is not None:
            with contextlib.suppress(Exception):
                Disconnect(self._si)
            self._si = None
        self._end_process()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _end_process(self) -> None:
        self.thaw()  # a stopped process would not act on SIGTERM
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.returncode = proc.returncode
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            self._log.close()

    # -- pyvmomi ------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def connect(self, user: str | None = None, password: str | None = None) -> Any:
        """A new pyvmomi ServiceInstance (API 6.7), TLS verified against `ca_file`."""
        return SmartConnect(
            host=self.host,
            port=self.port,
            user=self.user if user is None else user,
            pwd=self.password if password is None else password,
            sslContext=self.ssl_context(),
        )

    @property
    def si(self) -> Any:
        """The helpers' own connection, made on first use and closed by stop()."""
        if self._si is None:
            self._si = self.connect()
            self._content = self._si.RetrieveContent()
        return self._si

    @property
    def content(self) -> Any:
        """ServiceContent of `si`, from RetrieveServiceContent (see module doc)."""
        _ = self.si
        return self._content

    def wait_task(self, task: Any, timeout: float = 30.0) -> Any:
        """Wait for `task` and return info.result; raise info.error (see module doc)."""
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=task, skip=False)],
            propSet=[
                pc.PropertySpec(type=vim.Task, pathSet=["info.state", "info.result", "info.error"])
            ],
        )
        collector = self.content.propertyCollector
        deadline = time.monotonic() + timeout
        interval = 0.002
        while True:
            result = collector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
            props = {p.name: p.val for o in result.objects for p in o.propSet}
            state = props.get("info.state")
            if state == vim.TaskInfo.State.success:
                return props.get("info.result")
            if state == vim.TaskInfo.State.error:
                raise props["info.error"]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {task._moId} still {state} after {timeout} s")
            time.sleep(interval)
            interval = min(interval * 2, 0.1)

    # -- inventory ----------------------------------------------------------------------

    def datastores(self) -> list[tuple[str, str]]:
        """(name, moref value) of every datastore of every datacenter, in inventory order."""
        content = self.content
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datacenter], True)
        try:
            found = [(ds.name, ds._moId) for dc in view.view for ds in dc.datastore]
        finally:
            view.DestroyView()
        return found

    def _datastore(self, name: str | None) -> tuple[str, Any]:
        """The datastore of that name or moref (two may share a name); None: the first."""
        stores = self.datastores()
        for ds_name, moref in stores:
            if name is None or name in (ds_name, moref):
                return ds_name, vim.Datastore(moref, self.si._stub)
        raise LookupError(f"no datastore {name!r} in {stores}")

    def _ref(self, ivd: Ivd) -> tuple[Any, Any]:
        return vim.vslm.ID(id=ivd.id), vim.Datastore(ivd.datastore_moref, self.si._stub)

    @property
    def _vsom(self) -> Any:
        return self.content.vStorageObjectManager

    def create_ivd(self, name: str, capacity_mb: int, datastore: str | None = None) -> Ivd:
        """Create a thin IVD on datastore `datastore` (a name or moref; default: the first one),
        through HostCreateDisk_Task in ESX mode and CreateDisk_Task otherwise."""
        ds_name, ds = self._datastore(datastore)
        spec = vim.vslm.CreateSpec(
            name=name,
            capacityInMB=capacity_mb,
            backingSpec=vim.vslm.CreateSpec.DiskFileBackingSpec(
                datastore=ds, provisioningType="thin"
            ),
        )
        create = self._vsom.HostCreateDisk_Task if self.esx else self._vsom.CreateDisk_Task
        obj = self.wait_task(create(spec))
        ivd = Ivd(
            id=obj.config.id.id,
            name=obj.config.name,
            datastore_name=ds_name,
            datastore_moref=ds._moId,
            capacity_bytes=obj.config.capacityInMB * 1024 * 1024,
        )
        if self.facts_dir is not None:
            record_ivd(self.facts_dir, ivd.id, ivd.datastore_moref)
        return ivd

    def tell_standin(self, images_dir: str | os.PathLike[str]) -> None:
        """From now on, record every IVD this vCenter has and makes in `images_dir` for the
        stand-in VDDK (`record_ivd`): it checks the datastore that PrepareForAccess, EndAccess
        and ConnectEx name even for an IVD without images (a --snapshot-now's, before its
        snapshot exists)."""
        self.facts_dir = Path(images_dir)
        for p in self.populated:
            record_ivd(self.facts_dir, p.ivd.id, p.ivd.datastore_moref)

    def delete_ivd(self, ivd: Ivd) -> None:
        ivd_id, ds = self._ref(ivd)
        if self.esx:
            task = self._vsom.HostDeleteVStorageObject_Task(id=ivd_id, datastore=ds)
        else:
            task = self._vsom.DeleteVStorageObject_Task(id=ivd_id, datastore=ds)
        self.wait_task(task)

    def create_snapshot(self, ivd: Ivd, description: str) -> str:
        """Snapshot `ivd`; returns the snapshot id."""
        ivd_id, ds = self._ref(ivd)
        if self.esx:
            create = self._vsom.HostVStorageObjectCreateSnapshot_Task
        else:
            create = self._vsom.VStorageObjectCreateSnapshot_Task
        return str(self.wait_task(create(id=ivd_id, datastore=ds, description=description)).id)

    def delete_snapshot(self, ivd: Ivd, snapshot_id: str) -> None:
        ivd_id, ds = self._ref(ivd)
        if self.esx:
            delete = self._vsom.HostVStorageObjectDeleteSnapshot_Task
        else:
            delete = self._vsom.DeleteSnapshot_Task
        self.wait_task(delete(id=ivd_id, datastore=ds, snapshotId=vim.vslm.ID(id=snapshot_id)))

    def snapshots(self, ivd: Ivd) -> list[str]:
        ivd_id, ds = self._ref(ivd)
        if self.esx:
            info = self._vsom.HostVStorageObjectRetrieveSnapshotInfo(id=ivd_id, datastore=ds)
        else:
            info = self._vsom.RetrieveSnapshotInfo(id=ivd_id, datastore=ds)
        return [s.id.id for s in info.snapshots]

    def backing_path(self, ivd: Ivd) -> str:
        """The IVD's running disk, ``backing.filePath``: "[ds] fcd/<stem>[-NNNNNN].vmdk"."""
        ivd_id, ds = self._ref(ivd)
        retrieve = (
            self._vsom.HostRetrieveVStorageObject if self.esx else self._vsom.RetrieveVStorageObject
        )
        return str(retrieve(id=ivd_id, datastore=ds).config.backing.filePath)

    def rename_ivd(self, ivd: Ivd, name: str) -> None:
        ivd_id, ds = self._ref(ivd)
        rename = (
            self._vsom.HostRenameVStorageObject if self.esx else self._vsom.RenameVStorageObject
        )
        rename(id=ivd_id, datastore=ds, name=name)

    # -- changed block tracking ---------------------------------------------------------

    def set_cbt(self, ivd: Ivd, enabled: bool) -> None:
        """Switch changed block tracking for `ivd` (the enableChangedBlockTracking control
        flag). Snapshots taken while it is on get a changedBlockTrackingId; turning it off
        and on again starts afresh, so older ids stop working."""
        ivd_id, ds = self._ref(ivd)
        if self.esx:
            call = (
                self._vsom.HostSetVStorageObjectControlFlags
                if enabled
                else self._vsom.HostClearVStorageObjectControlFlags
            )
        else:
            call = (
                self._vsom.SetVStorageObjectControlFlags
                if enabled
                else self._vsom.ClearVStorageObjectControlFlags
            )
        call(id=ivd_id, datastore=ds, controlFlags=["enableChangedBlockTracking"])

    def snapshot_details(self, ivd: Ivd, snapshot_id: str) -> tuple[str, str]:
        """(path, changedBlockTrackingId or "") of a snapshot (vCenter only)."""
        ivd_id, ds = self._ref(ivd)
        d = self._vsom.RetrieveSnapshotDetails(
            id=ivd_id, datastore=ds, snapshotId=vim.vslm.ID(id=snapshot_id)
        )
        return str(d.path or ""), str(d.changedBlockTrackingId or "")

    def changed_areas(self, ivd: Ivd, snapshot_id: str, change_id: str, start: int = 0) -> Any:
        """One QueryChangedDiskAreas call: a vim.VirtualMachine.DiskChangeInfo."""
        ivd_id, ds = self._ref(ivd)
        return self._vsom.QueryChangedDiskAreas(
            id=ivd_id,
            datastore=ds,
            snapshotId=vim.vslm.ID(id=snapshot_id),
            startOffset=start,
            changeId=change_id,
        )

    def all_changed_areas(
        self, ivd: Ivd, snapshot_id: str, change_id: str
    ) -> list[tuple[int, int]]:
        """Every changed (start, length) of the disk: the client loop on startOffset."""
        out: list[tuple[int, int]] = []
        offset = 0
        while offset < ivd.capacity_bytes:
            info = self.changed_areas(ivd, snapshot_id, change_id, offset)
            if info.startOffset != offset or info.length <= 0:
                raise RuntimeError(f"no progress at {offset}: {info}")
            out += [(a.start, a.length) for a in info.changedArea or []]
            offset = info.startOffset + info.length
        return out

    # -- VSLM ---------------------------------------------------------------------------

    def connect_vslm(self, si: Any = None, *, version: str | None = None) -> Any:
        """The VslmServiceInstance of this vCenter, sharing `si`'s vim session (default:
        the helpers' own); `version` defaults to vslm_version(api_version)."""
        si = self.si if si is None else si
        stub = SoapStubAdapter(
            host=self.host,
            port=self.port,
            path="/vslm/sdk",
            version=version or vslm_version(self.api_version),
            sslContext=self.ssl_context(),
            requestContext={"vcSessionCookie": si._stub.GetSessionId()},
        )
        return vslm.ServiceInstance("ServiceInstance", stub)

    def vslm_list(
        self,
        vsom: Any,
        *,
        query: Sequence[Any] = (),
        datastore_moref: str | None = None,
        page: int = 1000,
    ) -> Iterator[Any]:
        """Every VslmVsoVStorageObjectResult matching `query` (VStorageObjectQuerySpecs,
        ANDed) and, if given, on one datastore, page by page with the documented
        continuation: repeat the query plus "id greaterThan <last id>" until
        allRecordsReturned."""
        q = vslm.vso.VStorageObjectQuerySpec
        base = list(query)
        if datastore_moref is not None:
            base.append(
                q(queryField="datastoreMoId", queryOperator="equals", queryValue=[datastore_moref])
            )
        last: str | None = None
        while True:
            spec = list(base)
            if last is not None:
                spec.append(q(queryField="id", queryOperator="greaterThan", queryValue=[last]))
            res = vsom.VslmListVStorageObjectForSpec(query=spec, maxResult=page)
            yield from res.queryResults or []
            if res.allRecordsReturned or not res.id:
                return
            last = res.id[-1].id


@contextlib.contextmanager
def https_server(directory: Path, *, silent: bool = False) -> Iterator[tuple[int, Path]]:
    """An HTTPS server that is not vSphere (every request: 404) on 127.0.0.1, whose
    certificate only its own CA file verifies (like vcsim's): yields (port, CA file).
    `silent`: it completes each TLS handshake and then never answers (a stalled server)."""
    ca, cert, key = make_certificates(directory)
    stopped = threading.Event()

    class Silent(http.server.BaseHTTPRequestHandler):
        def handle(self) -> None:
            stopped.wait(600)

    handler = Silent if silent else http.server.BaseHTTPRequestHandler
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], ca
    finally:
        stopped.set()
        server.shutdown()


_DATASTORE_PATH = re.compile(r"\[(?P<ds>[^\]]+)\] (?P<rel>.+)")


def datastore_file(datastore_dir: str | os.PathLike[str], datastore: str, path: str) -> Path:
    """Where vSphere's "[<datastore>] fcd/x.vmdk" lies under `datastore_dir`, the datastore's
    root on this host (what --datastore-path NAME=DIR names). ValueError for a path on another
    datastore or one that climbs out of it."""
    m = _DATASTORE_PATH.fullmatch(path)
    if m is None or m["ds"] != datastore:
        raise ValueError(f"{path!r} is not a path on datastore {datastore!r}")
    rel = PurePosixPath(m["rel"])
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{path!r} leaves the datastore")
    return Path(datastore_dir, *rel.parts)


def place_chain(
    vcsim: Vcsim,
    ivd: Ivd,
    datastore_dir: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    *,
    current: str | os.PathLike[str] | None = None,
    layout: vmdk.Layout = "sparse",
    seed: int | None = None,
) -> list[vmdk.Link]:
    """Write `ivd`'s VMDK chain where vCenter says its files are, under `datastore_dir`.

    `images`: the raw image of each snapshot, in RetrieveSnapshotInfo's order; `current`: the
    running disk's (default: the last snapshot's, i.e. nothing written since). Snapshot k's
    path (RetrieveSnapshotDetails) gets link k, the backing filePath the last link, so that
    reading any snapshot's file in VDDK's local-file mode gives that snapshot's image. Files of
    this IVD's chain that vCenter no longer names (consolidated away by a snapshot deletion)
    are removed; calling it again after a deletion rewrites the chain as ESXi would have left
    it (every file a new inode). vCenter only: a host has no RetrieveSnapshotDetails.
    """
    snaps = vcsim.snapshots(ivd)
    if len(images) != len(snaps):
        raise ValueError(f"{len(images)} images for {len(snaps)} snapshots of {ivd.id}")
    paths = [vcsim.snapshot_details(ivd, s)[0] for s in snaps] + [vcsim.backing_path(ivd)]
    files = [datastore_file(datastore_dir, ivd.datastore_name, p) for p in paths]
    folder = files[0].parent
    if any(f.parent != folder for f in files) or len({f.name for f in files}) != len(files):
        raise ValueError(f"not one chain in one folder: {paths}")
    last = current if current is not None else (images[-1] if images else None)
    if last is None:
        raise ValueError(f"{ivd.id} has no snapshot: give the running disk's image (current=)")
    links = vmdk.write_chain(
        folder, [f.name for f in files], [*images, last], layout=layout, seed=seed
    )
    keep = {p.name for link in links for p in (link.descriptor, *link.extents)}
    stem = files[0].name.removesuffix(".vmdk")
    for p in folder.glob(f"{stem}*.vmdk"):
        if p.name not in keep:
            p.unlink()
    return links


def record_ivd(
    images_dir: str | os.PathLike[str],
    ivd_id: str,
    datastore_moref: str,
    *,
    sector_size: int = 512,
) -> Path:
    """Tell the stand-in VDDK what vCenter knows of IVD `ivd_id`: the moref of its datastore
    (ConnectEx, PrepareForAccess and EndAccess must name it) and its logical = physical sector
    size (GetInfo's logicalSectorSize/physicalSectorSize; 4096 for a 4Kn disk). Idempotent; a
    different answer for the same IVD is a test bug (ValueError)."""
    dest_dir = Path(images_dir) / ivd_id
    dest_dir.mkdir(parents=True, exist_ok=True)
    facts = {"datastore": datastore_moref}
    if sector_size != 512:
        facts["sector-size"] = f"{sector_size} {sector_size}"
    elif (dest_dir / "sector-size").exists():
        facts["sector-size"] = "512 512"
    for name, value in facts.items():
        path = dest_dir / name
        try:
            old = path.read_text().strip()
        except FileNotFoundError:
            path.write_text(value + "\n")
            continue
        if old != value:
            raise ValueError(f"IVD {ivd_id}: {name} is {old!r}, not {value!r}")
    return dest_dir


def place_image(
    images_dir: str | os.PathLike[str],
    ivd: Ivd,
    snapshot_id: str,
    src_path: str | os.PathLike[str],
    *,
    sector_size: int = 512,
) -> Path:
    """Install `src_path` as images_dir/<ivd.id>/<snapshot_id>.raw for the stand-in VDDK, and
    record the IVD's datastore and sector size beside it (`record_ivd`).

    A copy, not a hard link: a link would share the inode with the source, so a later
    in-place rewrite of the source (tests reuse scratch files) would silently change a
    "snapshot". ``cp --sparse=always`` keeps holes (and makes holes of zero runs), so
    multi-GiB test images cost only their data. The copy is written under a temporary
    name, made read-only (0444) and linked into place: readers never see a partial
    image, and an existing image is never replaced (FileExistsError).
    """
    dest_dir = record_ivd(images_dir, ivd.id, ivd.datastore_moref, sector_size=sector_size)
    dest = dest_dir / f"{snapshot_id}.raw"
    tmp = dest_dir / f".{snapshot_id}.raw.{os.getpid()}.tmp"
    try:
        subprocess.run(
            ["cp", "--sparse=always", "--", os.fspath(src_path), os.fspath(tmp)], check=True
        )
        tmp.chmod(0o444)
        os.link(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
