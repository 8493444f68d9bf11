"""TLS towards vCenter/ESXi: the verification policy, and the certificate's SHA-1 thumbprint.

Role: verified against the system CAs (plus --ca-file) by default; a pinned thumbprint replaces
CA checks; --insecure disables both (logged). One handshake tells the thumbprint of the
certificate actually presented, which VDDK is then given, so the user never computes it.

Concurrency: pure functions; blocking (one TCP connection and handshake).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl

from ivdfs.config import ServerConfig
from ivdfs.errors import TlsProblem, Unreachable

log = logging.getLogger(__name__)


def sha1_thumbprint(der: bytes) -> str:
    digest = hashlib.sha1(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def tls_context(server: ServerConfig) -> ssl.SSLContext:
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
            raise TlsProblem(f"cannot load CA file {server.ca_file}: {e}") from None
    return ctx


def probe_certificate(server: ServerConfig, ctx: ssl.SSLContext) -> str:
    """Handshake once to verify the certificate and learn its SHA-1 thumbprint for VDDK."""
    where = f"{server.host}:{server.port}"
    try:
        # The deadline covers the connect and, as the socket's timeout, the handshake.
        raw = socket.create_connection((server.host, server.port), timeout=server.timeout)
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise Unreachable(f"cannot reach {where}: {reason}") from None
    try:
        with raw, ctx.wrap_socket(raw, server_hostname=server.host) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as e:
        raise TlsProblem(
            f"TLS certificate of {where} failed verification ({e.verify_message}); add its CA "
            "with --ca-file, pin it with --thumbprint, or (lab only) use --insecure"
        ) from None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
        # Accepted, then closed before any certificate: whether the client sees an EOF or a
        # reset is a race, and either way no vSphere server answered.
        raise Unreachable(
            f"{where} closed the connection during the TLS handshake: it is not a vCenter or "
            "ESXi (or something in between blocks TLS)"
        ) from None
    except ssl.SSLError as e:
        if "WRONG_VERSION_NUMBER" in str(e) or "record layer failure" in str(e):
            # A plain-HTTP server answered the handshake with text: it is not vSphere.
            raise Unreachable(f"{where} does not speak TLS: it is not a vCenter or ESXi") from None
        raise TlsProblem(f"TLS handshake with {where} failed: {e}") from None
    except TimeoutError:
        raise Unreachable(
            f"{where} does not answer the TLS handshake within {server.timeout:g} s "
            "(--vcenter-timeout)"
        ) from None
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise Unreachable(f"{where} does not answer the TLS handshake: {reason}") from None
    if not der:
        raise TlsProblem(f"{where} presented no certificate")
    thumbprint = sha1_thumbprint(der)
    if server.thumbprint and thumbprint != server.thumbprint:
        raise TlsProblem(
            f"certificate thumbprint mismatch for {server.host}: the server presented "
            f"{thumbprint}, --thumbprint pins {server.thumbprint}"
        )
    if server.insecure:
        log.warning(
            "TLS verification disabled (--insecure); server certificate SHA-1 %s", thumbprint
        )
    return thumbprint
