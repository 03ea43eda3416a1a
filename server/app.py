"""The app factory: routes, dependency injection, error mapping, CORS, compression, OpenAPI.

`create_app(settings)` is what `hounsfield serve` runs; tests pass overrides (a blob store, a DSN) so that
they use the same code with their own real parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.config.compression import CompressionConfig
from litestar.config.cors import CORSConfig
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.logging.config import LoggingConfig
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.plugins import InitPlugin
from litestar.types import ASGIApp

from authz.plugin import AuthzPlugin
from authz.recording import audit_requests
from dicomweb import plugin as dicomweb_plugin
from dicomweb.blobs import BlobStore
from dicomweb.index.facts import IndexFacts
from dicomweb.ingest.events import Listener
from dicomweb.plugin import DicomwebPlugin
from fhir import outcome as fhir_outcome
from fhir import plugin as fhir_plugin
from fhir import subscriptions
from fhir.plugin import FhirPlugin
from inference import plugin as inference_plugin
from inference.plugin import InferencePlugin
from server import health
from server.errors import EXCEPTION_HANDLERS
from server.limits import FHIR_PREFIX, header_limit, plain_target
from server.platform import telemetry
from server.platform.connections import body_deadline
from server.platform.database import DatabasePlugin
from server.platform.http import by_path, http_error
from server.platform.inflight import InFlight
from server.platform.logs import AccessLog
from server.platform.plugin import ServicePlugin
from server.platform.worker import WorkerPlugin
from server.settings import Settings

EXPOSED_HEADERS = ["Warning", "ETag", "Content-Range", "Accept-Ranges", "Content-Length", "Content-Location"]
DRAIN_SECONDS = 10.0
"""How long the shutdown waits for requests that outlived uvicorn's graceful shutdown (`server.platform.inflight`)."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plugins:
    """The packages' plugins in the order they open (each may use those before it); the worker comes last."""

    database: DatabasePlugin
    authz: AuthzPlugin
    dicomweb: DicomwebPlugin
    fhir: FhirPlugin
    inference: InferencePlugin
    worker: WorkerPlugin

    def __iter__(self) -> Iterator[ServicePlugin]:
        return iter((self.database, self.authz, self.dicomweb, self.fhir, self.inference, self.worker))


def plugins(
    settings: Settings,
    *,
    blobs: BlobStore | None = None,
    dsn: str | None = None,
    listeners: Sequence[Listener] = (),
) -> Plugins:
    """Every package's plugin, wired: what follows a store (FHIR sync, DIMSE routing, AI dispatch, renditions, then
    `listeners`) and a FHIR write (Subscription notifications, AI report feedback) is bound here, in that order."""
    database = DatabasePlugin(settings, dsn=dsn)
    authz = AuthzPlugin(settings, database, IndexFacts())  # the index answers what the policy asks
    routing, renditions = dicomweb_plugin.ingest_listeners(settings)
    after_store = [
        *fhir_plugin.ingest_listeners(settings),  # ImagingStudy follows the index
        routing,  # DIMSE auto-routing rules
        *inference_plugin.ingest_listeners(settings),  # quiet-period dispatch to the models
        renditions,  # frames encoded ahead of requests
        *listeners,
    ]
    dicomweb = DicomwebPlugin(settings, database, authz, listeners=after_store, blobs=blobs)
    after_write = [subscriptions.queue_notifications, *inference_plugin.write_hooks(settings)]
    fhir = FhirPlugin(settings, database, authz, write_hooks=after_write)
    inference = InferencePlugin(settings, database, authz, dicomweb, fhir)
    worker = WorkerPlugin(
        database,
        [authz, dicomweb, fhir, inference],
        enabled=settings.worker_enabled,
        poll_seconds=settings.worker_poll_seconds,
        pause_while=lambda: dicomweb.space.is_low(),  # derived work waits below the free-space watermark
    )
    return Plugins(database, authz, dicomweb, fhir, inference, worker)


class _Drain(InitPlugin):
    """Listed last, so that its lifespan ends first: requests that outlived uvicorn's graceful shutdown get
    `DRAIN_SECONDS` to finish before the services they use close."""

    def __init__(self, in_flight: InFlight) -> None:
        self.in_flight = in_flight

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.lifespan.append(self.lifespan)
        return app_config

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        yield
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                await self.in_flight.wait_idle()
        except TimeoutError:
            log.warning("%d requests still in flight; closing their resources", self.in_flight.count)


def logging_config(settings: Settings) -> LoggingConfig:
    """Litestar's default logging config resets the root logger to INFO, which silently overrode
    `HOUNSFIELD_LOG_LEVEL` for every logger but Litestar's own: leave the root logger to `hounsfield serve`
    (`logging.basicConfig` at the configured level) and send Litestar's records there too."""
    return LoggingConfig(
        configure_root_logger=False,
        loggers={"litestar": {"level": settings.log_level.upper(), "handlers": [], "propagate": True}},
    )


def create_app(
    settings: Settings | None = None,
    *,
    blobs: BlobStore | None = None,
    dsn: str | None = None,
) -> Litestar:
    settings = settings or Settings.from_env()
    in_flight = InFlight()
    wired = plugins(settings, blobs=blobs, dsn=dsn)
    cors = None
    if settings.cors_origins:
        cors = CORSConfig(
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    app = Litestar(
        route_handlers=health.ROUTES,
        dependencies={"settings": Provide(lambda: settings, sync_to_thread=False)},
        exception_handlers=exception_handlers(),
        cors_config=cors,
        logging_config=logging_config(settings),
        compression_config=CompressionConfig(
            backend="gzip", minimum_size=1024, gzip_compress_level=5, exclude_opt_key="no_compression"
        ),
        openapi_config=OpenAPIConfig(
            title="Hounsfield",
            version="0.1.0",
            description="DICOMweb (PS3.18) imaging archive",
            path="/openapi",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        plugins=[telemetry.litestar_plugin(settings), *wired, _Drain(in_flight)],
        middleware=[header_limit(settings.max_request_header_bytes)],  # then authz's: authentication
        debug=False,
    )
    app.asgi_handler = in_flight.wrap(edge(app.asgi_handler, settings))
    return app


def exception_handlers() -> dict[Any, Any]:
    """`server.errors`' handlers, with one change: what no route matched under /fhir (404, 405) is answered as
    FHIR answers errors, with an OperationOutcome (the FHIR routes' own handlers only see matched requests)."""
    handlers: dict[Any, Any] = dict(EXCEPTION_HANDLERS)
    handlers[HTTPException] = by_path(FHIR_PREFIX, fhir_outcome.http_error, http_error)
    return handlers


def edge(handler: ASGIApp, settings: Settings) -> ASGIApp:
    """The layers every HTTP request passes, routed or not, outermost first: the access log, the audit record
    of every response, the request target check (400). Litestar runs the app's `middleware` only once a route
    matched, so an unknown path (404), a wrong method (405) or a target the router refuses (400) would bypass
    them; here they wrap Litestar's whole handler (router, exception handling, CORS, OpenTelemetry). Innermost, the
    deadline on each read of a request body (`server.platform.connections.body_deadline`)."""
    timed = body_deadline(handler, settings.http_body_timeout_seconds)  # a stalled request body ends in 408
    return AccessLog(audit_requests(settings.auth_public_paths)(plain_target(timed)))
