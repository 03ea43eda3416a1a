"""FHIR R4 as a plugin: the routes under /fhir (and the SMART configuration at the root); the versioned resource
repository; the jobs that keep ImagingStudy in step with the index, deliver Subscription notifications and
reindex search parameters.

Dependency: `fhir` (`fhir.services.FhirServices`), also published in the app's state for resource hooks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from authz.plugin import AuthzPlugin
from dicomweb.ingest.events import Listener
from fhir import reindex, subscriptions
from fhir import sync as fhir_sync
from fhir.imagingstudy import dicomweb_address
from fhir.repository import FhirRepository, WriteHook
from fhir.rest import meta as routes_meta
from fhir.rest.router import fhir_router
from fhir.search.service import matching_ids
from fhir.services import STATE_KEY, FhirServices
from fhir.settings import FhirSettings
from server.platform.database import DatabasePlugin
from server.platform.plugin import JobSet, ServicePlugin, opened

if TYPE_CHECKING:
    from litestar.datastructures import State


class FhirPlugin(ServicePlugin):
    def __init__(
        self,
        settings: FhirSettings,
        database: DatabasePlugin,
        authz: AuthzPlugin,
        *,
        write_hooks: Sequence[WriteHook] = (subscriptions.queue_notifications,),
    ) -> None:
        self.settings = settings
        self.database = database
        self.authz = authz
        self.write_hooks = tuple(write_hooks)
        """What follows each write of a resource, in its transaction, in order (Subscription notifications...)."""
        self._services: FhirServices | None = None
        self._jobs = JobSet()

    @property
    def services(self) -> FhirServices:
        return opened(self._services, "the FHIR services")

    @property
    def repository(self) -> FhirRepository:
        return self.services.repository

    def route_handlers(self) -> Iterable[Any]:
        return [fhir_router(), *routes_meta.ROOT_ROUTES]

    def dependencies(self) -> Mapping[str, Callable[[], Any]]:
        return {"fhir": lambda: self.services}

    def jobs(self) -> JobSet:
        return self._jobs

    def publish(self, state: State) -> None:
        state[STATE_KEY] = self.services

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        settings, pool, authz = self.settings, self.database.pool, self.authz
        repository = FhirRepository(hooks=self.write_hooks)
        self._services = FhirServices(settings, pool, repository, authz.audit)
        stack.callback(functools.partial(setattr, self, "_services", None))
        address = dicomweb_address(settings.public_url, settings.host, settings.port)
        handlers = {
            fhir_sync.SYNC_JOB: fhir_sync.sync_handler(pool, repository, address),
            reindex.REINDEX_JOB: reindex.handler(pool, repository),  # queued by migrations adding search params
        }
        handlers.update(  # fhir.notify, fhir.deliver
            subscriptions.handlers(
                pool, repository, settings, policy=authz.policy, audit_log=authz.audit, matching_ids=matching_ids
            )
        )
        self._jobs = JobSet(handlers=handlers, at_start=[fhir_sync.enqueue_backfill])  # studies stored before sync


def ingest_listeners(settings: FhirSettings) -> list[Listener]:
    """FHIR's listener to a store: the study's ImagingStudy brought up to date shortly after."""
    return [fhir_sync.ingest_hook(settings.fhir_sync_delay_seconds)]
