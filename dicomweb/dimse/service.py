"""The DICOM Application Entity of the server and its lifecycle (started and stopped by the lifespan).

Accepted: Verification (C-ECHO); every storage SOP class pynetdicom knows, in all transfer syntaxes it knows,
including the compressed ones (the bytes are stored as received); Patient Root and Study Root
Query/Retrieve FIND, MOVE and GET. Storage contexts accept SCP/SCU role selection, so a C-GET requestor can
take the Storage SCP role (PS3.7 D.3.3.4). Only configured calling AE titles may associate: any other gets
A-ASSOCIATE-RJ rejected-permanent, service-user, "calling-AE-title-not-recognized" (PS3.8 9.3.4). Every
association accepted, rejected, released or aborted is audited.

Latency: pynetdicom deep-copies the server's supported contexts for every association it accepts; ours are
~170 storage SOP classes in 45 transfer syntaxes, and copying each UID re-validates it, which cost 40-60 ms of
CPU per association (findscu waited ~89 ms for A-ASSOCIATE-AC; now ~5-20 ms). `served_contexts` hands pynetdicom
contexts whose deep copy copies only what can change. Sockets get TCP_NODELAY (`dicomweb.dimse.tcp`). pynetdicom's
own INFO logging is off: it logs every C-FIND identifier (patient names and IDs) and each message.
"""

from __future__ import annotations

import logging
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

from dicomweb.dimse.audit import association_record
from dicomweb.dimse.handlers_query import handle_find
from dicomweb.dimse.handlers_retrieve import handle_get, handle_move
from dicomweb.dimse.handlers_store import handle_store
from dicomweb.dimse.node import Node
from dicomweb.dimse.tcp import nodelay

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
    ae.require_calling_aet = [p.ae_title for p in settings.dimse.peers]
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


def _audit_association(event: Any, node: Node, kind: str) -> None:
    requestor = event.assoc.requestor
    title = str(requestor.ae_title or "")
    principal = node.principal(title) if kind != "rejected" else None
    record = association_record(title, requestor.address, principal, event=kind, accepted=kind != "rejected")
    try:
        node.run(node.audit.append(record))
    except Exception:
        log.exception("association audit record could not be written")


class DimseService:
    """Starts the AE's listener on `settings.host:settings.dimse_port` without blocking the loop."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ae = build_ae(node)
        self._server: Any = None
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines carry identifiers (PHI)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._server.server_address[1]) if self._server is not None else 0

    def _handlers(self) -> list[Any]:
        node = self.node
        return [
            (evt.EVT_C_STORE, handle_store, [node]),
            (evt.EVT_C_FIND, handle_find, [node]),
            (evt.EVT_C_MOVE, handle_move, [node]),
            (evt.EVT_C_GET, handle_get, [node]),
            (evt.EVT_ACCEPTED, _audit_association, [node, "accepted"]),
            (evt.EVT_REJECTED, _audit_association, [node, "rejected"]),
            (evt.EVT_RELEASED, _audit_association, [node, "released"]),
            (evt.EVT_ABORTED, _audit_association, [node, "aborted"]),
            (evt.EVT_CONN_OPEN, nodelay),
        ]

    async def start(self) -> None:
        address = (self.node.settings.host, self.node.settings.dimse_port)
        self._server = await anyio.to_thread.run_sync(
            lambda: self.ae.start_server(
                address, block=False, evt_handlers=self._handlers(), contexts=served_contexts(self.ae)
            )
        )
        log.info("DICOM AE %s listening on %s:%d", self.ae.ae_title, address[0], self.port)

    async def stop(self) -> None:
        """Stop accepting, abort associations still open, and wait for the listener thread."""
        server, self._server = self._server, None
        if server is not None:
            await anyio.to_thread.run_sync(self._shutdown, server)

    def _shutdown(self, server: Any) -> None:
        server.shutdown()  # no new associations
        for assoc in server.active_associations:
            assoc.abort()
        for assoc in server.active_associations:
            assoc.join(timeout=self.node.timeout)  # a handler in flight finishes on the (still open) pool


async def open_dimse(resources: Any) -> DimseService | None:
    """Start the AE on the lifespan's resources (`server.resources.Resources`); the caller stops it. Without
    configured peers nobody could associate, so no port is opened (None)."""
    import asyncio

    if not resources.settings.dimse.peers:
        log.warning("DIMSE is on but HOUNSFIELD_DIMSE_PEERS is empty: no calling AE may associate; not listening")
        return None

    node = Node(
        asyncio.get_running_loop(),
        resources.settings,
        resources.pool,
        resources.store,
        resources.blobs,
        resources.audit,
        resources.policy,
    )
    service = DimseService(node)
    await service.start()
    return service
