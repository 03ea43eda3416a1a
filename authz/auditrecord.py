"""An audit record: what IHE BALP (Basic Audit Log Patterns) asks of a FHIR R4 AuditEvent: who (subject, roles,
client application, network address), what (event type and subtype, action, patient, study/series/instance, the
query of a search), when, why (purpose of use), outcome, and the policy decision (id, revision, break-glass).
`authz.auditevent.to_fhir` renders one as an AuditEvent; `authz.audit` chains them.

Tokens are never part of a record: there is no field for one, and any string that looks like a JWT is cut out
before the record is written. Queries are kept as base64 (BALP entity.query), never as plain text.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from authz.decision import Action, Decision, Resource
from authz.principal import Principal

RECORD_VERSION = 1

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"

FhirAction = Literal["C", "R", "U", "D", "E"]
Outcome = Literal["0", "4", "8", "12"]


@dataclass(frozen=True, slots=True)
class Code:
    """A Coding: the event type and subtype vocabularies of FHIR R4 AuditEvent (DICOM PS3.16 CID 400/401, HL7)."""

    system: str
    code: str
    display: str

    def to_json(self) -> dict[str, str]:
        return {"system": self.system, "code": self.code, "display": self.display}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Code:
        return cls(str(value["system"]), str(value["code"]), str(value.get("display", "")))


class EventType:
    """AuditEvent.type codes (DICOM PS3.16 CID 400; FHIR audit-event-type)."""

    REST = Code(AUDIT_EVENT_TYPE, "rest", "RESTful Operation")
    PATIENT_RECORD = Code(DCM, "110110", "Patient Record")
    QUERY = Code(DCM, "110112", "Query")
    INSTANCES_ACCESSED = Code(DCM, "110103", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = Code(DCM, "110104", "DICOM Instances Transferred")
    EXPORT = Code(DCM, "110106", "Export")
    IMPORT = Code(DCM, "110107", "Import")
    SECURITY_ALERT = Code(DCM, "110113", "Security Alert")
    USER_AUTHENTICATION = Code(DCM, "110114", "User Authentication")


class EventSubtype:
    """AuditEvent.subtype codes (DICOM PS3.16 CID 401 for alerts; FHIR restful-interaction for REST, as BALP)."""

    EMERGENCY_OVERRIDE_STARTED = Code(DCM, "110127", "Emergency Override Started")
    EMERGENCY_OVERRIDE_STOPPED = Code(DCM, "110138", "Emergency Override Stopped")
    READ = Code(RESTFUL_INTERACTION, "read", "read")
    SEARCH = Code(RESTFUL_INTERACTION, "search-type", "search-type")
    CREATE = Code(RESTFUL_INTERACTION, "create", "create")
    UPDATE = Code(RESTFUL_INTERACTION, "update", "update")
    DELETE = Code(RESTFUL_INTERACTION, "delete", "delete")


# Policy action -> (type, FHIR action, subtype) for HTTP requests, as IHE BALP's RESTful patterns: a search is an
# "E"xecute of a query (BALP Query), a retrieve a "R"ead; an export is DICOM's Export event.
HTTP_EVENTS: dict[str, tuple[Code, FhirAction, Code | None]] = {
    "search": (EventType.REST, "E", EventSubtype.SEARCH),
    "read": (EventType.REST, "R", EventSubtype.READ),
    "create": (EventType.REST, "C", EventSubtype.CREATE),
    "update": (EventType.REST, "U", EventSubtype.UPDATE),
    "delete": (EventType.REST, "D", EventSubtype.DELETE),
    "export": (EventType.EXPORT, "R", None),
}
# The same for DIMSE (DICOM PS3.15 A.5.3): C-FIND is a Query, C-MOVE/C-GET an access, C-STORE a transfer in.
DIMSE_EVENTS: dict[str, tuple[Code, FhirAction, Code | None]] = {
    "search": (EventType.QUERY, "E", None),
    "read": (EventType.INSTANCES_ACCESSED, "R", None),
    "create": (EventType.INSTANCES_TRANSFERRED, "C", None),
    "update": (EventType.INSTANCES_TRANSFERRED, "U", None),
    "delete": (EventType.INSTANCES_ACCESSED, "D", None),
    "export": (EventType.EXPORT, "R", None),
}


def outcome_for_status(status: int) -> Outcome:
    """FHIR R4 AuditEvent.outcome from an HTTP status: "0" success (< 400); "4" minor failure ("often equivalent
    to an HTTP 400 response": every 4xx, including 401 unauthenticated and 403 denied by policy; a denial is told
    apart by the record's policy decision and outcome_desc); "8" serious failure ("often equivalent to an HTTP
    500 response": every 5xx, including 503 when the policy engine could not decide)."""
    if status < 400:
        return "0"
    if status < 500:
        return "4"
    return "8"


def encode_query(raw: str | bytes) -> str:
    """BALP: the query of a search goes into AuditEvent.entity.query as base64, never as plain text in logs."""
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class Agent:
    """Who asked (BALP agent): the authenticated user (None when unauthenticated), their client application and
    network address. `requestor` is true for the party that initiated the access."""

    sub: str | None
    issuer: str | None = None
    roles: tuple[str, ...] = ()
    client_id: str | None = None
    address: str | None = None
    """The client's IP address (AuditEvent.agent.network.address)."""
    requestor: bool = True
    ae_title: str | None = None
    """DIMSE: the calling AE title."""

    def to_json(self) -> dict[str, Any]:
        return _compact(
            sub=self.sub,
            issuer=self.issuer,
            roles=list(self.roles) or None,
            client_id=self.client_id,
            address=self.address,
            requestor=self.requestor,
            ae_title=self.ae_title,
        )

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Agent:
        return cls(
            sub=_opt(value.get("sub")),
            issuer=_opt(value.get("issuer")),
            roles=tuple(str(r) for r in value.get("roles") or ()),
            client_id=_opt(value.get("client_id")),
            address=_opt(value.get("address")),
            requestor=bool(value.get("requestor", True)),
            ae_title=_opt(value.get("ae_title")),
        )


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited access. `time` is UTC; `query` is base64 (`encode_query`); `outcome` see `outcome_for_status`."""

    time: dt.datetime
    type: Code
    action: FhirAction
    outcome: Outcome
    agent: Agent
    subtype: tuple[Code, ...] = ()
    outcome_desc: str | None = None
    purpose_of_use: tuple[str, ...] = ()
    """HL7 v3 ActReason codes, e.g. TREAT, BTG."""
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    instance_uid: str | None = None
    query: str | None = None
    method: str | None = None
    path: str | None = None
    status: int | None = None
    decision_id: str | None = None
    policy_revision: str | None = None
    break_glass: bool = False
    reason: str | None = None
    """Free text given with the access (the break-glass reason)."""
    channel: str = "http"
    """`http` or `dimse`."""

    def to_json(self) -> dict[str, Any]:
        """The stored form (hashed canonically); keys with no value are left out."""
        time = self.time if self.time.tzinfo else self.time.replace(tzinfo=dt.UTC)
        scrubbed: dict[str, Any] = _scrub(
            {
                "v": RECORD_VERSION,
                "time": time.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                "type": self.type.to_json(),
                "action": self.action,
                "outcome": self.outcome,
                "agent": self.agent.to_json(),
                "channel": self.channel,
                **_compact(
                    subtype=[c.to_json() for c in self.subtype] or None,
                    outcome_desc=self.outcome_desc,
                    purpose_of_use=list(self.purpose_of_use) or None,
                    entity=_compact(
                        patient_id=self.patient_id,
                        study_uid=self.study_uid,
                        series_uid=self.series_uid,
                        instance_uid=self.instance_uid,
                        query=self.query,
                    )
                    or None,
                    http=_compact(method=self.method, path=self.path, status=self.status) or None,
                    policy=_compact(
                        decision_id=self.decision_id,
                        revision=self.policy_revision,
                        break_glass=self.break_glass or None,
                        reason=self.reason,
                    )
                    or None,
                ),
            }
        )
        return scrubbed

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> AuditRecord:
        """Read a stored record; raises ValueError (or KeyError/TypeError) when it is malformed."""
        entity = value.get("entity") or {}
        http = value.get("http") or {}
        policy = value.get("policy") or {}
        action = str(value["action"])
        outcome = str(value["outcome"])
        if action not in ("C", "R", "U", "D", "E") or outcome not in ("0", "4", "8", "12"):
            raise ValueError(f"bad action {action!r} or outcome {outcome!r}")
        return cls(
            time=dt.datetime.fromisoformat(str(value["time"]).replace("Z", "+00:00")),
            type=Code.from_json(value["type"]),
            action=action,  # type: ignore[arg-type]
            outcome=outcome,  # type: ignore[arg-type]
            agent=Agent.from_json(value.get("agent") or {}),
            subtype=tuple(Code.from_json(c) for c in value.get("subtype") or ()),
            outcome_desc=_opt(value.get("outcome_desc")),
            purpose_of_use=tuple(str(p) for p in value.get("purpose_of_use") or ()),
            patient_id=_opt(entity.get("patient_id")),
            study_uid=_opt(entity.get("study_uid")),
            series_uid=_opt(entity.get("series_uid")),
            instance_uid=_opt(entity.get("instance_uid")),
            query=_opt(entity.get("query")),
            method=_opt(http.get("method")),
            path=_opt(http.get("path")),
            status=int(http["status"]) if http.get("status") is not None else None,
            decision_id=_opt(policy.get("decision_id")),
            policy_revision=_opt(policy.get("revision")),
            break_glass=bool(policy.get("break_glass", False)),
            reason=_opt(policy.get("reason")),
            channel=str(value.get("channel", "http")),
        )


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


def _compact(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def _scrub(value: Any) -> Any:
    """No tokens ever: a JWT-looking string is cut out. Also makes strings storable in jsonb and canonical (no
    NUL, no lone surrogates); floats are refused (they would not survive a jsonb round trip bit for bit)."""
    if isinstance(value, str):
        text = _JWT.sub("[redacted]", value).replace("\x00", "\ufffd")
        return text.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {str(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    if isinstance(value, float):
        raise TypeError("audit records hold no floats")
    return value


def canonical_json(value: Mapping[str, Any]) -> str:
    """The text that is hashed: sorted keys, no whitespace, ASCII only (RFC 8259 escapes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def request_record(
    principal: Principal | None,
    decision: Decision | None,
    *,
    action: Action,
    resource: Resource | None,
    status: int,
    method: str | None = None,
    path: str | None = None,
    query_string: str | bytes | None = None,
    client_ip: str | None = None,
    channel: str = "http",
    break_glass: bool = False,
    reason: str | None = None,
    outcome_desc: str | None = None,
    time: dt.datetime | None = None,
) -> AuditRecord:
    """The record of one request, from what the authentication, the guard and the response know."""
    event_type, fhir_action, subtype = (HTTP_EVENTS if channel == "http" else DIMSE_EVENTS)[action]
    if outcome_desc is None and decision is not None and not decision.allow:
        outcome_desc = "; ".join(decision.reasons) or "denied by policy"
    purpose = principal.purpose_of_use if principal else ()
    return AuditRecord(
        time=time or dt.datetime.now(dt.UTC),
        type=event_type,
        subtype=(subtype,) if subtype else (),
        action=fhir_action,
        outcome=outcome_for_status(status),
        outcome_desc=outcome_desc,
        agent=Agent(
            sub=principal.sub if principal else None,
            issuer=principal.issuer if principal else None,
            roles=principal.roles if principal else (),
            client_id=principal.client_id if principal else None,
            address=client_ip,
        ),
        purpose_of_use=purpose,
        patient_id=resource.patient_id if resource else None,
        study_uid=resource.study_uid if resource else None,
        series_uid=resource.series_uid if resource else None,
        instance_uid=resource.instance_uid if resource else None,
        query=encode_query(query_string) if query_string else None,
        method=method,
        path=path,
        status=status,
        decision_id=decision.decision_id if decision else None,
        policy_revision=decision.revision if decision else None,
        break_glass=break_glass or bool(decision and decision.obligations.get("break_glass")),
        reason=reason,
        channel=channel,
    )


def break_glass_record(
    principal: Principal,
    reason: str,
    *,
    client_ip: str | None = None,
    decision: Decision | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    stopped: bool = False,
    time: dt.datetime | None = None,
) -> AuditRecord:
    """Security Alert (DCM 110113) with subtype Emergency Override Started (110127) or Stopped (110138)."""
    subtype = EventSubtype.EMERGENCY_OVERRIDE_STOPPED if stopped else EventSubtype.EMERGENCY_OVERRIDE_STARTED
    purpose = principal.purpose_of_use if "BTG" in principal.purpose_of_use else (*principal.purpose_of_use, "BTG")
    return AuditRecord(
        time=time or dt.datetime.now(dt.UTC),
        type=EventType.SECURITY_ALERT,
        subtype=(subtype,),
        action="E",
        outcome="0",
        agent=Agent(
            sub=principal.sub,
            issuer=principal.issuer,
            roles=principal.roles,
            client_id=principal.client_id,
            address=client_ip,
        ),
        purpose_of_use=purpose,
        patient_id=patient_id,
        study_uid=study_uid,
        decision_id=decision.decision_id if decision else None,
        policy_revision=decision.revision if decision else None,
        break_glass=True,
        reason=reason,
    )
