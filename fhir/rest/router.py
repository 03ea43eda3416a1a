"""Every route under `/fhir`, one module per concern, on one router that answers every error of those routes as
an OperationOutcome (`fhir.outcome.EXCEPTION_HANDLERS`; FHIR R4 http.html "Handling errors")."""

from __future__ import annotations

from typing import Any

from litestar import Router

from fhir.audit import routes as routes_audit
from fhir.outcome import EXCEPTION_HANDLERS
from fhir.rest import bundle as routes_bundle
from fhir.rest import instance as routes_rest
from fhir.rest import meta as routes_meta
from fhir.rest import search as routes_search


def fhir_routes() -> list[Any]:
    routes: list[Any] = [*routes_meta.ROUTES, *routes_audit.ROUTES, *routes_rest.ROUTES]
    routes += routes_search.ROUTES
    routes += routes_bundle.ROUTES
    return routes


def fhir_router() -> Router:
    """The `/fhir` router `server.app` mounts; its handlers take precedence over the application's for these
    routes, guards included."""
    return Router(path="/fhir", route_handlers=fhir_routes(), tags=["FHIR"], exception_handlers=EXCEPTION_HANDLERS)
