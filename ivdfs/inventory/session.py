"""A logged-in vSphere session used by a pool of threads; re-login; the VSLM endpoint.

Role: one login (SmartConnect) whose SOAP stub serves concurrent calls: pyVmomi's stub hands
each call its own pooled HTTP connection, all with the one session cookie, so `map` runs up
to `pool` queries at once (a vCenter round trip of 20-50 ms otherwise makes thousands of IVDs
cost minutes). After an expired session or a broken connection, `call` logs in again once for
everyone (a generation counter keeps concurrent failures from each logging in), checking first
that the certificate is still the one VDDK was given. vCenter 6.7 U2 and later also serve the
VSLM endpoint (/vslm/sdk), which answers for many IVDs in one call; it shares the vim session
through the vcSessionCookie header and is used when present.

Deadlines (--vcenter-timeout): every socket this module opens carries the server's timeout,
so connecting, the TLS handshake and every read of a reply fail after it, as a refused
connection does (pyVmomi's own API version discovery has none, so it is done here). A call
that may have reached vCenter but whose reply was lost is re-sent only when it is idempotent:
`call(..., resend=False)` raises ReplyLost instead, and the caller finds out what happened
(a task start must never run twice).

Concurrency: every method blocks and may be called from any thread; `_lock` guards login
state, and everything done under it is bounded by the deadline. Callers on the trio thread
use `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pyVim import connect as pyvim_connect
from pyVmomi import SoapStubAdapter, vim, vmodl, vslm
from pyVmomi.VmomiSupport import GetServiceVersions, versionIdMap

from ivdfs.config import ServerConfig
from ivdfs.errors import (
    BackendError,
    IvdfsError,
    LoginRefused,
    NotFound,
    TlsProblem,
    Unreachable,
)
from ivdfs.inventory.tls import probe_certificate, tls_context

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# pyVmomi's VSLM versions by the vCenter API version that serves them, newest first.
VSLM_VERSIONS = (
    ((7, 0, 2, 0), "vslm.version.v7_0_2_0"),
    ((7, 0, 1, 0), "vslm.version.v7_0_1_0"),
    ((7, 0, 0, 0), "vslm.version.v7_0"),
    ((6, 7, 3), "vslm.version.version15"),
    ((6, 7, 2), "vslm.version.version14"),
)


class ReplyLost(BackendError):
    """A call that may have reached vCenter, whose reply never came (a broken connection or
    the deadline): whether it ran is unknown."""


def vslm_version(api_version: str) -> str | None:
    """The VSLM version to speak to a vCenter of `api_version`; None before 6.7 U2."""
    try:
        have = tuple(int(p) for p in api_version.split("."))
    except ValueError:
        return None
    for need, name in VSLM_VERSIONS:
        if have >= need:
            return name
    return None


class Session:
    def __init__(self, server: ServerConfig, pool: int = 1) -> None:
        """`pool`: queries at once on the one login (the mount's --vcenter-connections)."""
        self.server = server
        self.pool = max(1, pool)
        self._lock = threading.Lock()
        self._generation = 0
        # When the last attempt to log in again failed (monotonic), and why.
        self._login_failed: tuple[float, str] | None = None
        self._ctx: ssl.SSLContext | None = None
        self.si: Any = None
        self.content: Any = None
        self.vslm: Any = None  # the VslmVStorageObjectManager, when the server has one
        self.vslm_version: str | None = None
        self.thumbprint = ""
        self.about = ""
        self.api_version = ""
        self.is_host = False  # a standalone ESXi host rather than a vCenter

    # --- login ---------------------------------------------------------------------------

    def connect(self, use_vslm: bool = True) -> str:
        """Check TLS, log in; returns the server certificate's SHA-1 thumbprint."""
        self._ctx = tls_context(self.server)
        self.thumbprint = probe_certificate(self.server, self._ctx)
        self._use_vslm = use_vslm
        with self._lock:
            self._login()
        return self.thumbprint

    def _login(self) -> None:
        s = self.server
        try:
            # pyVim's SmartConnect asks for the API versions without any timeout (a stalled
            # server would hold `_lock` forever): the same discovery with the deadline.
            version = self._api_version()
            si = pyvim_connect.Connect(
                host=s.host,
                port=s.port,
                user=s.user,
                pwd=s.password.reveal(),
                version=version,
                sslContext=self._ctx,
                connectionPoolTimeout=-1,
                httpConnectionTimeout=s.timeout,
            )
            # RetrieveContent, not the `content` property: some servers (vcsim among them)
            # leave vStorageObjectManager out of the property fetch that `content` uses.
            content = si.RetrieveContent()
        except IvdfsError:
            raise
        except vim.fault.InvalidLogin:
            raise LoginRefused(f"{s.host} rejected user {s.user!r} or its password") from None
        except vim.fault.NoPermission as e:
            raise LoginRefused(f"user {s.user!r} lacks privileges on {s.host}: {e.msg}") from None
        except TimeoutError:
            raise Unreachable(
                f"{s.host}:{s.port} did not answer within {s.timeout:g} s (--vcenter-timeout)"
            ) from None
        except ssl.SSLError as e:
            raise TlsProblem(f"TLS failure talking to {s.host}: {e}") from None
        except Exception as e:  # pyVmomi raises many shapes for "this is not vSphere"
            first = str(e).splitlines()[0] if str(e) else ""
            raise Unreachable(
                f"{s.host}:{s.port} does not answer as a vCenter or ESXi server "
                f"({type(e).__name__}: {first})".replace(": )", ")")
            ) from None
        # Room for the whole pool of threads in the stub's connection pool.
        si._stub.poolSize = self.pool
        about = content.about
        if content.vStorageObjectManager is None:
            raise Unreachable(f"{s.host} has no VStorageObjectManager (needs vSphere 6.5 or later)")
        self.si, self.content = si, content
        self.api_version = str(about.apiVersion)
        self.is_host = str(getattr(about, "apiType", "")) == "HostAgent"
        kind = "ESXi host" if self.is_host else "vCenter"
        self.about = f"{about.fullName} (API {about.apiVersion}, {kind})"
        self._connect_vslm()
        log.info(
            "logged in to %s %s (API %s) as %s%s",
            about.fullName,
            about.build,
            about.apiVersion,
            s.user,
            ", using its VSLM endpoint" if self.vslm is not None else "",
        )

    def _api_version(self) -> str:
        """The newest vim API version both pyVmomi and the server speak (as SmartConnect
        finds it, from /sdk/vimServiceVersions.xml), within the deadline."""
        s = self.server
        where = f"{s.host}:{s.port}"
        conn = http.client.HTTPSConnection(s.host, s.port, timeout=s.timeout, context=self._ctx)
        try:
            conn.request("GET", "/sdk/vimServiceVersions.xml")
            reply = conn.getresponse()
            body = reply.read()
        finally:
            conn.close()
        not_vsphere = f"{where} does not answer as a vCenter or ESXi server"
        if reply.status != 200:
            raise Unreachable(f"{not_vsphere} (no API versions: HTTP {reply.status})")
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError:
            raise Unreachable(f"{not_vsphere} (its API version list is unreadable)") from None
        offered = {v.text for v in root.iter("version")}
        for version in GetServiceVersions("vim25"):
            if versionIdMap.get(version) in offered:
                return str(version)
        raise Unreachable(f"{not_vsphere} (no API version this pyVmomi knows)")

    def _connect_vslm(self) -> None:
        self.vslm = None
        version = None if self.is_host or not self._use_vslm else vslm_version(self.api_version)
        if version is None:
            return
        try:
            stub = SoapStubAdapter(
                host=self.server.host,
                port=self.server.port,
                path="/vslm/sdk",
                version=version,
                sslContext=self._ctx,
                poolSize=self.pool,
                connectionPoolTimeout=-1,
                httpConnectionTimeout=self.server.timeout,
                requestContext={"vcSessionCookie": self.si._stub.GetSessionId()},
            )
            content = vslm.ServiceInstance("ServiceInstance", stub).RetrieveContent()
            self.vslm, self.vslm_version = content.vStorageObjectManager, version
        except Exception as e:  # an older or partial server: the vim queries serve
            log.debug("no VSLM endpoint (%s: %s); asking per IVD", type(e).__name__, e)

    def close(self) -> None:
        with self._lock:
            if self.si is not None:
                try:
                    pyvim_connect.Disconnect(self.si)
                except Exception as e:  # logout at exit is best effort
                    log.debug("logout failed: %s", e)
                self.si = None

    # --- calls ---------------------------------------------------------------------------

    def call(self, what: str, fn: Callable[[], T], *, resend: bool = True) -> T:
        """Run a query; after an expired session or a broken connection, log in again once
        and send it again. With `resend=False` (a call that must not run twice, such as a
        task start), a connection that failed after the request may have left raises
        ReplyLost instead: the caller finds out whether it ran. An expired session is safe to
        re-send either way: vCenter refused the request without running it."""
        for attempt in (1, 2):
            generation = self._generation
            started = time.monotonic()
            try:
                return fn()
            except vim.fault.NotAuthenticated:
                reason = "session expired"
            except vim.fault.NotFound as e:
                raise NotFound(f"{what}: {e.msg or 'not found'}") from None
            except vmodl.MethodFault as e:
                raise BackendError(f"{what}: {type(e).__name__}: {e.msg}") from None
            except (OSError, ssl.SSLError, http.client.HTTPException) as e:
                reason = self._failure(e)
                if not resend:
                    raise ReplyLost(f"{what}: vCenter {reason}") from None
            if attempt == 2:
                break
            self._relogin(generation, reason, what, started)
        raise BackendError(f"{what}: vCenter {reason}")

    def _failure(self, e: BaseException) -> str:
        if isinstance(e, TimeoutError):
            return f"did not answer within {self.server.timeout:g} s (--vcenter-timeout)"
        return f"connection failed ({e or type(e).__name__})"

    def _relogin(self, generation: int, reason: str, what: str, started: float) -> None:
        """Log in again once for everyone whose call failed in this generation; a call that
        began before the last failed attempt shares that failure instead of trying again (a
        silent vCenter would otherwise cost each waiting thread its own deadline in turn)."""
        with self._lock:
            if self._generation != generation:
                return  # another thread logged in again meanwhile
            failed = self._login_failed
            if failed is not None and failed[0] >= started:
                raise BackendError(f"{what}: {failed[1]}")
            log.info("vCenter %s; logging in again", reason)
            try:
                # The certificate is checked again: VDDK keeps using the thumbprint seen first.
                assert self._ctx is not None
                if probe_certificate(self.server, self._ctx) != self.thumbprint:
                    raise BackendError("the server certificate changed since mounting")
                self._login()
            except (LoginRefused, Unreachable, TlsProblem, BackendError) as e:
                self._login_failed = (time.monotonic(), str(e))
                raise BackendError(f"{what}: {e}") from None
            self._login_failed = None
            self._generation += 1

    def map(
        self, fn: Callable[[T], R], items: Iterable[T], skip: type[Exception] | None = None
    ) -> list[R]:
        """`fn` over `items`, up to `pool` at once, results in order; items whose call raises
        `skip` (e.g. NotFound: deleted meanwhile) are left out."""
        todo: Sequence[T] = list(items)
        if len(todo) <= 1:
            return [r for r in (self._one(fn, x, skip) for x in todo) if r is not _SKIPPED]
        with ThreadPoolExecutor(max_workers=min(self.pool, len(todo))) as ex:
            results = list(ex.map(lambda x: self._one(fn, x, skip), todo))
        return [r for r in results if r is not _SKIPPED]

    @staticmethod
    def _one(fn: Callable[[T], R], item: T, skip: type[Exception] | None) -> Any:
        try:
            return fn(item)
        except Exception as e:
            if skip is not None and isinstance(e, skip):
                return _SKIPPED
            raise


_SKIPPED = object()
