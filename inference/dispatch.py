"""Dispatch: which models run on which series, and when.

Trigger: every ingest path goes through `dicomweb.ingest.service.StoreService`, whose listener (`ingest_hook`) queues an
`inference.series_quiet` job for each series of the stored instances inside the ingest transaction, keyed by the Series
Instance UID and due `HOUNSFIELD_INFERENCE_QUIET_SECONDS` later; each further instance of the series pushes the queued
job later again (`debounce`), so the job runs once the series has been quiet that long: the series is taken as complete.
Results (SEG, SR) are skipped: models do not run on their own outputs.

The quiet job matches the series (modality, SOP classes, body part, description, instance count from the index)
against every active and shadow model (`inference.registry.Selector`) and, for each match, claims the result row
(series, model, version) and queues one `inference.run` job. The claim is an insert that does nothing when the
row exists: dispatching a series twice (a late instance, a second server) runs each model version once.

On demand: `request_inference` records a request and claims/queues the same way (a failed result is run again);
its status is the result row's (`request_status`). The model's selector holds there as well: a series it does not
match is refused (`InputRejected`, with the reason) unless the request overrides the selector, which the policy
allows to admins only and the audit record names (`inference.routes`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from dicomweb.ingest.events import InstanceStored, Listener
from dicomweb.search.access import UNRESTRICTED, AccessConstraints
from inference import registry
from inference.errors import InputNotFound, InputRejected, InvalidModel, RequestNotFound
from inference.registry import Model, SeriesFacts
from server.platform import jobs
from server.platform.db import Connection, Queries

SQL = Queries(Path(__file__).with_name("dispatch.sql"))
QUIET_JOB = "inference.series_quiet"
RUN_JOB = "inference.run"
RESULT_MODALITIES = frozenset({"SEG", "SR", "KO", "PR", "RWV"})
"""Series of these modalities are results or annotations, never model inputs."""


def ingest_hook(quiet_seconds: float) -> Listener:
    """The `StoreService` listener: (re)start the quiet period of each series of the stored instances, with one
    statement."""

    async def hook(conn: Connection, stored: Sequence[InstanceStored]) -> None:
        series: dict[str, str] = {}
        for event in stored:
            p = event.parsed
            if (p.series.get("modality") or "").upper() not in RESULT_MODALITIES:
                series.setdefault(p.series_uid, p.study_uid)
        if not series:
            return
        payloads = [json.dumps({"study": study, "series": uid}) for uid, study in series.items()]
        await conn.execute(SQL["debounce_many"], QUIET_JOB, payloads, list(series), float(quiet_seconds), 8)

    return hook


async def series_facts(conn: Connection, series_uid: str) -> tuple[SeriesFacts, tuple[str, ...]] | None:
    """The series as selectors see it, and the modalities of its study (for the policy); None when unknown."""
    row = await conn.fetchrow(SQL["series_facts"], series_uid)
    if row is None:
        return None
    facts = SeriesFacts(
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        modality=row["modality"],
        body_part=row["body_part_examined"],
        series_description=row["series_description"],
        sop_classes=frozenset(row["sop_classes"]),
        instances=int(row["instances"]),
        patient_id=row["patient_id"],
    )
    return facts, tuple(row["modalities"])


async def _queue_run(conn: Connection, facts: SeriesFacts, model: Model, max_attempts: int) -> None:
    payload = {"study": facts.study_uid, "series": facts.series_uid, "model": model.name, "version": model.version}
    key = f"{facts.series_uid}|{model.name}|{model.version}"
    await jobs.enqueue(conn, RUN_JOB, payload, dedupe_key=key, max_attempts=max_attempts)


async def dispatch_series(conn: Connection, series_uid: str, max_attempts: int) -> list[str]:
    """Claim and queue a run of every matching active or shadow model; returns the `name/version`s queued
    (models that already have a result for the series are not)."""
    found = await series_facts(conn, series_uid)
    if found is None:
        return []
    facts, _ = found
    queued: list[str] = []
    for model in await registry.running(conn):
        if not model.selector.matches(facts):
            continue
        async with conn.transaction():
            claimed = await conn.fetchval(
                SQL["claim_result"],
                facts.study_uid,
                facts.series_uid,
                model.name,
                model.version,
                model.status == "shadow",
            )
            if claimed is not None:
                await _queue_run(conn, facts, model, max_attempts)
                queued.append(model.key)
    return queued


def quiet_handler(pool: asyncpg.Pool, max_attempts: int) -> jobs.Handler:
    """`inference.series_quiet`: payload `{"study", "series"}`."""

    async def run(job: jobs.Job) -> None:
        series_uid = job.payload.get("series")
        if not isinstance(series_uid, str) or not series_uid:
            raise jobs.PermanentJobError("inference.series_quiet payload names no series")
        async with pool.acquire() as conn:
            await dispatch_series(conn, series_uid, max_attempts)

    return run


@dataclass(frozen=True, slots=True)
class OnDemand:
    """An accepted on-demand request; `overridden`: why the model's selector refused the series, when the
    request overrode it (None: the selector matched)."""

    request_id: uuid.UUID
    overridden: str | None = None


async def request_inference(
    conn: Connection,
    *,
    study_uid: str,
    series_uid: str,
    name: str,
    version: str | None,
    requested_by: str,
    max_attempts: int,
    max_instances: int,
    override_selector: bool = False,
) -> OnDemand:
    """An on-demand run of one model (its active version unless `version`) on one series of a study. A series
    the model's selector does not match is refused (`InputRejected`, nothing queued) unless `override_selector`
    (the caller's policy decision allowed the override); a series of more than `max_instances` instances is
    refused whatever the override (a model never reads part of a series)."""
    found = await series_facts(conn, series_uid)
    if found is None or found[0].study_uid != study_uid:
        raise InputNotFound(f"series {series_uid} of study {study_uid} is not in the archive")
    facts, _ = found
    model = await _requested_model(conn, name, version)
    mismatch = model.selector.mismatch(facts)
    if mismatch is not None and not override_selector:
        raise InputRejected(f"model {model.key} does not take this series: {mismatch}")
    if facts.instances > max_instances:
        raise InputRejected(
            f"the series has {facts.instances} instances, more than the {max_instances} a model reads "
            "(HOUNSFIELD_INFERENCE_MAX_INSTANCES); nothing was queued"
        )
    request_id = uuid.uuid4()
    async with conn.transaction():
        shadow = model.status == "shadow"
        claimed = await conn.fetchval(SQL["claim_result"], study_uid, series_uid, model.name, model.version, shadow)
        if claimed is None:
            claimed = await conn.fetchval(SQL["requeue_failed"], series_uid, model.name, model.version, shadow)
        if claimed is not None:
            await _queue_run(conn, facts, model, max_attempts)
        await conn.execute(
            SQL["insert_request"], request_id, study_uid, series_uid, model.name, model.version, requested_by
        )
    return OnDemand(request_id, mismatch)


async def _requested_model(conn: Connection, name: str, version: str | None) -> Model:
    if version is not None:
        model = await registry.get(conn, name, version)
        if model.status == "retired":
            raise InvalidModel(f"model {model.key} is retired")
        return model
    models = await registry.list_models(conn, name, "active")
    if not models:
        raise InvalidModel(f"model {name} has no active version; name a version")
    return models[-1]


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _stats(value: Any) -> dict[str, Any]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return dict(loaded or {})


def result_json(row: asyncpg.Record) -> dict[str, Any]:
    """A result row as the API shows it."""
    keys = set(row.keys())
    out: dict[str, Any] = {
        "study": row["study_uid"],
        "series": row["series_uid"],
        "model": row["model_name"],
        "version": row["model_version"],
        "state": row["state"] or "queued",
        "shadow": bool(row["shadow"]),
        "attempts": row["attempts"] or 0,
        "error": row["last_error"],
        "latency_ms": row["latency_ms"],
        "stats": _stats(row["stats"]),
        "outputs": {"series": row["output_series_uid"], "instances": list(row["output_instances"] or [])},
        "report": f"DiagnosticReport/{row['report_id']}" if row["report_id"] else None,
        "finished": _iso(row["finished_at"]),
    }
    if "feedback" in keys:
        out["feedback"] = row["feedback"]
    if "updated_at" in keys:  # a result row: when its run was dispatched, and since when it is in its state
        out["dispatched"], out["state_since"] = _iso(row["created_at"]), _iso(row["updated_at"])
    return out


async def request_status(conn: Connection, request_id: str) -> dict[str, Any]:
    try:
        rid = uuid.UUID(request_id)
    except ValueError:
        raise RequestNotFound(f"no inference request {request_id}") from None
    row = await conn.fetchrow(SQL["request"], rid)
    if row is None:
        raise RequestNotFound(f"no inference request {request_id}")
    return {
        "id": str(row["id"]),
        "requested_by": row["requested_by"],
        "created": _iso(row["created_at"]),
        **result_json(row),
    }


async def results(
    conn: Connection,
    *,
    series: str | None,
    model: str | None,
    version: str | None,
    limit: int,
    access: AccessConstraints = UNRESTRICTED,
) -> list[dict[str, Any]]:
    """Result rows, newest first, of the series the subject may see (`access`: the policy's search constraints)."""
    rows = await conn.fetch(
        SQL["results"],
        series,
        model,
        version,
        limit,
        list(access.patient_ids) if access.patient_ids is not None else None,
        list(access.patient_ids_excluded),
        list(access.modalities_excluded),
        access.granted.patient_id if access.granted is not None else None,
        access.granted.study_uid if access.granted is not None else None,
    )
    return [result_json(r) for r in rows]


async def request_study(conn: Connection, request_id: str) -> str | None:
    """The study an inference request names (None: no such request)."""
    try:
        rid = uuid.UUID(request_id)
    except ValueError:
        return None
    value = await conn.fetchval(SQL["request_study"], rid)
    return str(value) if value is not None else None
