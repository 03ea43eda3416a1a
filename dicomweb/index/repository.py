"""Runs the named queries of the index. No SQL text lives outside the `.sql` files beside this module."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from dicomweb.ingest.parse import ParsedInstance
from server.platform.db import Connection, Queries

STORE = Queries(Path(__file__).with_name("store.sql"))
RETRIEVE = Queries(Path(__file__).with_name("retrieve.sql"))


class SeriesInOtherStudy(Exception):
    """The Series Instance UID is already indexed under a different study."""


class StudyOfAnotherPatient(Exception):
    """The Study Instance UID is already indexed under a different patient (Patient ID and Issuer of Patient ID,
    compared exactly; an absent value differs from any present one). Carries the patient the study is filed
    under, for the audit record only: the sender may not be allowed to know it."""

    def __init__(self, patient_id: str | None, issuer: str | None) -> None:
        super().__init__("the study is filed under another patient")
        self.patient_id = patient_id
        self.issuer = issuer


def _instance_args(
    p: ParsedInstance, study_pk: int, series_pk: int, blob_key: str, size: int, sha256: str
) -> list[object]:
    i = p.instance
    return [
        series_pk,
        study_pk,
        i["sop_instance_uid"],
        i["sop_class_uid"],
        i["instance_number"],
        i["transfer_syntax_uid"],
        i["rows"],
        i["columns"],
        i["number_of_frames"],
        i["bits_allocated"],
        blob_key,
        size,
        sha256,
        p.metadata,
        json.dumps(p.bulk),
        json.dumps(p.pixel) if p.pixel is not None else None,
    ]


@dataclass(frozen=True, slots=True)
class Indexed:
    """What `index_instances` did with one instance: its study and series keys, its new key (None when the SOP
    Instance UID was already indexed, or the instance was not inserted because of `conflict`), and whether this
    instance inserted its study or series row (then the rows after it in the batch were told of a row that a
    refusal of this one would roll back)."""

    study_pk: int
    series_pk: int
    instance_pk: int | None
    conflict: StudyOfAnotherPatient | SeriesInOtherStudy | None
    created: bool


_STUDY = (
    "study_uid",
    "patient_id",
    "issuer_of_patient_id",
    "patient_name",
    "patient_name_search",
    "patient_birth_date",
    "patient_sex",
    "study_date",
    "study_time",
    "accession_number",
    "study_id",
    "study_description",
    "referring_physician_name",
    "referring_physician_search",
)
_SERIES = (
    "series_uid",
    "modality",
    "series_number",
    "series_description",
    "body_part_examined",
    "series_date",
    "series_time",
    "pps_start_date",
    "pps_start_time",
)
_INSTANCE = (
    "sop_instance_uid",
    "sop_class_uid",
    "instance_number",
    "transfer_syntax_uid",
    "rows",
    "columns",
    "number_of_frames",
    "bits_allocated",
)


def _json(value: object) -> str | None:
    return json.dumps(value, ensure_ascii=False) if value is not None else None


async def _index_one(conn: Connection, p: ParsedInstance, blob_key: str, size: int, sha256: str) -> asyncpg.Record:
    """`index_instance` in store.sql: a batch of one."""
    s, r = p.study, p.series
    row = await conn.fetchrow(
        STORE["index_instance"],
        s["study_uid"],
        s["patient_id"],
        s["issuer_of_patient_id"],
        s["patient_name"],
        s["patient_name_search"],
        s["patient_birth_date"],
        s["patient_sex"],
        s["study_date"],
        s["study_time"],
        s["accession_number"],
        s["study_id"],
        s["study_description"],
        s["referring_physician_name"],
        s["referring_physician_search"],
        json.dumps(p.study_attrs, ensure_ascii=False),
        r["series_uid"],
        r["modality"],
        r["series_number"],
        r["series_description"],
        r["body_part_examined"],
        r["series_date"],
        r["series_time"],
        r["pps_start_date"],
        r["pps_start_time"],
        json.dumps(p.series_attrs, ensure_ascii=False),
        *_instance_args(p, 0, 0, blob_key, size, sha256)[2:],
        s["patient_name_groups"],
        s["referring_physician_groups"],
    )
    assert row is not None  # the upserts always return their rows
    return row


async def index_instances(conn: Connection, batch: Sequence[tuple[ParsedInstance, str, int, str]]) -> list[Indexed]:
    """Study, series and instance rows of a batch of (instance, blob key, size, sha256) in one round trip
    (`index_instances` in store.sql), each instance told what it would be told indexed alone after the ones before
    it. An instance in conflict (`Indexed.conflict`) is not stored, but may have inserted its study or series
    (`Indexed.created`): the caller rolls back before storing without it. A batch of one (a lone instance) takes the
    single-row statement, which costs less."""
    if len(batch) == 1:
        rows = [await _index_one(conn, *batch[0])]
    else:
        rows = await conn.fetch(STORE["index_instances"], *_columns(batch))
    assert len(rows) == len(batch)  # the upserts always return their rows
    out = []
    for (p, *_), row in zip(batch, rows, strict=True):
        conflict: StudyOfAnotherPatient | SeriesInOtherStudy | None = None
        if (row["study_patient_id"], row["study_issuer"]) != (p.study["patient_id"], p.study["issuer_of_patient_id"]):
            conflict = StudyOfAnotherPatient(row["study_patient_id"], row["study_issuer"])
        elif row["series_study_pk"] != row["study_pk"]:
            conflict = SeriesInOtherStudy(p.series_uid)
        instance_pk = row["instance_pk"] if conflict is None else None
        created = len(batch) > 1 and bool(row["study_created"] or row["series_created"])
        out.append(
            Indexed(
                int(row["study_pk"]),
                int(row["series_pk"]),
                int(instance_pk) if instance_pk is not None else None,
                conflict,
                created,
            )
        )
    return out


def _columns(batch: Sequence[tuple[ParsedInstance, str, int, str]]) -> list[list[object]]:
    """The arguments of `index_instances` in store.sql: one array per column."""
    columns: list[list[object]] = [[p.study[name] for p, *_ in batch] for name in _STUDY]
    columns.append([_json(p.study_attrs) for p, *_ in batch])
    columns += [[p.series[name] for p, *_ in batch] for name in _SERIES]
    columns.append([_json(p.series_attrs) for p, *_ in batch])
    columns += [[p.instance[name] for p, *_ in batch] for name in _INSTANCE]
    columns.append([key for _p, key, _size, _sha in batch])
    columns.append([size for _p, _key, size, _sha in batch])
    columns.append([sha for _p, _key, _size, sha in batch])
    columns.append([p.metadata for p, *_ in batch])
    columns.append([json.dumps(p.bulk) for p, *_ in batch])
    columns.append([_json(p.pixel) for p, *_ in batch])
    columns.append([_json(p.study["patient_name_groups"]) for p, *_ in batch])
    columns.append([_json(p.study["referring_physician_groups"]) for p, *_ in batch])
    columns.append(list(range(1, len(batch) + 1)))
    return columns


async def replace_instance(
    conn: Connection,
    p: ParsedInstance,
    study_pk: int,
    series_pk: int,
    blob_key: str,
    size: int,
    sha256: str,
) -> int:
    value = await conn.fetchval(
        STORE["replace_instance"], *_instance_args(p, study_pk, series_pk, blob_key, size, sha256)
    )
    return int(value)


async def find_instance(conn: Connection, sop_uid: str, *, lock: bool = False) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(STORE["lock_instance" if lock else "find_instance"], sop_uid)
    return row


async def blob_keys_present(conn: Connection, keys: list[str]) -> set[str]:
    rows = await conn.fetch(STORE["blob_keys_present"], keys)
    return {r["blob_key"] for r in rows}


async def intake_reserve(
    conn: Connection,
    slot: int | None,
    ident: tuple[str, str, str, str | None, str | None, str],
    overwrite: bool,
) -> asyncpg.Record:
    """`ident` (study, series and SOP Instance UIDs, Patient ID, its issuer, sha256) checked against the index and
    the server processes' acknowledged instances, and reserved for `slot` (None: checked only) when nothing
    contradicts it: `conflict` ('patient' with `study_patient_id` / `study_issuer`, 'series', 'duplicate') or
    `reservation`."""
    row = await conn.fetchrow(STORE["intake_reserve"], slot, *ident, overwrite)
    assert row is not None  # one row always
    return row


async def intake_unreserve(conn: Connection, reservations: list[int]) -> None:
    await conn.execute(STORE["intake_unreserve"], reservations)


async def intake_unreserve_slots(conn: Connection, slots: list[int]) -> None:
    await conn.execute(STORE["intake_unreserve_slots"], slots)
