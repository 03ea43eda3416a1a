"""Runs the named queries of the index. No SQL text lives outside the `.sql` files beside this module."""

from __future__ import annotations

import json
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


async def index_instance(
    conn: Connection, p: ParsedInstance, blob_key: str, size: int, sha256: str
) -> tuple[int, int, int | None]:
    """Study, series and instance rows in one round trip (`index_instance` in store.sql): returns the study and
    series keys and the new instance's key, or None when the SOP Instance UID is already indexed. Raises
    `StudyOfAnotherPatient` or `SeriesInOtherStudy` (the caller rolls back: the statement may have inserted the
    instance)."""
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
    if (row["study_patient_id"], row["study_issuer"]) != (s["patient_id"], s["issuer_of_patient_id"]):
        raise StudyOfAnotherPatient(row["study_patient_id"], row["study_issuer"])
    if row["series_study_pk"] != row["study_pk"]:
        raise SeriesInOtherStudy(r["series_uid"])
    instance_pk = row["instance_pk"]
    return int(row["study_pk"]), int(row["series_pk"]), int(instance_pk) if instance_pk is not None else None


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


async def identity(conn: Connection, study_uid: str, series_uid: str, sop_uid: str) -> asyncpg.Record:
    """The study's patient (`study_known`, `patient_id`, `issuer_of_patient_id`), the series' study
    (`series_study_uid`) and the instance's original bytes (`instance_sha256`), each NULL when not indexed."""
    row = await conn.fetchrow(STORE["identity"], study_uid, series_uid, sop_uid)
    assert row is not None  # one row always
    return row
