"""Test-bed vSphere: a private vcsim (govmomi 0.24) and helpers to populate it.

Used by the t4 tests, scripts/demo and scripts/bench. ``Vcsim`` starts our launcher
(tests/testbed/vcsim/main.go, built by tests/testbed/build.sh) with a throw-away CA and
server certificate made by the ``openssl`` CLI, and offers blocking pyvmomi helpers to
create IVDs and snapshots. ``place_image`` puts the raw image of a snapshot where the
stand-in VDDK library serves it from.

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
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import signal
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

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
        _openssl(f"{server} -new -out server.csr", cwd=directory)
        _openssl(
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 7"
            " -extfile server.ext -out server.pem",
            cwd=directory,
        )
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


class Vcsim:
    """A private vcsim on 127.0.0.1 with a verified TLS certificate; a context manager.

    Attributes once started: url, host, port, server ("127.0.0.1:PORT"), thumbprint
    (SHA-1, "AA:BB:..."), ca_file, cert_file, user, password, tmpdir.
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
    ) -> None:
        """`datastores`: LocalDS_0..N-1; `delay_ms`: added to every SOAP call;
        `session_idle_timeout` (s): vcsim expires idle sessions (0: never)."""
        self.user = user
        self.password = password if password is not None else secrets.token_urlsafe(16)
        self.self_signed = self_signed
        self.host = "127.0.0.1"
        self._args = [
            "-ds",
            str(datastores),
            "-delay",
            str(delay_ms),
            "-session-idle",
            f"{session_idle_timeout}s",
        ]
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._si: Any = None
        self._content: Any = None
        self._log: Any = None
        self.returncode: int | None = None  # the launcher's, once stopped (0: clean exit)
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
            self._launch(f"{self.host}:0")
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, listen: str) -> None:
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
        vCenter whose sessions are gone)."""
        self._launch(f"{self.host}:{self.port}")

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
        if self._si is not None:
            with contextlib.suppress(Exception):
                Disconnect(self._si)
            self._si = None
        self._end_process()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _end_process(self) -> None:
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
        stores = self.datastores()
        for ds_name, moref in stores:
            if name is None or ds_name == name:
                return ds_name, vim.Datastore(moref, self.si._stub)
        raise LookupError(f"no datastore {name!r} in {stores}")

    def _ref(self, ivd: Ivd) -> tuple[Any, Any]:
        return vim.vslm.ID(id=ivd.id), vim.Datastore(ivd.datastore_moref, self.si._stub)

    @property
    def _vsom(self) -> Any:
        return self.content.vStorageObjectManager

    def create_ivd(self, name: str, capacity_mb: int, datastore: str | None = None) -> Ivd:
        """Create a thin IVD on datastore `datastore` (a name; default: the first one)."""
        ds_name, ds = self._datastore(datastore)
        spec = vim.vslm.CreateSpec(
            name=name,
            capacityInMB=capacity_mb,
            backingSpec=vim.vslm.CreateSpec.DiskFileBackingSpec(
                datastore=ds, provisioningType="thin"
            ),
        )
        obj = self.wait_task(self._vsom.CreateDisk_Task(spec))
        return Ivd(
            id=obj.config.id.id,
            name=obj.config.name,
            datastore_name=ds_name,
            datastore_moref=ds._moId,
            capacity_bytes=obj.config.capacityInMB * 1024 * 1024,
        )

    def delete_ivd(self, ivd: Ivd) -> None:
        ivd_id, ds = self._ref(ivd)
        self.wait_task(self._vsom.DeleteVStorageObject_Task(id=ivd_id, datastore=ds))

    def create_snapshot(self, ivd: Ivd, description: str) -> str:
        """Snapshot `ivd`; returns the snapshot id."""
        ivd_id, ds = self._ref(ivd)
        task = self._vsom.VStorageObjectCreateSnapshot_Task(
            id=ivd_id, datastore=ds, description=description
        )
        return str(self.wait_task(task).id)

    def delete_snapshot(self, ivd: Ivd, snapshot_id: str) -> None:
        ivd_id, ds = self._ref(ivd)
        task = self._vsom.DeleteSnapshot_Task(
            id=ivd_id, datastore=ds, snapshotId=vim.vslm.ID(id=snapshot_id)
        )
        self.wait_task(task)

    def snapshots(self, ivd: Ivd) -> list[str]:
        ivd_id, ds = self._ref(ivd)
        info = self._vsom.RetrieveSnapshotInfo(id=ivd_id, datastore=ds)
        return [s.id.id for s in info.snapshots]


def place_image(
    images_dir: str | os.PathLike[str],
    ivd_id: str,
    snapshot_id: str,
    src_path: str | os.PathLike[str],
) -> Path:
    """Install `src_path` as images_dir/<ivd_id>/<snapshot_id>.raw for the stand-in VDDK.

    A copy, not a hard link: a link would share the inode with the source, so a later
    in-place rewrite of the source (tests reuse scratch files) would silently change a
    "snapshot". ``cp --sparse=always`` keeps holes (and makes holes of zero runs), so
    multi-GiB test images cost only their data. The copy is written under a temporary
    name, made read-only (0444) and linked into place: readers never see a partial
    image, and an existing image is never replaced (FileExistsError).
    """
    dest_dir = Path(images_dir) / ivd_id
    dest_dir.mkdir(parents=True, exist_ok=True)
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
