"""The app factory: routes, dependency injection, error mapping, CORS, compression, OpenAPI.

`create_app(settings)` is what `hounsfield serve` runs; tests pass overrides (a blob store, a DSN) so that
they use the same code with their own real parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Router
from litestar.config.compression import CompressionConfig
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.logging.config import LoggingConfig
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.types import ASGIApp

from authz import routes_breakglass as breakglass
from authz.authn import authenticate
from authz.guard import authorize
from authz.recording import audit_requests
from dicomweb.blobs import BlobStore
from dicomweb.dimse import routes as dimse_routes
from dicomweb.routes import qido, stow, wado, wadouri
from dicomweb.routes import rendered as rendered_routes
from fhir import outcome as fhir_outcome
from fhir import routes_meta
from fhir.routes import fhir_router
from inference.routes import inference_router
from server import health
from server.errors import EXCEPTION_HANDLERS
from server.limits import FHIR_PREFIX, header_limit, plain_target
from server.platform import telemetry
from server.platform.connections import body_deadline
from server.platform.http import by_path, http_error
from server.platform.inflight import InFlight
from server.platform.logs import AccessLog
from server.resources import Resources, open_resources
from server.settings import Settings

EXPOSED_HEADERS = ["Warning", "ETag", "Content-Range", "Accept-Ranges", "Content-Length", "Content-Location"]
DRAIN_SECONDS = 10.0
"""How long the shutdown waits for requests that outlived uvicorn's graceful shutdown (`server.platform.inflight`)."""
log = logging.getLogger(__name__)


def _resources(state: State) -> Resources:
    res: Resources = state.resources
    return res


def dicomweb_routes() -> list[Any]:
    routes: list[Any] = [*stow.ROUTES, *qido.ROUTES, *wado.ROUTES]
    routes += rendered_routes.ROUTES  # rendered and thumbnail resources (PS3.18 10.4)
    return routes


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

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_resources(settings, blobs=blobs, dsn=dsn) as resources:
            app.state.resources = resources
            yield
            try:
                async with asyncio.timeout(DRAIN_SECONDS):
                    await in_flight.wait_idle()
            except TimeoutError:
                log.warning("%d requests still in flight; closing their resources", in_flight.count)

    cors = None
    if settings.cors_origins:
        cors = CORSConfig(
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
    dicomweb = Router(path="/dicom-web", route_handlers=dicomweb_routes(), tags=["DICOMweb"])
    app = Litestar(
        route_handlers=[
            dicomweb,
            *wadouri.ROUTES,
            *health.ROUTES,
            fhir_router(),
            *breakglass.ROUTES,
            *routes_meta.ROOT_ROUTES,
            *dimse_routes.ROUTES,
            inference_router(),  # /models, /inference-requests, /inference-results
        ],
        dependencies={"resources": Provide(_resources, sync_to_thread=False)},
        lifespan=[lifespan],
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
        plugins=[telemetry.litestar_plugin(settings)],
        middleware=[
            header_limit(settings.max_request_header_bytes),
            authenticate(settings),
        ],
        guards=[authorize],
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
