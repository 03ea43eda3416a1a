"""Resources have one owner (house style 6): the lifespan opens them here and closes them in reverse order;
route handlers get them by dependency injection."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeAlias

import anyio.to_thread
import asyncpg
from litestar.di import NamedDependency

from authz import keys
from authz.audit import CHECKPOINT_JOB, AuditTrail, checkpoint_handler, key_signer, key_verifier
from authz.auditanchor import AuditAnchors, open_anchors
from authz.auditsyslog import SyslogForwarder
from authz.breakglass import ALERT_JOB, alert_handler
from authz.decision import PolicyEngine
from authz.decision_cache import CachingEngine
from authz.engines import open_engine
from authz.sessioncache import SessionCache
from dicomweb import renditions
from dicomweb.blobs import BlobStore
from dicomweb.blobs.fs import FileSystemBlobStore
from dicomweb.dimse import routing
from dicomweb.dimse.service import DimseService, open_dimse
from dicomweb.store import IngestActivity, StoreService, blob_delete_handler, gc_handler
from fhir import subscriptions
from fhir import sync as fhir_sync
from fhir.imagingstudy import dicomweb_address
from fhir.repository import FhirRepository
from inference.service import InferenceService, open_inference
from server import db, dbroles, jobs, private
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Resources:
    settings: Settings
    pool: asyncpg.Pool
    blobs: BlobStore
    store: StoreService
    audit: AuditTrail
    policy: PolicyEngine
    fhir: FhirRepository = field(default_factory=FhirRepository)
    """Versioned FHIR resources (write hooks: Subscription notifications)."""
    worker: jobs.Worker | None = None
    handlers: dict[str, jobs.Handler] = field(default_factory=dict)
    dimse: DimseService | None = None
    """The DICOM Application Entity, when `HOUNSFIELD_DIMSE` is on."""
    inference: InferenceService | None = None
    """The AI dispatch, backend and model runs (`inference.service`), when `HOUNSFIELD_INFERENCE` is on."""
    sessions: SessionCache | None = None
    """Open break-glass sessions by subject, for the guard (`authz.sessioncache`)."""
    anchors: AuditAnchors | None = None
    """Where signed audit checkpoints are copied (`authz.auditanchor`); failing sinks show in /readyz."""


async def open_blob_store(settings: Settings) -> BlobStore:
    if settings.s3 is not None:
        from dicomweb.blobs.s3 import S3BlobStore

        s3 = S3BlobStore(settings.s3)
        await s3.open()
        return s3
    return FileSystemBlobStore(settings.blob_dir)


def _deferral(settings: Settings, store: StoreService) -> jobs.Deferral | None:
    """Rendition jobs give way to the ingest of this server's processes (`HOUNSFIELD_RENDITIONS_IDLE_MS`)."""
    if settings.renditions_idle_seconds <= 0:
        return None
    return jobs.Deferral(
        frozenset({renditions.RENDITION_JOB}),
        functools.partial(store.activity.busy_for, settings.renditions_idle_seconds),
        settings.renditions_max_wait_seconds,
    )


async def database_url(settings: Settings) -> str:
    """The URL to serve with (the app role, `server.dbroles`), once the schema's owner applied the migrations."""
    return (await dbroles.database_urls(settings)).serving


@contextlib.asynccontextmanager
async def open_resources(
    settings: Settings, *, blobs: BlobStore | None = None, dsn: str | None = None
) -> AsyncIterator[Resources]:
    private.make_dirs(settings.data_dir)
    dsn = dsn or await database_url(settings)
    pool = await db.create_pool(dsn, settings.db_pool_min, settings.db_pool_max)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            await db.migrate(conn)
            await dbroles.check_serving_role(conn, allow_privileged=settings.database_allow_privileged)
        if blobs is None:
            blobs = await open_blob_store(settings)
            stack.push_async_callback(blobs.close)
        store = StoreService(
            pool,
            blobs,
            overwrite=settings.overwrite,
            bulk_threshold=settings.bulkdata_threshold,
            hooks=[fhir_sync.ingest_hook(settings.fhir_sync_delay_seconds)],  # ImagingStudy follows the index
            compression=settings.store_compression,  # HOUNSFIELD_STORE_COMPRESSION (dicomweb/compress.py)
            activity=IngestActivity(settings.data_dir / "ingest.activity"),  # shared by the server's processes
        )
        handlers: dict[str, jobs.Handler] = {
            "blob.gc": gc_handler(
                pool, blobs, settings.gc_grace_seconds, settings.gc_interval_seconds, settings.spool_dir
            ),
            "blob.delete": blob_delete_handler(pool, blobs),
        }
        forwarder = SyslogForwarder(settings.audit_syslog) if settings.audit_syslog else None
        if forwarder is not None:
            stack.push_async_callback(forwarder.close)
        audit = AuditTrail(pool, forwarder=forwarder)
        stack.push_async_callback(audit.close)  # runs before the pool closes: records in flight are written
        policy = CachingEngine(
            open_engine(settings), ttl=settings.policy_cache_seconds, entries=settings.policy_cache_entries
        )
        stack.push_async_callback(policy.close)
        signing_key = await anyio.to_thread.run_sync(keys.load_or_create, settings.data_dir)
        anchors = open_anchors(settings, forwarder)  # checkpoints copied out of the database's reach
        stack.push_async_callback(anchors.close)
        handlers[CHECKPOINT_JOB] = checkpoint_handler(
            pool,
            key_signer(signing_key.private_pem, signing_key.kid),
            settings.audit_checkpoint_seconds,
            anchors=anchors,
            verifier=key_verifier({signing_key.kid: signing_key.public_jwk}),
        )
        handlers[ALERT_JOB] = alert_handler(pool, settings)  # break-glass webhook alerts
        fhir = FhirRepository(hooks=[subscriptions.queue_notifications])
        handlers[fhir_sync.SYNC_JOB] = fhir_sync.sync_handler(
            pool, fhir, dicomweb_address(settings.public_url, settings.host, settings.port)
        )
        sessions = SessionCache(dsn)
        await sessions.start()
        stack.push_async_callback(sessions.close)
        resources = Resources(settings, pool, blobs, store, audit, policy, fhir, handlers=handlers, sessions=sessions)
        resources.anchors = anchors
        handlers.update(subscriptions.handlers(resources))  # fhir.notify, fhir.deliver
        store.hooks.append(routing.routing_hook(settings.dimse))  # DIMSE auto-routing rules
        handlers[routing.ROUTE_JOB] = routing.route_handler(
            pool, blobs, audit, settings.dimse, settings.dimse_ae_title, float(settings.dimse_timeout_seconds)
        )
        if settings.inference_enabled:  # AI on ingest: quiet-period dispatch, model runs as the AI service
            resources.inference = open_inference(settings, pool, blobs, store, fhir, policy, audit)
            stack.push_async_callback(resources.inference.close)
            store.hooks.append(resources.inference.hook())
            handlers.update(resources.inference.handlers(pool))
        store.hooks.append(renditions.ingest_hook(settings.renditions))  # frames encoded ahead of requests
        handlers[renditions.RENDITION_JOB] = renditions.job_handler(
            pool, blobs, settings.renditions, settings.spool_dir
        )
        if settings.dimse_enabled:
            resources.dimse = await open_dimse(resources)  # None without configured peers
            if resources.dimse is not None:
                stack.push_async_callback(resources.dimse.stop)  # before the audit trail and pool close
        if settings.worker_enabled:
            async with pool.acquire() as conn:
                await jobs.schedule(
                    conn,
                    CHECKPOINT_JOB,
                    {"periodic": True},
                    dedupe_key="periodic",
                    delay_seconds=settings.audit_checkpoint_seconds,
                )
                await jobs.schedule(
                    conn,
                    "blob.gc",
                    {"periodic": True},
                    dedupe_key="periodic",
                    delay_seconds=settings.gc_interval_seconds,
                )
                await fhir_sync.enqueue_backfill(conn)  # studies stored before FHIR sync existed
            worker = jobs.Worker(
                pool, handlers, poll_seconds=settings.worker_poll_seconds, deferral=_deferral(settings, store)
            )
            resources.worker = worker
            task = asyncio.create_task(worker.run(), name="hounsfield-worker")

            async def _stop_worker() -> None:
                worker.stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, timeout=10)

            stack.push_async_callback(_stop_worker)
        yield resources


ResourcesDep: TypeAlias = NamedDependency[Resources]
"""Route handlers declare `resources: ResourcesDep` (a Litestar named dependency)."""
