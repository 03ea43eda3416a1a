"""FHIR R4 search (https://hl7.org/fhir/R4/search.html) on the served resource types, parsed: the query as a
`SearchQuery` value (pure: name/value pairs in, a value out) that `fhir.search.sql` runs. `check_query` validates
a query without running it; `fhir.search.service` is the API the routes, batch bundles and Subscriptions call.

Supported (the parameters of each type are `fhir.search.index.PARAMS`):
- token `code`, `system|code`, `|code`, `system|`; `:not`, `:text`; an identifier with system `urn:dicom:uid` and
  a bare UID also matches `urn:oid:<UID>`.
- string: starts with, case- and accent-insensitive; `:exact`, `:contains`.
- date: prefixes eq ne lt le gt ge sa eb ap on the value's implicit range (R4 3.1.1.4.5; `2024-05` is the month).
- reference: `Type/id`, a bare id (any allowed target type), an absolute URL on our base or elsewhere;
  `:<Type>`, `:identifier`; chains one level deep (`patient.identifier=system|value`, `subject:Patient.name=x`).
- `:missing=true|false` on every parameter; comma = OR within a parameter, a repeated parameter = AND (R4 3.1.1.5).
- `_sort` (several keys, `-` for descending), `_count` (default 50, at most 1000; 0: the total only), `_offset`
  (the position of a page; what `next` links carry), `_total` (none, estimate, accurate), `_summary`
  (true, false, text, data, count), `_elements`, `_include`, `_revinclude`.

Unknown parameters and unsupported modifiers are ignored and reported (`SearchQuery.ignored`), or refused with
`strict` (`Prefer: handling=strict`, R4 3.1.1.4). A malformed value is always a 400 naming the parameter.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl

from dicomweb.search.access import UNRESTRICTED, AccessConstraints
from fhir.audit.search import SearchError, date_range, split_values, token, unescape
from fhir.errors import FhirError
from fhir.search.index import PARAMS, ParamDef, normalize, reference_key, reference_type

DEFAULT_COUNT = 50
MAX_COUNT = 1000
MAX_VALUE = 1024
DICOM_UID = "urn:dicom:uid"
_PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap")
_ELEMENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_SUMMARIES = ("true", "false", "text", "data", "count")
_TOTALS = ("none", "estimate", "accurate")
CONTROL = ("_count", "_offset", "_sort", "_total", "_summary", "_elements", "_include", "_revinclude")
IGNORED_CONTROL = ("_format", "_pretty")


TypeAccess = Callable[[str], Awaitable[AccessConstraints | None]]
"""The policy's constraints on searching a resource type (None: the caller may not see that type at all)."""


class SearchAccess:
    """What one caller may see in one search, type by type: the searched type's `constraints` (from the policy's
    decision on that search), and for every other type the search reaches (`_include`, `_revinclude`, the target
    of a chain) the constraints of the policy's decision on searching THAT type, asked once per type (`other`).
    A row of any type is seen only when it meets its own type's constraints for this caller: included resources
    are never filtered with the searched type's constraints (they differ: an Endpoint search has no patient limit,
    a Patient search no modality limit). Made by `fhir.rest.interactions.search_access` for the route and for bundle
    entries alike; `unrestricted` is for the server's own matching (Subscriptions)."""

    def __init__(self, resource_type: str, constraints: AccessConstraints, other: TypeAccess) -> None:
        self.resource_type = resource_type
        self.constraints = constraints
        self._other = other

    @classmethod
    def unrestricted(cls, resource_type: str) -> SearchAccess:
        async def everything(_kind: str) -> AccessConstraints | None:
            return UNRESTRICTED

        return cls(resource_type, UNRESTRICTED, everything)

    async def of(self, resource_type: str) -> AccessConstraints | None:
        """The constraints on rows of `resource_type` (None: none of them may be seen)."""
        if resource_type == self.resource_type:
            return self.constraints
        return await self._other(resource_type)


class InvalidSearch(FhirError):
    """A malformed search (a value that cannot be read, a control parameter out of range): 400 `invalid`."""


class UnsupportedSearch(FhirError):
    """A parameter or modifier this server does not support, refused under strict handling: 400 `not-supported`."""

    code = "not-supported"


# --- the parsed query ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenMatch:
    """`system` None: any system; "": no system. `code` None: any code (`system|`). `text`: `:text` (normalized)."""

    system: str | None = None
    code: str | None = None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class StringMatch:
    value: str
    """Normalized, except for `exact`."""
    mode: Literal["start", "exact", "contains"] = "start"


@dataclass(frozen=True, slots=True)
class DateMatch:
    prefix: str
    low: dt.datetime
    high: dt.datetime
    """The search value's range [low, high)."""


@dataclass(frozen=True, slots=True)
class ReferenceMatch:
    keys: tuple[str, ...]
    """Index keys that match (relative `Type/id` and absolute URL forms); empty: nothing matches."""


@dataclass(frozen=True, slots=True)
class ChainMatch:
    """`<reference param>.<param of target>=value`: the reference points at a `target` resource matching `inner`."""

    target: str
    inner: Clause


Match = TokenMatch | StringMatch | DateMatch | ReferenceMatch | ChainMatch
Source = Literal["index", "id", "updated"]


@dataclass(frozen=True, slots=True)
class Clause:
    """One parameter occurrence: the resource matches when any of `matches` does (`negate`: none does), or,
    with `missing` set, when it has no value / some value for the parameter."""

    param: str
    source: Source = "index"
    matches: tuple[Match, ...] = ()
    negate: bool = False
    missing: bool | None = None


@dataclass(frozen=True, slots=True)
class SortKey:
    param: str
    source: Source
    type: str
    descending: bool


@dataclass(frozen=True, slots=True)
class Include:
    """`_include=<source>:<param>[:<target>]` or `_revinclude=<source>:<param>[:<target>]`."""

    source: str
    param: str
    target: str | None
    reverse: bool


@dataclass(frozen=True, slots=True)
class SearchQuery:
    resource_type: str
    clauses: tuple[Clause, ...] = ()
    sort: tuple[SortKey, ...] = ()
    count: int = DEFAULT_COUNT
    offset: int = 0
    total: str = "accurate"
    summary: str | None = None
    elements: tuple[str, ...] | None = None
    includes: tuple[Include, ...] = ()
    echo: tuple[tuple[str, str], ...] = ()
    """The parameters used, as given (the self link)."""
    ignored: tuple[str, ...] = ()
    """Why each ignored parameter was ignored."""

    def link_params(self, offset: int | None = None) -> list[tuple[str, str]]:
        """The query of this page's self link (`offset` None) or of the page at `offset`."""
        position = self.offset if offset is None else offset
        params = [*self.echo, ("_count", str(self.count))]
        return params + ([("_offset", str(position))] if position else [])

    @property
    def count_only(self) -> bool:
        return self.summary == "count" or self.count == 0


# --- values ----------------------------------------------------------------------------------------------------


def _checked(name: str, value: str) -> str:
    if len(value) > MAX_VALUE:
        raise InvalidSearch(f"search parameter {name}: value longer than {MAX_VALUE} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidSearch(f"search parameter {name}: value contains control characters")
    return value


def _alternatives(name: str, raw: str) -> list[str]:
    values = split_values(raw)
    if not values:
        raise InvalidSearch(f"search parameter {name}: no value")
    return values


def _date(name: str, value: str, now: dt.datetime) -> DateMatch:
    head = value[:2]
    if head.isalpha():
        if head not in _PREFIXES:
            raise InvalidSearch(f"search parameter {name}: {head!r} is not a date prefix (eq ne lt le gt ge sa eb ap)")
        value = value[2:]
    else:
        head = "eq"
    try:
        low, high = date_range(name, value)
    except SearchError as exc:
        raise InvalidSearch(f"search parameter {exc.detail}") from None
    if head == "ap":  # approximately: 10% of the distance from now, at least a day, each side (R4 3.1.1.4.3)
        margin = max(abs(now - low) / 10, dt.timedelta(days=1))
        low, high = low - margin, high + margin
    return DateMatch(head, low, high)


def _token(param: str, value: str, modifier: str | None) -> list[TokenMatch]:
    if modifier == "text":
        return [TokenMatch(text=normalize(unescape(value)))]
    system, code = token(value)
    if system is not None and code == "":
        return [TokenMatch(system=system)]
    matches = [TokenMatch(system, code)]
    if param == "identifier" and system in (None, DICOM_UID) and re.fullmatch(r"[0-9.]{1,64}", code):
        matches.append(TokenMatch(system, f"urn:oid:{code}"))
    return matches


def _reference_keys(value: str, targets: tuple[str, ...], base: str | None) -> tuple[str, ...]:
    """The index keys a reference value matches: relative and absolute-on-our-base forms of `Type/id`."""
    text = reference_key(unescape(value))
    if base and text.startswith(base.rstrip("/") + "/"):
        text = text[len(base.rstrip("/")) + 1 :]
    if "/" not in text and ":" not in text:
        relative = [f"{kind}/{text}" for kind in targets]
    elif re.fullmatch(r"[A-Z][A-Za-z]+/[^/]+", text):
        relative = [text] if not targets or reference_type(text) in targets else []
    else:
        return (text,)
    absolute = [f"{base.rstrip('/')}/{key}" for key in relative] if base else []
    return tuple(relative + absolute)


# --- parameters ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Parser:
    resource_type: str
    strict: bool
    base: str | None
    now: dt.datetime
    clauses: list[Clause] = field(default_factory=list)
    echo: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def skip(self, name: str, why: str) -> None:
        if self.strict:
            raise UnsupportedSearch(f"search parameter {name}: {why}")
        self.ignored.append(f"search parameter {name} was ignored: {why}")

    def clause(self, resource_type: str, name: str, raw: str, depth: int = 0) -> Clause | None:
        """The clause of `name=raw` on `resource_type`; None (after `skip`) when unsupported."""
        head, dot, rest = name.partition(".")
        param, _, modifier_text = head.partition(":")
        modifier = modifier_text or None
        spec = PARAMS[resource_type].get(param)
        if spec is None:
            self.skip(name, f"{resource_type} has no search parameter {param!r}")
            return None
        if dot:
            return self.chain(resource_type, name, param, spec, modifier, rest, raw, depth)
        source: Source = "id" if param == "_id" else "updated" if param == "_lastUpdated" else "index"
        if modifier == "missing":
            if raw not in ("true", "false"):
                raise InvalidSearch(f"search parameter {name}: :missing takes true or false")
            return Clause(param, source, missing=raw == "true")
        allowed = _MODIFIERS[spec.type]
        if spec.type == "reference" and modifier in spec.targets:
            allowed = (*allowed, modifier)
        if source != "index" and modifier is not None and modifier != "not":
            allowed = ()
        if modifier is not None and modifier not in allowed:
            self.skip(name, f"the modifier :{modifier} is not supported on {param}")
            return None
        matches: list[Match] = []
        for value in _alternatives(name, raw):
            matches.extend(self.values(name, spec, modifier, value))
        if modifier == "identifier":
            return Clause(f"{param}:identifier", source, tuple(matches))
        return Clause(param, source, tuple(dict.fromkeys(matches)), negate=modifier == "not")

    def values(self, name: str, spec: ParamDef, modifier: str | None, value: str) -> list[Match]:
        if spec.type == "token" or modifier == "identifier":
            return list(_token(name.partition(":")[0], value, modifier if modifier == "text" else None))
        if spec.type == "string":
            if modifier == "exact":
                return [StringMatch(unescape(value), "exact")]
            return [StringMatch(normalize(unescape(value)), "contains" if modifier == "contains" else "start")]
        if spec.type == "date":
            return [_date(name, value, self.now)]
        if spec.type == "uri":
            return [TokenMatch(None, unescape(value))]
        targets = (modifier,) if modifier in spec.targets else spec.targets
        return [ReferenceMatch(_reference_keys(value, targets, self.base))]

    def chain(
        self,
        resource_type: str,
        name: str,
        param: str,
        spec: ParamDef,
        modifier: str | None,
        rest: str,
        raw: str,
        depth: int,
    ) -> Clause | None:
        """R4 3.1.1.4.12 chained parameters, one level deep."""
        if spec.type != "reference":
            self.skip(name, f"{param} is not a reference parameter: it cannot be chained")
            return None
        served = [t for t in ((modifier,) if modifier else spec.targets) if t in PARAMS and t in spec.targets]
        if depth > 0 or not served:
            self.skip(name, "chains reach one level, to the resource types this server holds")
            return None
        if len(served) > 1:
            raise InvalidSearch(f"search parameter {name}: name the target type ({param}:{served[0]}.{rest})")
        inner = self.clause(served[0], rest, raw, depth + 1)
        return None if inner is None else Clause(param, "index", (ChainMatch(served[0], inner),))


_MODIFIERS: Mapping[str, tuple[str, ...]] = {
    "token": ("not", "text"),
    "string": ("exact", "contains"),
    "date": (),
    "reference": ("identifier",),
    "uri": (),
}


def _count(name: str, value: str) -> int:
    if not re.fullmatch(r"\d{1,9}", value):
        raise InvalidSearch(f"search parameter {name}: {value!r} is not a non-negative integer")
    return int(value)


@dataclass(slots=True)
class _Control:
    count: int = DEFAULT_COUNT
    offset: int = 0
    total: str = "accurate"
    summary: str | None = None
    elements: tuple[str, ...] | None = None
    sort: list[SortKey] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)


def _control(parser: _Parser, control: _Control, name: str, param: str, modifier: str | None, raw: str) -> bool:
    """Apply one control parameter; False when it was skipped."""
    rtype = parser.resource_type
    if modifier is not None:
        parser.skip(name, f"the modifier :{modifier} is not supported on {param}")
        return False
    if param == "_count":
        control.count = min(_count(name, raw), MAX_COUNT)
    elif param == "_offset":
        control.offset = _count(name, raw)
    elif param == "_total":
        if raw not in _TOTALS:
            raise InvalidSearch(f"search parameter {name}: takes none, estimate or accurate")
        control.total = raw
    elif param == "_summary":
        if raw not in _SUMMARIES:
            raise InvalidSearch(f"search parameter {name}: takes true, false, text, data or count")
        control.summary = raw
    elif param == "_elements":
        names = [n.strip() for n in raw.split(",") if n.strip()]
        if not names or not all(_ELEMENT.fullmatch(n) for n in names):
            raise InvalidSearch(f"search parameter {name}: a comma-separated list of element names")
        control.elements = tuple(dict.fromkeys([*(control.elements or ()), *names]))
    elif param == "_sort":
        keys = [k.strip() for k in raw.split(",") if k.strip()]
        for key in keys:
            sort_name = key.removeprefix("-")
            spec = PARAMS[rtype].get(sort_name)
            if spec is None:
                parser.skip(name, f"{rtype} has no search parameter {sort_name!r} to sort by")
                return False
            source: Source = "id" if sort_name == "_id" else "updated" if sort_name == "_lastUpdated" else "index"
            control.sort.append(SortKey(sort_name, source, spec.type, key.startswith("-")))
    else:  # _include, _revinclude
        include = _include(parser, name, raw, reverse=param == "_revinclude")
        if include is None:
            return False
        control.includes.append(include)
    return True


def _include(parser: _Parser, name: str, raw: str, *, reverse: bool) -> Include | None:
    parts = raw.split(":")
    if len(parts) not in (2, 3) or parts[1] == "*":
        parser.skip(name, f"{raw!r} is not Type:parameter[:target] (wild cards are not supported)")
        return None
    source, param, target = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    spec = PARAMS.get(source, {}).get(param)
    if spec is None or spec.type != "reference":
        parser.skip(name, f"{source}:{param} is not a reference search parameter of this server")
        return None
    if not reverse and source != parser.resource_type:
        parser.skip(name, f"{source} is not the type searched (_include:iterate is not supported)")
        return None
    if reverse and parser.resource_type not in spec.targets:
        parser.skip(name, f"{source}:{param} does not refer to {parser.resource_type}")
        return None
    if target is not None and (target not in spec.targets or (reverse and target != parser.resource_type)):
        parser.skip(name, f"{target} is not a target of {source}:{param}")
        return None
    return Include(source, param, target, reverse)


def parse_search(
    resource_type: str,
    items: Iterable[tuple[str, str]],
    *,
    strict: bool = False,
    base: str | None = None,
    now: dt.datetime | None = None,
) -> SearchQuery:
    """Parse a search on `resource_type`; raises `InvalidSearch` / `UnsupportedSearch` (400)."""
    if resource_type not in PARAMS:
        raise UnsupportedSearch(f"{resource_type} cannot be searched here")
    parser = _Parser(resource_type, strict, base, now or dt.datetime.now(dt.UTC))
    control = _Control()
    for name, raw in items:
        if raw == "":
            continue  # R4 3.1.1.4: empty parameters are ignored
        _checked(name, raw)
        param, _, modifier = name.partition(":")
        if param in IGNORED_CONTROL:
            if param == "_format" and "json" not in raw:
                raise UnsupportedSearch(f"search parameter {name}: only JSON is available")
            continue
        if param in CONTROL:
            used = _control(parser, control, name, param, modifier or None, raw)
            if used and param not in ("_count", "_offset"):
                parser.echo.append((name, raw))
            continue
        clause = parser.clause(resource_type, name, raw)
        if clause is not None:
            parser.clauses.append(clause)
            parser.echo.append((name, raw))
    return SearchQuery(
        resource_type,
        tuple(parser.clauses),
        tuple(control.sort),
        control.count,
        control.offset,
        control.total,
        control.summary,
        control.elements,
        tuple(control.includes),
        tuple(parser.echo),
        tuple(parser.ignored),
    )


def query_items(query: str) -> list[tuple[str, str]]:
    """The name/value pairs of a URL query string (a leading `?` allowed)."""
    try:
        return parse_qsl(query.removeprefix("?"), keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise InvalidSearch(f"not a query string: {exc}") from None


def check_query(resource_type: str, query: str) -> None:
    """Raise fhir.errors.FhirError (400) if `query` (a URL query string such as "status=final&patient=Patient/1")
    is not a valid search on resource_type with only supported parameters (used to validate Subscription.criteria
    and If-None-Exist)."""
    parse_search(resource_type, query_items(query), strict=True)
