"""Every route under `/fhir` (mounted by `server.app`), one module per concern."""

from __future__ import annotations

from typing import Any

from fhir import routes_audit, routes_bundle, routes_meta, routes_rest, routes_search


def fhir_routes() -> list[Any]:
    routes: list[Any] = [*routes_meta.ROUTES, *routes_audit.ROUTES, *routes_rest.ROUTES]
    routes += routes_search.ROUTES
    routes += routes_bundle.ROUTES
    return routes
