"""The QIDO-RS search service (PS3.18 10.6): runs a parsed `Query` against the index and returns DICOM JSON.

Each result holds the attributes PS3.18 Table 10.6.3-3 (study), -4 (series) and -5 (instance) require for its
level, and those of the levels above it that the path does not name (10.6.3.3: `/series` returns the study
attributes too); plus the attributes named by `includefield` or as keys, and with `includefield=all` every
stored attribute of the level. Values come from the stored DICOM JSON (study and series `attrs`, instance
`metadata`), so VRs and value formats are those of the data; what the server computes (counts, modalities,
SOP classes, Retrieve URL, availability) is added. A key or includefield attribute that the data lacks is
returned empty (as a C-FIND return key would be); a required one that the data lacks is left out.
No HTTP types in here: the route turns `SearchResult` into a response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from pydicom.datadict import dictionary_VR

from dicomweb.index import search as index
from dicomweb.search.access import UNRESTRICTED, AccessConstraints
from dicomweb.search.query import Level, Query, level_of, tag_of
from server.platform.db import vouch_stateless

TRUNCATED = "The number of results exceeded the maximum supported by the server. Additional results can be requested."


def _tags(*keywords: str) -> frozenset[str]:
    return frozenset(tag_of(k) for k in keywords)


CHARSET = tag_of("SpecificCharacterSet")
TIMEZONE = tag_of("TimezoneOffsetFromUTC")
_OWN_LEVEL = frozenset({CHARSET, TIMEZONE})  # taken from the result's own level, which has them too

STUDY_REQUIRED = _tags(
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
)
SERIES_REQUIRED = _tags(
    "SpecificCharacterSet",
    "Modality",
    "TimezoneOffsetFromUTC",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
    "StudyInstanceUID",
)
INSTANCE_REQUIRED = _tags(
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "TimezoneOffsetFromUTC",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
_REQUIRED = {Level.STUDY: STUDY_REQUIRED, Level.SERIES: SERIES_REQUIRED, Level.INSTANCE: INSTANCE_REQUIRED}

MODALITIES_IN_STUDY = tag_of("ModalitiesInStudy")
SOP_CLASSES_IN_STUDY = tag_of("SOPClassesInStudy")
STUDY_SERIES = tag_of("NumberOfStudyRelatedSeries")
STUDY_INSTANCES = tag_of("NumberOfStudyRelatedInstances")
SERIES_INSTANCES = tag_of("NumberOfSeriesRelatedInstances")
RETRIEVE_URL = tag_of("RetrieveURL")
AVAILABILITY = tag_of("InstanceAvailability")
_COMPUTED = frozenset(
    {
        MODALITIES_IN_STUDY,
        SOP_CLASSES_IN_STUDY,
        STUDY_SERIES,
        STUDY_INSTANCES,
        SERIES_INSTANCES,
        RETRIEVE_URL,
        AVAILABILITY,
    }
)


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The matches as DICOM JSON objects, and warnings for the response's Warning header."""

    matches: list[dict[str, Any]]
    warnings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Plan:
    """Which attributes each result carries, decided once per request."""

    levels: tuple[Level, ...]  # the levels whose attributes the result includes
    tags: frozenset[str]

    @staticmethod
    def of(query: Query) -> _Plan:
        levels = [query.level]
        if query.level is Level.INSTANCE and query.series_uid is None:
            levels.append(Level.SERIES)
        if query.level is not Level.STUDY and query.study_uid is None:
            levels.append(Level.STUDY)
        tags = set().union(*(_REQUIRED[level] for level in levels))
        tags |= {t for t in query.return_tags if level_of(t) <= query.level}
        return _Plan(tuple(levels), frozenset(tags))

    def instance_keys(self) -> list[str]:
        return sorted(t for t in self.tags if level_of(t) is Level.INSTANCE or t in _OWN_LEVEL)


async def search(
    pool: asyncpg.Pool, query: Query, base_url: str, access: AccessConstraints = UNRESTRICTED
) -> SearchResult:
    """Run `query`; `base_url` is the DICOMweb root that Retrieve URLs and Bulk Data URIs start with; `access`
    limits the rows to those the policy permits (counts of permitted studies are whole: a study is permitted
    or withheld entirely)."""
    plan = _Plan.of(query)
    instance_keys = None if query.include_all else plan.instance_keys()
    async with pool.acquire() as conn:
        rows = await index.fetch_page(conn, query, instance_keys=instance_keys, access=access)
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        if query.level is Level.STUDY:  # the page query computed them (one round trip)
            studies = {int(r["study_pk"]): r for r in rows}
        else:
            studies = await index.study_stats(
                conn, sorted({int(r["study_pk"]) for r in rows}) if Level.STUDY in plan.levels else []
            )
        series = await index.series_stats(
            conn, sorted({int(r["series_pk"]) for r in rows}) if Level.SERIES in plan.levels else []
        )
        vouch_stateless(conn)  # SELECTs only: the release needs no reset query (a round trip per search)
    warnings = list(query.unsupported)
    if more and (query.limit_requested is None or query.limit_requested > query.limit):
        warnings.append(TRUNCATED)
    builder = _Builder(query, plan, studies, series, base_url)
    return SearchResult([builder.result(row) for row in rows], tuple(warnings))


def _absolute_bulk(text: str, base_url: str) -> str:
    """Bulk Data URIs are stored relative (`studies/...`); responses carry them absolute (PS3.18 8.6.1.2)."""
    root = json.dumps(base_url + "/")[1:-1]
    return text.replace('"BulkDataURI":"studies/', f'"BulkDataURI":"{root}studies/')


def _decode(text: str) -> dict[str, Any]:
    value: dict[str, Any] = msgspec.json.decode(text)
    return value


def _empty(tag: str) -> dict[str, Any] | None:
    try:
        return {"vr": dictionary_VR(int(tag, 16)).split(" or ")[0]}
    except KeyError:
        return None


def _values(vr: str, values: list[str]) -> dict[str, Any]:
    return {"vr": vr, "Value": values} if values else {"vr": vr}


class _Builder:
    """Makes one DICOM JSON result per row; a page's rows share their parents' parsed attributes."""

    def __init__(
        self,
        query: Query,
        plan: _Plan,
        studies: dict[int, asyncpg.Record],
        series: dict[int, int],
        base_url: str,
    ) -> None:
        self.query = query
        self.plan = plan
        self.studies = studies
        self.series = series
        self.base_url = base_url
        requested = query.return_tags
        # (tag, level whose attributes hold it, own level first?, empty element when absent)
        self.wanted = [
            (tag, level_of(tag), tag in _OWN_LEVEL, _empty(tag) if tag in requested else None)
            for tag in sorted(plan.tags - _COMPUTED)
        ]
        self.parsed: dict[tuple[Level, int], dict[str, Any]] = {}

    def _attrs(self, level: Level, pk: int, text: str) -> dict[str, Any]:
        key = (level, pk)
        attrs = self.parsed.get(key)
        if attrs is None:
            attrs = self.parsed[key] = _decode(text)
        return attrs

    def result(self, row: asyncpg.Record) -> dict[str, Any]:
        query = self.query
        stores = {Level.STUDY: self._attrs(Level.STUDY, int(row["study_pk"]), row["study_attrs"])}
        if query.level is not Level.STUDY:
            stores[Level.SERIES] = self._attrs(Level.SERIES, int(row["series_pk"]), row["series_attrs"])
        if query.level is Level.INSTANCE:
            stores[Level.INSTANCE] = _decode(_absolute_bulk(row["metadata"] or "{}", self.base_url))
        own = stores[query.level]
        out: dict[str, Any] = dict(own) if query.include_all else {}
        for tag, level, own_first, empty in self.wanted:
            element = own.get(tag) if own_first else stores[level].get(tag)
            if element is None and own_first:
                element = stores[Level.STUDY].get(tag)
            if element is None:
                element = empty
            if element is not None:
                out[tag] = element
        self._computed(row, out)
        return {k: out[k] for k in sorted(out)}

    def _computed(self, row: asyncpg.Record, out: dict[str, Any]) -> None:
        level = self.query.level
        url = f"{self.base_url}/studies/{row['study_uid']}"
        if level is not Level.STUDY:
            url += f"/series/{row['series_uid']}"
        if level is Level.INSTANCE:
            url += f"/instances/{row['sop_instance_uid']}"
        out[RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
        out[AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
        if Level.STUDY in self.plan.levels:
            stats = self.studies.get(int(row["study_pk"]))
            if stats is not None:
                out[STUDY_SERIES] = {"vr": "IS", "Value": [int(stats["series_count"])]}
                out[STUDY_INSTANCES] = {"vr": "IS", "Value": [int(stats["instance_count"])]}
                out[MODALITIES_IN_STUDY] = _values("CS", list(stats["modalities"]))
                out[SOP_CLASSES_IN_STUDY] = _values("UI", list(stats["sop_classes"]))
        if Level.SERIES in self.plan.levels:
            count = self.series.get(int(row["series_pk"]))
            if count is not None:
                out[SERIES_INSTANCES] = {"vr": "IS", "Value": [count]}
