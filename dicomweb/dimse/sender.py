"""A C-STORE SCU (PS3.4 B.2) for auto-routing: one association to a configured destination, over TLS to a
destination marked `+tls`. Each instance goes in its stored transfer syntax when the destination accepts it,
else decoded (or re-encoded without loss) into one it accepted (`dicomweb.dimse.syntaxes`). Blocking: run it in
a worker thread."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from pynetdicom import AE

from dicomweb.dimse.config import Destination, TlsConfig
from dicomweb.dimse.syntaxes import NotSendable, accepted_syntaxes, outgoing, proposals
from dicomweb.dimse.tcp import NODELAY_HANDLERS
from dicomweb.dimse.tls import client_context


class SendFailed(Exception):
    """The destination could not be reached or refused an instance."""


class NotSent(SendFailed):
    """An instance cannot be sent in any transfer syntax the destination accepted: retrying cannot help."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    sop_class_uid: str
    transfer_syntax_uid: str
    data: bytes
    """A Part 10 file."""


def tls_args(destination: Destination, tls: TlsConfig | None) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for an association to `destination` (None: plain TCP). The destination's
    certificate must name its host (or address) and chain to the configured CA (`check_tls` made sure of one)."""
    if not destination.tls:
        return None
    assert tls is not None and tls.ca is not None
    return client_context(tls), destination.host


def send(
    destination: Destination,
    calling_title: str,
    items: Sequence[Outgoing],
    timeout: float,
    tls: TlsConfig | None = None,
) -> list[int]:
    """C-STORE each item; returns the statuses. Raises SendFailed when no association can be made, NotSent when
    an item cannot be sent in any syntax the destination accepted (the items before it were sent)."""
    try:  # pynetdicom 3.0 leaks its socket when the connection is refused: find out first
        socket.create_connection((destination.host, destination.port), timeout=timeout).close()
    except OSError as exc:
        raise SendFailed(
            f"no association with {destination.ae_title} at {destination.host}:{destination.port}: {exc}"
        ) from None
    ae = AE(ae_title=calling_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = proposals((i.sop_class_uid, i.transfer_syntax_uid) for i in items)
    assoc = ae.associate(
        destination.host,
        destination.port,
        contexts=contexts,
        ae_title=destination.ae_title,
        tls_args=tls_args(destination, tls),
        evt_handlers=NODELAY_HANDLERS,
    )
    if not assoc.is_established:
        raise SendFailed(f"no association with {destination.ae_title} at {destination.host}:{destination.port}")
    statuses = []
    try:
        for item in items:
            accepted = accepted_syntaxes(assoc, item.sop_class_uid)
            try:
                ds = outgoing(item.data, item.transfer_syntax_uid, accepted)
            except NotSendable as exc:
                raise NotSent(f"{destination.ae_title}: {exc}") from None
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if "Status" in rsp else 0xA700)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses
