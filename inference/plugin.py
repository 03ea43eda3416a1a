"""AI on ingest as a plugin: the routes of the model registry, on-demand requests and results; the inference
service (adapters, backend, runner) when `HOUNSFIELD_INFERENCE` is on, with the dispatch and run jobs.

Dependency: `inference` (`inference.services.InferenceServices`), also published in the app's state for
resource hooks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from authz.plugin import AuthzPlugin
from dicomweb.ingest.events import Listener
from dicomweb.plugin import DicomwebPlugin
from fhir.plugin import FhirPlugin
from fhir.repository import WriteHook
from inference import dispatch, monitoring
from inference.routes import inference_router
from inference.service import InferenceService, open_inference
from inference.services import STATE_KEY, InferenceServices
from inference.settings import InferenceSettings
from server.platform.database import DatabasePlugin
from server.platform.plugin import JobSet, ServicePlugin, opened

if TYPE_CHECKING:
    from litestar.datastructures import State


class InferencePlugin(ServicePlugin):
    def __init__(
        self,
        settings: InferenceSettings,
        database: DatabasePlugin,
        authz: AuthzPlugin,
        dicomweb: DicomwebPlugin,
        fhir: FhirPlugin,
    ) -> None:
        self.settings = settings
        self.database = database
        self.authz = authz
        self.dicomweb = dicomweb
        self.fhir = fhir
        self.service: InferenceService | None = None
        """The dispatch, backend and model runs, while the app runs with AI on ingest on."""
        self._services: InferenceServices | None = None
        self._jobs = JobSet()

    @property
    def services(self) -> InferenceServices:
        return opened(self._services, "the inference services")

    def route_handlers(self) -> Iterable[Any]:
        return [inference_router()]  # /models, /inference-requests, /inference-results

    def dependencies(self) -> Mapping[str, Callable[[], Any]]:
        return {"inference": lambda: self.services}

    def jobs(self) -> JobSet:
        return self._jobs

    def publish(self, state: State) -> None:
        state[STATE_KEY] = self.services

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        settings, pool = self.settings, self.database.pool
        adapters: tuple[str, ...] = ()
        if settings.inference_enabled:  # quiet-period dispatch, model runs as the AI service
            dicomweb, authz = self.dicomweb, self.authz
            service = self.service = open_inference(
                settings, pool, dicomweb.blobs, dicomweb.store, self.fhir.repository, authz.policy, authz.audit
            )
            stack.push_async_callback(service.close)
            stack.callback(functools.partial(setattr, self, "service", None))
            adapters = tuple(sorted(service.adapters))
            self._jobs = JobSet(
                handlers=service.handlers(pool),
                derived=frozenset({dispatch.RUN_JOB}),
                concurrency={dispatch.RUN_JOB: settings.inference_workers},  # runs at once: a backend may batch
            )
        self._services = InferenceServices(settings, pool, adapters)
        stack.callback(functools.partial(setattr, self, "_services", None))


def ingest_listeners(settings: InferenceSettings) -> list[Listener]:
    """A new series is dispatched to the matching models once it has been quiet for a while."""
    return [dispatch.ingest_hook(settings.inference_quiet_seconds)] if settings.inference_enabled else []


def write_hooks(settings: InferenceSettings) -> list[WriteHook]:
    """Radiologists' verdicts on AI reports, counted per model version."""
    return [monitoring.feedback_hook()] if settings.inference_enabled else []
