"""Liveness and readiness (for load balancers and orchestrators)."""

from __future__ import annotations

from litestar import Response, get

from authz.deps import AnchorsDep
from server.platform.db import RETRY_AFTER_SECONDS
from server.platform.dbwatch import DatabaseHealth
from server.platform.deps import DatabaseHealthDep, PoolDep, SpaceDep


@get("/healthz", include_in_schema=True, sync_to_thread=False)
def healthz() -> dict[str, str]:
    """The process is up: liveness. It stays 200 while the database is down or being restarted, because the
    server recovers by itself (`server.platform.dbwatch`): an orchestrator that restarted it would only cut that
    short."""
    return {"status": "ok"}


async def _database(pool: PoolDep, health: DatabaseHealth) -> str | None:
    """None when the database answers; else what is wrong: `restarting` (the embedded PostgreSQL is being
    started again) or `unreachable` (the server reconnects with backoff)."""
    try:
        async with pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")
    except Exception:
        return health.status() or "unreachable"
    return None


@get("/readyz")
async def readyz(
    pool: PoolDep, database: DatabaseHealthDep, anchors: AnchorsDep, space: SpaceDep
) -> Response[dict[str, str]]:
    """The database answers; the server can take traffic. While it does not: 503 with Retry-After and
    `"database": "restarting"|"unreachable"`, until the server reconnected by itself. `audit_anchors` names an
    anchor sink whose last write failed (authz/auditanchor.py); `disk` a volume below the free-space watermark
    (`disk_check`)."""
    down = await _database(pool, database)
    if down is not None:
        return Response(
            {"status": "unavailable", "database": down},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    body = {"status": "ready"}
    failing = anchors.status()
    if failing is not None:  # still ready: serving goes on while the checkpoint job retries the sink
        body["audit_anchors"] = failing
    disk = disk_check(space)
    if disk is not None:  # still ready: reads are served while ingest is refused (server/platform/diskspace.py)
        body["disk"] = disk
    return Response(body)


def disk_check(space: SpaceDep) -> str | None:
    """The `disk` check of /readyz: None while every volume is above the free-space watermark, else which volume is
    low (`low: blob store 120 MB free, watermark 1.0 GB ...`). The server stays ready (200): it still serves
    reads, which is what a load balancer routes by; ingest is refused with 503/A700 and the reason."""
    return space.describe()


ROUTES = [healthz, readyz]
