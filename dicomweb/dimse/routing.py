"""Auto-routing: forward newly stored instances to remote AEs (the "DICOM router"), through the job queue.

An ingest listener (`StoreService` listeners run inside the index transaction) matches each new instance against the
rules (`dicomweb.dimse.config.RoutingRule`: calling AE, modality, SOP class, patient/study/series attribute patterns)
and enqueues one `dimse.route` job per matching destination, the jobs of every instance of an ingest transaction with
one statement, so a job exists exactly when its instance committed. The job handler reads the stored bytes and sends
them with C-STORE (`dicomweb.dimse.sender`), in the stored transfer syntax or one the destination accepted
(`dicomweb.dimse.syntaxes`); a failure (destination down, a refusal status) raises, and the queue retries with
exponential backoff (`server.platform.jobs.backoff_seconds`) up to `MAX_ATTEMPTS`; an instance no accepted syntax can
carry fails the job at once. The jobs table is the status (`routing_status`, shown by `GET /dimse/routing`).

An instance received over DIMSE names its calling AE title in its origin (`dicomweb.ingest.origin.Origin`); those
of the other channels have none, and only match rules without a `calling_ae` condition.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import asyncpg

from authz.audit import AuditTrail
from authz.auditrecord import Agent, AuditRecord, EventType
from dicomweb.blobs import BlobStore
from dicomweb.dimse.audit import outcome_of
from dicomweb.dimse.config import DimseConfig
from dicomweb.dimse.sender import NotSent, Outgoing, SendFailed, send
from dicomweb.ingest.events import InstanceStored, Listener
from server.platform import jobs
from server.platform.db import Connection, Queries

SQL = Queries(Path(__file__).with_name("dimse.sql"))
ROUTE_JOB = "dimse.route"
MAX_ATTEMPTS = 10


def _text(element: Any) -> str | None:
    """The first value of a DICOM JSON element as text (a person name's alphabetic group)."""
    if not isinstance(element, dict):
        return None
    values = element.get("Value") or []
    if not values:
        return None
    first = values[0]
    if isinstance(first, dict):
        first = first.get("Alphabetic")
    return None if first is None else str(first)


def _values(stored: InstanceStored, tags: set[str]) -> dict[str, str]:
    p = stored.parsed
    out: dict[str, str] = {}
    metadata: dict[str, Any] | None = None
    for tag in tags:
        element = p.study_attrs.get(tag) or p.series_attrs.get(tag)
        if element is None:
            if metadata is None:
                metadata = json.loads(p.metadata)
            element = metadata.get(tag)
        text = _text(element)
        if text is not None:
            out[tag] = text
    return out


def _matched(config: DimseConfig, tags: set[str], stored: InstanceStored) -> list[dict[str, str]]:
    """The `dimse.route` payloads of one instance: one per destination of the rules it matches."""
    p = stored.parsed
    values = _values(stored, tags) if tags else {}
    calling = stored.origin.calling_ae
    sent: set[str] = set()
    payloads = []
    for rule in config.routes:
        if rule.destination in sent:
            continue
        if rule.matches(calling, p.series.get("modality"), p.sop_class_uid, values):
            sent.add(rule.destination)
            payloads.append({"instance": p.sop_instance_uid, "destination": rule.destination, "rule": rule.name})
    return payloads


def routing_hook(config: DimseConfig) -> Listener:
    """The ingest listener that enqueues `dimse.route` jobs for the rules an instance matches."""
    tags = {tag for rule in config.routes for tag, _ in rule.attributes}

    async def hook(conn: Connection, stored: Sequence[InstanceStored]) -> None:
        if not config.routes:
            return
        new = [
            jobs.NewJob(ROUTE_JOB, payload, max_attempts=MAX_ATTEMPTS)
            for event in stored
            for payload in _matched(config, tags, event)
        ]
        await jobs.enqueue_many(conn, new)

    return hook


def route_handler(
    pool: asyncpg.Pool, blobs: BlobStore, audit: AuditTrail, config: DimseConfig, calling_title: str, timeout: float
) -> jobs.Handler:
    """`dimse.route`: send one stored instance to one destination; raise to be retried."""

    async def run(job: jobs.Job) -> None:
        destination = config.destination(str(job.payload.get("destination", "")))
        if destination is None:
            raise jobs.PermanentJobError(f"destination {job.payload.get('destination')!r} is no longer configured")
        async with pool.acquire() as conn:
            row = await conn.fetchrow(SQL["routed_instance"], str(job.payload.get("instance", "")))
        if row is None:
            return  # deleted since: nothing to forward
        data = await blobs.read_range(row["blob_key"], 0, int(row["size_bytes"]))
        item = Outgoing(row["sop_class_uid"], row["transfer_syntax_uid"], data)
        try:
            statuses = await anyio.to_thread.run_sync(send, destination, calling_title, [item], timeout, config.tls)
            failure = next((s for s in statuses if outcome_of(s) != "0"), None)
            if failure is not None:
                raise SendFailed(f"{destination.ae_title} answered C-STORE status 0x{failure:04X}")
        except NotSent as exc:  # no syntax the destination accepts can carry it: retrying cannot help
            await audit.append(_record(destination.ae_title, row, "8", str(exc)))
            raise jobs.PermanentJobError(str(exc)) from None
        except SendFailed as exc:
            await audit.append(_record(destination.ae_title, row, "8", str(exc)))
            raise
        await audit.append(_record(destination.ae_title, row, "0", None))

    return run


def _record(title: str, row: asyncpg.Record, outcome: str, desc: str | None) -> AuditRecord:
    """DICOM Instances Transferred (PS3.15 A.5.3.4), action R: this server sent a copy to `title`."""
    return AuditRecord(
        time=dt.datetime.now(dt.UTC),
        type=EventType.INSTANCES_TRANSFERRED,
        action="R",
        outcome=outcome,  # type: ignore[arg-type]
        outcome_desc=desc,
        agent=Agent(sub=None, ae_title=title, requestor=False),
        instance_uid=row["sop_instance_uid"],
        method="C-STORE",
        channel="dimse",
    )


async def routing_status(pool: asyncpg.Pool, limit: int = 100) -> list[dict[str, Any]]:
    """The newest auto-routing jobs as plain values."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(SQL["routing_status"], limit)
    out = []
    for row in rows:
        item = dict(row)
        for key in ("created_at", "run_at", "finished_at"):
            if item[key] is not None:
                item[key] = item[key].isoformat()
        out.append(item)
    return out
