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
    """The database answers; the server can take traffic. `audit_anchors` names an anchor sink whose last
    write failed (authz/auditanchor.py)."""
    try:
        async with resources.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")
    except Exception:
        return Response({"status": "unavailable", "database": "unreachable"}, status_code=503)
    body = {"status": "ready"}
    anchors = resources.anchors.status() if resources.anchors is not None else None
    if anchors is not None:  # still ready: serving goes on while the checkpoint job retries the sink
        body["audit_anchors"] = anchors
    return Response(body)


ROUTES = [healthz, readyz]
