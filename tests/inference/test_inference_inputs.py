"""What a model is given, over HTTP: an on-demand request respects the model's input selector (a chest CR sent to a
brain-tumour model is a 422 with the reason, nothing queued) unless an admin overrides it, which the policy
refuses to other roles and the audit trail records; a series over `HOUNSFIELD_INFERENCE_MAX_INSTANCES` fails its
run with the count and the limit instead of being processed in part and reported as succeeded."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import pydicom
import pytest

from tests.conftest import LiveServer, bearer
from tests.inference.test_inference_e2e import CHEST, result_of
from tests.support.data import sample
from tests.support.factory import multipart, stow_headers
from tests.support.sql import query

BRAIN_TUMOUR = {
    "name": "tumor",
    "version": "1.0.0",
    "task": "brain MR tumour classification",
    "selector": {"modality": ["MR"], "body_part": ["HEAD", "BRAIN"]},
    "outputs": [],
    "status": "active",
    "backend": {"adapter": "test-measures"},  # the selector is under test, not the network
}
CHEST_MODEL = {
    "name": "chest",
    "version": "1.0.0",
    "task": "chest X-ray measurement",
    "selector": {"modality": ["CR", "DX"]},
    "outputs": [],
    "status": "active",
    "backend": {"adapter": "test-measures"},
}


@pytest.fixture
def ai(make_server: Any) -> LiveServer:
    server: LiveServer = make_server(
        inference_quiet_seconds=0.3,
        inference_max_attempts=2,
        inference_max_instances=2,
        inference_plugins=("tests.support.inference_plugins",),
    )
    return server


@pytest.fixture
def api(ai: LiveServer) -> Any:
    with httpx.Client(base_url=ai.url, timeout=60, headers=ai.headers) as client:
        yield client


def stow_series(api: httpx.Client, count: int, tag: str = "1") -> tuple[str, str]:
    """`count` instances of one chest CR series (the sample under new study, series and instance UIDs ending in
    `.tag`); its Study and Series Instance UIDs."""
    raw = sample(CHEST).read_bytes()
    parts = []
    for n in range(count):
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.StudyInstanceUID = f"{ds.StudyInstanceUID}.{tag}"
        ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.{tag}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.{tag}.{n + 1}"
        ds.InstanceNumber = n + 1
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        parts.append(out.getvalue())
    response = api.post("/dicom-web/studies", content=multipart(parts), headers=stow_headers())
    assert response.status_code == 200, response.text
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def request_records(dsn: str) -> list[dict[str, Any]]:
    rows = query(dsn, "SELECT record::text AS record FROM audit_log ORDER BY seq")
    records = [json.loads(r["record"]) for r in rows]
    return [r for r in records if r.get("http", {}).get("path") == "/inference-requests"]


def test_on_demand_run_respects_the_selector(ai: LiveServer, api: httpx.Client) -> None:
    assert api.post("/models", json=BRAIN_TUMOUR).status_code == 201
    study, series = stow_series(api, 1)
    body = {"study": study, "series": series, "model": "tumor"}

    refused = api.post("/inference-requests", json=body)
    assert refused.status_code == 422, refused.text
    assert refused.json()["status"] == 422
    assert "modality CR is not one of MR" in refused.json()["error"]
    assert "Warning" in refused.headers
    assert api.get("/inference-results", params={"series": series}).json()["results"] == []
    assert query(ai.dsn, "SELECT count(*) AS n FROM inference_requests")[0]["n"] == 0

    bad = api.post("/inference-requests", json={**body, "override_selector": "yes"})
    assert bad.status_code == 400 and "override_selector" in bad.json()["error"]

    radiologist = bearer(ai.token(sub="rad", roles=["radiologist"], scopes=[]))
    denied = api.post("/inference-requests", json={**body, "override_selector": True}, headers=radiologist)
    assert denied.status_code == 403, denied.text
    assert api.get("/inference-results", params={"series": series}).json()["results"] == []

    overridden = api.post("/inference-requests", json={**body, "override_selector": True})
    assert overridden.status_code == 202, overridden.text
    assert "modality CR is not one of MR" in overridden.json()["selector_overridden"]
    [result] = api.get("/inference-results", params={"series": series}).json()["results"]
    assert result["model"] == "tumor"

    records = request_records(ai.dsn)
    assert [r["http"]["status"] for r in records] == [422, 400, 403, 202]
    assert "admin role" in records[2]["outcome_desc"]
    accepted = records[3]
    assert "admin" in accepted["agent"]["roles"]
    assert accepted["outcome_desc"].startswith("model input selector overridden: modality CR is not one of MR")
    assert "selector" not in (records[0].get("outcome_desc") or "")


def test_series_over_the_instance_limit_fails_visibly(ai: LiveServer, api: httpx.Client) -> None:
    assert api.post("/models", json=CHEST_MODEL).status_code == 201
    study, series = stow_series(api, 3)  # the limit is 2
    result = result_of(api, series, "chest", ("succeeded", "failed"))
    assert result["state"] == "failed", result
    assert "3 instances" in result["error"] and "the 2 a model reads" in result["error"]
    assert result["attempts"] == 1  # retrying cannot help
    assert result["stats"] == {} and result["outputs"] == {"series": None, "instances": []}
    assert result["report"] is None
    # asked for on demand, the same series is refused at once, override or not
    for extra in ({}, {"override_selector": True}):
        body = {"study": study, "series": series, "model": "chest", **extra}
        refused = api.post("/inference-requests", json=body)
        assert refused.status_code == 422, refused.text
        assert "3 instances, more than the 2 a model reads" in refused.json()["error"]
    # at the limit the series is read whole
    _, other = stow_series(api, 2, tag="2")
    done = result_of(api, other, "chest", ("succeeded", "failed"))
    assert done["state"] == "succeeded" and done["stats"]["images"] == 2
