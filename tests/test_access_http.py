"""Policy decisions through the public interface: who sees which studies, 403s for denials, and an audit
record for every access (allowed, denied, unauthenticated), in a chain that verifies."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from authz.audit import key_verifier
from authz.auditverify import verify
from authz.keys import load_or_create
from server import db
from tests.conftest import bearer
from tests.factory import ct, multipart, part10, stow_headers


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
            import json

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
    outcomes = [(r["agent"].get("sub"), r["http"]["status"], r["outcome"]) for r in records]
    assert ("dr-who", 403, "4") in outcomes
    assert ("sec", 403, "4") in outcomes
    assert (None, 401, "4") in outcomes
    denied_record = next(r for r in records if r["agent"].get("sub") == "dr-who" and r["http"]["status"] == 403)
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
