"""DICOM audit records of the DIMSE channel (PS3.15 A.5.3, IHE ATNA/BALP), appended to the same tamper-evident
trail as HTTP accesses (`authz.audit`).

- association accepted / released: User Authentication (DCM 110114), subtype Login (110122) / Logout (110123);
  a rejected association (called AE title not ours; calling AE title unknown, or from an address or with a
  certificate not bound to it; too many associations) and a failed TLS handshake are a Login with outcome 4
  (minor failure) whose description says why;
- C-STORE received: DICOM Instances Transferred (110104), action C;
- C-FIND: Query (110112), action E, the identifier as DICOM JSON in base64 (entity.query);
- C-MOVE / C-GET: Begin Transferring DICOM Instances (110102) when the sub-operations start, and DICOM
  Instances Transferred (110104), action R, with the counts when they end.

The DIMSE status goes where HTTP records keep theirs (`status`), the DIMSE command in `method`, and the calling
AE title in the agent (`ae_title`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from authz.auditrecord import DCM, Agent, AuditRecord, Code, EventType, Outcome, encode_query, request_record
from authz.decision import Action, Decision, Resource
from authz.principal import Principal

LOGIN = Code(DCM, "110122", "Login")
LOGOUT = Code(DCM, "110123", "Logout")
BEGIN_TRANSFERRING = Code(DCM, "110102", "Begin Transferring DICOM Instances")

_CLIENT_FAILURES = frozenset({0x0122, 0x0124, 0xA801, 0xFE00})


def outcome_of(status: int) -> Outcome:
    """AuditEvent.outcome of a DIMSE status (PS3.7 C): success, warning and pending are 0; refusals caused by the
    request (not authorized, unknown SOP class or destination, bad identifier/data set: 01xx, A9xx, Cxxx) are 4;
    the server's own failures (out of resources A7xx, processing failure 0110) are 8."""
    if status == 0 or status in (0xFF00, 0xFF01) or 0xB000 <= status <= 0xBFFF:
        return "0"
    if status in _CLIENT_FAILURES or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF:
        return "4"
    if 0x0100 <= status <= 0x01FF and status != 0x0110:
        return "4"
    return "8"


def operation_record(
    principal: Principal,
    decision: Decision | None,
    *,
    action: Action,
    command: str,
    resource: Resource | None,
    status: int,
    address: str | None,
    outcome_desc: str | None = None,
    query: bytes | None = None,
    event_type: Code | None = None,
) -> AuditRecord:
    """The record of one DIMSE operation by an associated peer."""
    record = request_record(
        principal,
        decision,
        action=action,
        resource=resource,
        status=200,
        method=command,
        query_string=query,
        client_ip=address,
        channel="dimse",
        outcome_desc=outcome_desc,
    )
    return dataclasses.replace(
        record,
        type=event_type or record.type,
        outcome=outcome_of(status),
        status=status,
        agent=dataclasses.replace(record.agent, ae_title=principal.client_id),
    )


def association_record(
    calling_ae: str,
    address: str | None,
    principal: Principal | None,
    *,
    event: str,
    accepted: bool = True,
    reason: str | None = None,
) -> AuditRecord:
    """`event`: "accepted", "rejected", "released" or "aborted"; `reason`: why it was rejected."""
    desc = {
        "rejected": f"association rejected: {reason or 'calling AE title not recognized'}",
        "aborted": "association aborted",
    }.get(event)
    return AuditRecord(
        time=dt.datetime.now(dt.UTC),
        type=EventType.USER_AUTHENTICATION,
        subtype=(LOGIN if event in ("accepted", "rejected") else LOGOUT,),
        action="E",
        outcome="0" if accepted else "4",
        outcome_desc=desc,
        agent=Agent(
            sub=principal.sub if principal else None,
            issuer=principal.issuer if principal else None,
            roles=principal.roles if principal else (),
            client_id=principal.client_id if principal else None,
            address=address,
            ae_title=calling_ae[:64] or None,
        ),
        method={"released": "A-RELEASE", "aborted": "A-ABORT"}.get(event, "A-ASSOCIATE"),
        channel="dimse",
    )


__all__ = ["BEGIN_TRANSFERRING", "LOGIN", "LOGOUT", "association_record", "encode_query", "operation_record"]
