"""`fhir.reindex`: recompute the search index rows (`fhir_search`) of every current resource of one type.

The index is written with each version (`FhirRepository`), so a type whose search parameters grow needs its
stored resources indexed again: the migration that adds them queues this job (`{"type": "Subscription"}`). Pages
of `PAGE` resources, each in its own transaction with its rows locked, so writes go on meanwhile; versions,
history and write hooks (Subscription notifications) are left alone. A retried job starts over, which is
harmless: reindexing is idempotent.
"""

from __future__ import annotations

import asyncpg

from fhir.repository import FhirRepository
from fhir.types import TYPES
from server.platform import jobs

REINDEX_JOB = "fhir.reindex"
PAGE = 500


def handler(pool: asyncpg.Pool, repo: FhirRepository) -> jobs.Handler:
    async def handle(job: jobs.Job) -> None:
        resource_type = job.payload.get("type")
        if not isinstance(resource_type, str) or resource_type not in TYPES:
            raise jobs.PermanentJobError(f"{REINDEX_JOB} job {job.id}: no served resource type in its payload")
        after: str | None = ""
        while after is not None:
            async with pool.acquire() as conn, conn.transaction():
                after = await repo.reindex(conn, resource_type, after, PAGE)

    return handle
