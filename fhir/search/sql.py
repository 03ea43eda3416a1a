"""Runs a parsed FHIR search (`fhir.search.query.SearchQuery`) on PostgreSQL and assembles the R4 `searchset` Bundle
(https://hl7.org/fhir/R4/search.html, https://hl7.org/fhir/R4/bundle.html).

The SQL text is composed only of the named fragments in `search.sql`, table aliases, whitelisted column names and
parameter numbers; every value from the request travels as a positional parameter (as `dicomweb/index/search.py`
does for QIDO). Each parameter occurrence is one EXISTS over the index rows of `fhir_search` (alternatives or-ed
inside it), so the (resource_type, param, code|text_value|low) indexes serve it. The policy's constraints are
conditions on the `fhir_resources` row (patient allow-list and exclusions on `patient_key`, excluded modalities
on `modalities`), the same in the page and the total; chain targets and included resources meet the constraints
of their own type (`fhir.search.query.SearchAccess`), never those of the searched type.

One query reads the page (one row more than the page size tells whether a next page exists), one counts the
matches (skipped when the page itself shows the total), one reads each `_include` / `_revinclude`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from dicomweb.search.access import AccessConstraints
from fhir.outcome import issue, operation_outcome
from fhir.search.index import PARAMS
from fhir.search.query import (
    ChainMatch,
    Clause,
    DateMatch,
    Match,
    ReferenceMatch,
    SearchAccess,
    SearchQuery,
    StringMatch,
    TokenMatch,
)
from fhir.subscriptions import owner_document
from server.platform.db import Connection, Queries

SQL = Queries(Path(__file__).with_name("search.sql"))
PATIENTLESS = frozenset({"Endpoint", "Subscription"})
"""Types whose resources belong to no patient: patient constraints do not apply to them (modalities do)."""
MAX_INCLUDED = 1000
"""At most this many resources per `_include` / `_revinclude` of one page."""
Seen = Mapping[str, AccessConstraints | None]
"""The constraints on the rows of each type a search reaches (None: the caller may not see that type)."""
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


def _sql(name: str, **parts: str) -> str:
    """A fragment without its comment lines, with its placeholders filled."""
    text = "\n".join(line for line in SQL[name].splitlines() if not line.lstrip().startswith("--"))
    return text.format(**parts)


class _Params:
    def __init__(self) -> None:
        self.values: list[object] = []

    def add(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


# --- conditions ------------------------------------------------------------------------------------------------


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _prefix(column: str, value: str, params: _Params) -> str:
    """`column` starts with `value`, served by the text_pattern_ops index."""
    if not value:
        return _sql("all")
    code = ord(value[-1]) + 1
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return _sql("like", column=column, p=params.add(_like_escape(value) + "%"))
    return _sql(
        "like_prefix",
        column=column,
        p=params.add(_like_escape(value) + "%"),
        low=params.add(value),
        high=params.add(value[:-1] + chr(code)),
    )


def _date(match: DateMatch, low: str, high: str, params: _Params) -> str:
    name = f"date_{match.prefix}"
    bounds = {"sl": match.low, "sh": match.high}  # only the bounds the prefix compares with become parameters
    return _sql(name, low=low, high=high, **{k: params.add(v) for k, v in bounds.items() if f"{{{k}}}" in SQL[name]})


def _token(match: TokenMatch, params: _Params) -> str:
    parts = []
    if match.text is not None:
        parts.append(_prefix("s.text_value", match.text, params))
    if match.code is not None:
        parts.append(_sql("equal", column="s.code", p=params.add(match.code)))
    if match.system == "":
        parts.append(_sql("is_null", column="s.system"))
    elif match.system is not None:
        parts.append(_sql("equal", column="s.system", p=params.add(match.system)))
    return " AND ".join(parts) or _sql("all")


def _value(match: Match, params: _Params, seen: Seen) -> str:
    """A condition on one index row (alias `s`)."""
    if isinstance(match, TokenMatch):
        return _token(match, params)
    if isinstance(match, StringMatch):
        if match.mode == "exact":
            return _sql("equal", column="s.code", p=params.add(match.value))
        if match.mode == "contains":
            return _sql("like", column="s.text_value", p=params.add(f"%{_like_escape(match.value)}%"))
        return _prefix("s.text_value", match.value, params)
    if isinstance(match, DateMatch):
        return _date(match, "s.low", "s.high", params)
    if isinstance(match, ReferenceMatch):
        if not match.keys:
            return _sql("nothing")
        return _sql("any", column="s.code", p=params.add(list(match.keys)))
    target = seen.get(match.target)
    if target is None:  # the caller may not search the chained type: its rows match nothing
        return _sql("nothing")
    inner = [_clause(match.inner, match.target, "c", params, seen)]
    inner += restrict(target, match.target, "c", params)
    return _sql("chain_target", target=params.add(match.target), where=" AND ".join(inner))


def _either(conditions: list[str]) -> str:
    if not conditions:
        return _sql("nothing")
    return conditions[0] if len(conditions) == 1 else "(" + " OR ".join(f"({c})" for c in conditions) + ")"


def _clause(clause: Clause, resource_type: str, alias: str, params: _Params, seen: Seen) -> str:
    """A condition on one resource row (alias `alias`) of `resource_type`."""
    if clause.source != "index":
        if clause.missing is not None:  # _id and _lastUpdated always have a value
            return _sql("nothing" if clause.missing else "all")
        if clause.source == "id":
            codes = [m.code for m in clause.matches if isinstance(m, TokenMatch) and m.code is not None]
            condition = _sql("any", column=f"{alias}.id", p=params.add(codes))
            return f"NOT ({condition})" if clause.negate else condition
        high = f"({alias}.last_updated + interval '1 microsecond')"
        dates = [_date(m, f"{alias}.last_updated", high, params) for m in clause.matches if isinstance(m, DateMatch)]
        return _either(dates)
    rtype = params.add(resource_type)
    param = params.add(clause.param)
    if clause.missing is not None:
        fragment = "has_no_value" if clause.missing else "has_value"
        return _sql(fragment, rtype=rtype, alias=alias, param=param, where=_sql("all"))
    where = _either([_value(m, params, seen) for m in clause.matches])
    fragment = "has_no_value" if clause.negate else "has_value"
    return _sql(fragment, rtype=rtype, alias=alias, param=param, where=where)


def restrict(constraints: AccessConstraints, resource_type: str, alias: str, params: _Params) -> list[str]:
    """The policy's constraints as conditions on a resource row: the limits, or the granted patient's rows
    (a break-glass session; when it names a study, the ImagingStudy of that study only); and, for a type whose
    searches list the caller's own resources, its recorded writer (whatever is granted)."""
    owned = []
    if constraints.owner is not None:
        owned.append(_sql("owned_by", alias=alias, p=params.add(owner_document(*constraints.owner))))
    conditions = []
    if resource_type not in PATIENTLESS:
        if constraints.patient_ids is not None:
            conditions.append(_sql("patients", alias=alias, p=params.add(list(constraints.patient_ids))))
        if constraints.patient_ids_excluded:
            excluded = list(constraints.patient_ids_excluded)
            conditions.append(_sql("patients_excluded", alias=alias, p=params.add(excluded)))
    if constraints.modalities_excluded:
        modalities = list(constraints.modalities_excluded)
        conditions.append(_sql("modalities_excluded", alias=alias, p=params.add(modalities)))
    grant = constraints.granted
    if grant is None or not conditions or resource_type in PATIENTLESS:
        return conditions + owned
    granted = _sql("patients", alias=alias, p=params.add([grant.patient_id]))
    if grant.study_uid is not None and resource_type == "ImagingStudy":  # other types are tied to no study
        granted += " AND " + _sql("equal", column=f"{alias}.source_key", p=params.add(grant.study_uid))
    return [_sql("limits_or_granted", limits=" AND ".join(conditions), granted=granted), *owned]


def where(query: SearchQuery, seen: Seen, params: _Params, alias: str = "r") -> str:
    """The search's clauses and its type's constraints on a resource row; a chain's target rows meet the
    constraints of the target's own type."""
    constraints = seen.get(query.resource_type)
    if constraints is None:
        return _sql("nothing")
    conditions = [_clause(c, query.resource_type, alias, params, seen) for c in query.clauses]
    conditions += restrict(constraints, query.resource_type, alias, params)
    return " AND ".join(conditions) or _sql("all")


async def _seen(query: SearchQuery, access: SearchAccess) -> Seen:
    """The constraints of the searched type and of every chained type, decided before any SQL is built."""
    types = {query.resource_type}
    for clause in query.clauses:
        types.update(m.target for m in clause.matches if isinstance(m, ChainMatch))
    return {kind: await access.of(kind) for kind in sorted(types)}


def _order(query: SearchQuery, params: _Params) -> tuple[str, str]:
    """(lateral joins, ORDER BY) for `_sort`; the id breaks ties so that pages are stable."""
    joins, order = [], []
    for i, key in enumerate(query.sort):
        direction = "DESC" if key.descending else "ASC"
        if key.source == "id":
            order.append(f"r.id {direction}")
            continue
        if key.source == "updated":
            order.append(f"r.last_updated {direction}")
            continue
        column = {"date": "low", "string": "text_value"}.get(key.type, "code")
        agg = "max" if key.descending else "min"
        joins.append(_sql("sort_key", agg=agg, column=column, param=params.add(key.param), key=f"k{i}"))
        order.append(f"k{i}.v {direction} NULLS LAST")
    order.append("r.id ASC")
    return " ".join(joins), ", ".join(order)


# --- running ---------------------------------------------------------------------------------------------------


async def matching_ids(
    conn: Connection, query: SearchQuery, access: SearchAccess, *, only_id: str | None, limit: int
) -> list[str]:
    seen = await _seen(query, access)
    params = _Params()
    rtype = params.add(query.resource_type)
    condition = where(query, seen, params)
    if only_id is not None:
        condition += " AND " + _sql("equal", column="r.id", p=params.add(only_id))
    rows = await conn.fetch(_sql("ids", rtype=rtype, where=condition, limit=params.add(limit)), *params.values)
    return [str(r["id"]) for r in rows]


async def _page(
    conn: Connection, query: SearchQuery, seen: Seen
) -> tuple[list[tuple[str, dict[str, Any]]], int | None, bool]:
    """(the page's (id, resource), the total or None, whether more follow)."""
    params = _Params()
    rtype = params.add(query.resource_type)
    condition = where(query, seen, params)
    filter_values = list(params.values)
    rows: list[tuple[str, dict[str, Any]]] = []
    more = False
    if not query.count_only:
        joins, order = _order(query, params)
        limit, offset = params.add(query.count + 1), params.add(query.offset)
        sql = _sql("page", rtype=rtype, joins=joins, where=condition, order=order, limit=limit, offset=offset)
        found = await conn.fetch(sql, *params.values)
        more = len(found) > query.count
        rows = [(str(r["id"]), json.loads(r["content"])) for r in found[: query.count]]
        if query.total == "none":
            return rows, None, more
        if not more and (rows or query.offset == 0):
            return rows, query.offset + len(rows), more
    total = await conn.fetchval(_sql("total", rtype=rtype, where=condition), *filter_values)
    return rows, int(total), more


async def _included(
    conn: Connection,
    query: SearchQuery,
    ids: list[str],
    base: str,
    access: SearchAccess,
) -> list[tuple[str, str, dict[str, Any]]]:
    """The included resources of the page (`ids`): each of them meets the constraints of ITS type (the policy's
    decision on searching that type for this caller), and none of a type the caller may not search."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for include in query.includes:
        spec = PARAMS[include.source][include.param]
        types = [include.source] if include.reverse else [include.target] if include.target else list(spec.targets)
        for target in (t for t in types if t in PARAMS):
            constraints = await access.of(target)
            if constraints is None:
                continue
            params = _Params()
            if include.reverse:
                keys = [f"{query.resource_type}/{i}" for i in ids]
                keys += [f"{base}/{k}" for k in keys]
                source, param, key_list = params.add(target), params.add(include.param), params.add(keys)
                condition = " AND ".join(restrict(constraints, target, "t", params)) or _sql("all")
                sql = _sql(
                    "revinclude", source=source, param=param, keys=key_list, where=condition,
                    limit=params.add(MAX_INCLUDED),
                )  # fmt: skip
            else:
                source, param, id_list = params.add(include.source), params.add(include.param), params.add(ids)
                base_p, target_p = params.add(base + "/"), params.add(target)
                condition = " AND ".join(restrict(constraints, target, "t", params)) or _sql("all")
                sql = _sql(
                    "include", base=base_p, source=source, param=param, ids=id_list, target=target_p,
                    where=condition, limit=params.add(MAX_INCLUDED),
                )  # fmt: skip
            for row in await conn.fetch(sql, *params.values):
                found.setdefault((row["resource_type"], row["id"]), json.loads(row["content"]))
    return [(kind, rid, content) for (kind, rid), content in found.items()]


@functools.lru_cache(maxsize=16)
def _elements_of(resource_type: str) -> tuple[frozenset[str], frozenset[str]]:
    """(mandatory, summary) top-level element names of a type, from the R4 model's metadata."""
    from fhir.resources.R4B import get_fhir_model_class

    mandatory, summary = {"resourceType", "id", "meta"}, {"resourceType", "id", "meta"}
    for name, info in get_fhir_model_class(resource_type).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        key = info.alias or name
        if info.is_required() or extra.get("element_required") or extra.get("one_of_many_required"):
            mandatory.add(key)
        if extra.get("summary_element_property"):
            summary.add(key)
    return frozenset(mandatory), frozenset(summary | mandatory)


def _subset(resource: dict[str, Any], query: SearchQuery) -> dict[str, Any]:
    """`_summary` / `_elements` (R4 3.1.1.5.8, 3.1.1.5.9): top-level elements kept, mandatory ones always,
    and the resource marked SUBSETTED (R4 3.1.1.5.9)."""
    mandatory, summary = _elements_of(resource["resourceType"])
    if query.summary in ("true", "text", "data"):
        keep: set[str] | None = {
            "true": set(summary),
            "text": {*mandatory, "text"},
            "data": set(resource) - {"text"},
        }[query.summary]
    elif query.elements is not None and query.summary in (None, "false"):
        wanted = set(query.elements)
        keep = {*mandatory, *(k for k in resource if k in wanted or _choice_of(k) in wanted)}
    else:
        return resource
    assert keep is not None
    out = {k: v for k, v in resource.items() if k in keep}
    if len(out) == len(resource):
        return resource
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return out


def _choice_of(key: str) -> str:
    """`effectiveDateTime` -> `effective` (a choice element named by its stem)."""
    for i, c in enumerate(key):
        if c.isupper() and i > 0:
            return key[:i]
    return key


def _link(base: str, query: SearchQuery, offset: int | None = None) -> str:
    return f"{base}/{query.resource_type}?{urlencode(query.link_params(offset), safe=':|,/')}"


async def bundle(
    conn: Connection,
    query: SearchQuery,
    *,
    base: str,
    access: SearchAccess,
) -> dict[str, Any]:
    """The R4 `searchset` Bundle of one page: matches, included resources, an outcome entry for what was
    ignored, `total` per `_total`, and self / next / previous links (R4 3.1.1.6). `access` decides the rows of
    every type: the matches, the chain targets and each included type."""
    rows, total, more = await _page(conn, query, await _seen(query, access))
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/{query.resource_type}/{rid}",
            "resource": _subset(content, query),
            "search": {"mode": "match"},
        }
        for rid, content in rows
    ]
    if rows and query.includes:
        seen = {(query.resource_type, rid) for rid, _ in rows}
        for kind, rid, content in await _included(conn, query, [r for r, _ in rows], base, access):
            if (kind, rid) not in seen:
                entries.append({"fullUrl": f"{base}/{kind}/{rid}", "resource": content, "search": {"mode": "include"}})
    if query.ignored:
        outcome = operation_outcome(*(issue("not-supported", why, "warning") for why in query.ignored))
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    links = [{"relation": "self", "url": _link(base, query)}]
    if more:
        links.append({"relation": "next", "url": _link(base, query, query.offset + query.count)})
    if query.offset > 0 and not query.count_only:
        links.append({"relation": "previous", "url": _link(base, query, max(0, query.offset - query.count))})
    result: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "searchset",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if total is not None:
        result["total"] = total
    result["link"] = links
    if entries:
        result["entry"] = entries
    return result
