"""What a resource contributes to the search index (`fhir_search`): one `SearchEntry` per value of each search
parameter the server supports (R4 search 3.1.1.4, https://hl7.org/fhir/R4/search.html; paths and types from the
R4 search parameter registry, https://hl7.org/fhir/R4/searchparameter-registry.html). Pure: a resource in, entries
out. `PARAMS` is the one table of supported parameters: `fhir.search.query` parses queries against it.

How each type is kept (migrations/0007_fhir.sql):
- token: `system`, `code`; the Coding display / CodeableConcept text / Identifier type text in `text_value`
  (normalized, for `:text`). A `code` element (status, gender) carries its value set's system (R4 3.1.1.4.10:
  codes are in their implicit code system).
- string: `text_value` normalized (lower case, accents removed) for the default "starts with" and `:contains`;
  the value as written in `code` for `:exact`. A HumanName or Address gives one entry per part.
- date: `low` / `high` as the period the value covers, `high` exclusive (`2024-05` is [May 1, June 1)); a Period
  without start or end is open on that side (year 1 / 9999).
- reference: `code` "Type/id" for a relative reference (a version suffix dropped), the URL as written for an
  absolute one (the server's base is not known here; `fhir.search.query` matches both forms). A Reference's
  `identifier` is indexed under "<param>:identifier" as a token (R4 3.1.1.4.9 `:identifier`).
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from authz.auditquery import EARLIEST, LATEST
from fhir.audit.search import SearchError, date_range

ParamType = Literal["token", "string", "date", "reference", "uri"]

MAX_CODE_BYTES = 1024
MAX_SYSTEM_BYTES = 512
MAX_TEXT_BYTES = 1024
"""A btree index entry holds at most ~2.7 kB: longer values are cut (at a character boundary)."""


@dataclass(frozen=True, slots=True)
class SearchEntry:
    param: str
    system: str | None = None
    code: str | None = None
    text_value: str | None = None
    low: dt.datetime | None = None
    high: dt.datetime | None = None
    number: Decimal | None = None


@dataclass(frozen=True, slots=True)
class ParamDef:
    """One search parameter: its R4 type, the element paths it reads (dotted, arrays flattened), the implicit
    code system of a `code` element, and a reference's allowed target types."""

    type: ParamType
    paths: tuple[str, ...]
    system: str | None = None
    targets: tuple[str, ...] = ()
    indexed: bool = True
    """False for `_id` and `_lastUpdated`, read from `fhir_resources` itself."""


def _p(type_: ParamType, *paths: str, system: str | None = None, targets: tuple[str, ...] = ()) -> ParamDef:
    return ParamDef(type_, paths, system, targets)


_PRACTITIONERS = ("Practitioner", "PractitionerRole")
COMMON: Mapping[str, ParamDef] = {
    "_id": ParamDef("token", (), indexed=False),
    "_lastUpdated": ParamDef("date", (), indexed=False),
    "_tag": _p("token", "meta.tag"),
    "_security": _p("token", "meta.security"),
    "_profile": _p("uri", "meta.profile"),
}
"""Parameters of every resource (R4 3.1.1.5.1)."""

PARAMS: Mapping[str, Mapping[str, ParamDef]] = {
    "ImagingStudy": {
        **COMMON,
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=("Patient",)),
        "subject": _p("reference", "subject", targets=("Patient", "Device", "Group")),
        "started": _p("date", "started"),
        "modality": _p("token", "series.modality"),
        "series": _p("token", "series.uid"),
        "instance": _p("token", "series.instance.uid"),
        "dicom-class": _p("token", "series.instance.sopClass"),
        "bodysite": _p("token", "series.bodySite"),
        "endpoint": _p("reference", "endpoint", "series.endpoint", targets=("Endpoint",)),
        "status": _p("token", "status", system="http://hl7.org/fhir/imagingstudy-status"),
        "referrer": _p("reference", "referrer", targets=_PRACTITIONERS),
        "basedon": _p(
            "reference",
            "basedOn",
            targets=("CarePlan", "ServiceRequest", "Appointment", "AppointmentResponse", "Task"),
        ),
        "encounter": _p("reference", "encounter", targets=("Encounter",)),
        "interpreter": _p("reference", "interpreter", targets=_PRACTITIONERS),
        "performer": _p(
            "reference",
            "series.performer.actor",
            targets=(*_PRACTITIONERS, "CareTeam", "Organization", "Patient", "Device", "RelatedPerson"),
        ),
        "reason": _p("token", "reasonCode"),
    },
    "DiagnosticReport": {
        **COMMON,
        "identifier": _p("token", "identifier"),
        "patient": _p("reference", "subject", targets=("Patient",)),
        "subject": _p("reference", "subject", targets=("Patient", "Group", "Device", "Location")),
        "status": _p("token", "status", system="http://hl7.org/fhir/diagnostic-report-status"),
        "code": _p("token", "code"),
        "category": _p("token", "category"),
        "date": _p("date", "effectiveDateTime", "effectivePeriod"),
        "issued": _p("date", "issued"),
        "result": _p("reference", "result", targets=("Observation",)),
        "based-on": _p(
            "reference",
            "basedOn",
            targets=("CarePlan", "ImmunizationRecommendation", "MedicationRequest", "NutritionOrder", "ServiceRequest"),
        ),
        "performer": _p("reference", "performer", targets=(*_PRACTITIONERS, "Organization", "CareTeam")),
        "results-interpreter": _p(
            "reference", "resultsInterpreter", targets=(*_PRACTITIONERS, "Organization", "CareTeam")
        ),
        "encounter": _p("reference", "encounter", targets=("Encounter",)),
        "conclusion": _p("token", "conclusionCode"),
        "media": _p("reference", "media.link", targets=("Media",)),
        # Custom: R4 has no search parameter on DiagnosticReport.imagingStudy.
        "imaging-study": _p("reference", "imagingStudy", targets=("ImagingStudy",)),
    },
    "Patient": {
        **COMMON,
        "identifier": _p("token", "identifier"),
        "name": _p("string", "name"),
        "family": _p("string", "name.family"),
        "given": _p("string", "name.given"),
        "birthdate": _p("date", "birthDate"),
        "gender": _p("token", "gender", system="http://hl7.org/fhir/administrative-gender"),
        "active": _p("token", "active"),
        "address": _p("string", "address"),
        "telecom": _p("token", "telecom"),
        "general-practitioner": _p("reference", "generalPractitioner", targets=(*_PRACTITIONERS, "Organization")),
        "organization": _p("reference", "managingOrganization", targets=("Organization",)),
    },
    "Subscription": {
        **COMMON,
        "criteria": _p("string", "criteria"),
        "status": _p("token", "status", system="http://hl7.org/fhir/subscription-status"),
        "type": _p("token", "channel.type", system="http://hl7.org/fhir/subscription-channel-type"),
        "url": _p("uri", "channel.endpoint"),
        "payload": _p("token", "channel.payload"),
        "contact": _p("token", "contact"),
    },
    "Endpoint": {
        **COMMON,
        "identifier": _p("token", "identifier"),
        "status": _p("token", "status", system="http://hl7.org/fhir/endpoint-status"),
        "connection-type": _p("token", "connectionType"),
        "name": _p("string", "name"),
        "payload-type": _p("token", "payloadType"),
        "organization": _p("reference", "managingOrganization", targets=("Organization",)),
    },
}
"""The search parameters served, by resource type."""


# --- values ----------------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """R4 3.1.1.4.7 string matching: case- and accent-insensitive (NFKD, combining marks dropped, case folded)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _cut(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    raw = value.encode("utf-8")
    return value if len(raw) <= limit else raw[:limit].decode("utf-8", errors="ignore")


def _values(node: Any, path: list[str]) -> Iterator[Any]:
    """The values at a dotted path, arrays flattened at every step."""
    if isinstance(node, list):
        for item in node:
            yield from _values(item, path)
        return
    if not path:
        if node is not None:
            yield node
        return
    if isinstance(node, Mapping):
        yield from _values(node.get(path[0]), path[1:])


def _text(value: Any) -> str | None:
    return normalize(value) if isinstance(value, str) and value else None


def tokens(param: str, value: Any, system: str | None = None) -> Iterator[SearchEntry]:
    """Token entries of a code, boolean, Coding, CodeableConcept, Identifier or ContactPoint."""
    if isinstance(value, bool):
        yield SearchEntry(param, None, "true" if value else "false")
    elif isinstance(value, str):
        yield SearchEntry(param, system, value)
    elif isinstance(value, Mapping):
        if "coding" in value or ("text" in value and "value" not in value and "code" not in value):
            for coding in value.get("coding") or ():
                yield from tokens(param, coding)
            if isinstance(value.get("text"), str):
                yield SearchEntry(param, None, None, _text(value["text"]))
        elif "value" in value:  # Identifier, ContactPoint
            kind = value.get("type") or {}
            label = kind.get("text") if isinstance(kind, Mapping) else None
            yield SearchEntry(param, value.get("system"), str(value["value"]), _text(label))
        elif "code" in value:  # Coding
            yield SearchEntry(param, value.get("system"), str(value["code"]), _text(value.get("display")))


_PARTS = ("text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country")


def strings(param: str, value: Any) -> Iterator[SearchEntry]:
    """String entries of a string, HumanName or Address (one per part)."""
    if isinstance(value, str):
        if value:
            yield SearchEntry(param, None, value, normalize(value))
    elif isinstance(value, Mapping):
        for part in _PARTS:
            for item in _values(value, [part]):
                yield from strings(param, item)


def period(text: str) -> tuple[dt.datetime, dt.datetime] | None:
    """The period a date, dateTime or instant covers ([start, end) at its precision)."""
    try:
        return date_range("date", text)
    except SearchError:
        return None


def dates(param: str, value: Any) -> Iterator[SearchEntry]:
    """Date entries of a date, dateTime, instant or Period."""
    if isinstance(value, str):
        covered = period(value)
        if covered is not None:
            yield SearchEntry(param, low=covered[0], high=covered[1])
    elif isinstance(value, Mapping) and ("start" in value or "end" in value):
        start = period(value["start"]) if isinstance(value.get("start"), str) else None
        end = period(value["end"]) if isinstance(value.get("end"), str) else None
        yield SearchEntry(param, low=start[0] if start else EARLIEST, high=end[1] if end else LATEST)


_HISTORY = re.compile(r"/_history/[^/]*$")


def reference_key(reference: str) -> str:
    """A reference as indexed: `Type/id` (version dropped) when relative, the URL (version dropped) otherwise."""
    return _HISTORY.sub("", reference.strip())


def reference_type(key: str) -> str | None:
    """The resource type a reference key names (`Patient/1`, `https://host/fhir/Patient/1`), if it names one."""
    parts = key.split("/")
    if len(parts) >= 2 and re.fullmatch(r"[A-Z][A-Za-z]+", parts[-2]):
        return parts[-2]
    return None


def references(param: str, value: Any, targets: tuple[str, ...]) -> Iterator[SearchEntry]:
    """Reference entries (contained `#id` and references to types outside `targets` are left out) and the
    Reference's identifier under "<param>:identifier"."""
    if not isinstance(value, Mapping):
        return
    raw = value.get("reference")
    if isinstance(raw, str) and raw and not raw.startswith("#"):
        key = reference_key(raw)
        kind = reference_type(key)
        declared = value.get("type")
        if not targets or (kind or declared) in targets or (kind is None and declared is None):
            yield SearchEntry(param, None, key)
    identifier = value.get("identifier")
    if isinstance(identifier, Mapping) and "value" in identifier:
        declared = value.get("type")
        if not targets or declared is None or declared in targets:
            yield from tokens(f"{param}:identifier", identifier)


def _entries_of(name: str, spec: ParamDef, content: Mapping[str, Any]) -> Iterator[SearchEntry]:
    for path in spec.paths:
        for value in _values(content, path.split(".")):
            if spec.type == "token":
                yield from tokens(name, value, spec.system)
            elif spec.type == "string":
                yield from strings(name, value)
            elif spec.type == "date":
                yield from dates(name, value)
            elif spec.type == "reference":
                yield from references(name, value, spec.targets)
            elif isinstance(value, str):  # uri
                yield SearchEntry(name, None, value)


def entries(resource_type: str, content: Mapping[str, Any]) -> list[SearchEntry]:
    """The search index rows of one resource's current version (duplicates removed)."""
    found: dict[SearchEntry, None] = {}
    for name, spec in PARAMS.get(resource_type, {}).items():
        if not spec.indexed:
            continue
        for entry in _entries_of(name, spec, content):
            cut = SearchEntry(
                entry.param,
                _cut(entry.system, MAX_SYSTEM_BYTES),
                _cut(entry.code, MAX_CODE_BYTES),
                _cut(entry.text_value, MAX_TEXT_BYTES),
                entry.low,
                entry.high,
                entry.number,
            )
            found.setdefault(cut, None)
    return list(found)
