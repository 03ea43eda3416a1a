"""DICOM TLS (PS3.15 Annex B, the BCP 195 TLS Secure Transport Connection Profiles): the listener's and the
requestor's SSL contexts, the TLS association server, and the client certificate of a connection.

Contexts follow BCP 195 (RFC 9325) as the non-downgrading profile asks: TLS 1.2 or later, ECDHE key exchange with
AES-GCM or ChaCha20-Poly1305 for TLS 1.2 (TLS 1.3's suites are all acceptable), no compression, no renegotiation.

pynetdicom's server wraps each accepted socket in its accept loop, so the handshake would run there, and one
client that connects and sends nothing would hold up every other connection. `TlsAssociationServer` accepts plain
sockets and runs the handshake in the connection's own thread, within the DIMSE timeout; a failed handshake (a
plain-text client, no client certificate where one is required, one the CA did not sign) closes the connection
before any association exists and is reported to `on_failure` (for the audit trail).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from dicomweb.dimse.config import ClientCertificate, TlsConfig

log = logging.getLogger(__name__)

CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""TLS 1.2 suites of BCP 195 (RFC 9325 4.2) with forward secrecy and AEAD."""

_VERIFY = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "off": ssl.CERT_NONE}


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The listener's context: the server's certificate and key, client certificates as configured."""
    assert tls.cert is not None and tls.key is not None
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca is not None:
        context.load_verify_locations(cafile=tls.ca)
    context.verify_mode = _VERIFY[tls.client_certificates]
    return context


@functools.lru_cache(maxsize=4)
def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """The context of associations this server requests (C-MOVE destinations, routing): the destination's
    certificate verified against the CA and its host name or address; the server's own certificate presented."""
    assert tls.ca is not None
    context = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca)))
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def client_certificate(sock: Any) -> ClientCertificate | None:
    """The verified certificate the client presented on a TLS socket (None: plain text, or no certificate)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    subject: Any = (sock.getpeercert() or {}).get("subject", ())  # ((("commonName", "x"),), ...): RDNs of pairs
    names = tuple(str(value) for rdn in subject for key, value in rdn if key == "commonName")
    return ClientCertificate(names, hashlib.sha256(der).hexdigest())


HandshakeFailure = Callable[[str, str], None]
"""`(client address, reason)`: a TLS handshake failed."""


class TlsAssociationServer(ThreadedAssociationServer):
    """An association server whose TLS handshakes run in each connection's thread (see the module docstring).
    `ssl_context` is the listener's context; `handshake_timeout` and `on_failure` are set after construction."""

    handshake_timeout: float = 30.0
    on_failure: HandshakeFailure | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        context = self.ssl_context
        assert context is not None
        try:
            request.settimeout(self.handshake_timeout)
            wrapped = context.wrap_socket(request, server_side=True)
            wrapped.settimeout(None)
        except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self._failed(request, str(client_address[0]), f"TLS handshake failed: {reason}")
            return
        super().process_request_thread(wrapped, client_address)

    def _failed(self, request: socket.socket, address: str, reason: str) -> None:
        try:
            request.close()
        except OSError:
            pass
        if self.on_failure is not None:
            try:
                self.on_failure(address, reason)
            except Exception:
                log.exception("a failed TLS handshake could not be reported")


class SharedPortTlsServer(TlsAssociationServer):
    """`TlsAssociationServer` on a port shared by the server's processes (see `tcp.SharedPortServer`)."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()
