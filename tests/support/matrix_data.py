"""The authorization matrix's data set, stored through the public interface as an admin: several patients and
modalities (STOW-RS), DiagnosticReports (one moved to another patient, so that its versions are filed under two
patients), the ImagingStudy, Patient and Endpoint resources the FHIR sync derives, a Subscription, inference
results (one model that fails, one that measures), a break-glass session for one patient, and an attempt to
file an instance of one patient into another's study.

The result (`DataSet`) is what the request generators fill routes from and what the extractors map identifiers
back to patients with: every identifier a response can name (Patient ID, study/series/instance UID, FHIR id)
is a token mapped to its patient (and study)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydicom.uid import generate_uid

from tests.support.factory import ct, multipart, part10, stow_headers

FHIR_JSON = "application/fhir+json"
T = TypeVar("T")


@dataclass(frozen=True)
class Study:
    patient: str
    modality: str
    study: str
    series: str
    instance: str
    bulk_tag: str = ""


STUDIES: tuple[tuple[str, str], ...] = (
    ("P1", "CT"),  # in dr-who's care list
    ("P2", "MR"),  # in both care lists
    ("P3", "CT"),  # opted out of research
    ("P4", "MG"),  # in dr-house's care list; MG is restricted to radiologists and admins
    ("P4", "CT"),
    ("P5", "MG"),  # in no care list: the break-glass session's patient
    ("P6", "CT"),  # in no care list
)
PATIENTS = tuple(dict.fromkeys(p for p, _ in STUDIES))


@dataclass(frozen=True)
class Version:
    vid: str
    patient: str | None


@dataclass(frozen=True)
class FhirResource:
    type: str
    id: str
    patient: str | None
    """The patient of the current version (None: a resource of no patient, e.g. an Endpoint)."""
    study: str | None
    versions: tuple[Version, ...]


@dataclass(frozen=True)
class InferenceRun:
    id: str
    patient: str
    study: str
    series: str


@dataclass
class DataSet:
    studies: list[Study]
    fhir: dict[str, list[FhirResource]] = field(default_factory=dict)
    runs: list[InferenceRun] = field(default_factory=list)
    models: list[tuple[str, str]] = field(default_factory=list)
    break_glass_session: str = ""
    audit_event: str = ""
    moved_report: str = ""
    loaded_at: str = ""
    """When the data set was complete (an instant: the audit export of the matrix stops there)."""
    subscriptions: list[str] = field(default_factory=list)
    intruder: tuple[str, str] | None = None
    """(series, instance) of P5's instance the archive accepted into P1's study, if it did."""
    patient_ids: dict[str, str] = field(default_factory=dict)
    """FHIR Patient id -> Patient ID."""
    tokens: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    """Identifier -> (patient, study or None)."""

    def study(self, uid: str) -> Study | None:
        return next((s for s in self.studies if uid in (s.study, s.series, s.instance)), None)

    def studies_of(self, patient: str) -> set[str]:
        """Every study holding data of `patient` (a study of another patient, when the archive let one in)."""
        return {study for p, study in self.tokens.values() if p == patient and study is not None}

    def modality(self, study_uid: str | None) -> str | None:
        found = self.study(study_uid) if study_uid else None
        return found.modality if found else None

    def patient_of(self, rtype: str, resource: dict[str, Any]) -> str | None:
        """The Patient ID a FHIR resource belongs to (its identifier, or its subject's)."""
        if rtype == "Patient":
            return str(resource["identifier"][0]["value"])
        ref = (resource.get("subject") or {}).get("reference")
        return self.patient_ids.get(ref.rsplit("/", 1)[-1]) if isinstance(ref, str) else None

    def patient_fhir_id(self, patient: str) -> str:
        return next(r.id for r in self.fhir["Patient"] if r.patient == patient)

    def imaging_study_id(self, study_uid: str) -> str:
        return next(r.id for r in self.fhir["ImagingStudy"] if r.study == study_uid)


async def wait_for(check: Callable[[], Awaitable[T | None]], what: str, seconds: float = 60.0) -> T:
    """Poll `check` until it returns a value (bounded: fails after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _ok(response: httpx.Response, *expected: int) -> Any:
    assert response.status_code in (expected or (200,)), (response.request.url, response.status_code, response.text)
    return response.json() if response.content else None


async def _store(http: httpx.AsyncClient) -> list[Study]:
    """One instance a study (32x32, so that its pixel data is bulk data). Study UIDs are `2.25.` UIDs (about 44
    characters): short enough that a 64-character DIMSE error comment naming one has room left for more."""
    datasets = [
        ct(generate_uid(prefix=None), PatientID=patient, Modality=modality, rows=32, columns=32, seed=i)
        for i, (patient, modality) in enumerate(STUDIES)
    ]
    body = multipart([part10(d) for d in datasets])
    _ok(await http.post("/dicom-web/studies", content=body, headers=stow_headers()))
    studies = []
    for d in datasets:
        url = f"/dicom-web/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}/instances/{d.SOPInstanceUID}"
        [meta] = _ok(await http.get(url + "/metadata", headers={"Accept": "application/dicom+json"}))
        bulk = [v["BulkDataURI"].rsplit("/bulk/", 1)[1] for v in meta.values() if "BulkDataURI" in v]
        assert bulk, "an instance of the data set has no bulk data element"
        studies.append(
            Study(d.PatientID, d.Modality, d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID, bulk[0])
        )
    return studies


async def _intruder(http: httpx.AsyncClient, data: DataSet) -> None:
    """An instance of P5 sent into P1's study, in a series of its own: the archive must refuse it (a study has
    one patient). Where it is stored anyway, the data set knows it as P5's data inside P1's study, and waits
    until the FHIR sync has taken it in."""
    p1 = next(s for s in data.studies if s.patient == "P1")
    intruder = ct(p1.study, PatientID="P5", Modality="CT", rows=32, columns=32, seed=99)
    response = await http.post("/dicom-web/studies", content=multipart([part10(intruder)]), headers=stow_headers())
    assert response.status_code in (200, 202, 400, 409), (response.status_code, response.text)
    stored = await http.get(
        f"/dicom-web/studies/{p1.study}/series", params={"SeriesInstanceUID": intruder.SeriesInstanceUID}
    )
    if stored.status_code != 200 or not stored.content or not stored.json():
        return
    data.intruder = (intruder.SeriesInstanceUID, intruder.SOPInstanceUID)

    async def synced() -> bool:
        found = await _search(http, "ImagingStudy", identifier=f"urn:oid:{p1.study}")
        return any(s.get("uid") == intruder.SeriesInstanceUID for r in found for s in r.get("series", []))

    await wait_for(synced, "the FHIR sync of the instance filed into another patient's study")


async def _search(http: httpx.AsyncClient, rtype: str, **params: Any) -> list[dict[str, Any]]:
    bundle = _ok(await http.get(f"/fhir/{rtype}", params={"_count": 500, **params}))
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]


async def _wait_for_sync(http: httpx.AsyncClient, studies: list[Study]) -> None:
    async def synced() -> bool:
        found = await _search(http, "ImagingStudy")
        return len(found) == len(studies) and len(await _search(http, "Patient")) == len(PATIENTS)

    await wait_for(synced, "the FHIR sync of the data set's studies")


def _report(patient_id: str, imaging: str | None, text: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": text},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    if imaging:
        body["imagingStudy"] = [{"reference": f"ImagingStudy/{imaging}"}]
    return body


async def _reports(http: httpx.AsyncClient, data: DataSet) -> None:
    """Reports of P1, P3, P4 (on its MG study), P5, P6; one created for P5 and moved to P1 by an update."""
    headers = {"Content-Type": FHIR_JSON}
    for patient in ("P1", "P3", "P4", "P5", "P6"):
        study = next((s for s in data.studies if s.patient == patient), None)
        imaging = data.imaging_study_id(study.study) if study and patient != "P6" else None
        body = _report(data.patient_fhir_id(patient), imaging, f"report of {patient}")
        _ok(await http.post("/fhir/DiagnosticReport", json=body, headers=headers), 201)
    p5 = next(s for s in data.studies if s.patient == "P5")
    p1 = next(s for s in data.studies if s.patient == "P1")
    first = _report(data.patient_fhir_id("P5"), data.imaging_study_id(p5.study), "moved report")
    created = _ok(await http.post("/fhir/DiagnosticReport", json=first, headers=headers), 201)
    moved = {
        **_report(data.patient_fhir_id("P1"), data.imaging_study_id(p1.study), "moved report"),
        "id": created["id"],
    }
    _ok(await http.put(f"/fhir/DiagnosticReport/{created['id']}", json=moved, headers=headers))
    data.moved_report = created["id"]


async def _subscription(http: httpx.AsyncClient, data: DataSet, hook: str) -> None:
    body = {
        "resourceType": "Subscription",
        "status": "off",
        "reason": "authorization matrix",
        "criteria": "DiagnosticReport?status=final",
        "channel": {"type": "rest-hook", "endpoint": hook, "payload": FHIR_JSON},
    }
    created = _ok(await http.post("/fhir/Subscription", json=body, headers={"Content-Type": FHIR_JSON}), 201)
    data.subscriptions.append(created["id"])


MODELS = (
    {"name": "fails", "adapter": "test-always-fails", "runs": ("P1", "P4", "P5"), "state": "failed"},
    {"name": "measures", "adapter": "test-measures", "runs": ("P2",), "state": "succeeded"},
)


async def _inference(http: httpx.AsyncClient, data: DataSet) -> None:
    """On-demand runs (the selectors match nothing stored, so nothing runs on ingest; the admin overrides them for
    these runs): failures on P1, P4 (MG) and P5 (MG), a result with an AI DiagnosticReport on P2."""
    for model in MODELS:
        registration = {
            "name": model["name"],
            "version": "1",
            "task": "authorization matrix",
            "selector": {"modality": ["OT"]},
            "outputs": ["DiagnosticReport"],
            "status": "active",
            "backend": {"adapter": model["adapter"], "backend": "in-process"},
        }
        _ok(await http.post("/models", json=registration), 201)
        data.models.append((str(model["name"]), "1"))
        for patient in model["runs"]:
            study = next(s for s in data.studies if s.patient == patient and (patient != "P4" or s.modality == "MG"))
            body = {"study": study.study, "series": study.series, "model": model["name"], "override_selector": True}
            accepted = await http.post("/inference-requests", json=body)
            _ok(accepted, 202)
            rid = accepted.headers["location"].rsplit("/", 1)[1]
            data.runs.append(InferenceRun(rid, patient, study.study, study.series))

            async def finished(rid: str = rid, state: Any = model["state"]) -> bool:
                status = _ok(await http.get(f"/inference-requests/{rid}"))
                assert status["state"] in ("queued", "running", "retrying", state), status
                return bool(status["state"] == state)

            await wait_for(finished, f"inference run {model['name']} on {patient}")


async def _break_glass(http: httpx.AsyncClient, token: str, patient: str) -> str:
    body = {"reason": "authorization matrix: emergency access", "patient_id": patient}
    started = await http.post("/break-glass", json=body, headers={"Authorization": f"Bearer {token}"})
    return str(_ok(started, 201)["id"])


async def _versions(http: httpx.AsyncClient, data: DataSet, rtype: str, rid: str) -> tuple[Version, ...]:
    bundle = _ok(await http.get(f"/fhir/{rtype}/{rid}/_history", params={"_count": 100}))
    versions = [
        Version(e["resource"]["meta"]["versionId"], data.patient_of(rtype, e["resource"]))
        for e in bundle.get("entry", [])
        if "resource" in e
    ]
    return tuple(sorted(versions, key=lambda v: int(v.vid)))


async def _fhir(http: httpx.AsyncClient, data: DataSet) -> None:
    """Every FHIR resource of the data set, with its versions and the patient each version was filed under
    (Subscriptions cannot be searched: the one the data set made is read by id)."""
    for rtype in ("Patient", "ImagingStudy", "Endpoint", "DiagnosticReport", "Subscription"):
        if rtype == "Subscription":
            items = [_ok(await http.get(f"/fhir/Subscription/{sid}")) for sid in data.subscriptions]
        else:
            items = await _search(http, rtype)
        found: list[FhirResource] = []
        for resource in items:
            patient = data.patient_of(rtype, resource)
            if rtype == "Patient" and patient:
                data.patient_ids[resource["id"]] = patient
            study = None
            if rtype == "ImagingStudy":
                study = resource["identifier"][0]["value"].removeprefix("urn:oid:")
            versions = await _versions(http, data, rtype, resource["id"])
            found.append(FhirResource(rtype, resource["id"], patient, study, versions))
        data.fhir[rtype] = found


def _tokens(data: DataSet) -> dict[str, tuple[str, str | None]]:
    tokens: dict[str, tuple[str, str | None]] = {p: (p, None) for p in PATIENTS}
    for s in data.studies:
        for uid in (s.study, s.series, s.instance):
            tokens[uid] = (s.patient, s.study)
    if data.intruder is not None:
        p1 = next(s for s in data.studies if s.patient == "P1")
        for uid in data.intruder:
            tokens[uid] = ("P5", p1.study)
    for resources in data.fhir.values():
        for r in resources:
            if r.patient is not None and r.id != data.moved_report:
                tokens[r.id] = (r.patient, r.study)
    return tokens


async def build(http: httpx.AsyncClient, break_glass_tokens: dict[str, str], hook: str) -> DataSet:
    """Store the data set through `http` (an admin client) and read back every identifier it made."""
    data = DataSet(await _store(http))
    await _wait_for_sync(http, data.studies)
    await _fhir(http, data)
    await _reports(http, data)
    await _subscription(http, data, hook)
    await _inference(http, data)
    for patient, token in break_glass_tokens.items():
        data.break_glass_session = await _break_glass(http, token, patient)
    await _intruder(http, data)
    await _fhir(http, data)
    events = await _search(http, "AuditEvent", patient="P5", _count=1)
    assert events, "no audit event names P5"
    data.audit_event = events[0]["id"]
    data.tokens = _tokens(data)
    data.loaded_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return data
