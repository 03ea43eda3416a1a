"""Policy decisions through the public interface: who sees which studies, 403s for denials, and an audit
record for every access (allowed, denied, unauthenticated), in a chain that verifies."""

from __future__ import annotations

import asyncio
import base64
import json

import asyncpg
import httpx

from authz.audit import key_verifier
from authz.auditverify import verify
from authz.keys import load_or_create
from server.platform import db
from tests.conftest import bearer
from tests.support.factory import ct, multipart, part10, stow_headers


def store(http: httpx.Client) -> dict[str, str]:
    """Studies of P1 (CT), P2 (CT), P3 (MR) and P5 (MG); returns study UID by patient."""
    studies = {}
    parts = []
    for patient, modality in (("P1", "CT"), ("P2", "CT"), ("P3", "MR"), ("P5", "MG")):
        ds = ct(PatientID=patient, Modality=modality)
        studies[patient] = ds.StudyInstanceUID
        parts.append(part10(ds))
    assert http.post("/dicom-web/studies", content=multipart(parts), headers=stow_headers()).status_code == 200
    return studies


def patients(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return sorted(m["00100020"]["Value"][0] for m in resp.json())


def audit_rows(dsn: str) -> list[dict]:
    async def run() -> list[dict]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT record FROM audit_log ORDER BY seq")
            return [json.loads(r["record"]) if isinstance(r["record"], str) else dict(r["record"]) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def test_roles_see_only_what_the_policy_allows(http, server, token) -> None:
    studies = store(http)
    url = server.url + "/dicom-web"
    referring = bearer(token(sub="dr-who", roles=["referring"], scopes=[]))
    assert patients(httpx.get(url + "/studies", headers=referring)) == ["P1", "P2"]
    assert httpx.get(f"{url}/studies/{studies['P1']}/metadata", headers=referring).status_code == 200
    denied = httpx.get(f"{url}/studies/{studies['P3']}/metadata", headers=referring)
    assert denied.status_code == 403 and "Warning" in denied.headers

    radiologist = bearer(token(sub="rad", roles=["radiologist"], scopes=[]))
    assert patients(httpx.get(url + "/studies?limit=10", headers=radiologist)) == ["P1", "P2", "P3", "P5"]
    technologist = bearer(token(sub="tech", roles=["technologist"], scopes=[]))
    assert patients(httpx.get(url + "/studies", headers=technologist)) == ["P1", "P2", "P3"]  # MG restricted

    researcher = bearer(token(sub="res", roles=["researcher"], scopes=[]))
    assert "P3" not in patients(httpx.get(url + "/studies", headers=researcher))  # opted out of research

    auditor = bearer(token(sub="sec", roles=["auditor"], scopes=[]))
    assert httpx.get(url + "/studies", headers=auditor).status_code == 403

    patient_bound = bearer(token(sub="app", roles=["radiologist"], scopes=["patient/ImagingStudy.rs"], patient="P2"))
    assert patients(httpx.get(url + "/studies", headers=patient_bound)) == ["P2"]
    assert httpx.get(f"{url}/studies/{studies['P1']}/metadata", headers=patient_bound).status_code == 403

    nobody = httpx.get(url + "/studies", headers={"Authorization": "Bearer not-a-jwt"})
    assert nobody.status_code == 401

    records = audit_rows(server.dsn)
    outcomes = [(r["agent"].get("sub"), r["http"].get("status"), r["outcome"]) for r in records]
    assert ("dr-who", 403, "4") in outcomes
    assert ("sec", 403, "4") in outcomes
    assert (None, 401, "4") in outcomes
    denied_record = next(r for r in records if r["agent"].get("sub") == "dr-who" and r["http"].get("status") == 403)
    assert denied_record["entity"]["patient_id"] == "P3" and denied_record["policy"]["decision_id"]
    assert denied_record["policy"]["revision"]
    searches = [r for r in records if r["agent"].get("sub") == "rad"]
    assert searches and "query" in searches[0]["entity"]  # the search's query, base64 (never plain text)

    async def check() -> None:
        pool = await db.create_pool(server.dsn, 1, 2)
        try:
            key = load_or_create(server.settings.data_dir)
            result = await verify(pool, key_verifier({key.kid: key.public_jwk}))
            assert result.ok, result.problems
            assert result.checked == len(records)
        finally:
            await pool.close()

    asyncio.run(check())


def test_every_response_is_audited_routed_or_not(http, server, token) -> None:
    """404 (no route), 405 (wrong method), 431 (headers too large) and 400 (a target with a control character,
    a Host header the router refuses) each get their record, like any access; a record of a request that was
    never authenticated names no one and holds no token, and a search's recorded query holds no
    `access_token`."""
    jwt = token()
    anonymous = {"Authorization": f"Bearer {jwt}"}  # sent, but never checked: no route matches
    sent = [
        (404, "/no/such/route", httpx.get(server.url + "/no/such/route", headers=anonymous)),
        (404, "/no/such/route", httpx.get(server.url + "/no/such/route")),
        (405, "/dicom-web/studies", http.request("PATCH", "/dicom-web/studies")),
        (431, "/dicom-web/studies", http.get("/dicom-web/studies", headers={"X-Big": "a" * 100_000})),
        (400, "/dicom-web/studies/1.2\ufffd3", http.get("/dicom-web/studies/1.2%003")),
        (400, "/fhir/Patient/x\n", http.get("/fhir/Patient/x%0A")),
        (400, "/dicom-web/studies", http.get("/dicom-web/studies", headers={"Host": "bad host!"})),
    ]
    for status, _path, response in sent:
        assert response.status_code == status, (status, response.text)
    search = http.get("/dicom-web/studies", params={"PatientID": "P1", "access_token": jwt})
    assert search.status_code in (200, 204, 400)

    records = audit_rows(server.dsn)
    for status, path, _response in sent:
        found = [r for r in records if r["http"]["status"] == status and r["http"]["path"] == path]
        assert found, (status, path, [(r["http"]["status"], r["http"]["path"]) for r in records])
        assert all(r["outcome"] == "4" for r in found)
    unrouted = [r for r in records if r["http"]["path"] == "/no/such/route"]
    assert len(unrouted) == 2 and all(r["agent"].get("sub") is None for r in unrouted)
    for record in records:
        text = json.dumps(record)
        assert jwt not in text and jwt.split(".")[1] not in text
        query = record.get("entity", {}).get("query")
        if query:
            assert b"access_token" not in base64.b64decode(query), record
    assert any(r.get("entity", {}).get("query") for r in records if r["http"]["path"] == "/dicom-web/studies")
