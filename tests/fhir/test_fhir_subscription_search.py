"""FHIR Subscription search (R4 search on Subscription: criteria, status, type, url, payload, contact) lists the
caller's own Subscriptions only, by GET, POST _search and in a batch; Subscriptions stored before the type was
searchable are indexed by the `fhir.reindex` job that the migration queues."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from server.platform import db
from tests.conftest import LiveServer, _with_db, bearer
from tests.fhir.test_fhir_subscriptions import FHIR_HEADERS, subscribe, subscription

HOOKS = "http://127.0.0.1:9/hooks"
EHR = ["ehr"]
SCOPES = ["system/Subscription.cruds", "system/DiagnosticReport.rs"]


@pytest.fixture
def fhir(make_server: Any) -> LiveServer:
    server: LiveServer = make_server(fhir_subscription_endpoints=(HOOKS,))
    return server


def ids(bundle: dict[str, Any]) -> set[str]:
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset", bundle
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}


def _three(http: httpx.Client, server: LiveServer) -> tuple[dict[str, str], dict[str, str], str, str, str]:
    one = bearer(server.token(sub="ehr-1", roles=EHR, scopes=SCOPES))
    two = bearer(server.token(sub="ehr-2", roles=EHR, scopes=SCOPES))
    reports = subscribe(http, subscription(f"{HOOKS}/reports"), one)["id"]
    body = subscription(f"{HOOKS}/studies", criteria="ImagingStudy?modality=CT", payload="application/fhir+json")
    body["contact"] = [{"system": "email", "value": "pacs@example.org"}]
    studies = subscribe(http, body, one)["id"]
    others = subscribe(http, subscription(f"{HOOKS}/reports"), two)["id"]
    return one, two, reports, studies, others


def test_search_lists_the_callers_own(fhir: LiveServer) -> None:
    with httpx.Client(base_url=fhir.url, timeout=60) as http:
        one, two, reports, studies, others = _three(http, fhir)
        answer = http.get("/fhir/Subscription", headers=one)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("application/fhir+json")
        assert ids(answer.json()) == {reports, studies} and answer.json()["total"] == 2
        assert ids(http.get("/fhir/Subscription", headers=two).json()) == {others}
        # An identity that wrote none sees none, whatever its role.
        assert ids(http.get("/fhir/Subscription", headers=fhir.headers).json()) == set()
        for params, expected in [
            ({"status": "active"}, {reports, studies}),
            ({"status": "off"}, set()),
            ({"criteria": "DiagnosticReport"}, {reports}),  # string: starts with, case-insensitive
            ({"criteria:exact": "ImagingStudy?modality=CT"}, {studies}),
            ({"url": f"{HOOKS}/studies"}, {studies}),
            ({"type": "rest-hook"}, {reports, studies}),
            ({"payload": "application/fhir+json"}, {studies}),
            ({"contact": "pacs@example.org"}, {studies}),
            ({"_id": others}, set()),  # another's, even by id
        ]:
            answer = http.get("/fhir/Subscription", params=params, headers={**one, "Prefer": "handling=strict"})
            assert answer.status_code == 200, (params, answer.text)
            assert ids(answer.json()) == expected, params
        form = http.post(
            "/fhir/Subscription/_search",
            content="status=active",
            headers={**one, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert ids(form.json()) == {reports, studies}
        batch = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [{"request": {"method": "GET", "url": "Subscription?status=active"}}],
        }
        answer = http.post("/fhir", json=batch, headers={**two, **FHIR_HEADERS})
        assert answer.status_code == 200, answer.text
        assert ids(answer.json()["entry"][0]["resource"]) == {others}
        # Roles without Subscription rights may not search them.
        rad = bearer(fhir.token(sub="rad", roles=["radiologist"], scopes=[]))
        denied = http.get("/fhir/Subscription", headers=rad)
        assert denied.status_code == 403 and denied.json()["resourceType"] == "OperationOutcome"


def test_capability_statement_advertises_the_search(fhir: LiveServer) -> None:
    statement = httpx.get(fhir.url + "/fhir/metadata").json()
    entry = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription")
    assert "search-type" in {i["code"] for i in entry["interaction"]}
    assert {"criteria", "status", "url", "type", "payload", "contact"} <= {p["name"] for p in entry["searchParam"]}
    assert "own" in entry["documentation"]


def _sql(dsn: str, *statements: str) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            result = None
            for statement in statements:
                result = await conn.fetch(statement)
            return result
        finally:
            await conn.close()

    return asyncio.run(run())


def test_reindex_job_indexes_subscriptions_stored_before(fhir: LiveServer) -> None:
    """What the migration's job does for Subscriptions stored when they had no search rows."""
    with httpx.Client(base_url=fhir.url, timeout=60) as http:
        one = bearer(fhir.token(sub="ehr-1", roles=EHR, scopes=SCOPES))
        created = subscribe(http, subscription(f"{HOOKS}/reports"), one)["id"]
        _sql(fhir.dsn, "DELETE FROM fhir_search WHERE resource_type = 'Subscription'")
        assert ids(http.get("/fhir/Subscription", params={"status": "active"}, headers=one).json()) == set()
        queue = Path("migrations/0023_subscription_search.sql").read_text(encoding="utf-8")
        _sql(fhir.dsn, queue)
        deadline = time.monotonic() + 30
        while not ids(http.get("/fhir/Subscription", params={"status": "active"}, headers=one).json()):
            assert time.monotonic() < deadline, "the fhir.reindex job did not index the Subscription"
            time.sleep(0.2)
        assert ids(http.get("/fhir/Subscription", params={"status": "active"}, headers=one).json()) == {created}
        state = _sql(fhir.dsn, "SELECT state FROM jobs WHERE kind = 'fhir.reindex'")
        assert [r["state"] for r in state] == ["done"]


def test_migration_queues_the_reindex_only_when_needed(pg_uri: str, tmp_path: Path) -> None:
    earlier = tmp_path / "migrations"
    earlier.mkdir()
    for path in db.migration_files():
        if path.name < "0023_subscription_search":
            shutil.copy(path, earlier / path.name)

    async def run(name: str, with_subscription: bool) -> list[str]:
        admin = await asyncpg.connect(pg_uri)
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            conn = await asyncpg.connect(_with_db(pg_uri, name))
            try:
                await db.migrate(conn, earlier)
                if with_subscription:
                    content = json.dumps({"resourceType": "Subscription", "id": "s1", "status": "active"})
                    await conn.execute(
                        "INSERT INTO fhir_resources (resource_type, id, version, last_updated, content)"
                        " VALUES ('Subscription', 's1', 1, now(), $1::jsonb)",
                        content,
                    )
                await db.migrate(conn)
                rows = await conn.fetch("SELECT payload::text FROM jobs WHERE kind = 'fhir.reindex'")
                return [json.loads(r["payload"])["type"] for r in rows]
            finally:
                await conn.close()
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await admin.close()

    stamp = int(time.time() * 1000)
    assert asyncio.run(run(f"reindex_yes_{stamp}", True)) == ["Subscription"]
    assert asyncio.run(run(f"reindex_no_{stamp}", False)) == []


def test_another_owners_subscription_does_not_exist_for_the_caller(fhir: LiveServer) -> None:
    """A Subscription's channel may carry the receiver's credentials: by id too, another owner's Subscription is
    unknown (read, vread, history, delete, a batch entry), and a write cannot take it over."""
    with httpx.Client(base_url=fhir.url, timeout=60) as http:
        one, two, reports, _, others = _three(http, fhir)
        mine = http.get(f"/fhir/Subscription/{reports}", headers=one)
        assert mine.status_code == 200
        for path in (f"/fhir/Subscription/{others}", f"/fhir/Subscription/{others}/_history/1"):
            answer = http.get(path, headers=one)
            assert answer.status_code == 404 and "hooks" not in answer.text, (path, answer.text)
        assert http.get(f"/fhir/Subscription/{others}/_history", headers=one).status_code == 404
        taken = subscription(f"{HOOKS}/reports")
        taken["id"] = others
        put = http.put(f"/fhir/Subscription/{others}", json=taken, headers={**one, **FHIR_HEADERS})
        assert put.status_code == 403, put.text
        assert http.delete(f"/fhir/Subscription/{others}", headers=one).status_code in (200, 204)
        batch = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [{"request": {"method": "GET", "url": f"Subscription/{others}"}}],
        }
        entry = http.post("/fhir", json=batch, headers={**one, **FHIR_HEADERS}).json()["entry"][0]
        assert entry["response"]["status"].startswith("404") and "resource" not in entry
        # Its owner still has it, unchanged and undeleted.
        kept = http.get(f"/fhir/Subscription/{others}", headers=two)
        assert kept.status_code == 200 and kept.json()["meta"]["versionId"] == "1"
