"""Liveness and readiness (for load balancers and orchestrators)."""

from __future__ import annotations

from litestar import Response, get

from server.resources import Resources, ResourcesDep


@get("/healthz", include_in_schema=True, sync_to_thread=False)
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@get("/readyz")
async def readyz(resources: ResourcesDep) -> Response[dict[str, str]]:
    """The database answers; the server can take traffic. `audit_anchors` names an anchor sink whose last
    write failed (authz/auditanchor.py); `disk` a volume below the free-space watermark (`disk_check`)."""
    try:
        async with resources.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")
    except Exception:
        return Response({"status": "unavailable", "database": "unreachable"}, status_code=503)
    body = {"status": "ready"}
    anchors = resources.anchors.status() if resources.anchors is not None else None
    if anchors is not None:  # still ready: serving goes on while the checkpoint job retries the sink
        body["audit_anchors"] = anchors
    disk = disk_check(resources)
    if disk is not None:  # still ready: reads are served while ingest is refused (server/diskspace.py)
        body["disk"] = disk
    return Response(body)


def disk_check(resources: Resources) -> str | None:
    """The `disk` check of /readyz: None while every volume is above the free-space watermark, else which volume is
    low (`low: blob store 120 MB free, watermark 1.0 GB ...`). The server stays ready (200): it still serves
    reads, which is what a load balancer routes by; ingest is refused with 503/A700 and the reason."""
    space = resources.store.space
    return space.describe() if space is not None else None


ROUTES = [healthz, readyz]
