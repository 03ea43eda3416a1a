"""The inference service as its plugin opens it (`inference.plugin`): the adapter catalog, the backend, the AI
service identity, the runner and the job handlers."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from authz.audit import AuditTrail
from authz.decision import PolicyEngine
from dicomweb.blobs import BlobStore
from dicomweb.ingest.service import StoreService
from fhir.imagingstudy import dicomweb_address
from fhir.repository import FhirRepository
from inference import dispatch
from inference.backends import ByModel, InferenceBackend, InProcessBackend
from inference.identity import ServiceActor
from inference.models import AdapterFactory, catalog
from inference.runner import Runner
from inference.settings import InferenceSettings
from server.platform import jobs


@dataclass
class InferenceService:
    settings: InferenceSettings
    adapters: dict[str, AdapterFactory]
    backend: InferenceBackend
    runner: Runner

    def handlers(self, pool: asyncpg.Pool) -> dict[str, jobs.Handler]:
        return {
            dispatch.QUIET_JOB: dispatch.quiet_handler(pool, self.settings.inference_max_attempts),
            dispatch.RUN_JOB: self.runner.handle,
        }

    async def close(self) -> None:
        await self.backend.close()


def open_inference(
    settings: InferenceSettings,
    pool: asyncpg.Pool,
    blobs: BlobStore,
    store: StoreService,
    fhir: FhirRepository,
    policy: PolicyEngine,
    audit: AuditTrail,
) -> InferenceService:
    adapters = catalog(settings.inference_plugins)
    backend = _backend(settings, adapters, pool)
    actor = ServiceActor.of(settings.inference_subject, policy, audit)
    runner = Runner(
        pool,
        blobs,
        store,
        fhir,
        backend,
        actor,
        dicomweb_address(settings.public_url, settings.host, settings.port),
        settings.inference_max_instances,
    )
    return InferenceService(settings, adapters, backend, runner)


def _backend(settings: InferenceSettings, adapters: dict[str, AdapterFactory], pool: asyncpg.Pool) -> InferenceBackend:
    """The in-process thread pool and Ray Serve (imported only when a model runs there), each model to the one
    its registration pins, else to `HOUNSFIELD_INFERENCE_BACKEND`'s."""

    def in_process() -> InferenceBackend:
        return InProcessBackend(adapters, settings.inference_workers)

    def ray_serve() -> InferenceBackend:
        from inference import registry
        from inference.backend_ray import RayServeBackend

        async def models() -> list[registry.Model]:
            """The models a local Ray instance deploys: those that run in Ray on this server."""
            async with pool.acquire() as conn:
                found = await registry.list_models(conn)
            return [m for m in found if m.status != "retired" and m.runs_in(settings.inference_backend) == "ray"]

        return RayServeBackend(settings, models)

    return ByModel(settings.inference_backend, {"inprocess": in_process, "ray": ray_serve})
