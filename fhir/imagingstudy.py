"""DICOM -> FHIR R4: ImagingStudy, Patient and Endpoint from what the DICOM index keeps (pure: DICOM JSON in,
resource content out; no database).

Follows https://hl7.org/fhir/R4/imagingstudy-mappings.html (DICOM column) and the R4 ImagingStudy example:

- `ImagingStudy.identifier`: the Study Instance UID (`urn:dicom:uid` | `urn:oid:<uid>`, use official), the
  Accession Number (type v2-0203 `ACSN`; system from the Issuer of Accession Number Sequence's Universal Entity
  ID when it is an ISO OID, UUID or URI) and the Study ID (use secondary).
- `started` / `series.started`: FHIR `dateTime` with a time needs a timezone (R4 2.24.0.1 dateTime). DICOM dates
  and times are local; the offset is known only from Timezone Offset From UTC (0008,0201) of the series or else
  the study. With an offset: `YYYY-MM-DDThh:mm:ss[.f]+hh:mm`. Without one: the date alone (`YYYY-MM-DD`), since
  assuming UTC or the server's zone would state a wrong instant. Partial times (HH, HHMM) are padded with zeros.
- `series.bodySite`: Body Part Examined (0018,0015) as SNOMED CT by DICOM PS3.16 Annex L (the defined terms of
  CID 4031, common ones below); other values keep the term as `display` only.
- `series.laterality`: Laterality (0020,0060) R/L/B as the R4 bodysite-laterality SNOMED CT codes.
- Values FHIR types cannot hold are left out (a negative Series/Instance Number is not an `unsignedInt`).
- `series.modality` is required (1..1): a series without Modality gets DCM `OT` (Other).

Patient (https://hl7.org/fhir/R4/patient.html; DICOM Patient Module PS3.3 C.7.1.1):

- `identifier.value` = Patient ID. `identifier.system` from the issuer: the Issuer of Patient ID Qualifiers
  Sequence's Universal Entity ID as `urn:oid:` (type ISO), `urn:uuid:` (UUID) or itself (URI); else Issuer of
  Patient ID when it is an OID (`urn:oid:`) or a URI; else no system and the issuer text as
  `identifier.assigner.display`. The Qualifiers' Identifier Type Code (a v2-0203 code) becomes `identifier.type`.
- The natural key (`source_key`, one Patient per key) is `<issuer>|<PatientID>` with issuer the system (or the
  issuer text) above, empty when none.
- `name`: one HumanName per component group of the PN (alphabetic, then ideographic and phonetic when present):
  family, given (given and middle names, split on spaces), prefix, suffix.
- `gender`: M/F/O -> male/female/other; anything else (absent, empty) -> unknown. `birthDate` from Patient's
  Birth Date when it is a valid date.

Endpoint (https://hl7.org/fhir/R4/endpoint.html): the archive's DICOMweb service, connection type
`dicom-wado-rs`, payload "DICOM WADO-RS", `application/dicom`, address the public DICOMweb base URL.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fhir.bodyparts import BODY_PARTS

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
URN_DICOM_UID = "urn:dicom:uid"
RFC3986 = "urn:ietf:rfc:3986"
CONNECTION_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
ENDPOINT_SOURCE_KEY = "dicomweb"
"""The natural key of the one Endpoint resource (the archive's DICOMweb service)."""

DicomJson = Mapping[str, Any]
"""A DICOM JSON object (PS3.18 F.2): tag -> {"vr": ..., "Value": [...]}."""

# DICOM tags (PS3.6) read from the index's DICOM JSON.
PATIENT_NAME, PATIENT_ID, ISSUER_OF_PATIENT_ID = "00100010", "00100020", "00100021"
ISSUER_QUALIFIERS, PATIENT_BIRTH_DATE, PATIENT_SEX = "00100024", "00100030", "00100040"
UNIVERSAL_ENTITY_ID, UNIVERSAL_ENTITY_ID_TYPE, IDENTIFIER_TYPE_CODE = "00400032", "00400033", "00400035"
STUDY_UID, STUDY_DATE, STUDY_TIME, STUDY_ID = "0020000D", "00080020", "00080030", "00200010"
ACCESSION_NUMBER, ISSUER_OF_ACCESSION = "00080050", "00080051"
REFERRING_PHYSICIAN, READING_PHYSICIANS = "00080090", "00081060"
STUDY_DESCRIPTION, PROCEDURE_CODES, TIMEZONE_OFFSET = "00081030", "00081032", "00080201"
CODE_VALUE, CODING_SCHEME, CODE_MEANING = "00080100", "00080102", "00080104"
SERIES_UID, MODALITY, SERIES_NUMBER, SERIES_DESCRIPTION = "0020000E", "00080060", "00200011", "0008103E"
SERIES_DATE, SERIES_TIME, BODY_PART, LATERALITY = "00080021", "00080031", "00180015", "00200060"
PERFORMING_PHYSICIAN = "00081050"

_SCHEMES = {
    "SCT": SCT,
    "SRT": "http://snomed.info/srt",
    "LN": "http://loinc.org",
    "DCM": DCM,
    "RADLEX": "http://radlex.org",
    "UCUM": "http://unitsofmeasure.org",
}
"""Coding Scheme Designators (PS3.16 Table 8-1) whose FHIR system URI is known."""

_GENDER = {"M": "male", "F": "female", "O": "other"}
_LATERALITY = {
    "L": ("419161000", "Unilateral left"),
    "R": ("419465000", "Unilateral right"),
    "B": ("51440002", "Bilateral"),
}
"""Laterality (0020,0060) -> http://hl7.org/fhir/ValueSet/bodysite-laterality."""


_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+")
_TZ = re.compile(r"([+-])(\d{2})(\d{2})")


@dataclass(frozen=True, slots=True)
class InstanceData:
    """One instance row of the index."""

    uid: str
    sop_class: str
    number: int | None = None


@dataclass(frozen=True, slots=True)
class SeriesData:
    """One series: its DICOM JSON attributes (the index's `series.attrs`) and its instances, in order."""

    attrs: DicomJson
    instances: Sequence[InstanceData]


@dataclass(frozen=True, slots=True)
class PatientIdentity:
    """Who a study belongs to: the Patient ID, its issuer as an Identifier system (or as text), and the natural
    key that keeps one Patient resource per identifier."""

    patient_id: str
    system: str | None
    issuer_text: str | None
    type_code: str | None

    @property
    def source_key(self) -> str:
        return f"{self.system or self.issuer_text or ''}|{self.patient_id}"


# --- DICOM JSON access ---------------------------------------------------------------------------------------


def values(attrs: DicomJson, tag: str) -> list[Any]:
    element = attrs.get(tag)
    if not isinstance(element, Mapping):
        return []
    found = element.get("Value")
    return list(found) if isinstance(found, list) else []


def text(attrs: DicomJson, tag: str) -> str | None:
    """The first value as stripped text; None when absent or empty."""
    for value in values(attrs, tag):
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            out = str(value).strip()
            if out:
                return out
    return None


def number(attrs: DicomJson, tag: str) -> int | None:
    raw = text(attrs, tag)
    try:
        return int(float(raw)) if raw is not None else None
    except ValueError:
        return None


def items(attrs: DicomJson, tag: str) -> list[DicomJson]:
    return [v for v in values(attrs, tag) if isinstance(v, Mapping)]


# --- datatypes ----------------------------------------------------------------------------------------------


def fhir_date(da: str | None) -> str | None:
    """DA (YYYYMMDD, also YYYY.MM.DD) -> FHIR date; None when not a valid calendar date."""
    if not da:
        return None
    raw = da.replace(".", "").replace("-", "").strip()
    if len(raw) != 8 or not raw.isdigit():
        return None
    try:
        return dt.date(int(raw[:4]), int(raw[4:6]), int(raw[6:])).isoformat()
    except ValueError:
        return None


def fhir_offset(tz: str | None) -> str | None:
    """Timezone Offset From UTC (&ZZXX, e.g. -0500) -> FHIR `-05:00`; None when absent or malformed."""
    match = _TZ.fullmatch((tz or "").strip())
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    if int(hours) > 14 or int(minutes) > 59 or (int(hours) == 14 and int(minutes) > 0):
        return None
    return f"{sign}{hours}:{minutes}"


def fhir_datetime(da: str | None, tm: str | None, tz: str | None) -> str | None:
    """DA + TM + offset -> FHIR dateTime: with a time only when the offset is known (see the module docstring)."""
    date = fhir_date(da)
    if date is None:
        return None
    offset = fhir_offset(tz)
    raw = (tm or "").replace(":", "").strip()
    head, _, fraction = raw.partition(".")
    if offset is None or not head.isdigit() or len(head) not in (2, 4, 6):
        return date
    hh, mm, ss = head[:2], head[2:4] or "00", head[4:6] or "00"
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        return date
    frac = f".{fraction}" if fraction.isdigit() else ""
    return f"{date}T{hh}:{mm}:{ss}{frac}{offset}"


def _pn_groups(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [str(value[k]) for k in ("Alphabetic", "Ideographic", "Phonetic") if value.get(k)]
    return []


def human_name(pn: str) -> dict[str, Any] | None:
    """One PN component group (family^given^middle^prefix^suffix, PS3.5 6.2.1) -> HumanName."""
    parts = [p.strip() for p in pn.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    name: dict[str, Any] = {}
    if family:
        name["family"] = family
    given_names = given.split() + middle.split()
    if given_names:
        name["given"] = given_names
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name or None


def human_names(attrs: DicomJson, tag: str) -> list[dict[str, Any]]:
    out = []
    for value in values(attrs, tag)[:1]:
        for group in _pn_groups(value):
            name = human_name(group)
            if name is not None:
                out.append(name)
    return out


def display_name(pn: str) -> str | None:
    """A PN as people write it: prefix given middle family suffix."""
    name = human_name(pn)
    if name is None:
        return None
    words = [*name.get("prefix", []), *name.get("given", []), name.get("family", ""), *name.get("suffix", [])]
    return " ".join(w for w in words if w) or None


def person_references(attrs: DicomJson, tag: str) -> list[dict[str, Any]]:
    """Each value of a PN attribute as a display-only Reference (R4 allows a Reference with only `display`)."""
    out = []
    for value in values(attrs, tag):
        groups = _pn_groups(value)
        shown = display_name(groups[0]) if groups else None
        if shown:
            out.append({"display": shown})
    return out


def gender(sex: str | None) -> str:
    return _GENDER.get((sex or "").strip().upper(), "unknown")


def body_site(term: str | None) -> dict[str, Any] | None:
    """Body Part Examined -> Coding: SNOMED CT per PS3.16 Annex L, else the term as display."""
    if not term:
        return None
    key = re.sub(r"[\s_\-]", "", term.upper())
    known = BODY_PARTS.get(key)
    if known is None:
        return {"display": term}
    return {"system": SCT, "code": known[0], "display": known[1]}


def laterality(value: str | None) -> dict[str, Any] | None:
    known = _LATERALITY.get((value or "").strip().upper())
    return {"system": SCT, "code": known[0], "display": known[1]} if known else None


def codeable_concept(item: DicomJson) -> dict[str, Any] | None:
    """A Code Sequence item (PS3.3 8.8) -> CodeableConcept; unknown schemes keep only the meaning as text."""
    code, scheme, meaning = text(item, CODE_VALUE), text(item, CODING_SCHEME), text(item, CODE_MEANING)
    concept: dict[str, Any] = {}
    system = _SCHEMES.get((scheme or "").upper())
    if code and system:
        coding = {"system": system, "code": code}
        if meaning:
            coding["display"] = meaning
        concept["coding"] = [coding]
    if meaning:
        concept["text"] = meaning
    return concept or None


def _issuer_system(entity_id: str | None, entity_type: str | None) -> str | None:
    """A Universal Entity ID (HL7 v2 HD) or free-text issuer -> a URI usable as Identifier.system."""
    if not entity_id:
        return None
    kind = (entity_type or "").upper()
    if kind == "ISO" or (not kind and _OID.fullmatch(entity_id)):
        return f"urn:oid:{entity_id}" if _OID.fullmatch(entity_id) else None
    if kind == "UUID":
        return f"urn:uuid:{entity_id.lower()}"
    if kind in ("URI", "URL") and _URI.fullmatch(entity_id):
        return entity_id
    if not kind and entity_id.startswith(("urn:", "http://", "https://")) and _URI.fullmatch(entity_id):
        return entity_id  # free text (Issuer of Patient ID) is a system only when it is plainly a URI
    return None


# --- Patient ------------------------------------------------------------------------------------------------


def patient_identity(study_attrs: DicomJson) -> PatientIdentity | None:
    """The Patient a study belongs to; None when it has no Patient ID (type 2: may be empty)."""
    patient_id = text(study_attrs, PATIENT_ID)
    if patient_id is None:
        return None
    issuer = text(study_attrs, ISSUER_OF_PATIENT_ID)
    system: str | None = None
    type_code: str | None = None
    for qualifiers in items(study_attrs, ISSUER_QUALIFIERS)[:1]:
        system = _issuer_system(text(qualifiers, UNIVERSAL_ENTITY_ID), text(qualifiers, UNIVERSAL_ENTITY_ID_TYPE))
        type_code = text(qualifiers, IDENTIFIER_TYPE_CODE)
    if system is None:
        system = _issuer_system(issuer, None)
    return PatientIdentity(patient_id, system, None if system else issuer, type_code)


def patient_resource(study_attrs: DicomJson, identity: PatientIdentity | None) -> dict[str, Any]:
    """A Patient from the DICOM Patient Module of a study (identity None: a study without Patient ID)."""
    resource: dict[str, Any] = {"resourceType": "Patient"}
    if identity is not None:
        identifier: dict[str, Any] = {}
        if identity.type_code:
            identifier["type"] = {"coding": [{"system": V2_0203, "code": identity.type_code}]}
        if identity.system:
            identifier["system"] = identity.system
        identifier["value"] = identity.patient_id
        if identity.issuer_text:
            identifier["assigner"] = {"display": identity.issuer_text}
        resource["identifier"] = [identifier]
    names = human_names(study_attrs, PATIENT_NAME)
    if names:
        resource["name"] = names
    resource["gender"] = gender(text(study_attrs, PATIENT_SEX))
    birth = fhir_date(text(study_attrs, PATIENT_BIRTH_DATE))
    if birth:
        resource["birthDate"] = birth
    return resource


# --- Endpoint -----------------------------------------------------------------------------------------------


def dicomweb_address(public_url: str | None, host: str, port: int) -> str:
    """The DICOMweb base URL clients reach: `<public_url>/dicom-web` when configured, else the bound address
    (`http://host:port/dicom-web`; a wildcard bind such as 0.0.0.0 needs HOUNSFIELD_PUBLIC_URL to be useful)."""
    if public_url:
        return public_url.rstrip("/") + "/dicom-web"
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/dicom-web"


def endpoint_resource(address: str) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPES, "code": "dicom-wado-rs"},
        "name": "Hounsfield DICOMweb",
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }


# --- ImagingStudy -------------------------------------------------------------------------------------------


def _unsigned(value: int | None) -> int | None:
    return value if value is not None and value >= 0 else None


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    if value is not None and value != [] and value != "":
        target[key] = value


def modalities(series: Iterable[SeriesData]) -> tuple[str, ...]:
    """The distinct modalities of a study's series, sorted (so that the resource is the same for the same
    study whatever order rows come in)."""
    return tuple(sorted({m for s in series if (m := text(s.attrs, MODALITY))}))


def _study_identifiers(attrs: DicomJson, study_uid: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"use": "official", "system": URN_DICOM_UID, "value": f"urn:oid:{study_uid}"}]
    accession = text(attrs, ACCESSION_NUMBER)
    if accession:
        identifier: dict[str, Any] = {"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}}
        for issuer in items(attrs, ISSUER_OF_ACCESSION)[:1]:
            _put(
                identifier,
                "system",
                _issuer_system(text(issuer, UNIVERSAL_ENTITY_ID), text(issuer, UNIVERSAL_ENTITY_ID_TYPE)),
            )
        identifier["value"] = accession
        out.append(identifier)
    study_id = text(attrs, STUDY_ID)
    if study_id:
        out.append({"use": "secondary", "value": study_id})
    return out


def _series(series: SeriesData, study_tz: str | None) -> dict[str, Any]:
    attrs = series.attrs
    entry: dict[str, Any] = {"uid": text(attrs, SERIES_UID) or ""}
    _put(entry, "number", _unsigned(number(attrs, SERIES_NUMBER)))
    entry["modality"] = {"system": DCM, "code": text(attrs, MODALITY) or "OT"}
    _put(entry, "description", text(attrs, SERIES_DESCRIPTION))
    entry["numberOfInstances"] = len(series.instances)
    _put(entry, "bodySite", body_site(text(attrs, BODY_PART)))
    _put(entry, "laterality", laterality(text(attrs, LATERALITY)))
    tz = text(attrs, TIMEZONE_OFFSET) or study_tz
    _put(entry, "started", fhir_datetime(text(attrs, SERIES_DATE), text(attrs, SERIES_TIME), tz))
    _put(entry, "performer", [{"actor": ref} for ref in person_references(attrs, PERFORMING_PHYSICIAN)])
    instances = []
    for inst in series.instances:
        item: dict[str, Any] = {"uid": inst.uid, "sopClass": {"system": RFC3986, "code": f"urn:oid:{inst.sop_class}"}}
        _put(item, "number", _unsigned(inst.number))
        instances.append(item)
    _put(entry, "instance", instances)
    return entry


def imaging_study(
    study_attrs: DicomJson,
    series: Sequence[SeriesData],
    *,
    study_uid: str,
    subject: str,
    endpoint: str | None,
) -> dict[str, Any]:
    """The ImagingStudy of one study (`subject`: "Patient/<id>", `endpoint`: "Endpoint/<id>")."""
    attrs = study_attrs
    tz = text(attrs, TIMEZONE_OFFSET)
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": _study_identifiers(attrs, study_uid),
        "status": "available",
    }
    _put(resource, "modality", [{"system": DCM, "code": m} for m in modalities(series)])
    resource["subject"] = {"reference": subject}
    _put(resource, "started", fhir_datetime(text(attrs, STUDY_DATE), text(attrs, STUDY_TIME), tz))
    referrers = person_references(attrs, REFERRING_PHYSICIAN)
    if referrers:
        resource["referrer"] = referrers[0]
    _put(resource, "interpreter", person_references(attrs, READING_PHYSICIANS))
    if endpoint:
        resource["endpoint"] = [{"reference": endpoint}]
    resource["numberOfSeries"] = len(series)
    resource["numberOfInstances"] = sum(len(s.instances) for s in series)
    _put(resource, "procedureCode", [c for i in items(attrs, PROCEDURE_CODES) if (c := codeable_concept(i))])
    _put(resource, "description", text(attrs, STUDY_DESCRIPTION))
    _put(resource, "series", [_series(s, tz) for s in series])
    return resource
