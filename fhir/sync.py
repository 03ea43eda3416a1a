"""The `fhir.sync` job: ImagingStudy, Patient and Endpoint resources derived from the DICOM index.

Trigger: every ingest path goes through `dicomweb.ingest.service.StoreService`, whose listener (`ingest_hook`) queues a
`fhir.sync` job for each study of the stored instances inside the ingest transaction, keyed by the Study Instance UID
and delayed a little (`HOUNSFIELD_FHIR_SYNC_DELAY_MS`, default 1 s): a queued job absorbs the others, so a burst of
instances makes one job and one new version, visible a second or so after the burst.

The job reads the study, its series and instances from the index and writes, in one transaction, the Endpoint
(one for the archive's DICOMweb service), the Patient (one per `issuer|PatientID`) and the ImagingStudy (one per
Study Instance UID) through `FhirRepository`, so every change is a new version with history, and a resource whose
content did not change gets no new version. A study no longer in the index has its ImagingStudy deleted.

Concurrency: jobs are idempotent and may run twice or side by side on several servers. Each derived resource
is written under a transaction-scoped advisory lock on its natural key (`lock_source`), taken only when the
resource must be written, in the order ImagingStudy -> Endpoint -> Patient (no deadlock); a unique violation on
the natural key (a writer that did not lock) is caught and the winner's resource is used.

Backfill: at start (with the worker on) one job pages through studies without a current ImagingStudy and
queues their sync, then through ImagingStudy resources whose study left the index, so that an archive upgraded
to this version gets its resources.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from dicomweb.ingest.events import InstanceStored, Listener
from fhir.imagingstudy import (
    ENDPOINT_SOURCE_KEY,
    InstanceData,
    PatientIdentity,
    SeriesData,
    endpoint_resource,
    imaging_study,
    modalities,
    patient_identity,
    patient_resource,
)
from fhir.repository import FhirRepository, Filing, Stored
from server.platform import jobs
from server.platform.db import Connection, Queries

log = logging.getLogger(__name__)
SQL = Queries(Path(__file__).with_name("sync.sql"))
SYNC_JOB = "fhir.sync"
BACKFILL_KEY = "backfill"
BACKFILL_PAGE = 500
PATIENT_LOOKBACK = 50
"""How many of a Patient ID's newest studies are searched for the one with the same issuer."""
NO_PATIENT_ID = "#no-patient-id|"
"""Natural key prefix of the Patient of a study without Patient ID: one such Patient per study (R4 requires
ImagingStudy.subject), never shared between studies of unknown patients."""


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync did: the study's current ImagingStudy (None when the study is not in the index) and
    whether anything was written."""

    study_uid: str
    imaging_study: Stored | None
    changed: bool


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        loaded = json.loads(value)
        return loaded if isinstance(loaded, dict) else {}
    return dict(value) if isinstance(value, Mapping) else {}


async def enqueue_sync(conn: Connection, study_uid: str, *, delay_seconds: float = 0.0) -> int | None:
    """Queue a sync of one study (absorbed by a queued one); run in the transaction that changed the study."""
    return await jobs.enqueue(conn, SYNC_JOB, {"study": study_uid}, dedupe_key=study_uid, delay_seconds=delay_seconds)


async def enqueue_backfill(conn: Connection) -> int | None:
    return await jobs.enqueue(conn, SYNC_JOB, {"backfill": "studies", "after": 0}, dedupe_key=BACKFILL_KEY)


def ingest_hook(delay_seconds: float) -> Listener:
    """The `StoreService` listener: the stored instances queue their studies' sync, one job per study, with one
    statement."""

    async def hook(conn: Connection, stored: Sequence[InstanceStored]) -> None:
        studies = dict.fromkeys(event.parsed.study_uid for event in stored)
        new = [jobs.NewJob(SYNC_JOB, {"study": uid}, uid, delay_seconds) for uid in studies]
        await jobs.enqueue_many(conn, new)

    return hook


def sync_handler(pool: asyncpg.Pool, repo: FhirRepository, endpoint_address: str) -> jobs.Handler:
    """`fhir.sync`: payload `{"study": uid}` syncs one study; `{"backfill": "studies"|"orphans", "after": ...}`
    is one page of the backfill."""

    async def run(job: jobs.Job) -> None:
        study_uid = job.payload.get("study")
        phase = job.payload.get("backfill")
        async with pool.acquire() as conn:
            if isinstance(study_uid, str) and study_uid:
                await sync_study(conn, repo, study_uid, endpoint_address=endpoint_address)
            elif phase in ("studies", "orphans"):
                await backfill(conn, str(phase), job.payload.get("after"))
            else:
                raise jobs.PermanentJobError("fhir.sync payload names neither a study nor a backfill page")

    return run


async def sync_study(conn: Connection, repo: FhirRepository, study_uid: str, *, endpoint_address: str) -> SyncResult:
    """Bring the study's ImagingStudy (and its Patient and the Endpoint) up to date with the index."""
    async with conn.transaction():
        await conn.execute(SQL["lock_source"], "ImagingStudy", study_uid)
        study = await conn.fetchrow(SQL["study"], study_uid)
        if study is None:
            existing = await repo.find_by_source(conn, "ImagingStudy", study_uid)
            if existing is None or existing.deleted:
                return SyncResult(study_uid, None, False)
            await repo.delete(conn, "ImagingStudy", existing.id)
            return SyncResult(study_uid, None, True)
        attrs = _json(study["attrs"])
        series = await _series(conn, study["study_pk"])
        endpoint, _ = await _put(
            conn, repo, "Endpoint", ENDPOINT_SOURCE_KEY, endpoint_resource(endpoint_address), Filing()
        )
        identity = patient_identity(attrs)
        patient = await _patient(conn, repo, study_uid, attrs, identity)
        content = imaging_study(
            attrs,
            series,
            study_uid=study_uid,
            subject=f"Patient/{patient.id}",
            endpoint=f"Endpoint/{endpoint.id}",
        )
        filing = Filing(identity.patient_id if identity else None, modalities(series), study_uid)
        stored, changed = await _put(conn, repo, "ImagingStudy", study_uid, content, filing, locked=True)
        return SyncResult(study_uid, stored, changed)


async def _series(conn: Connection, study_pk: int) -> list[SeriesData]:
    rows = await conn.fetch(SQL["series_of_study"], study_pk)
    instances: dict[int, list[InstanceData]] = defaultdict(list)
    for row in await conn.fetch(SQL["instances_of_study"], study_pk):
        instances[row["series_pk"]].append(
            InstanceData(row["sop_instance_uid"], row["sop_class_uid"], row["instance_number"])
        )
    return [SeriesData(_json(row["attrs"]), instances.get(row["series_pk"], [])) for row in rows]


async def _patient(
    conn: Connection,
    repo: FhirRepository,
    study_uid: str,
    attrs: dict[str, Any],
    identity: PatientIdentity | None,
) -> Stored:
    """The Patient of a study, from the newest study of the same identifier (a name corrected in a later study
    is what the Patient shows, whichever study's job runs last)."""
    if identity is None:
        key, source = NO_PATIENT_ID + study_uid, attrs
    else:
        key, source = identity.source_key, attrs
        for row in await conn.fetch(SQL["studies_of_patient"], identity.patient_id, PATIENT_LOOKBACK):
            other = _json(row["attrs"])
            found = patient_identity(other)
            if found is not None and found.source_key == key:
                source = other
                break
    filing = Filing(identity.patient_id if identity else None, (), key)
    stored, _ = await _put(conn, repo, "Patient", key, patient_resource(source, identity), filing)
    return stored


def _unchanged(stored: Stored, content: Mapping[str, Any], filing: Filing) -> bool:
    if stored.deleted or stored.content is None:
        return False
    current = {k: v for k, v in stored.content.items() if k not in ("id", "meta")}
    return current == dict(content) and stored.filing == filing


async def _put(
    conn: Connection,
    repo: FhirRepository,
    resource_type: str,
    source_key: str,
    content: Mapping[str, Any],
    filing: Filing,
    *,
    locked: bool = False,
) -> tuple[Stored, bool]:
    """Create or update the derived resource with this natural key; no new version when nothing changed.
    Returns (current version, whether it was written). Runs inside the caller's transaction."""
    filing = Filing(filing.patient_key, filing.modalities, source_key)
    existing = await repo.find_by_source(conn, resource_type, source_key)
    if existing is not None and _unchanged(existing, content, filing):
        return existing, False
    if not locked:
        await conn.execute(SQL["lock_source"], resource_type, source_key)
        existing = await repo.find_by_source(conn, resource_type, source_key)
        if existing is not None and _unchanged(existing, content, filing):
            return existing, False
    if existing is None:
        try:
            async with conn.transaction():  # a savepoint: a lost race must not abort the whole sync
                return await repo.create(conn, resource_type, content, filing), True
        except asyncpg.UniqueViolationError:
            existing = await repo.find_by_source(conn, resource_type, source_key)
            if existing is None:
                raise
            if _unchanged(existing, content, filing):
                return existing, False
    stored, _ = await repo.update(conn, resource_type, existing.id, content, filing)
    return stored, True


async def backfill(conn: Connection, phase: str, after: Any) -> int:
    """One page of the backfill: queue the sync of up to `BACKFILL_PAGE` studies, then the next page (or the
    next phase). Returns how many syncs were queued."""
    async with conn.transaction():
        if phase == "studies":
            rows = await conn.fetch(SQL["studies_without_imagingstudy"], int(after or 0), BACKFILL_PAGE)
            uids = [str(r["study_uid"]) for r in rows]
            following: dict[str, Any] = (
                {"backfill": "studies", "after": int(rows[-1]["study_pk"])}
                if len(rows) == BACKFILL_PAGE
                else {"backfill": "orphans", "after": ""}
            )
        else:
            rows = await conn.fetch(SQL["imagingstudies_without_study"], str(after or ""), BACKFILL_PAGE)
            uids = [str(r["source_key"]) for r in rows]
            following = {"backfill": "orphans", "after": uids[-1]} if len(rows) == BACKFILL_PAGE else {}
        for uid in uids:
            await enqueue_sync(conn, uid)
        if following:
            await jobs.enqueue(conn, SYNC_JOB, following, dedupe_key=BACKFILL_KEY)
    if uids:
        log.info("FHIR backfill (%s): queued the sync of %d studies", phase, len(uids))
    return len(uids)
