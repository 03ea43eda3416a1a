"""Versioned FHIR storage (fhir/repository.py) on the real database: versions, history, If-Match, deletion."""

from __future__ import annotations

import asyncio

import pytest

from fhir.errors import ResourceGone, ResourceNotFound, VersionConflict
from fhir.repository import FhirRepository, Filing, Stored, parse_etag
from server.platform import db


def test_versions_history_and_deletion(dsn: str) -> None:
    seen: list[tuple[str, int]] = []

    async def hook(_conn: db.Connection, stored: Stored) -> None:
        seen.append((stored.method or "", stored.version))

    async def run() -> None:
        pool = await db.create_pool(dsn, 1, 2)
        repo = FhirRepository([hook])
        try:
            async with pool.acquire() as conn:
                async with conn.transaction():
                    first = await repo.create(conn, "DiagnosticReport", {"status": "preliminary"}, Filing("P1"))
                assert first.version == 1 and first.content is not None
                assert first.content["meta"]["versionId"] == "1" and first.etag == 'W/"1"'
                rid = first.id
                async with conn.transaction():
                    second, created = await repo.update(
                        conn, "DiagnosticReport", rid, {"status": "final"}, Filing("P1"), expected_version=1
                    )
                assert not created and second.version == 2
                with pytest.raises(VersionConflict):
                    async with conn.transaction():
                        await repo.update(conn, "DiagnosticReport", rid, {"status": "amended"}, expected_version=1)
                current = await repo.read(conn, "DiagnosticReport", rid)
                assert current.content is not None and current.content["status"] == "final"
                assert current.filing.patient_key == "P1"
                old = await repo.vread(conn, "DiagnosticReport", rid, 1)
                assert old.content is not None and old.content["status"] == "preliminary"
                async with conn.transaction():
                    gone = await repo.delete(conn, "DiagnosticReport", rid)
                assert gone is not None and gone.version == 3 and gone.deleted
                with pytest.raises(ResourceGone):
                    await repo.read(conn, "DiagnosticReport", rid)
                with pytest.raises(ResourceNotFound):
                    await repo.read(conn, "DiagnosticReport", "nope")
                history = await repo.history(conn, "DiagnosticReport", rid)
                assert [(h.version, h.method) for h in history] == [(3, "DELETE"), (2, "PUT"), (1, "POST")]
                async with conn.transaction():
                    again, created = await repo.update(conn, "DiagnosticReport", rid, {"status": "final"})
                assert not created and again.version == 4
        finally:
            await pool.close()

    asyncio.run(run())
    assert seen == [("POST", 1), ("PUT", 2), ("DELETE", 3), ("PUT", 4)]


def test_parse_etag() -> None:
    assert parse_etag('W/"3"') == 3 and parse_etag('"12"') == 12 and parse_etag("7") == 7
