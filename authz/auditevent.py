"""An audit record as a FHIR R4 AuditEvent, following IHE BALP (Basic Audit Log Patterns, ITI): the client is the
Source Role ID (DCM 110153), the server the Destination Role ID (DCM 110152), the user the agent that requested
(type IRCP for query/retrieve, AGNT for create/update, INF for export), the patient an entity of type Person /
role Patient, the query of a search an entity of role Query carrying it base64-encoded (`entity.query`), the
study an entity identified by its UID (`urn:dicom:uid`, value `urn:oid:<UID>`; series and instance UIDs as
entity details). Valid against `fhir.resources.R4B.auditevent.AuditEvent`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from authz.auditrecord import AuditRecord

DCM = "http://dicom.nema.org/resources/ontology/DCM"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ROLE_CLASS = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
DICOM_UID = "urn:dicom:uid"
OBSERVER = "hounsfield"

_USER_TYPE = {
    "R": (PARTICIPATION, "IRCP", "information recipient"),
    "E": (PARTICIPATION, "IRCP", "information recipient"),
    "C": (ROLE_CLASS, "AGNT", "agent"),
    "U": (ROLE_CLASS, "AGNT", "agent"),
    "D": (ROLE_CLASS, "AGNT", "agent"),
}
_OUTCOME_DESC = {"0": "Success", "4": "Minor failure", "8": "Serious failure", "12": "Major failure"}


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def _instant(value: dt.datetime) -> str:
    value = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _purposes(record: AuditRecord) -> list[dict[str, Any]]:
    codes = list(record.purpose_of_use)
    if record.break_glass and "BTG" not in codes:
        codes.append("BTG")
    return [{"coding": [{"system": ACT_REASON, "code": code}]} for code in codes]


def _agents(record: AuditRecord) -> list[dict[str, Any]]:
    who = record.agent
    network = {"address": who.address, "type": "2"} if who.address else None  # 2 = IP address
    system, code, display = _USER_TYPE[record.action]
    if record.type.code == "110106":  # Export
        system, code, display = PARTICIPATION, "INF", "informant"
    user: dict[str, Any] = {
        "type": {"coding": [_coding(system, code, display)]},
        "who": {"identifier": {"value": who.sub or "anonymous"}}
        | ({"display": who.sub} if who.sub else {"display": "unauthenticated"}),
        "requestor": who.requestor,
    }
    if who.issuer:
        user["who"]["identifier"]["system"] = who.issuer if ":" in who.issuer else f"urn:hounsfield:{who.issuer}"
    if who.roles:
        user["role"] = [{"text": role} for role in who.roles]
    if record.decision_id:
        user["policy"] = [f"urn:uuid:{record.decision_id}"]
    if record.purpose_of_use or record.break_glass:
        user["purposeOfUse"] = _purposes(record)
    if network:
        user["network"] = network
    if who.ae_title:
        user["altId"] = who.ae_title
    agents = [user]
    client: dict[str, Any] = {
        "type": {"coding": [_coding(DCM, "110153", "Source Role ID")]},
        "who": {"display": who.client_id or who.ae_title or "client"},
        "requestor": False,
    }
    if who.client_id:
        client["who"]["identifier"] = {"value": who.client_id}
    if network:
        client["network"] = network
    agents.append(client)
    agents.append(
        {
            "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
            "who": {"display": OBSERVER},
            "requestor": False,
        }
    )
    return agents


def _entities(record: AuditRecord) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if record.patient_id:
        entities.append(
            {
                "what": {"identifier": {"value": record.patient_id}},
                "type": _coding(ENTITY_TYPE, "1", "Person"),
                "role": _coding(OBJECT_ROLE, "1", "Patient"),
            }
        )
    if record.study_uid:
        details = [
            {"type": name, "valueString": value}
            for name, value in (("SeriesInstanceUID", record.series_uid), ("SOPInstanceUID", record.instance_uid))
            if value
        ]
        study: dict[str, Any] = {
            "what": {"identifier": {"system": DICOM_UID, "value": f"urn:oid:{record.study_uid}"}},
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "3", "Report"),
            "name": "Study Instance UID",
        }
        if details:
            study["detail"] = details
        entities.append(study)
    if record.query:
        entities.append(
            {
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "24", "Query"),
                "query": record.query,
            }
        )
    request = [
        {"type": name, "valueString": str(value)}
        for name, value in (
            ("method", record.method),
            ("path", record.path),
            ("status", record.status),
            ("channel", record.channel),
            ("policy-revision", record.policy_revision),
            ("break-glass", "true" if record.break_glass else None),
            ("reason", record.reason),
        )
        if value is not None
    ]
    if record.path or record.method or record.policy_revision:
        entities.append(
            {
                "what": {"display": f"{record.method or ''} {record.path or ''}".strip() or "request"},
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
                "detail": request,
            }
        )
    return entities


def to_fhir(record: AuditRecord, seq: int, *, recorded_at: dt.datetime | None = None) -> dict[str, Any]:
    """The AuditEvent (R4) for the record at `seq` of the chain; its id is the seq. `recorded` is when the trail
    stored it (default: the record's time); `period` the access itself."""
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(seq),
        "type": record.type.to_json(),
        "action": record.action,
        "period": {"start": _instant(record.time), "end": _instant(record.time)},
        "recorded": _instant(recorded_at or record.time),
        "outcome": record.outcome,
        "outcomeDesc": record.outcome_desc or _OUTCOME_DESC[record.outcome],
        "agent": _agents(record),
        "source": {
            "site": OBSERVER,
            "observer": {"display": OBSERVER},
            "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
        },
    }
    if record.subtype:
        event["subtype"] = [code.to_json() for code in record.subtype]
    purposes = _purposes(record)
    if purposes:
        event["purposeOfEvent"] = purposes
    entities = _entities(record)
    if entities:
        event["entity"] = entities
    return event


def validate(event: dict[str, Any]) -> None:
    """Raise (pydantic ValidationError) unless `event` is a valid R4 AuditEvent."""
    from fhir.resources.R4B.auditevent import AuditEvent

    AuditEvent.model_validate(event)
