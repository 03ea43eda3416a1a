"""Auto-routing: rules forward newly stored instances to a remote AE (dcmtk's storescp) through the job
queue, with retries while the destination is down and the jobs as the visible status."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pydicom

from dicomweb.dimse.routing import routing_status
from tests.conftest import admin_token, bearer, free_port
from tests.support.dimse_util import TITLE, dcmtk, dimse_audit, dimse_port, require_dcmtk, start
from tests.support.factory import ct, multipart, part10, stow_headers


def _jobs(dsn: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            return await routing_status(pool)
        finally:
            await pool.close()

    return asyncio.run(read())


def _wait(dsn: str, done: Any, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = _jobs(dsn)
        if done(jobs):
            return jobs
        assert time.monotonic() < deadline, jobs
        time.sleep(0.1)


def test_routing_rules_retry_until_the_destination_is_up(make_server: Any, tmp_path: Path) -> None:
    require_dcmtk()
    port = free_port()
    rules = [
        {"name": "CT from CT1", "destination": "ROUTER", "calling_ae": "CT1", "modality": "CT"},
        {"name": "research", "destination": "ROUTER", "attributes": {"StudyDescription": "*RESEARCH*"}},
    ]
    server = start(make_server, destinations=f"ROUTER@127.0.0.1:{port}", routes=json.dumps(rules))
    ct1 = ct(PatientID="P1")
    mr = ct(PatientID="P1", Modality="MR")
    research = ct(PatientID="P2", StudyDescription="LUNG RESEARCH")
    stowed_ct = ct(PatientID="P2")
    files = []
    for i, ds in enumerate([ct1, mr]):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(part10(ds))
        files.append(path)
    run = dcmtk("storescu", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", str(dimse_port(server)), *files)
    assert run.returncode == 0, run.stdout + run.stderr
    with httpx.Client(timeout=60, headers=server.headers) as http:
        body = multipart([part10(research), part10(stowed_ct)])
        assert http.post(f"{server.url}/dicom-web/studies", content=body, headers=stow_headers()).status_code == 200
    # the CT from CT1 and the research study are routed; the MR and the STOW'd CT (no calling AE) are not
    jobs = _wait(server.dsn, lambda js: len(js) == 2 and all(j["attempts"] >= 1 and j["last_error"] for j in js))
    assert {j["instance"] for j in jobs} == {ct1.SOPInstanceUID, research.SOPInstanceUID}
    assert {j["rule"] for j in jobs} == {"CT from CT1", "research"}
    assert all(j["state"] == "queued" and "no association" in j["last_error"] for j in jobs)  # retried later
    out = tmp_path / "routed"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "+xa", "-aet", "ROUTER", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        jobs = _wait(server.dsn, lambda js: all(j["state"] == "done" for j in js))
    finally:
        proc.terminate()
        proc.wait(10)
    got = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert got == {ct1.SOPInstanceUID, research.SOPInstanceUID}
    sent = [r for r in dimse_audit(server.dsn) if r["type"]["code"] == "110104" and r["action"] == "R"]
    assert {r["outcome"] for r in sent} == {"0", "8"} and all(r["agent"]["ae_title"] == "ROUTER" for r in sent)
    # the same status over HTTP, for admins only
    with httpx.Client(timeout=60) as http:
        answer = http.get(f"{server.url}/dimse/routing", headers=server.headers, params={"limit": 10})
        assert answer.status_code == 200
        assert {j["instance"] for j in answer.json()["jobs"]} == {ct1.SOPInstanceUID, research.SOPInstanceUID}
        assert all(j["state"] == "done" for j in answer.json()["jobs"])
        radiologist = admin_token(server.settings, roles=["radiologist"])
        assert http.get(f"{server.url}/dimse/routing", headers=bearer(radiologist)).status_code == 403
