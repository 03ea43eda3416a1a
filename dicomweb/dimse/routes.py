"""`GET /dimse/routing?limit=N`: the auto-routing status (the newest `dimse.route` jobs: destination, instance,
rule, state, attempts, last error), as JSON. Decided as `read` on `system` (admins); audited like any request.
Registered by the app factory with `*dimse_routes.ROUTES`."""

from __future__ import annotations

from typing import Any

from litestar import get
from litestar.params import Parameter

from authz.guard import authz_opt
from dicomweb.dimse.routing import routing_status
from server.platform.deps import PoolDep


@get("/dimse/routing", opt=authz_opt("read", "system"), tags=["DIMSE"])
async def routing(pool: PoolDep, limit: int = Parameter(default=100, ge=1, le=1000)) -> dict[str, Any]:
    return {"jobs": await routing_status(pool, limit)}


ROUTES = [routing]
