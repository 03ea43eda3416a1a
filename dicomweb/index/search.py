"""Builds and runs the QIDO-RS search SQL (PS3.18 10.6) from a parsed `dicomweb.search.query.Query`.

The SQL text is composed only of the named fragments in `search.sql`, the whitelisted column expressions of
`COLUMNS` and parameter numbers; every value from the request travels as a positional parameter. The
composition keeps the queries index-backed:

- keys on the resource's own table filter it directly; keys on a parent table join it; keys on a child table
  become `EXISTS` over the child's foreign-key index (a study matches `Modality=CT` when one of its series does);
- `LIKE` patterns with a literal prefix on a `text_pattern_ops` column also get a byte-order range, so the
  btree serves them under generic plans too; other patterns rely on the pg_trgm GIN indexes;
- one page of keys is chosen first; attributes and computed counts are read only for that page.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from dicomweb.ingest.columns import name_search
from dicomweb.search.access import UNRESTRICTED, AccessConstraints
from dicomweb.search.query import FLOAT_VRS, INDEXED, INT_VRS, Filter, Level, Match, Query, tag_of
from server.platform.db import Connection, Queries

SEARCH = Queries(Path(__file__).with_name("search.sql"))


@dataclass(frozen=True, slots=True)
class Column:
    """A whitelisted SQL expression for an indexed key and how values compare with it.

    kind: `text` (exact, case-sensitive), `name` (the upper-cased *_search form of a person name), `folded`
    (compared upper-cased), `int`, `date`, `time`. `wrapper` names a fragment that puts the condition inside
    an `EXISTS` over another table (ModalitiesInStudy, SOPClassesInStudy). `groups`, for person names, is the
    text[] column of the name's component groups (alphabetic, ideographic, phonetic), each normalized like
    `expr`: single value and wild card matching compare group by group (`_person_name`)."""

    expr: str
    kind: str = "text"
    pattern_index: bool = False
    wrapper: str | None = None
    groups: str | None = None


COLUMNS: dict[str, Column] = {
    tag_of("StudyInstanceUID"): Column("st.study_uid"),
    tag_of("PatientName"): Column(
        "st.patient_name_search", "name", pattern_index=True, groups="st.patient_name_groups"
    ),
    tag_of("PatientID"): Column("st.patient_id"),
    tag_of("IssuerOfPatientID"): Column("st.issuer_of_patient_id"),
    tag_of("PatientBirthDate"): Column("st.patient_birth_date", "date"),
    tag_of("PatientSex"): Column("st.patient_sex"),
    tag_of("StudyDate"): Column("st.study_date", "date"),
    tag_of("StudyTime"): Column("st.study_time", "time"),
    tag_of("AccessionNumber"): Column("st.accession_number"),
    tag_of("StudyID"): Column("st.study_id"),
    tag_of("StudyDescription"): Column("st.study_description", "folded"),
    tag_of("ReferringPhysicianName"): Column(
        "st.referring_physician_search", "name", groups="st.referring_physician_groups"
    ),
    tag_of("ModalitiesInStudy"): Column("ms.modality", wrapper="modalities_in_study"),
    tag_of("SOPClassesInStudy"): Column("mi.sop_class_uid", wrapper="sop_classes_in_study"),
    tag_of("SeriesInstanceUID"): Column("se.series_uid"),
    tag_of("Modality"): Column("se.modality"),
    tag_of("SeriesNumber"): Column("se.series_number", "int"),
    tag_of("SeriesDescription"): Column("se.series_description", "folded"),
    tag_of("BodyPartExamined"): Column("se.body_part_examined"),
    tag_of("SeriesDate"): Column("se.series_date", "date"),
    tag_of("SeriesTime"): Column("se.series_time", "time"),
    tag_of("PerformedProcedureStepStartDate"): Column("se.pps_start_date", "date"),
    tag_of("PerformedProcedureStepStartTime"): Column("se.pps_start_time", "time"),
    tag_of("SOPInstanceUID"): Column("i.sop_instance_uid"),
    tag_of("SOPClassUID"): Column("i.sop_class_uid"),
    tag_of("InstanceNumber"): Column("i.instance_number", "int"),
    tag_of("Rows"): Column("i.rows", "int"),
    tag_of("Columns"): Column("i.columns", "int"),
    tag_of("NumberOfFrames"): Column("i.number_of_frames", "int"),
    tag_of("BitsAllocated"): Column("i.bits_allocated", "int"),
}
assert set(COLUMNS) == set(INDEXED), "every indexed key of dicomweb.search.query needs a column"

_ATTRS = {Level.STUDY: "st.attrs", Level.SERIES: "se.attrs", Level.INSTANCE: "i.metadata::jsonb"}
_STUDY_PK = {Level.STUDY: "st.study_pk", Level.SERIES: "se.study_pk", Level.INSTANCE: "i.study_pk"}


PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
"""The component groups of a person name, in the order of its `=`-separated value (PS3.5 6.2.1, PS3.18 F.2.2)."""


def json_values(vr: str, value: str) -> list[object]:
    """The `Value` items any of which a stored attribute may hold to match `value` by containment. A person
    name matches per component group: a value of one group may be any group of the stored name, a value with
    `=` gives its groups by position (see `_person_name`)."""
    if vr != "PN":
        return [json_value(vr, value)]
    given = value.split("=")
    if len(given) == 1:
        return [{group: value} for group in PN_GROUPS]
    return [{group: text for group, text in zip(PN_GROUPS, given, strict=False) if text}]


def json_value(vr: str, value: str) -> object:
    """A query value as it appears in a DICOM JSON `Value` array (PS3.18 F.2.3), for containment matching (a
    person name as its alphabetic group: `json_values` gives every group it may match)."""
    if vr == "PN":
        return {"Alphabetic": value}
    if vr in INT_VRS:
        return int(value.strip())
    if vr in FLOAT_VRS:
        number = float(value.strip())
        return int(number) if number.is_integer() else number
    return value


def time_upper_bound(value: str) -> str:
    """The last normalized time (HHMMSS.FFFFFF) that a range's upper end `value` includes: `10` covers
    10:59:59.999999 (PS3.4 C.2.2.2.5: a time is matched to the precision it is given with)."""
    head, _, fraction = value.partition(".")
    if fraction:
        return f"{head}.{fraction.ljust(6, '9')}"
    return head + "5959"[len(head) - 2 :] + ".999999"


def like_pattern(value: str, *, person_name: bool) -> str:
    """A DICOM wild card value as a LIKE pattern (escape character backslash): `*` is `%`, `?` is `_`.
    Person names are normalized like `patient_name_search` (upper case, components joined by spaces)."""
    if person_name:
        value = " ".join(value.upper().replace("^", " ").replace("=", " ").split())
    out = []
    for ch in value:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def person_name_key(value: str) -> str:
    """A person name value as the index keeps it for case-insensitive matching."""
    return name_search(value) or ""


def _sql(name: str, **parts: str) -> str:
    """A fragment without its comment lines, with its placeholders filled."""
    text = "\n".join(line for line in SEARCH[name].splitlines() if not line.lstrip().startswith("--"))
    return text.format(**parts)  # literal braces in search.sql are doubled


class _Params:
    def __init__(self) -> None:
        self.values: list[object] = []

    def add(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _prefix_bounds(pattern: str) -> tuple[str, str] | None:
    """The literal prefix of a LIKE pattern and the first string after all strings with that prefix."""
    prefix: list[str] = []
    escaped = False
    for ch in pattern:
        if escaped:
            prefix.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "%_":
            break
        else:
            prefix.append(ch)
    if not prefix:
        return None
    low = "".join(prefix)
    code = ord(low[-1]) + 1
    if code > 0x10FFFF:
        return None
    if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be encoded; the next character is U+E000
        code = 0xE000
    return low, low[:-1] + chr(code)


def _like(column: Column, pattern: str, params: _Params) -> str:
    if column.kind == "folded":
        return _sql("match_folded_like", column=column.expr, p=params.add(pattern))
    bounds = _prefix_bounds(pattern) if column.pattern_index else None
    if bounds is not None:
        return _sql(
            "match_like_prefix",
            column=column.expr,
            p=params.add(pattern),
            low=params.add(bounds[0]),
            high=params.add(bounds[1]),
        )
    return _sql("match_like", column=column.expr, p=params.add(pattern))


def _person_name(column: Column, value: str, params: _Params) -> str:
    """Single value and wild card matching of a person name (PS3.4 C.2.2.2.1, C.2.2.2.4), case-insensitive and
    per component group (PS3.5 6.2.1). A value without `=` is one group and matches when any group of the
    stored name matches it: `山田*` and `やまだ*` both find `=山田^太郎=やまだ^たろう`. A value with `=` gives
    its groups by position and each non-empty one must match the stored group in that place (`=山田*` looks at
    the ideographic group only); an empty or `*` group matches anything, as universal matching does.

    Prefixes and exact values are served by the btree on each group; a pattern without a literal prefix is
    first narrowed by the whole-name column's trigram index (a group matching `*x*` implies the whole name
    holds `x`)."""
    assert column.groups is not None
    given = value.split("=")
    if len(given) == 1:
        term = _group_term(given[0])
        if term is None:
            return _sql("match_all")
        text, is_pattern = term
        refs = _group_refs(column, text, is_pattern, params)
        either = _or([_group_match(f"{column.groups}[{k}]", is_pattern, refs) for k in (1, 2, 3)])
        if is_pattern and column.pattern_index and len(refs) == 1:
            whole = _sql("match_like", column=column.expr, p=params.add(_containing(text)))
            return _and([whole, either])
        return either
    conditions = []
    for k, group in enumerate(given[:3], start=1):
        term = _group_term(group)
        if term is not None:
            text, is_pattern = term
            refs = _group_refs(column, text, is_pattern, params)
            conditions.append(_group_match(f"{column.groups}[{k}]", is_pattern, refs))
    return _and(conditions)


def _group_term(group: str) -> tuple[str, bool] | None:
    """One query group as the index keeps groups (a LIKE pattern when it has wild cards), or None when it
    matches anything."""
    if group.strip().strip("*^ ") == "":
        return None
    if "*" in group or "?" in group:
        return like_pattern(group, person_name=True), True
    return person_name_key(group), False


def _group_refs(column: Column, text: str, is_pattern: bool, params: _Params) -> tuple[str, ...]:
    """Parameters shared by the conditions on each group: the value, or the pattern and, when it has a literal
    prefix and the groups are indexed, the prefix's byte-order range."""
    if not is_pattern:
        return (params.add(text),)
    bounds = _prefix_bounds(text) if column.pattern_index else None
    if bounds is None:
        return (params.add(text),)
    return params.add(text), params.add(bounds[0]), params.add(bounds[1])


def _group_match(expr: str, is_pattern: bool, refs: tuple[str, ...]) -> str:
    if not is_pattern:
        return _sql("match_equal", column=expr, p=refs[0])
    if len(refs) == 3:
        return _sql("match_like_prefix", column=expr, p=refs[0], low=refs[1], high=refs[2])
    return _sql("match_like", column=expr, p=refs[0])


def _containing(pattern: str) -> str:
    """A LIKE pattern matching any string that holds a match of `pattern` (a doubled `%` is one)."""
    return f"%{pattern}%"


def _fuzzy_name(column: Column, value: str, params: _Params) -> str:
    """Fuzzy matching of person names (PS3.18 8.3.4.6): the value, wild cards allowed, matches the start of
    any name component, case-insensitively: `jo` matches `Doe^John`."""
    pattern = like_pattern(value, person_name=True)
    if not pattern.endswith("%"):
        pattern += "%"
    anywhere = pattern if pattern.startswith("%") else "% " + pattern
    return _sql("match_like_either", column=column.expr, p=params.add(pattern), q=params.add(anywhere))


def _range(column: Column, low: str, high: str, params: _Params) -> str:
    if column.kind == "time" and high:
        high = time_upper_bound(high)
    if low and high:
        return _sql("match_between", column=column.expr, low=params.add(low), high=params.add(high))
    if low:
        return _sql("match_from", column=column.expr, low=params.add(low))
    return _sql("match_until", column=column.expr, high=params.add(high))


def _indexed(column: Column, key: Filter, fuzzy: bool, params: _Params) -> str:
    kind = column.kind
    if key.match is Match.LIST:
        return _sql("match_any", column=column.expr, p=params.add(list(key.values)))
    if key.match is Match.RANGE:
        return _range(column, key.values[0], key.values[1], params)
    value = key.values[0]
    if kind == "name" and fuzzy:
        return _fuzzy_name(column, value, params)
    if kind == "name":
        return _person_name(column, value, params)
    if key.match is Match.WILDCARD:
        return _like(column, like_pattern(value, person_name=kind == "name"), params)
    if kind == "int":
        return _sql("match_equal", column=column.expr, p=params.add(int(value.strip())))
    if kind == "folded":  # exact but case-insensitive: through the same trigram index as patterns
        return _sql("match_folded_like", column=column.expr, p=params.add(_literal_like(value)))
    if kind == "time":  # a time matches to the precision it is given with
        return _range(column, value, value, params)
    return _sql("match_equal", column=column.expr, p=params.add(value))


def _literal_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _condition(key: Filter, query: Query, params: _Params) -> str | None:
    if key.match is Match.UNIVERSAL:
        return None
    if not key.indexed:
        documents = [{key.tag: {"Value": [item]}} for item in json_values(key.vr, key.values[0])]
        return _or(
            [
                _sql("match_contains", column=_ATTRS[key.level], p=params.add(json.dumps(doc, ensure_ascii=False)))
                for doc in documents
            ]
        )
    column = COLUMNS[key.tag]
    condition = _indexed(column, key, query.fuzzy, params)
    if column.wrapper is not None:
        condition = _sql(column.wrapper, study_pk=_STUDY_PK[query.level], where=condition)
    return condition


def _and(conditions: list[str]) -> str:
    return " AND ".join(conditions) if conditions else _sql("match_all")


def _or(conditions: list[str]) -> str:
    return conditions[0] if len(conditions) == 1 else "(" + " OR ".join(conditions) + ")"


def _restrict(access: AccessConstraints, level: Level, params: _Params) -> tuple[list[str], list[str]]:
    """Policy constraints as (study-table conditions, conditions on the resource row). With a grant, the limits
    and the grant become one study-table condition: (limits) OR (the granted patient's rows)."""
    study: list[str] = []
    own: list[str] = []
    if access.patient_ids is not None:
        study.append(_sql("restrict_patients", p=params.add(list(access.patient_ids))))
    if access.patient_ids_excluded:
        study.append(_sql("restrict_patients_excluded", p=params.add(list(access.patient_ids_excluded))))
    if access.modalities_excluded:
        own.append(
            _sql(
                "restrict_modalities_excluded",
                study_pk=_STUDY_PK[level],
                p=params.add(list(access.modalities_excluded)),
            )
        )
    grant = access.granted
    if grant is None or not (study or own):
        return study, own
    limits = _and(study + own)
    if grant.study_uid is None:
        return [_sql("restrict_or_granted", limits=limits, patient=params.add(grant.patient_id))], []
    return [
        _sql(
            "restrict_or_granted_study",
            limits=limits,
            patient=params.add(grant.patient_id),
            study=params.add(grant.study_uid),
        )
    ], []


def build(
    query: Query,
    *,
    instance_keys: Sequence[str] | None = None,
    extra: int = 1,
    access: AccessConstraints = UNRESTRICTED,
) -> tuple[str, list[object]]:
    """The page query for `query` and its parameters. It returns up to `query.limit + extra` rows (the extra
    row tells whether more results exist). At instance level, `instance_keys` are the metadata elements to
    return (None: all of them). `access` narrows the rows to what the policy permits."""
    params = _Params()
    own: list[str] = []  # conditions that only need the resource row
    by_level: dict[Level, list[str]] = {level: [] for level in Level}
    restrict_study, restrict_own = _restrict(access, query.level, params)
    by_level[Level.STUDY].extend(restrict_study)
    own.extend(restrict_own)
    if query.study_uid is not None:
        by_level[Level.STUDY].append(_sql("match_equal", column="st.study_uid", p=params.add(str(query.study_uid))))
    if query.series_uid is not None:
        by_level[Level.SERIES].append(_sql("match_equal", column="se.series_uid", p=params.add(str(query.series_uid))))
    for key in query.filters:
        condition = _condition(key, query, params)
        if condition is None:
            continue
        column = COLUMNS.get(key.tag) if key.indexed else None
        (own if column is not None and column.wrapper else by_level[key.level]).append(condition)
    where, joins = _compose(query.level, own, by_level)
    name = {Level.STUDY: "studies", Level.SERIES: "series", Level.INSTANCE: "instances"}[query.level]
    limit = params.add(query.limit + extra)
    offset = params.add(query.offset)
    metadata = ""
    if query.level is Level.INSTANCE:
        metadata = (
            _sql("metadata_all")
            if instance_keys is None
            else _sql("metadata_pick", keys=params.add(list(instance_keys)))
        )
    computed = _sql("study_computed", pk="p.study_pk") if query.level is Level.STUDY else ""
    sql = _sql(
        name, where=_and(where), joins=" ".join(joins), limit=limit, offset=offset, metadata=metadata, computed=computed
    )
    return sql, params.values


def _compose(level: Level, own: list[str], by_level: dict[Level, list[str]]) -> tuple[list[str], list[str]]:
    study, series, instance = by_level[Level.STUDY], by_level[Level.SERIES], by_level[Level.INSTANCE]
    where = list(own)
    joins: list[str] = []
    if level is Level.STUDY:
        where += study
        if series and instance:
            where.append(_sql("exists_instances_of_series_of_study", where=_and(series + instance)))
        elif series:
            where.append(_sql("exists_series_of_study", where=_and(series)))
        elif instance:
            where.append(_sql("exists_instances_of_study", where=_and(instance)))
    elif level is Level.SERIES:
        where += series
        if study:
            joins.append(_sql("join_study_of_series"))
            where += study
        if instance:
            where.append(_sql("exists_instances_of_series", where=_and(instance)))
    else:
        where += instance + series + study
        if series:
            joins.append(_sql("join_series_of_instance"))
        if study:
            joins.append(_sql("join_study_of_instance"))
    return where, joins


async def fetch_page(
    conn: Connection,
    query: Query,
    *,
    instance_keys: Sequence[str] | None = None,
    extra: int = 1,
    access: AccessConstraints = UNRESTRICTED,
) -> list[asyncpg.Record]:
    sql, args = build(query, instance_keys=instance_keys, extra=extra, access=access)
    rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
    return rows


async def study_stats(conn: Connection, study_pks: Sequence[int]) -> dict[int, asyncpg.Record]:
    """NumberOfStudyRelatedSeries/Instances, ModalitiesInStudy and SOPClassesInStudy by study key."""
    if not study_pks:
        return {}
    rows = await conn.fetch(_sql("study_stats", computed=_sql("study_computed", pk="s.study_pk")), list(study_pks))
    return {int(r["study_pk"]): r for r in rows}


async def series_stats(conn: Connection, series_pks: Sequence[int]) -> dict[int, int]:
    """NumberOfSeriesRelatedInstances by series key."""
    if not series_pks:
        return {}
    rows = await conn.fetch(_sql("series_stats"), list(series_pks))
    return {int(r["series_pk"]): int(r["instance_count"]) for r in rows}
