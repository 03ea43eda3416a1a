"""Searching and exporting the audit trail: a filter over the searchable facts of each record (who, patient,
study, event type and subtype, outcome, purpose of use, address, action, policy decision) and the time it was
recorded, run through the named queries of `auditquery.sql`.

The facts are those of `audit_search_doc(record)` (migrations/0006_audit_search.sql), GIN-indexed; a filter
becomes one SQL/JSON path predicate (`jsonpath`) of equality clauses, which PostgreSQL answers from that index
(PostgreSQL docs 8.14.4, "jsonb Indexing"). The predicate is a bound parameter built from checked values with
JSON string escapes, never SQL text. The FHIR face (`fhir.audit.search`) maps search parameters to a filter.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg

from server.platform.db import Queries

SQL = Queries(Path(__file__).with_name("auditquery.sql"))

Field = Literal[
    "agent", "role", "patient", "study", "type", "subtype", "outcome", "purpose", "address", "action", "policy"
]
"""What a term compares; the paths in the record (authz/auditrecord.py AuditRecord.to_json) are below."""
_PATHS: dict[str, str] = {
    "role": "$.agent.roles[*]",
    "patient": "$.entity.patient_id",
    "study": "$.entity.study_uid",
    "outcome": "$.outcome",
    "address": "$.agent.address",
    "action": "$.action",
    "policy": "$.policy.decision_id",
}

EARLIEST = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)
"""Bounds of "any time" (exclusive at the end)."""

Window = tuple[dt.datetime, dt.datetime]
"""[start, end) of recorded time."""


def _literal(value: str | bool) -> str:
    """A jsonpath literal: JSON's string escapes are jsonpath's (PostgreSQL docs 8.14.7)."""
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Term:
    """One fact compared with `value`. For `agent` (value: the user's sub), `type` and `subtype` (value: the
    code), `system` is the issuer or the code system: None for any, "" for none. `prefix`: starts with, in any
    case (for `address`)."""

    field: Field
    value: str | bool
    system: str | None = None
    prefix: bool = False

    def jsonpath(self) -> str:
        value = _literal(self.value)
        if self.field == "agent":
            return self._with_system(f"$.agent.sub == {value}", "$.agent.issuer")
        if self.field == "type":
            return self._with_system(f"$.type.code == {value}", "$.type.system")
        if self.field == "subtype":
            if self.system is None:
                return f"$.subtype[*].code == {value}"
            system = "!exists(@.system)" if self.system == "" else f"@.system == {_literal(self.system)}"
            return f"exists($.subtype[*] ? (@.code == {value} && {system}))"
        if self.field == "purpose":  # a break-glass access is for purpose BTG (authz.auditevent)
            extra = " || $.policy.break_glass == true" if self.value == "BTG" else ""
            return f"($.purpose_of_use[*] == {value}{extra})" if extra else f"$.purpose_of_use[*] == {value}"
        path = _PATHS[self.field]
        if self.prefix:  # case-insensitive starts-with (FHIR string search); not index-backed
            return f'{path} like_regex {_literal("^" + re.escape(str(self.value)))} flag "i"'
        return f"{path} == {value}"

    def _with_system(self, clause: str, path: str) -> str:
        if self.system is None:
            return clause
        if self.system == "":
            return f"({clause} && !exists({path}))"
        return f"({clause} && {path} == {_literal(self.system)})"


class UnenforceableConstraint(ValueError):
    """The policy constrained a search in a way audit records cannot be filtered by (refuse: fail closed)."""


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which records: every group of `all_of` has a matching term (and of ors), no term of `none_of` matches,
    the record was stored within one of `windows` (None: any time; empty: never), and `authenticated` (None:
    either) says whether the request had an authenticated user."""

    all_of: tuple[tuple[Term, ...], ...] = ()
    none_of: tuple[Term, ...] = ()
    windows: tuple[Window, ...] | None = None
    authenticated: bool | None = None

    @property
    def impossible(self) -> bool:
        """Nothing can match (an empty group or no time window): no need to ask the database."""
        return any(not group for group in self.all_of) or self.windows == ()

    def jsonpath(self) -> str | None:
        """The predicate over audit_search_doc(record), or None when the record is not constrained."""
        clauses = [_any(group) for group in self.all_of]
        clauses += [f"!({term.jsonpath()})" for term in self.none_of]
        if self.authenticated:
            clauses.append("exists($.agent.sub)")
        return " && ".join(clauses) or None

    def time_bounds(self) -> tuple[dt.datetime, dt.datetime, list[dt.datetime], list[dt.datetime]]:
        """$2..$5 of the searches: the hull of the windows, and the windows themselves when there are several."""
        windows = self.windows if self.windows is not None else ((EARLIEST, LATEST),)
        if not windows:
            return LATEST, EARLIEST, [], []
        lower, upper = min(w[0] for w in windows), max(w[1] for w in windows)
        if len(windows) == 1:
            return lower, upper, [], []
        return lower, upper, [w[0] for w in windows], [w[1] for w in windows]

    def restricted(self, constraints: Mapping[str, Sequence[str]]) -> AuditFilter:
        """This filter within a policy decision's search constraints (authz/policies/authz.rego): only the
        patients in `patient_ids`, none of `patient_ids_excluded`. Anything else cannot be enforced on audit
        records and raises `UnenforceableConstraint`."""
        unknown = set(constraints) - {"patient_ids", "patient_ids_excluded"}
        if unknown:
            raise UnenforceableConstraint(f"audit records cannot be limited by {', '.join(sorted(unknown))}")
        all_of, none_of = self.all_of, self.none_of
        if "patient_ids" in constraints:
            all_of += (tuple(Term("patient", str(p)) for p in constraints["patient_ids"]),)
        none_of += tuple(Term("patient", str(p)) for p in constraints.get("patient_ids_excluded", ()))
        return AuditFilter(all_of, none_of, self.windows, self.authenticated)

    def params(self) -> tuple[Any, ...]:
        """$1..$6 of the named queries."""
        return (self.jsonpath(), *self.time_bounds(), self.authenticated is False)


def _any(group: tuple[Term, ...]) -> str:
    if len(group) == 1:
        return group[0].jsonpath()
    return "(" + " || ".join(term.jsonpath() for term in group) + ")"


@dataclass(frozen=True, slots=True)
class Row:
    """A stored record: its seq (the AuditEvent id), when it was stored, and its JSON text."""

    seq: int
    recorded_at: dt.datetime
    record: str


@dataclass(slots=True)
class Page:
    rows: list[Row] = field(default_factory=list)
    more: bool = False
    """True when more rows match beyond this page."""
    total: int | None = None


def _rows(records: Sequence[asyncpg.Record]) -> list[Row]:
    return [Row(int(r["seq"]), r["recorded_at"], str(r["record"])) for r in records]


async def search(
    pool: asyncpg.Pool,
    flt: AuditFilter,
    *,
    count: int,
    newest_first: bool = True,
    after: int | None = None,
    total: bool = False,
) -> Page:
    """One page of matching records by recorded time (newest first by default), after the record at seq
    `after` (keyset paging: records appended meanwhile never shift a page); `total` also counts every match."""
    if flt.impossible:
        return Page(total=0 if total else None)
    params = flt.params()
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute(SQL["custom_plans"])
        query = SQL["search_desc" if newest_first else "search_asc"]
        found = _rows(await conn.fetch(query, *params, after, count + 1)) if count > 0 else []
        matched = int(await conn.fetchval(SQL["count"], *params)) if total else None
    return Page(found[:count], len(found) > count, matched)


async def read(pool: asyncpg.Pool, seq: int) -> Row | None:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(SQL["read"], seq)
    return None if row is None else _rows([row])[0]


async def export(pool: asyncpg.Pool, flt: AuditFilter, *, batch: int = 1000) -> AsyncIterator[list[Row]]:
    """Every matching record in chain order, `batch` rows at a time, from a server-side cursor in one
    REPEATABLE READ snapshot: memory stays flat whatever the size of the trail, and records appended while the
    export runs are not part of it."""
    if flt.impossible:
        return
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(SQL["custom_plans"])
        cursor = await conn.cursor(SQL["export"], *flt.params())
        while rows := await cursor.fetch(batch):
            yield _rows(rows)
