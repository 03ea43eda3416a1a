"""A `StoreService` on the test database and a temporary folder, for tests of the ingest without HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from dicomweb.blobs.fs import FileSystemBlobStore
from dicomweb.ingest.events import Listener
from dicomweb.ingest.service import StoreService
from dicomweb.ingest.spool import Spooler
from server.platform import db


@asynccontextmanager
async def store_service(
    dsn: str, tmp_path: Path, listeners: Sequence[Listener] = (), *, overwrite: bool = False
) -> AsyncIterator[StoreService]:
    pool = await db.create_pool(dsn, 1, 4)
    try:
        yield StoreService(
            pool,
            FileSystemBlobStore(tmp_path / "blobs"),
            spool=Spooler(tmp_path / "spool", 1 << 30),
            overwrite=overwrite,
            bulk_threshold=1024,
            listeners=listeners,
        )
    finally:
        await pool.close()
