"""Liveness and readiness (for load balancers and orchestrators)."""

from __future__ import annotations

from litestar import Response, get

from server.resources import ResourcesDep


@get("/healthz", include_in_schema=True, sync_to_thread=False)
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@get("/readyz")
async def readyz(resources: ResourcesDep) -> Response[dict[str, str]]:
    """The database answers; the server can take traffic."""
    try:
        async with resources.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")
    except Exception:
        return Response({"status": "unavailable", "database": "unreachable"}, status_code=503)
    return Response({"status": "ready"})


ROUTES = [healthz, readyz]
