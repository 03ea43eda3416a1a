"""Versioned storage of FHIR resources (R4 3.1.0: read, vread, update, delete, history).

Every write is a new version: the current version lives in `fhir_resources`, every version in `fhir_history`,
and the search index rows (`fhir.search.index`) are replaced in the same transaction, so a search never sees a
half-written resource. `meta.versionId` and `meta.lastUpdated` are set here, never taken from the client.

Writers pass the facts the policy needs with the content (`Filing`: the DICOM Patient ID the resource belongs
to, its modalities, the natural key of a derived resource). Every version keeps the filing it was written with:
a vread or history entry is decided on the patient that version belonged to, which need not be the current one
(a report moved to another patient). Hooks (`WriteHook`) run inside the transaction after
each write: that is where Subscriptions queue their notifications.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from fhir.errors import FhirError, ResourceGone, ResourceNotFound, VersionConflict
from fhir.search import index as searchindex
from server.platform.db import Connection, Queries

SQL = Queries(Path(__file__).with_name("resources.sql"))
ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")
"""R4 `id` datatype."""


@dataclass(frozen=True, slots=True)
class Filing:
    """Where a resource is filed for the policy: `patient_key` is the DICOM Patient ID it belongs to (None: no
    patient), `modalities` the imaging modalities it is about, `source_key` the natural key of a derived resource
    (ImagingStudy: StudyInstanceUID; Patient: `issuer|PatientID`)."""

    patient_key: str | None = None
    modalities: tuple[str, ...] = ()
    source_key: str | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """One version of a resource. `content` is None for a deletion."""

    resource_type: str
    id: str
    version: int
    last_updated: dt.datetime
    deleted: bool
    content: dict[str, Any] | None
    filing: Filing = field(default_factory=Filing)
    method: str | None = None
    """History entries: POST, PUT or DELETE."""

    @property
    def etag(self) -> str:
        """R4 3.1.0.4.2: the ETag is the weak version id."""
        return f'W/"{self.version}"'


WriteHook = Callable[[Connection, Stored], Awaitable[None]]
"""Runs inside the write's transaction after every create, update and delete."""


def check_id(value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise FhirError(f"{value!r} is not a valid resource id (1-64 of A-Z a-z 0-9 - .)")
    return value


def new_id() -> str:
    return str(uuid.uuid4())


def parse_etag(value: str) -> int:
    """The version in an `If-Match` header: `W/"3"` (also accepted: `"3"`, `3`)."""
    raw = value.strip()
    if raw.startswith("W/"):
        raw = raw[2:]
    raw = raw.strip('"')
    if not raw.isdigit():
        raise FhirError(f'If-Match {value!r} is not a version ETag such as W/"1"')
    return int(raw)


def _stored(row: asyncpg.Record, method: str | None = None) -> Stored:
    content = row["content"]
    if isinstance(content, str):
        content = json.loads(content)
    keys = set(row.keys())
    filing = (
        Filing(row["patient_key"], tuple(row["modalities"] or ()), row["source_key"])
        if "patient_key" in keys
        else Filing()
    )
    return Stored(
        row["resource_type"],
        row["id"],
        row["version"],
        row["last_updated"],
        bool(row["deleted"]) if "deleted" in keys else row["method"] == "DELETE",
        content,
        filing,
        method or (row["method"] if "method" in keys else None),
    )


def _with_meta(
    content: Mapping[str, Any], resource_type: str, rid: str, version: int, at: dt.datetime
) -> dict[str, Any]:
    body = dict(content)
    body["resourceType"] = resource_type
    body["id"] = rid
    meta = dict(body.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = at.isoformat().replace("+00:00", "Z")
    body["meta"] = meta
    return body


class FhirRepository:
    def __init__(self, hooks: Sequence[WriteHook] = ()) -> None:
        self.hooks: tuple[WriteHook, ...] = tuple(hooks)
        """Run in this order in each write's transaction; bound here, at the one construction of the server's."""

    async def read(self, conn: Connection, resource_type: str, rid: str, *, allow_deleted: bool = False) -> Stored:
        """The current version; 404 when unknown, 410 when deleted (unless `allow_deleted`)."""
        row = await conn.fetchrow(SQL["read"], resource_type, rid)
        if row is None:
            raise ResourceNotFound(f"{resource_type}/{rid} is not known")
        stored = _stored(row)
        if stored.deleted and not allow_deleted:
            raise ResourceGone(f"{resource_type}/{rid} was deleted (version {stored.version})")
        return stored

    async def find(self, conn: Connection, resource_type: str, rid: str) -> Stored | None:
        row = await conn.fetchrow(SQL["read"], resource_type, rid)
        return _stored(row) if row is not None else None

    async def find_by_source(self, conn: Connection, resource_type: str, source_key: str) -> Stored | None:
        row = await conn.fetchrow(SQL["read_by_source"], resource_type, source_key)
        return _stored(row) if row is not None else None

    async def vread(self, conn: Connection, resource_type: str, rid: str, version: int) -> Stored:
        """One version (a deletion too), filed as it was written; 404 when there is no such version."""
        stored = await self.find_version(conn, resource_type, rid, version)
        if stored is None:
            raise ResourceNotFound(f"{resource_type}/{rid} has no version {version}")
        return stored

    async def find_version(self, conn: Connection, resource_type: str, rid: str, version: int) -> Stored | None:
        row = await conn.fetchrow(SQL["vread"], resource_type, rid, version)
        return _stored(row) if row is not None else None

    async def history(
        self, conn: Connection, resource_type: str, rid: str, *, since: dt.datetime | None = None, limit: int = 100
    ) -> list[Stored]:
        """Versions newest first. 404 when the resource never existed."""
        rows = await conn.fetch(SQL["history"], resource_type, rid, since, limit)
        if not rows and await conn.fetchrow(SQL["read"], resource_type, rid) is None:
            raise ResourceNotFound(f"{resource_type}/{rid} is not known")
        return [_stored(r) for r in rows]

    async def history_filings(
        self, conn: Connection, resource_type: str, rid: str, *, since: dt.datetime | None = None
    ) -> list[tuple[int, Filing]]:
        """Every version's number and filing, newest first (no content). 404 when the resource never existed."""
        rows = await conn.fetch(SQL["history_filings"], resource_type, rid, since)
        if not rows and await conn.fetchrow(SQL["read"], resource_type, rid) is None:
            raise ResourceNotFound(f"{resource_type}/{rid} is not known")
        return [(r["version"], Filing(r["patient_key"], tuple(r["modalities"] or ()), r["source_key"])) for r in rows]

    async def versions(self, conn: Connection, resource_type: str, rid: str, numbers: Sequence[int]) -> list[Stored]:
        """The versions numbered `numbers` that exist, newest first."""
        if not numbers:
            return []
        return [_stored(r) for r in await conn.fetch(SQL["versions"], resource_type, rid, list(numbers))]

    async def patient_key_of(self, conn: Connection, patient_id: str) -> str | None:
        """The DICOM Patient ID of `Patient/<patient_id>` (None when unknown or deleted)."""
        value = await conn.fetchval(SQL["patient_key_of"], patient_id)
        return str(value) if value is not None else None

    async def create(
        self,
        conn: Connection,
        resource_type: str,
        content: Mapping[str, Any],
        filing: Filing = Filing(),
        *,
        rid: str | None = None,
        now: dt.datetime | None = None,
    ) -> Stored:
        """Version 1 of a new resource (server-assigned id unless `rid`). Run inside a transaction."""
        rid = check_id(rid) if rid is not None else new_id()
        at = now or dt.datetime.now(dt.UTC)
        body = _with_meta(content, resource_type, rid, 1, at)
        version = await conn.fetchval(
            SQL["insert"],
            resource_type,
            rid,
            at,
            json.dumps(body),
            filing.patient_key,
            list(filing.modalities),
            filing.source_key,
        )
        if version is None:
            raise VersionConflict(f"{resource_type}/{rid} already exists")
        return await self._written(conn, resource_type, rid, 1, at, "POST", body, filing)

    async def update(
        self,
        conn: Connection,
        resource_type: str,
        rid: str,
        content: Mapping[str, Any],
        filing: Filing = Filing(),
        *,
        expected_version: int | None = None,
        now: dt.datetime | None = None,
    ) -> tuple[Stored, bool]:
        """A new version (update as create when the id is unknown: R4 3.1.0.4.3). Returns (stored, created).
        `expected_version` (from `If-Match`) must be the current version, else 412. Run inside a transaction."""
        rid = check_id(rid)
        at = now or dt.datetime.now(dt.UTC)
        current = await conn.fetchrow(SQL["read_for_update"], resource_type, rid)
        if current is None:
            if expected_version is not None:
                raise VersionConflict(f'{resource_type}/{rid} does not exist (If-Match W/"{expected_version}")')
            return await self.create(conn, resource_type, content, filing, rid=rid, now=at), True
        if expected_version is not None and current["version"] != expected_version:
            raise VersionConflict(
                f"{resource_type}/{rid} is at version {current['version']}, not {expected_version} (If-Match)"
            )
        version = current["version"] + 1
        at = max(at, current["last_updated"])
        body = _with_meta(content, resource_type, rid, version, at)
        await conn.execute(
            SQL["replace"],
            resource_type,
            rid,
            version,
            at,
            False,
            json.dumps(body),
            filing.patient_key,
            list(filing.modalities),
            filing.source_key,
        )
        return await self._written(conn, resource_type, rid, version, at, "PUT", body, filing), False

    async def delete(
        self,
        conn: Connection,
        resource_type: str,
        rid: str,
        *,
        expected_version: int | None = None,
        now: dt.datetime | None = None,
    ) -> Stored | None:
        """Delete (a new, empty version); None when there was nothing to delete (R4: still a success).
        Run inside a transaction."""
        at = now or dt.datetime.now(dt.UTC)
        current = await conn.fetchrow(SQL["read_for_update"], resource_type, rid)
        if current is None or current["deleted"]:
            if expected_version is not None and current is None:
                raise VersionConflict(f"{resource_type}/{rid} does not exist (If-Match)")
            return None
        if expected_version is not None and current["version"] != expected_version:
            raise VersionConflict(
                f"{resource_type}/{rid} is at version {current['version']}, not {expected_version} (If-Match)"
            )
        version = current["version"] + 1
        at = max(at, current["last_updated"])
        filing = Filing(current["patient_key"], tuple(current["modalities"] or ()), current["source_key"])
        await conn.execute(
            SQL["replace"],
            resource_type,
            rid,
            version,
            at,
            True,
            None,
            filing.patient_key,
            list(filing.modalities),
            filing.source_key,
        )
        return await self._written(conn, resource_type, rid, version, at, "DELETE", None, filing)

    async def _written(
        self,
        conn: Connection,
        resource_type: str,
        rid: str,
        version: int,
        at: dt.datetime,
        method: str,
        body: dict[str, Any] | None,
        filing: Filing,
    ) -> Stored:
        await conn.execute(
            SQL["insert_history"],
            resource_type,
            rid,
            version,
            at,
            method,
            json.dumps(body) if body else None,
            filing.patient_key,
            list(filing.modalities),
        )
        await self._index(conn, resource_type, rid, body)
        stored = Stored(resource_type, rid, version, at, body is None, body, filing, method)
        for hook in self.hooks:
            await hook(conn, stored)
        return stored

    async def _index(self, conn: Connection, resource_type: str, rid: str, body: dict[str, Any] | None) -> None:
        """Replace the search index rows (`fhir_search`) of one resource by those of `body` (none once deleted)."""
        await conn.execute(SQL["clear_search"], resource_type, rid)
        rows = searchindex.entries(resource_type, body) if body is not None else []
        if rows:
            await conn.execute(
                SQL["insert_search"],
                resource_type,
                rid,
                [e.param for e in rows],
                [e.system for e in rows],
                [e.code for e in rows],
                [e.text_value for e in rows],
                [e.low for e in rows],
                [e.high for e in rows],
                [e.number for e in rows],
            )

    async def reindex(self, conn: Connection, resource_type: str, after: str, limit: int) -> str | None:
        """Recompute the search rows of up to `limit` current resources of `resource_type` with ids after `after`
        (locked: a concurrent write waits, then writes its own rows); versions and hooks are left alone. Returns
        the last id done, or None when there were none. Run inside a transaction."""
        rows = await conn.fetch(SQL["current_page"], resource_type, after, limit)
        for row in rows:
            content = row["content"]
            body = json.loads(content) if isinstance(content, str) else content
            await self._index(conn, resource_type, str(row["id"]), body)
        return str(rows[-1]["id"]) if rows else None
