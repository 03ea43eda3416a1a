"""`GET /dimse/routing?limit=N`: the auto-routing status (the newest `dimse.route` jobs: destination, instance,
rule, state, attempts, last error), as JSON. `GET /dimse/intake`: the C-STORE intake (`dicomweb.dimse.indexer`):
`pending` (acknowledged, not indexed yet, by any process of the server), `retrying` (of those, the ones of the
answering process whose store failed and is retried) and `refused` (acknowledged, then refused by the store: kept in
`intake/refused/` for an operator). Both decided as
`read` on `system` (admins); audited like any request. Registered by the app factory with `*dimse_routes.ROUTES`."""

from __future__ import annotations

from typing import Any

from litestar import get
from litestar.params import Parameter

from authz.guard import authz_opt
from dicomweb.dimse.indexer import Indexer
from dicomweb.dimse.routing import routing_status
from server.platform.deps import PoolDep, Provided


@get("/dimse/routing", opt=authz_opt("read", "system"), tags=["DIMSE"])
async def routing(pool: PoolDep, limit: int = Parameter(default=100, ge=1, le=1000)) -> dict[str, Any]:
    return {"jobs": await routing_status(pool, limit)}


@get("/dimse/intake", opt=authz_opt("read", "system"), tags=["DIMSE"])
async def intake(intake: Provided[Indexer | None]) -> dict[str, int]:
    if intake is None:  # no DICOM AE in this process
        return {"pending": 0, "retrying": 0, "refused": 0}
    return intake.status()


ROUTES = [routing, intake]
