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
from dicomweb.ingest.activity import IngestActivity
from dicomweb.ingest.gc import blob_delete_handler, gc_handler
from dicomweb.ingest.service import StoreService
from dicomweb.ingest.spool import Spooler
from fhir import reindex, subscriptions
from fhir import sync as fhir_sync
from fhir.imagingstudy import dicomweb_address
from fhir.repository import FhirRepository
from fhir.search import matching_ids
from inference import dispatch, monitoring
from inference.service import InferenceService, open_inference
from server import dbroles
from server.platform import db, dbwatch, jobs, private, telemetry
from server.platform.diskspace import FreeSpace
from server.settings import Settings

log = logging.getLogger(__name__)
AUDIT_WRITER_CONNECTIONS = 2


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
    database: dbwatch.DatabaseHealth = field(default_factory=dbwatch.DatabaseHealth)
    """Whether the database is within reach, for /readyz (`server.platform.dbwatch`)."""


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


DERIVED_JOBS = frozenset({renditions.RENDITION_JOB, dispatch.RUN_JOB})
"""Job kinds that write new blobs from stored ones, paused while free space is below the watermark."""


async def _close_pool(pool: asyncpg.Pool) -> None:
    """Close gracefully; connections the database dropped (it is down at shutdown) are terminated instead."""
    try:
        await asyncio.wait_for(pool.close(), timeout=10)
    except Exception as exc:  # asyncpg terminated the pool already; shutting down goes on
        log.warning("database pool closed by termination: %s: %s", type(exc).__name__, exc)
        pool.terminate()


@contextlib.asynccontextmanager
async def open_resources(
    settings: Settings, *, blobs: BlobStore | None = None, dsn: str | None = None
) -> AsyncIterator[Resources]:
    private.make_dirs(settings.data_dir)
    owned = dsn is None and not settings.database_url  # this process starts the embedded PostgreSQL
    health = dbwatch.DatabaseHealth()

    async def connect() -> tuple[str, asyncpg.Pool]:
        url = dsn or await dbroles.database_url(settings)
        health.reset()
        pool = await db.create_pool(url, settings.db_pool_min, settings.db_pool_max, connect=health.connect)
        try:
            async with pool.acquire() as conn:
                await db.migrate(conn)
                await dbroles.check_serving_role(conn, allow_privileged=settings.database_allow_privileged)
        except BaseException:
            pool.terminate()
            raise
        return url, pool

    url, pool = await dbwatch.when_reachable(connect)  # a database that restarts is waited for
    async with contextlib.AsyncExitStack() as stack:
        if owned:  # started again when its postmaster dies; stopped watching last, after everything closed
            supervisor = dbwatch.EmbeddedSupervisor.for_health(settings.data_dir / "pg", health)
            supervisor.start()
            stack.push_async_callback(supervisor.aclose)
        stack.push_async_callback(_close_pool, pool)
        if blobs is None:
            blobs = await open_blob_store(settings)
            stack.push_async_callback(blobs.close)
        space = FreeSpace.of_settings(settings)  # HOUNSFIELD_MIN_FREE_BYTES / _PERCENT (server/platform/diskspace.py)
        stack.callback(telemetry.watch_free_space(space))  # hounsfield.disk.* gauges while the server runs
        store = StoreService(
            pool,
            blobs,
            spool=Spooler(settings.spool_dir, settings.max_instance_bytes, space),  # refused below the watermark
            overwrite=settings.overwrite,
            bulk_threshold=settings.bulkdata_threshold,
            listeners=(  # in this order, inside each ingest transaction
                fhir_sync.ingest_hook(settings.fhir_sync_delay_seconds),  # ImagingStudy follows the index
                routing.routing_hook(settings.dimse),  # DIMSE auto-routing rules
                *([dispatch.ingest_hook(settings.inference_quiet_seconds)] if settings.inference_enabled else []),
                renditions.ingest_hook(settings.renditions),  # frames encoded ahead of requests
            ),
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
        # The audit writer's own connections (AuditTrail: appends never wait behind the callers' checkouts); a
        # writer that ends hands over to the next, so two may overlap.
        audit_pool = await db.create_pool(url, 1, AUDIT_WRITER_CONNECTIONS, connect=health.connect)
        stack.push_async_callback(_close_pool, audit_pool)
        audit = AuditTrail(pool, forwarder=forwarder, writer=audit_pool)
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
        fhir = FhirRepository(  # in this order, inside each FHIR write's transaction
            hooks=[
                subscriptions.queue_notifications,
                *([monitoring.feedback_hook()] if settings.inference_enabled else []),  # verdicts on AI reports
            ]
        )
        handlers[fhir_sync.SYNC_JOB] = fhir_sync.sync_handler(
            pool, fhir, dicomweb_address(settings.public_url, settings.host, settings.port)
        )
        sessions = SessionCache(url)
        await sessions.start()
        stack.push_async_callback(sessions.close)
        resources = Resources(settings, pool, blobs, store, audit, policy, fhir, handlers=handlers, sessions=sessions)
        resources.anchors = anchors
        resources.database = health
        handlers.update(  # fhir.notify, fhir.deliver
            subscriptions.handlers(pool, fhir, settings, policy=policy, audit_log=audit, matching_ids=matching_ids)
        )
        handlers[reindex.REINDEX_JOB] = reindex.handler(pool, fhir)  # queued by migrations adding search params
        handlers[routing.ROUTE_JOB] = routing.route_handler(
            pool, blobs, audit, settings.dimse, settings.dimse_ae_title, float(settings.dimse_timeout_seconds)
        )
        if settings.inference_enabled:  # AI on ingest: quiet-period dispatch, model runs as the AI service
            resources.inference = open_inference(settings, pool, blobs, store, fhir, policy, audit)
            stack.push_async_callback(resources.inference.close)
            handlers.update(resources.inference.handlers(pool))
        handlers[renditions.RENDITION_JOB] = renditions.job_handler(
            pool, blobs, settings.renditions, settings.spool_dir, space
        )
        if settings.dimse_enabled:
            resources.dimse = await open_dimse(resources)  # None without configured peers
            if resources.dimse is not None:
                stack.push_async_callback(resources.dimse.stop)  # before the audit trail and pool close
        if settings.worker_enabled:

            async def schedule() -> None:
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

            await dbwatch.when_reachable(schedule)
            worker = jobs.Worker(
                pool,
                handlers,
                poll_seconds=settings.worker_poll_seconds,
                deferral=_deferral(settings, store),
                pause=jobs.Pause(DERIVED_JOBS, space.is_low),  # derived work waits below the watermark
            )
            resources.worker = worker
            task = asyncio.create_task(worker.run(), name="hounsfield-worker")

            async def _stop_worker() -> None:
                worker.stop()
                try:
                    await asyncio.wait_for(task, timeout=10)
                except (asyncio.CancelledError, TimeoutError):  # a job cut off is run again (handlers are idempotent)
                    pass
                except Exception:  # logged, never a failed shutdown: what follows must still close
                    log.exception("the job worker ended with an error")

            stack.push_async_callback(_stop_worker)
        yield resources


ResourcesDep: TypeAlias = NamedDependency[Resources]
"""Route handlers declare `resources: ResourcesDep` (a Litestar named dependency)."""
