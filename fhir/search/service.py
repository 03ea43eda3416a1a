"""The FHIR R4 search API that the routes, batch bundles and Subscriptions call: a search parsed
(`fhir.search.query`) and run on PostgreSQL (`fhir.search.sql`)."""

from __future__ import annotations

from typing import Any

from fhir.search import sql as searchsql
from fhir.search.query import SearchAccess, parse_search, query_items
from server.platform.db import Connection


async def matching_ids(
    conn: Connection,
    resource_type: str,
    query: str,
    *,
    access: SearchAccess,
    only_id: str | None = None,
    limit: int = 2,
) -> list[str]:
    """Ids of current non-deleted resources matching the query (strict: unknown parameters raise FhirError 400),
    among those `access` lets the caller see, optionally restricted to one id (Subscription matching): up to
    `limit`."""
    parsed = parse_search(resource_type, query_items(query), strict=True)
    return await searchsql.matching_ids(conn, parsed, access, only_id=only_id, limit=limit)


async def search_bundle(
    conn: Connection,
    resource_type: str,
    items: list[tuple[str, str]],
    *,
    base: str,
    access: SearchAccess,
    strict: bool,
) -> dict[str, Any]:
    """The searchset Bundle for these query items (used by the route and by batch bundles' GET entries alike).
    `access` (required: there is no default that would filter included resources with the searched type's
    constraints) decides the rows of every type the search reaches."""
    if access.resource_type != resource_type:
        raise ValueError(f"the access given is for a search of {access.resource_type}, not {resource_type}")
    parsed = parse_search(resource_type, items, strict=strict, base=base)
    return await searchsql.bundle(conn, parsed, base=base, access=access)
