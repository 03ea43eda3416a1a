"""Who may associate: the A-ASSOCIATE-RQ's called and calling AE titles, the connection's address and, over TLS,
the client certificate, against the configured peers. A pure function: `service` asks it when a request arrives
(EVT_REQUESTED) and answers A-ASSOCIATE-RJ when it refuses.

A refusal is rejected-permanent by the service user (PS3.8 9.3.4) with the diagnostic the standard has for it:
called-AE-title-not-recognized (7) when the request is not addressed to this AE, calling-AE-title-not-recognized
(3) for everything about the caller (an unknown title, a known title from an address or with a certificate not
bound to it), so the caller learns no more than that its title was not accepted. The reason, for the audit
record, says which.

A certificate identifies its peer: when the client's verified certificate is bound to a peer, the association
can only be that peer's (its calling AE title must be the peer's), whatever title it claims; a peer bound to
certificates is admitted only with one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomweb.dimse.config import ClientCertificate, DimseConfig, Peer

CALLING_AE_TITLE_NOT_RECOGNIZED = 0x03
CALLED_AE_TITLE_NOT_RECOGNIZED = 0x07


@dataclass(frozen=True, slots=True)
class Refusal:
    diagnostic: int
    """The A-ASSOCIATE-RJ diagnostic (PS3.8 Table 9-21, source: service user)."""
    reason: str
    """Why, for the audit record (never sent to the caller)."""


def admit(
    config: DimseConfig,
    own_title: str,
    *,
    calling: str,
    called: str,
    address: str | None,
    certificate: ClientCertificate | None,
) -> Peer | Refusal:
    """The peer the association runs as, or why it is refused."""
    if called.strip() != own_title.strip():
        return Refusal(CALLED_AE_TITLE_NOT_RECOGNIZED, f"called AE title not recognized: {called.strip()[:16]!r}")
    peer = config.peer(calling)
    if peer is None:
        return Refusal(CALLING_AE_TITLE_NOT_RECOGNIZED, "calling AE title not recognized: not a configured peer")
    if certificate is not None:
        owners = [p.ae_title for p in config.peers if p.owns(certificate)]
        if owners and peer.ae_title not in owners:
            return Refusal(
                CALLING_AE_TITLE_NOT_RECOGNIZED,
                f"calling AE title not recognized: the client certificate is bound to {', '.join(owners)[:80]}",
            )
    if peer.certificates and (certificate is None or not peer.owns(certificate)):
        presented = "no client certificate" if certificate is None else "a client certificate not bound to it"
        return Refusal(
            CALLING_AE_TITLE_NOT_RECOGNIZED, f"calling AE title not recognized: the peer came with {presented}"
        )
    if not peer.allows_address(address):
        return Refusal(
            CALLING_AE_TITLE_NOT_RECOGNIZED,
            "calling AE title not recognized: the address is not bound to the peer",
        )
    return peer


__all__ = ["CALLED_AE_TITLE_NOT_RECOGNIZED", "CALLING_AE_TITLE_NOT_RECOGNIZED", "Refusal", "admit"]
