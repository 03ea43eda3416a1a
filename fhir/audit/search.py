"""FHIR R4 search parameters of AuditEvent (https://hl7.org/fhir/R4/auditevent.html#search; R4 search,
https://hl7.org/fhir/R4/search.html) parsed into an `authz.auditquery.AuditFilter` plus paging options. Pure:
(name, value) pairs in, values out; `SearchError` (400 OperationOutcome at the edge) for what cannot be read.

Parameters (each may repeat: repeats are and-ed; a value may list alternatives with commas: or-ed; `\\,` `\\|`
`\\$` `\\\\` escape, R4 search 3.1.1.5):
- `date` (the time the record was stored, AuditEvent.recorded): prefixes eq ne lt le gt ge sa eb and partial
  dates (`2024`, `2024-05`, `2024-05-17`, `2024-05-17T10:00`, seconds, fractions, a zone; no zone = UTC).
- `agent`: the user, by the token's `sub` (`agent=alice`) or as `issuer-system|sub` (the system of
  AuditEvent.agent.who.identifier); also `agent:identifier=system|sub`, and `agent:missing=true` for requests
  without an authenticated user. `agent-role`: a role of the user.
- `patient` (`Patient/ID` or `ID`), `entity` (`Patient/ID`, `urn:oid:<study UID>` or a bare id or UID),
  `entity-identifier` (`urn:dicom:uid|urn:oid:<UID>`, `|<patient id>` or a bare value).
- `type`, `subtype`, `outcome` (0 4 8 12), `purpose` (HL7 v3 ActReason, e.g. BTG), `action` (C R U D E): tokens
  `system|code` or `code`. `address`: string (starts with, case-insensitive; `:exact`). `policy`: the decision
  (`urn:uuid:<decision id>`).
- `_count` (default 100, at most 1000), `_sort` (`-date` default, or `date`), `_total=accurate`, `_cursor` (the
  keyset position of a next link).
Unknown parameters are ignored (and left out of the self link) unless the client sent `Prefer: handling=strict`
(R4 search 3.1.1.4); a known parameter with a modifier it does not support is always refused (3.1.1.2).

Export (`parse_export`) takes the same filters plus `_since` / `_until` (stored at or after / before).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from authz.auditquery import EARLIEST, LATEST, AuditFilter, Field, Term, Window

DEFAULT_COUNT = 100
MAX_COUNT = 1000
MAX_VALUE = 1024
DICOM_UID_SYSTEM = "urn:dicom:uid"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
OUTCOME_SYSTEMS = (
    "http://hl7.org/fhir/audit-event-outcome",
    "http://terminology.hl7.org/CodeSystem/audit-event-outcome",
)
ACTION_SYSTEM = "http://hl7.org/fhir/audit-event-action"
ISSUER_PREFIX = "urn:hounsfield:"
"""authz.auditevent names an issuer without a colon `urn:hounsfield:<issuer>`."""


class SearchError(ValueError):
    """A parameter that cannot be read; `code` is the OperationOutcome issue type (invalid, not-supported)."""

    def __init__(self, param: str, detail: str, code: str = "invalid") -> None:
        super().__init__(f"{param}: {detail}")
        self.param = param
        self.detail = f"{param}: {detail}"
        self.code = code


@dataclass(frozen=True, slots=True)
class AuditSearch:
    filter: AuditFilter
    count: int = DEFAULT_COUNT
    newest_first: bool = True
    after: int | None = None
    """Keyset position: the seq of the last entry of the previous page."""
    total: bool = False
    echo: tuple[tuple[str, str], ...] = ()
    """The parameters understood, as given (for the self and next links)."""
    ignored: tuple[str, ...] = ()

    def link_params(self, after: int | None = None) -> list[tuple[str, str]]:
        """The query of this page's self link (`after` None) or of the page after the seq `after`."""
        params = [*self.echo, ("_count", str(self.count))]
        position = after if after is not None else self.after
        return params + ([("_cursor", str(position))] if position is not None else [])


@dataclass(slots=True)
class _Parts:
    all_of: list[tuple[Term, ...]] = field(default_factory=list)
    none_of: list[Term] = field(default_factory=list)
    windows: list[Window] | None = None
    authenticated: bool | None = None

    def build(self) -> AuditFilter:
        windows = None if self.windows is None else tuple(self.windows)
        return AuditFilter(tuple(self.all_of), tuple(self.none_of), windows, self.authenticated)


# --- values -------------------------------------------------------------------------------------------------


def split_values(raw: str) -> list[str]:
    """Comma-separated alternatives, escapes kept for the next step (R4 search 3.1.1.5: `\\,` is a comma);
    empty alternatives are dropped."""
    values: list[str] = []
    start = i = 0
    while i < len(raw):
        if raw[i] == "\\":
            i += 2
            continue
        if raw[i] == ",":
            values.append(raw[start:i])
            start = i + 1
        i += 1
    values.append(raw[start:])
    return [v for v in values if v]


def unescape(value: str) -> str:
    return re.sub(r"\\([\\,|$])", r"\1", value)


def token(value: str) -> tuple[str | None, str]:
    """`system|code` -> (system, code); `|code` -> ("", code); `code` -> (None, code)."""
    match = re.match(r"^((?:[^\\|]|\\.)*)\|(.*)$", value)
    if match is None:
        return None, unescape(value)
    return unescape(match.group(1)), unescape(match.group(2))


def _checked(param: str, value: str) -> str:
    if len(value) > MAX_VALUE:
        raise SearchError(param, f"value longer than {MAX_VALUE} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise SearchError(param, "value contains control characters")
    return value


# --- dates (R4 search 3.1.1.4.5 date, 3.1.1.4.3 prefixes) ----------------------------------------------------

_DATE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap")


def date_range(param: str, text: str) -> Window:
    """The range a partial date stands for: [start, end) at its precision, in UTC when it names no zone. (A
    space in the zone is a `+` that the client left unencoded in the query string.)"""
    text = text.replace(" ", "+")
    match = _DATE.match(text)
    if match is None:
        raise SearchError(param, f"{text!r} is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm...)")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        tz = dt.UTC if zone in (None, "Z") else dt.datetime.strptime(zone, "%z").tzinfo
        start = dt.datetime(
            int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")), tzinfo=tz,
        )  # fmt: skip
    except ValueError as exc:
        raise SearchError(param, f"{text!r} is not a valid date: {exc}") from None
    start = start.astimezone(dt.UTC)
    if month is None:
        end = _shift(start, years=1)
    elif day is None:
        end = _shift(start, months=1)
    elif hour is None:
        end = start + dt.timedelta(days=1)
    elif second is None:
        end = start + dt.timedelta(minutes=1)
    else:
        end = start + dt.timedelta(microseconds=max(1, 10 ** (6 - len(fraction or ""))))
    return start, end


def _shift(start: dt.datetime, *, years: int = 0, months: int = 0) -> dt.datetime:
    month = start.month - 1 + months
    try:
        return start.replace(year=start.year + years + month // 12, month=month % 12 + 1)
    except ValueError:
        return LATEST


def date_windows(param: str, value: str) -> list[Window]:
    """The recorded times a `date` value (one alternative) admits, as disjoint windows."""
    prefix = value[:2] if value[:2] in _PREFIXES else "eq"
    text = value[2:] if value[:2] in _PREFIXES else value
    if prefix == "ap":
        raise SearchError(param, "the prefix ap is not supported", "not-supported")
    lo, hi = date_range(param, text)
    windows = {
        "eq": [(lo, hi)],
        "ne": [(EARLIEST, lo), (hi, LATEST)],
        "lt": [(EARLIEST, lo)],
        "eb": [(EARLIEST, lo)],
        "le": [(EARLIEST, hi)],
        "gt": [(hi, LATEST)],
        "sa": [(hi, LATEST)],
        "ge": [(lo, LATEST)],
    }[prefix]
    return normalize(windows)


def normalize(windows: Iterable[Window]) -> list[Window]:
    """Sorted, merged, non-empty windows."""
    merged: list[Window] = []
    for lo, hi in sorted(w for w in windows if w[0] < w[1]):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def intersect(a: Sequence[Window], b: Sequence[Window]) -> list[Window]:
    return normalize((max(x[0], y[0]), min(x[1], y[1])) for x in a for y in b)


# --- parameters ---------------------------------------------------------------------------------------------


def _issuers(system: str) -> list[str]:
    """The issuers an identifier system may stand for (authz.auditevent writes an issuer without a colon as
    `urn:hounsfield:<issuer>`); "" (`|sub`): no issuer."""
    rest = system.removeprefix(ISSUER_PREFIX)
    return [system] if rest == system or ":" in rest else [rest, system]


def _agent(param: str, modifier: str | None, value: str, parts: _Parts) -> tuple[Term, ...]:
    if modifier == "missing":
        if value not in ("true", "false"):
            raise SearchError(param, "agent:missing takes true or false")
        missing = value == "true"
        if parts.authenticated is not None and parts.authenticated == missing:
            parts.all_of.append(())  # both with and without a user: nothing
        parts.authenticated = not missing
        return ()
    system, code = token(value)
    if system is None:
        return (Term("agent", code),)
    # `agent=a|b` may also be a sub that holds a bar (auth0|123): both readings, unless :identifier says token.
    whole = [] if modifier == "identifier" else [Term("agent", unescape(value))]
    return (*whole, *(Term("agent", code, issuer) for issuer in _issuers(system)))


_PATIENT_REF = re.compile(r"^(?:https?://\S*/)?Patient/(.+)$")
_OTHER_REF = re.compile(r"^(?:https?://\S*/)?[A-Z][a-z][A-Za-z]*/")


def _patient(param: str, value: str) -> str:
    """`Patient/ID`, `<base>/Patient/ID` or a bare id (DICOM Patient IDs may hold a slash: `12/345` is one)."""
    value = unescape(value)
    match = _PATIENT_REF.match(value)
    if match:
        return match.group(1)
    if _OTHER_REF.match(value):
        raise SearchError(param, f"{value!r} is not a Patient reference (Patient/ID or ID)")
    return value


def _entity(param: str, modifier: str | None, value: str) -> tuple[Term, ...]:
    if modifier == "identifier" or param == "entity-identifier":
        system, code = token(value)
        uid = code.removeprefix("urn:oid:")
        if system == DICOM_UID_SYSTEM:
            return (Term("study", uid),)
        if system == "":
            return (Term("patient", code),)
        return (Term("study", uid), Term("patient", code)) if system is None else ()
    plain = unescape(value)
    if plain.startswith("urn:oid:"):
        return (Term("study", plain.removeprefix("urn:oid:")),)
    if _PATIENT_REF.match(plain) or _OTHER_REF.match(plain):
        return (Term("patient", _patient(param, value)),)
    return (Term("study", plain), Term("patient", plain))


def _coded(name: str) -> Callable[[str, str | None, str, _Parts], tuple[Term, ...]]:
    def parse(param: str, modifier: str | None, value: str, parts: _Parts) -> tuple[Term, ...]:
        system, code = token(value)
        if name == "outcome":
            if code not in ("0", "4", "8", "12"):
                raise SearchError(param, f"{code!r} is not an AuditEvent outcome (0, 4, 8 or 12)")
            return (Term("outcome", code),) if system is None or system in OUTCOME_SYSTEMS else ()
        if name == "action":
            if code not in ("C", "R", "U", "D", "E"):
                raise SearchError(param, f"{code!r} is not an AuditEvent action (C, R, U, D or E)")
            return (Term("action", code),) if system in (None, ACTION_SYSTEM) else ()
        if name == "purpose":
            return (Term("purpose", code),) if system in (None, ACT_REASON) else ()
        if name == "agent-role":
            return (Term("role", code),) if system is None else ()
        coded: Field = "type" if name == "type" else "subtype"
        return (Term(coded, code, system),)

    return parse


def _simple(build: Callable[[str, str | None, str], tuple[Term, ...]]) -> Callable[..., tuple[Term, ...]]:
    return lambda param, modifier, value, parts: build(param, modifier, value)


_PARSERS: dict[str, tuple[tuple[str | None, ...], Callable[[str, str | None, str, _Parts], tuple[Term, ...]]]] = {
    "agent": ((None, "identifier", "missing"), _agent),
    "agent-role": ((None,), _coded("agent-role")),
    "patient": ((None, "Patient"), _simple(lambda p, m, v: (Term("patient", _patient(p, v)),))),
    "entity": ((None, "identifier"), _simple(_entity)),
    "entity-identifier": ((None,), _simple(_entity)),
    "type": ((None,), _coded("type")),
    "subtype": ((None,), _coded("subtype")),
    "outcome": ((None,), _coded("outcome")),
    "purpose": ((None,), _coded("purpose")),
    "action": ((None,), _coded("action")),
    "address": (
        (None, "exact"),
        _simple(lambda p, m, v: (Term("address", unescape(v), prefix=m is None),)),
    ),
    "policy": ((None,), _simple(lambda p, m, v: (Term("policy", unescape(v).removeprefix("urn:uuid:")),))),
}
DATE_PARAMS = ("date", "_since", "_until")
SEARCH_CONTROL = ("_count", "_sort", "_total", "_cursor", "_format")
EXPORT_CONTROL = ("_type", "_outputFormat", "_format")


def _filter_param(parts: _Parts, param: str, modifier: str | None, raw: str) -> None:
    if param in DATE_PARAMS:
        if modifier is not None:
            raise SearchError(param, f"the modifier :{modifier} is not supported", "not-supported")
        if param == "date":
            if not split_values(raw):
                raise SearchError(param, "no value")
            admitted = normalize(w for v in split_values(raw) for w in date_windows(param, v))
        else:  # _since / _until: an instant, inclusive start / exclusive end
            lo, _ = date_range(param, raw)
            admitted = [(lo, LATEST)] if param == "_since" else [(EARLIEST, lo)]
        parts.windows = admitted if parts.windows is None else intersect(parts.windows, admitted)
        return
    allowed, parse = _PARSERS[param]
    if modifier not in allowed:
        raise SearchError(param, f"the modifier :{modifier} is not supported", "not-supported")
    values = split_values(raw)
    if not values:
        raise SearchError(param, "no value")
    group: list[Term] = []
    for value in values:
        group.extend(parse(param, modifier, value, parts))
    if group or not (param == "agent" and modifier == "missing"):
        parts.all_of.append(tuple(dict.fromkeys(group)))


def _int(param: str, value: str, low: int) -> int:
    if not re.fullmatch(r"\d{1,18}", value) or int(value) < low:
        raise SearchError(param, f"{value!r} is not an integer of at least {low}")
    return int(value)


def parse_search(
    items: Iterable[tuple[str, str]],
    *,
    strict: bool = False,
    export: bool = False,
    default_count: int = DEFAULT_COUNT,
    max_count: int = MAX_COUNT,
) -> AuditSearch:
    """Parse a search (or with `export`, an export) query; raises SearchError."""
    parts = _Parts()
    echo: list[tuple[str, str]] = []
    ignored: list[str] = []
    count, newest_first, after, total = default_count, True, None, False
    control = EXPORT_CONTROL if export else SEARCH_CONTROL
    for name, raw in items:
        param, _, modifier_text = name.partition(":")
        modifier = modifier_text if _ else None
        if raw == "":
            continue  # an empty parameter is ignored
        known = param in _PARSERS or param == "date" or param in control
        if not known and not (export and param in ("_since", "_until")):
            ignored.append(name)
            continue
        value = _checked(name, raw)
        if param == "_count":
            count = min(_int(name, value, 0), max_count)
            continue
        if param == "_cursor":
            after = _int(name, value, 0)
            continue
        if param == "_sort":
            if value not in ("date", "-date"):
                raise SearchError(name, "results can only be sorted by date (-date, the default, or date)")
            newest_first = value == "-date"
        elif param == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise SearchError(name, "takes none, estimate or accurate")
            total = value == "accurate"
        elif param == "_format":
            if "json" not in value:
                raise SearchError(name, "only JSON is available", "not-supported")
        elif param == "_type":
            if value != "AuditEvent":
                raise SearchError(name, "this export has only AuditEvent resources", "not-supported")
        elif param == "_outputFormat":
            if value not in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
                raise SearchError(name, "the export is application/fhir+ndjson", "not-supported")
        else:
            _filter_param(parts, param, modifier, value)
        echo.append((name, raw))
    if ignored and strict:
        raise SearchError(ignored[0], f"unknown search parameters {', '.join(ignored)} (Prefer: handling=strict)")
    total = total or count == 0  # `_count=0`: only the number of matches (R4 search 3.1.1.6)
    return AuditSearch(parts.build(), count, newest_first, after, total, tuple(echo), tuple(ignored))


def parse_export(items: Iterable[tuple[str, str]], *, strict: bool = False) -> AuditFilter:
    return parse_search(items, strict=strict, export=True).filter


def strict_handling(prefer_headers: Iterable[str]) -> bool:
    """`Prefer: handling=strict` (RFC 7240; R4 search 3.1.1.4)."""
    for header in prefer_headers:
        for preference in re.split(r"[,;]", header):
            name, _, value = preference.partition("=")
            if name.strip().lower() == "handling" and value.strip().strip('"').lower() == "strict":
                return True
    return False
