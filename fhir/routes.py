"""Every route under `/fhir` (mounted by `server.app`), one module per concern."""

from __future__ import annotations

from typing import Any

from fhir import routes_audit


def fhir_routes() -> list[Any]:
    routes: list[Any] = [*routes_audit.ROUTES]
    return routes
