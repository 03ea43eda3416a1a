"""The DICOM Application Entity of the server and its lifecycle (started and stopped by the lifespan).

Accepted: Verification (C-ECHO); every storage SOP class pynetdicom knows, in all transfer syntaxes it knows,
including the compressed ones (the bytes are stored as received); Patient Root and Study Root
Query/Retrieve FIND, MOVE and GET. Storage contexts accept SCP/SCU role selection, so a C-GET requestor can
take the Storage SCP role (PS3.7 D.3.3.4); in those contexts a native syntax is accepted first
(`dicomweb.dimse.syntaxes.prefer_native_for_retrieve`). An association must be addressed to this AE's title and
come from a configured peer, from an address and (over TLS) with a certificate bound to it
(`dicomweb.dimse.admission`): otherwise A-ASSOCIATE-RJ rejected-permanent, service-user, called- or
calling-AE-title-not-recognized (PS3.8 9.3.4). Every association accepted, rejected, released or aborted, and
every failed TLS handshake, is audited.

Listeners: plain TCP on `HOUNSFIELD_DIMSE_PORT`, and DICOM TLS on `HOUNSFIELD_DIMSE_TLS_PORT` when a certificate
is configured (`dicomweb.dimse.tls`); with TLS configured the plain one runs only if `HOUNSFIELD_DIMSE_TLS_ONLY`
is false. Both serve the same AE, handlers and peers. With `HOUNSFIELD_PROCESSES` > 1 every server process listens
on the same ports (SO_REUSEPORT: the kernel spreads the associations over the processes, each with its own
interpreter), and `HOUNSFIELD_DIMSE_MAX_ASSOCIATIONS` applies to each process.

Latency: pynetdicom deep-copies the server's supported contexts for every association it accepts; ours are
~170 storage SOP classes in 45 transfer syntaxes, and copying each UID re-validates it, which cost 40-60 ms of
CPU per association (findscu waited ~89 ms for A-ASSOCIATE-AC; now ~5-20 ms). `served_contexts` hands pynetdicom
contexts whose deep copy copies only what can change. Sockets get TCP_NODELAY (`dicomweb.dimse.tcp`). pynetdicom's
own INFO logging is off: it logs every C-FIND identifier (patient names and IDs) and each message.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import threading
from typing import Any

import anyio.to_thread
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicomweb.dimse.admission import CALLING_AE_TITLE_NOT_RECOGNIZED, Refusal, admit
from dicomweb.dimse.audit import association_record
from dicomweb.dimse.config import LOOPBACK
from dicomweb.dimse.handlers_query import handle_find
from dicomweb.dimse.handlers_retrieve import handle_get, handle_move
from dicomweb.dimse.handlers_store import handle_store
from dicomweb.dimse.node import Node
from dicomweb.dimse.syntaxes import prefer_native_for_retrieve
from dicomweb.dimse.tcp import SharedPortServer, nodelay
from dicomweb.dimse.tls import SharedPortTlsServer, TlsAssociationServer, client_certificate, server_context

log = logging.getLogger(__name__)

QUERY_RETRIEVE = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)


def build_ae(node: Node) -> AE:
    settings = node.settings
    ae = AE(ae_title=settings.dimse_ae_title)
    ae.maximum_associations = settings.dimse_max_associations
    ae.maximum_pdu_size = settings.dimse_max_pdu  # larger PDUs: fewer reactor loops per data set (settings)
    ae.acse_timeout = ae.dimse_timeout = float(settings.dimse_timeout_seconds)
    ae.network_timeout = float(max(60, settings.dimse_timeout_seconds))
    # pynetdicom lets everyone in when the list is empty: `open_dimse` never starts an AE without peers.
    assert settings.dimse.peers, "the AE needs at least one configured peer"
    ae.require_calling_aet = [p.ae_title for p in settings.dimse.peers]  # `_admit` decides first; kept as a net
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for uid in QUERY_RETRIEVE:
        ae.add_supported_context(uid)
    return ae


class _SupportedContext(PresentationContext):
    """A supported presentation context that deep-copies cheaply. Its attributes are immutable values (UIDs are
    `str`, roles `bool`, the id and result ints or None) except the transfer syntax list, so a copy of the
    attribute dict with a new list is a deep copy, without pydicom re-validating 45 UIDs per context."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _SupportedContext:
        new = _SupportedContext.__new__(_SupportedContext)
        new.__dict__.update(self.__dict__)
        new._transfer_syntax = list(self._transfer_syntax)
        return new


def served_contexts(ae: AE) -> list[PresentationContext]:
    """The AE's supported contexts as `_SupportedContext`s, for `AE.start_server(contexts=...)`."""
    out: list[PresentationContext] = []
    for cx in ae.supported_contexts:
        fast = _SupportedContext.__new__(_SupportedContext)
        fast.__dict__.update(cx.__dict__)
        out.append(fast)
    return out


_REJECTIONS = {
    (0x01, 0x01, 0x03): "calling AE title not recognized",
    (0x01, 0x01, 0x07): "called AE title not recognized",
    (0x02, 0x03, 0x02): "local limit exceeded (too many associations)",
    (0x02, 0x02, 0x01): "user identity not accepted",
}


def _append(node: Node, record: Any) -> None:
    try:
        node.run(node.audit.append(record))
    except Exception:
        log.exception("association audit record could not be written")


def _admit(event: Any, node: Node) -> None:
    """EVT_REQUESTED: refuse what `admission.admit` refuses before pynetdicom negotiates anything. pynetdicom logs
    and ignores a handler's exception and would go on negotiating, so any failure here is a refusal."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    try:
        decision = admit(
            node.config,
            node.settings.dimse_ae_title,
            calling=str(request.calling_ae_title or ""),
            called=str(request.called_ae_title or ""),
            address=assoc.requestor.address,
            certificate=client_certificate(getattr(assoc.dul.socket, "socket", None)),
        )
    except Exception:
        log.exception("the association request could not be checked; rejecting it")
        decision = Refusal(CALLING_AE_TITLE_NOT_RECOGNIZED, "the association request could not be checked")
    if not isinstance(decision, Refusal):
        return
    title = str(request.calling_ae_title or "")
    record = association_record(
        title, assoc.requestor.address, None, event="rejected", accepted=False, reason=decision.reason
    )
    _append(node, record)  # before the answer: whoever sees the rejection finds its record
    assoc.acse.send_reject(0x01, 0x01, decision.diagnostic)  # rejected-permanent, service user (PS3.8 9.3.4)
    assoc.kill()


def _audit_association(event: Any, node: Node, kind: str) -> None:
    requestor = event.assoc.requestor
    title = str(requestor.ae_title or "")
    principal = node.principal(title) if kind != "rejected" else None
    reason = None
    if kind == "rejected":  # by pynetdicom itself (too many associations; the nets behind `_admit`)
        rj = event.assoc.acceptor.primitive
        reason = _REJECTIONS.get((rj.result, rj.result_source, rj.diagnostic), "rejected") if rj else None
    record = association_record(
        title, requestor.address, principal, event=kind, accepted=kind != "rejected", reason=reason
    )
    _append(node, record)


def _tls_failure(node: Node, address: str, reason: str) -> None:
    """A TLS handshake failed (`tls.TlsAssociationServer`): a rejected Login without an AE title."""
    _append(node, association_record("", address, None, event="rejected", accepted=False, reason=reason))


class DimseService:
    """Starts the AE's listeners on `settings.host` (plain `dimse_port`, TLS `dimse.tls.port`) without blocking
    the loop."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ae = build_ae(node)
        self._server: Any = None
        self._tls_server: Any = None
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines carry identifiers (PHI)

    @property
    def port(self) -> int:
        """The plain listener's bound port (useful with port 0; 0 when it does not run)."""
        return int(self._server.server_address[1]) if self._server is not None else 0

    @property
    def tls_port(self) -> int:
        """The TLS listener's bound port (0 when it does not run)."""
        return int(self._tls_server.server_address[1]) if self._tls_server is not None else 0

    def _handlers(self) -> list[Any]:
        node = self.node
        return [
            (evt.EVT_C_STORE, handle_store, [node]),
            (evt.EVT_C_FIND, handle_find, [node]),
            (evt.EVT_C_MOVE, handle_move, [node]),
            (evt.EVT_C_GET, handle_get, [node]),
            (evt.EVT_REQUESTED, _admit, [node]),
            (evt.EVT_REQUESTED, prefer_native_for_retrieve),
            (evt.EVT_ACCEPTED, _audit_association, [node, "accepted"]),
            (evt.EVT_REJECTED, _audit_association, [node, "rejected"]),
            (evt.EVT_RELEASED, _audit_association, [node, "released"]),
            (evt.EVT_ABORTED, _audit_association, [node, "aborted"]),
            (evt.EVT_CONN_OPEN, nodelay),
        ]

    async def start(self) -> None:
        settings, tls = self.node.settings, self.node.config.tls
        if tls is not None and tls.listens:
            address = (settings.host, tls.port)
            self._tls_server = await anyio.to_thread.run_sync(self._start_tls, address)
            log.info("DICOM AE %s listening with TLS on %s:%d", self.ae.ae_title, address[0], self.tls_port)
            if tls.only:
                return
        address = (settings.host, settings.dimse_port)
        shared = settings.processes > 1
        self._server = await anyio.to_thread.run_sync(
            self._serve, address, SharedPortServer if shared else ThreadedAssociationServer
        )
        log.info("DICOM AE %s listening on %s:%d", self.ae.ae_title, address[0], self.port)

    def _start_tls(self, address: tuple[str, int]) -> Any:
        """The TLS listener: `TlsAssociationServer` (handshakes off the accept loop)."""
        tls = self.node.config.tls
        assert tls is not None
        shared = self.node.settings.processes > 1
        server = self._serve(address, SharedPortTlsServer if shared else TlsAssociationServer, server_context(tls))
        assert isinstance(server, TlsAssociationServer)
        return server

    def _serve(self, address: tuple[str, int], server_class: type[Any], ssl_context: Any = None) -> Any:
        """`AE.start_server(block=False)` with a server class of ours: made, then served from a daemon thread."""
        server = self.ae.make_server(
            address,
            contexts=served_contexts(self.ae),
            ssl_context=ssl_context,
            evt_handlers=self._handlers(),
            server_class=server_class,
        )
        if isinstance(server, TlsAssociationServer):
            server.handshake_timeout = self.node.timeout
            server.on_failure = lambda address, reason: _tls_failure(self.node, address, reason)
        stamp = dt.datetime.now().strftime("%Y%m%d%H%M%S")
        thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # as start_server does: AssociationServer.shutdown removes it
        return server

    async def stop(self) -> None:
        """Stop accepting, abort associations still open, and wait for the listener threads."""
        for name in ("_server", "_tls_server"):
            server = getattr(self, name)
            setattr(self, name, None)
            if server is not None:
                await anyio.to_thread.run_sync(self._shutdown, server)

    def _shutdown(self, server: Any) -> None:
        server.shutdown()  # no new associations
        for assoc in server.active_associations:
            assoc.abort()
        for assoc in server.active_associations:
            assoc.join(timeout=self.node.timeout)  # a handler in flight finishes on the (still open) pool


async def open_dimse(node: Node) -> DimseService | None:
    """Start the AE of `node`; the caller stops it. Without configured peers nobody could associate, so no port is
    opened (None)."""
    if not node.settings.dimse.peers:
        log.warning("DIMSE is on but HOUNSFIELD_DIMSE_PEERS is empty: no calling AE may associate; not listening")
        return None
    _warn_loopback_only(node.settings)
    service = DimseService(node)
    await service.start()
    return service


def _warn_loopback_only(settings: Any) -> None:
    """Peers without bindings may connect from loopback only: say so when the AE listens on other addresses."""
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    unbound = [p.ae_title for p in settings.dimse.peers if p.networks == LOOPBACK and not p.certificates]
    if unbound and not loopback:
        log.warning(
            "DIMSE peers without an address binding may connect from loopback only: %s (bind them with "
            "@address, @network, @cn:NAME, @sha256:HEX or @* in HOUNSFIELD_DIMSE_PEERS)",
            ", ".join(unbound),
        )
