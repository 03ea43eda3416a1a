"""AI on ingest end to end over HTTP: an admin registers the chest X-ray lung fields model, a STOW of
pydicom-data's RG1 chest CR is followed, after the quiet period, by a DICOM SEG in the same study (QIDO-RS and
WADO-RS, with references to the source image and the AI / not-for-diagnosis markings) and a preliminary FHIR
DiagnosticReport (read with fhirpy), made by the AI service identity and audited. A shadow version runs and
publishes nothing; a failing model is retried and reports its failure; dispatching twice makes one result."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import numpy as np
import pydicom
import pytest

from inference.dispatch import dispatch_series
from tests.conftest import LiveServer, bearer
from tests.support.data import sample
from tests.support.factory import multipart, stow_headers

CHEST = "RG1_UNCR.dcm"
LUNGS = {
    "name": "lungs",
    "version": "1.0.0",
    "task": "chest X-ray lung fields",
    "selector": {"modality": ["CR", "DX"], "body_part": "CHEST", "min_instances": 1},
    "outputs": ["SEG", "DiagnosticReport"],
    "status": "active",
    "backend": {"adapter": "chest-xray-lung-fields"},
}


@pytest.fixture
def ai(make_server: Any) -> LiveServer:
    server: LiveServer = make_server(
        inference_quiet_seconds=0.5, inference_max_attempts=2, inference_plugins=("tests.support.inference_plugins",)
    )
    return server


@pytest.fixture
def api(ai: LiveServer) -> Any:
    with httpx.Client(base_url=ai.url, timeout=60, headers=ai.headers) as client:
        yield client


def stow_chest(api: httpx.Client) -> pydicom.Dataset:
    raw = sample(CHEST).read_bytes()
    response = api.post("/dicom-web/studies", content=multipart([raw]), headers=stow_headers())
    assert response.status_code == 200, response.text
    return pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)


def wait_for(check: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError("timed out waiting")


def result_of(api: httpx.Client, series: str, model: str, states: tuple[str, ...]) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        found = api.get("/inference-results", params={"series": series, "model": model}).json()["results"]
        return found[0] if found and found[0]["state"] in states else None

    result: dict[str, Any] = wait_for(done)
    return result


def test_stow_cr_makes_seg_and_report(ai: LiveServer, api: httpx.Client) -> None:
    assert api.post("/models", json=LUNGS).status_code == 201
    source = stow_chest(api)
    study, series = source.StudyInstanceUID, source.SeriesInstanceUID
    result = result_of(api, series, "lungs", ("succeeded", "failed"))
    assert result["state"] == "succeeded", result
    assert result["shadow"] is False and result["attempts"] == 1
    assert 0.1 < result["stats"]["lung_area_fraction"] < 0.45
    assert "lung_area_mm2" not in result["stats"]  # PixelSpacing 0\0 is no spacing
    assert result["latency_ms"] > 0
    # when the run was dispatched, and since when it is in its state: its finish (publishing the outputs and the
    # report while running does not move it), so clients can time queueing and runs from outside
    since = dt.datetime.fromisoformat(result["state_since"])
    assert dt.datetime.fromisoformat(result["dispatched"]) <= since == dt.datetime.fromisoformat(result["finished"])

    # QIDO-RS: the SEG is a new series of the same study
    segs = api.get(f"/dicom-web/studies/{study}/series", params={"Modality": "SEG"})
    assert segs.status_code == 200
    [seg_series] = segs.json()
    seg_uid = seg_series["0020000E"]["Value"][0]
    assert seg_uid == result["outputs"]["series"] and seg_uid != series
    # WADO-RS: the instance, with its references and markings
    [instance_uid] = result["outputs"]["instances"]
    wado = api.get(
        f"/dicom-web/studies/{study}/series/{seg_uid}/instances/{instance_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert wado.status_code == 200
    body = wado.content
    seg = pydicom.dcmread(io.BytesIO(body[body.index(b"DICM") - 128 :]))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study and seg.PatientID == source.PatientID
    assert seg.ContentQualification == "RESEARCH"
    assert seg.PatientOrientation == source.PatientOrientation  # General Image, Type 2C without a plane orientation
    assert "not for diagnostic use" in seg.SeriesDescription
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == series
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == "chest-xray-lung-fields"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "1.0.0"
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert "PixelMeasuresSequence" not in shared  # the source's bogus 0\\0 spacing is not copied into the SEG
    mask = seg.pixel_array
    assert mask.shape == (source.Rows, source.Columns)
    assert 0.1 < float(np.mean(mask)) < 0.45

    # FHIR: the preliminary DiagnosticReport, linked to the ImagingStudy and Patient
    from fhirpy import SyncFHIRClient

    fhir = SyncFHIRClient(f"{ai.url}/fhir", authorization=f"Bearer {ai.token()}")
    report = fhir.reference("DiagnosticReport", result["report"].split("/")[1]).to_resource()
    assert report["status"] == "preliminary"
    imaging = fhir.reference("ImagingStudy", report["imagingStudy"][0]["reference"].split("/")[1]).to_resource()
    assert imaging["identifier"][0]["value"] == f"urn:oid:{study}"
    assert report["subject"]["reference"] == imaging["subject"]["reference"]
    assert any(s["uid"] == seg_uid for s in imaging["series"])  # the ImagingStudy shows the result series
    assert report["meta"]["security"][0]["code"] == "AIAST"
    [observation] = [c for c in report["contained"] if c["code"]["text"] == "lung_area_fraction"]
    assert observation["valueQuantity"]["value"] == pytest.approx(result["stats"]["lung_area_fraction"], abs=1e-5)
    found = api.get("/fhir/DiagnosticReport", params={"study": f"ImagingStudy/{imaging['id']}"})
    assert found.status_code == 200

    # the AI service acted under its own identity: its reads and writes are in the audit trail
    def audited() -> list[dict[str, Any]]:
        bundle = api.get("/fhir/AuditEvent", params={"agent": "hounsfield-ai", "_count": 50}).json()
        return [e["resource"] for e in bundle.get("entry", [])]

    events = wait_for(lambda: len(audited()) >= 3 and audited())
    actions = sorted(e["action"] for e in events)
    assert "R" in actions and actions.count("C") >= 2

    # idempotent: dispatching the series again queues nothing; an on-demand request reuses the result
    async def again() -> list[str]:
        conn = await asyncpg.connect(ai.dsn)
        try:
            return await dispatch_series(conn, series, 2)
        finally:
            await conn.close()

    assert asyncio.run(again()) == []
    accepted = api.post("/inference-requests", json={"study": study, "series": series, "model": "lungs"})
    assert accepted.status_code == 202
    status = api.get(accepted.headers["location"]).json()
    assert status["state"] == "succeeded" and status["report"] == result["report"]
    assert len(api.get("/inference-results", params={"series": series}).json()["results"]) == 1
    assert len(api.get(f"/dicom-web/studies/{study}/series/{seg_uid}/instances").json()) == 1

    # feedback: a radiologist makes the report final (accepted); the summary counts it for this version
    radiologist = bearer(ai.token(sub="rad", roles=["radiologist"], scopes=[]))
    content = api.get(f"/fhir/{result['report']}").json()
    content["status"] = "final"
    put = api.put(
        f"/fhir/{result['report']}",
        json=content,
        headers={**radiologist, "Content-Type": "application/fhir+json"},
    )
    assert put.status_code == 200, put.text
    summary = api.get("/models/lungs/1.0.0/summary", headers=radiologist).json()
    assert summary["states"] == {"succeeded": 1} and summary["failures"] == 0
    assert summary["feedback"] == {"accepted": 1}
    assert summary["latency_ms"]["count"] == 1 and summary["throughput_per_hour"] == 1
    assert summary["outputs"]["lung_area_fraction"]["mean"] == pytest.approx(result["stats"]["lung_area_fraction"])
    # feedback is no state change: the result stays `succeeded` since it finished
    after = api.get("/inference-results", params={"series": series}).json()["results"][0]
    assert after["feedback"] == "final" and after["state_since"] == result["state_since"]


def test_shadow_runs_and_publishes_nothing(ai: LiveServer, api: httpx.Client) -> None:
    assert api.post("/models", json={**LUNGS, "version": "2.0.0", "status": "shadow"}).status_code == 201
    source = stow_chest(api)
    result = result_of(api, source.SeriesInstanceUID, "lungs", ("succeeded", "failed"))
    assert result["state"] == "succeeded" and result["shadow"] is True
    assert result["stats"]["lung_area_fraction"] > 0.1  # recorded for comparison
    assert result["outputs"] == {"series": None, "instances": []} and result["report"] is None
    series = api.get(f"/dicom-web/studies/{source.StudyInstanceUID}/series").json()
    assert [s["00080060"]["Value"][0] for s in series] == ["CR"]
    assert api.get("/fhir/DiagnosticReport").json().get("total", 0) == 0
    # the active version then runs on demand: only its result is published, and the two are compared
    assert api.post("/models", json=LUNGS).status_code == 201
    accepted = api.post(
        "/inference-requests",
        json={"study": source.StudyInstanceUID, "series": source.SeriesInstanceUID, "model": "lungs"},
    )
    assert accepted.status_code == 202 and accepted.json()["version"] == "1.0.0"
    wait_for(lambda: api.get(accepted.headers["location"]).json()["state"] == "succeeded")
    series = api.get(f"/dicom-web/studies/{source.StudyInstanceUID}/series").json()
    assert sorted(s["00080060"]["Value"][0] for s in series) == ["CR", "SEG"]
    assert api.get("/fhir/DiagnosticReport").json().get("total") == 1
    compared = api.get("/models/lungs/2.0.0/summary").json()
    assert compared["shadow_runs"] == 1
    assert compared["compared_with"]["1.0.0"]["series"] == 1
    assert compared["compared_with"]["1.0.0"]["mean_abs_difference"]["lung_area_fraction"] == pytest.approx(0)


def test_failing_model_retries_then_reports(ai: LiveServer, api: httpx.Client) -> None:
    broken = {**LUNGS, "name": "broken", "outputs": ["SEG"], "backend": {"adapter": "test-always-fails"}}
    assert api.post("/models", json=broken).status_code == 201
    source = stow_chest(api)
    result = result_of(api, source.SeriesInstanceUID, "broken", ("failed",))
    assert result["attempts"] == 2  # HOUNSFIELD_INFERENCE_MAX_ATTEMPTS, with a backoff between
    assert "test model refuses 1 images" in result["error"]
    accepted = api.post(
        "/inference-requests",
        json={"study": source.StudyInstanceUID, "series": source.SeriesInstanceUID, "model": "broken"},
    )
    assert accepted.status_code == 202  # a failed result runs again on demand
    status = api.get(accepted.headers["location"]).json()
    assert status["state"] in ("queued", "running", "retrying")


def test_registry_api_and_policy(ai: LiveServer, api: httpx.Client) -> None:
    referring = bearer(ai.token(sub="dr-who", roles=["referring"], scopes=[]))
    radiologist = bearer(ai.token(sub="rad", roles=["radiologist"], scopes=[]))
    assert api.post("/models", json=LUNGS, headers=referring).status_code == 403
    assert api.post("/models", json=LUNGS, headers=radiologist).status_code == 403
    assert api.get("/models", headers=referring).status_code == 403
    assert api.post("/models", json=LUNGS).status_code == 201
    assert api.post("/models", json=LUNGS).status_code == 409
    assert api.post("/models", json={**LUNGS, "version": "2.0.0", "status": "shadow"}).status_code == 201
    bad = api.post("/models", json={**LUNGS, "version": "3", "selector": {"series_description": "("}})
    assert bad.status_code == 400 and "series_description" in bad.json()["error"]
    assert api.post("/models", json={**LUNGS, "version": "4", "backend": {"adapter": "nope"}}).status_code == 400
    assert api.post("/models/lungs/2.0.0/promote", headers=radiologist).status_code == 403
    promoted = api.post("/models/lungs/2.0.0/promote")
    assert promoted.status_code == 200 and promoted.json()["status"] == "active"
    listed = {m["version"]: m["status"] for m in api.get("/models", headers=radiologist).json()["models"]}
    assert listed == {"1.0.0": "retired", "2.0.0": "active"}
    assert api.post("/models/lungs/9/retire").status_code == 404
    assert api.post("/models/lungs/1.0.0/shadow").json()["status"] == "shadow"
    missing = api.post("/inference-requests", json={"study": "1.2.3", "series": "1.2.4", "model": "lungs"})
    assert missing.status_code == 404
    assert api.get("/inference-requests/not-a-uuid").status_code == 404


def test_patient_bound_tokens_reach_only_their_patients_runs(ai: LiveServer, api: httpx.Client) -> None:
    """A SMART token bound to one patient (`patient/` scopes and a `patient` claim) with a role that may request
    runs: it may start one on its patient's study, read that request and see its results, but not start, read
    or list runs on another patient's study."""
    assert api.post("/models", json=LUNGS).status_code == 201
    ds = stow_chest(api)
    study, series, patient = ds.StudyInstanceUID, ds.SeriesInstanceUID, str(ds.PatientID)

    def bound(to: str) -> dict[str, str]:
        return bearer(ai.token(sub="app", roles=["radiologist"], scopes=["patient/*.cruds"], patient=to))

    own, other = bound(patient), bound(patient + "-other")
    body = {"study": study, "series": series, "model": "lungs"}
    refused = api.post("/inference-requests", json=body, headers=other)
    assert refused.status_code == 403, refused.text
    accepted = api.post("/inference-requests", json=body, headers=own)
    assert accepted.status_code == 202, accepted.text
    location = accepted.headers["location"]
    assert api.get(location, headers=other).status_code == 403
    assert api.get(location, headers=own).json()["series"] == series
    assert api.get("/inference-results", params={"series": series}, headers=other).json()["results"] == []
    [mine] = api.get("/inference-results", params={"series": series}, headers=own).json()["results"]
    assert mine["study"] == study
    assert len(api.get("/inference-results", params={"series": series}).json()["results"]) == 1  # admin: all
