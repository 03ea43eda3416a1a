"""The blob store's garbage: blobs no index row names (`blob.gc`, the orphan collector) and blobs an overwrite
replaced (`blob.delete`). A store that fails after its blob was written, or a crash between the blob write and the
index commit, leaves a blob without a row (`dicomweb.ingest.service`); the collector removes it after a grace
period, long enough for any store still in flight to commit the row that names it."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import anyio.to_thread
import asyncpg

from dicomweb.blobs import BlobStore
from dicomweb.index import repository
from dicomweb.ingest.spool import sweep
from server.platform import jobs

log = logging.getLogger(__name__)
GC_JOB = "blob.gc"
DELETE_JOB = "blob.delete"
BATCH = 500


def gc_handler(
    pool: asyncpg.Pool, blobs: BlobStore, grace_seconds: int, interval_seconds: int, spool_dir: Path | None = None
) -> jobs.Handler:
    """`blob.gc`: delete blobs that no index row names and that are older than the grace period (and stale spool
    files), then schedule the next sweep."""

    async def run(job: jobs.Job) -> None:
        if spool_dir is not None:
            swept = await anyio.to_thread.run_sync(sweep, spool_dir, grace_seconds)
            if swept:
                log.info("orphan collector removed %d stale spool files", swept)
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=grace_seconds)
        batch: list[str] = []
        removed = 0

        async def flush() -> int:
            async with pool.acquire() as conn:
                present = await repository.blob_keys_present(conn, batch)
            gone = [k for k in batch if k not in present]
            for k in gone:
                await blobs.delete(k)
            batch.clear()
            return len(gone)

        async for info in blobs.list():
            if info.modified < cutoff:
                batch.append(info.key)
                if len(batch) >= BATCH:
                    removed += await flush()
        if batch:
            removed += await flush()
        if removed:
            log.info("orphan collector removed %d blobs", removed)
        if job.payload.get("periodic"):
            async with pool.acquire() as conn:
                await jobs.enqueue(
                    conn, GC_JOB, {"periodic": True}, dedupe_key="periodic", delay_seconds=interval_seconds
                )

    return run


def blob_delete_handler(pool: asyncpg.Pool, blobs: BlobStore) -> jobs.Handler:
    """`blob.delete`: remove a blob replaced by an overwrite, unless a row names it again."""

    async def run(job: jobs.Job) -> None:
        key = str(job.payload["key"])
        async with pool.acquire() as conn:
            if await repository.blob_keys_present(conn, [key]):
                return
        await blobs.delete(key)

    return run
