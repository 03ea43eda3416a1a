"""ImagingStudy, Patient and Endpoint derived from the archive (fhir/imagingstudy.py, fhir/sync.py): studies
stored over STOW-RS become FHIR resources within seconds through the `fhir.sync` job, each change a new version
and none when nothing changed; one Patient per identifier even when jobs race; a backfill at start covers
studies stored before; a study that left the index loses its ImagingStudy. The pure DICOM -> FHIR mapping is
tested below (dates and timezones, names, gender, body sites, issuers, missing attributes), each resource
validated with the `fhir.resources.R4B` models."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fhir import imagingstudy as mapping
from fhir import sync
from fhir.bodyparts import BODY_PARTS
from fhir.imagingstudy import InstanceData, SeriesData
from fhir.repository import FhirRepository, Filing
from server.platform import db, jobs
from server.settings import Settings, SettingsError
from tests.conftest import LiveServer
from tests.support.factory import ct, multipart, part10, stow_headers
from tests.support.sql import query

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


# --- helpers -------------------------------------------------------------------------------------------------


def stow(http: httpx.Client, datasets: list[Dataset]) -> None:
    response = http.post("/dicom-web/studies", content=multipart([part10(d) for d in datasets]), headers=stow_headers())
    assert response.status_code == 200, response.text


def resource(dsn: str, resource_type: str, source_key: str) -> asyncpg.Record | None:
    rows = query(
        dsn,
        "SELECT id, version, deleted, content, patient_key, modalities FROM fhir_resources "
        "WHERE resource_type = $1 AND source_key = $2",
        resource_type,
        source_key,
    )
    return rows[0] if rows else None


def by_id(dsn: str, resource_type: str, rid: str) -> asyncpg.Record:
    rows = query(
        dsn,
        "SELECT id, version, deleted, content, patient_key, source_key FROM fhir_resources "
        "WHERE resource_type = $1 AND id = $2",
        resource_type,
        rid,
    )
    assert rows, f"{resource_type}/{rid} does not exist"
    return rows[0]


def content(row: asyncpg.Record) -> dict[str, Any]:
    value = row["content"]
    loaded: dict[str, Any] = json.loads(value) if isinstance(value, str) else dict(value)
    return loaded


def wait_for(check: Callable[[], Any], seconds: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_version(dsn: str, study_uid: str, version: int) -> asyncpg.Record:
    def check() -> asyncpg.Record | None:
        row = resource(dsn, "ImagingStudy", study_uid)
        return row if row is not None and row["version"] >= version else None

    row: asyncpg.Record = wait_for(check, what=f"ImagingStudy version {version}")
    return row


def complete(dsn: str, study_uid: str, instances: int) -> asyncpg.Record | None:
    row = resource(dsn, "ImagingStudy", study_uid)
    return row if row is not None and content(row)["numberOfInstances"] == instances else None


def jobs_settled(dsn: str) -> bool:
    rows = query(dsn, "SELECT count(*) AS n FROM jobs WHERE kind = 'fhir.sync' AND state IN ('queued', 'running')")
    return int(rows[0]["n"]) == 0


def enqueue(dsn: str, study_uid: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await sync.enqueue_sync(conn, study_uid)
        finally:
            await conn.close()

    asyncio.run(run())


# --- through the public interface ----------------------------------------------------------------------------


@pytest.fixture
def slow_sync(make_server: Any) -> Iterator[tuple[LiveServer, httpx.Client]]:
    """A server whose sync waits 2 s after an instance (room for a slow machine: one request, one version)."""
    server: LiveServer = make_server(fhir_sync_delay_seconds=2.0)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        yield server, http


def test_stow_makes_imagingstudy_patient_endpoint_and_versions(slow_sync: tuple[LiveServer, httpx.Client]) -> None:
    server, http = slow_sync
    study = generate_uid()
    ct_series, pt_series, new_series = generate_uid(), generate_uid(), generate_uid()
    common: dict[str, Any] = dict(
        PatientID="P-4711",
        PatientName="Doe^Jane^Q^Dr^III",
        PatientSex="F",
        PatientBirthDate="19700215",
        AccessionNumber="ACC-1",
        StudyID="S-9",
        StudyDescription="CT chest abdomen",
        ReferringPhysicianName="House^Gregory",
        StudyDate="20240102",
        StudyTime="101530.25",
        TimezoneOffsetFromUTC="+0100",
    )
    first = [
        ct(study, ct_series, InstanceNumber=2, SeriesNumber=1, BodyPartExamined="CHEST", **common),
        ct(study, ct_series, InstanceNumber=1, SeriesNumber=1, BodyPartExamined="CHEST", **common),
        ct(study, pt_series, InstanceNumber=1, SeriesNumber=2, Modality="PT", Laterality="L", **common),
    ]
    stow(http, first)
    row = wait_for(lambda: complete(server.dsn, study, 3), what="the ImagingStudy of 3 instances")
    assert row["version"] == 1 and row["patient_key"] == "P-4711" and list(row["modalities"]) == ["CT", "PT"]
    body = content(row)
    ImagingStudy.model_validate(body)
    assert body["status"] == "available"
    assert body["identifier"][0] == {"use": "official", "system": "urn:dicom:uid", "value": f"urn:oid:{study}"}
    accession = body["identifier"][1]
    assert accession["value"] == "ACC-1" and accession["type"]["coding"][0]["code"] == "ACSN"
    assert body["identifier"][2] == {"use": "secondary", "value": "S-9"}
    assert [m["code"] for m in body["modality"]] == ["CT", "PT"]
    assert body["started"] == "2024-01-02T10:15:30.25+01:00"
    assert body["numberOfSeries"] == 2 and body["numberOfInstances"] == 3
    assert body["description"] == "CT chest abdomen" and body["referrer"] == {"display": "Gregory House"}
    ct_entry, pt_entry = body["series"]
    assert ct_entry["uid"] == ct_series and ct_entry["number"] == 1 and ct_entry["numberOfInstances"] == 2
    assert ct_entry["modality"] == {"system": mapping.DCM, "code": "CT"}
    assert ct_entry["bodySite"] == {"system": mapping.SCT, "code": "816094009", "display": "Chest"}
    assert [i["number"] for i in ct_entry["instance"]] == [1, 2]
    assert ct_entry["instance"][0]["sopClass"] == {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{CT_IMAGE}"}
    assert pt_entry["laterality"]["code"] == "419161000" and pt_entry["numberOfInstances"] == 1
    stored_uids = {d.SOPInstanceUID for d in first}
    assert {i["uid"] for s in body["series"] for i in s["instance"]} == stored_uids

    patient_ref = body["subject"]["reference"]
    assert patient_ref.startswith("Patient/")
    patient = by_id(server.dsn, "Patient", patient_ref.removeprefix("Patient/"))
    patient_body = content(patient)
    Patient.model_validate(patient_body)
    assert patient["patient_key"] == "P-4711" and patient["source_key"] == "|P-4711"
    assert patient_body["identifier"] == [{"value": "P-4711"}]
    assert patient_body["name"] == [{"family": "Doe", "given": ["Jane", "Q"], "prefix": ["Dr"], "suffix": ["III"]}]
    assert patient_body["gender"] == "female" and patient_body["birthDate"] == "1970-02-15"

    endpoint = by_id(server.dsn, "Endpoint", body["endpoint"][0]["reference"].removeprefix("Endpoint/"))
    endpoint_body = content(endpoint)
    Endpoint.model_validate(endpoint_body)
    assert endpoint_body["address"] == server.dicomweb == f"{server.url}/dicom-web"
    assert endpoint_body["connectionType"]["code"] == "dicom-wado-rs" and endpoint_body["status"] == "active"

    # A new series: a new version with the new counts; the Patient and the Endpoint did not change.
    added = ct(study, new_series, InstanceNumber=1, SeriesNumber=3, Modality="MR", **common)
    stow(http, [added])
    row = wait_version(server.dsn, study, 2)
    body = content(row)
    ImagingStudy.model_validate(body)
    assert row["version"] == 2 and body["meta"]["versionId"] == "2"
    assert body["numberOfSeries"] == 3 and body["numberOfInstances"] == 4
    assert [m["code"] for m in body["modality"]] == ["CT", "MR", "PT"] and list(row["modalities"]) == ["CT", "MR", "PT"]
    assert by_id(server.dsn, "Patient", patient["id"])["version"] == 1
    assert by_id(server.dsn, "Endpoint", endpoint["id"])["version"] == 1

    # The same bytes again, and a sync job run again by hand: no new version of anything.
    stow(http, [added, *first])
    enqueue(server.dsn, study)
    wait_for(lambda: jobs_settled(server.dsn), what="the sync jobs to finish")
    time.sleep(server.settings.fhir_sync_delay_seconds + 0.5)
    wait_for(lambda: jobs_settled(server.dsn), what="the sync jobs to finish")
    assert resource(server.dsn, "ImagingStudy", study)["version"] == 2  # type: ignore[index]
    history = query(server.dsn, "SELECT version FROM fhir_history WHERE resource_type = 'ImagingStudy'")
    assert sorted(r["version"] for r in history) == [1, 2]
    assert by_id(server.dsn, "Patient", patient["id"])["version"] == 1
    assert len(query(server.dsn, "SELECT 1 FROM fhir_resources WHERE resource_type = 'Endpoint'")) == 1

    # The REST read route serves what the job wrote.
    read = http.get(f"/fhir/ImagingStudy/{row['id']}", headers={"Accept": "application/fhir+json"})
    assert read.status_code == 200, read.text
    assert read.json()["numberOfInstances"] == 4 and read.headers["ETag"] == 'W/"2"'


def test_one_patient_per_identifier_and_burst_makes_one_version(slow_sync: tuple[LiveServer, httpx.Client]) -> None:
    server, http = slow_sync
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    series_a = generate_uid()
    # One request of 6 instances of one study: one job, one version.
    stow(http, [ct(a, series_a, PatientID="P1", InstanceNumber=n) for n in range(6)])
    stow(http, [ct(b, PatientID="P1")])
    stow(http, [ct(c, PatientID="P1", IssuerOfPatientID="1.2.3.4")])  # same Patient ID, another issuer
    rows = {uid: wait_version(server.dsn, uid, 1) for uid in (b, c)}
    rows[a] = wait_for(lambda: complete(server.dsn, a, 6), what="the ImagingStudy of 6 instances")
    assert rows[a]["version"] == 1 and content(rows[a])["numberOfInstances"] == 6
    subjects = {uid: content(r)["subject"]["reference"] for uid, r in rows.items()}
    assert subjects[a] == subjects[b] != subjects[c]
    patients = query(server.dsn, "SELECT source_key, patient_key FROM fhir_resources WHERE resource_type = 'Patient'")
    assert sorted((p["source_key"], p["patient_key"]) for p in patients) == [
        ("urn:oid:1.2.3.4|P1", "P1"),
        ("|P1", "P1"),
    ]
    issued = by_id(server.dsn, "Patient", subjects[c].removeprefix("Patient/"))
    assert content(issued)["identifier"] == [{"system": "urn:oid:1.2.3.4", "value": "P1"}]


def test_concurrent_syncs_of_one_new_patient_make_one_patient(make_server: Any) -> None:
    server: LiveServer = make_server(worker_enabled=False)
    studies = [generate_uid() for _ in range(6)]
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        for uid in studies:
            stow(http, [ct(uid, PatientID="RACE-1", PatientName=f"Race^{uid[-4:]}")])
    address = "http://archive.example/dicom-web"

    async def run() -> list[sync.SyncResult]:
        pool = await db.create_pool(server.dsn, 1, len(studies) * 2)
        repo = FhirRepository()
        try:

            async def one(uid: str) -> sync.SyncResult:
                async with pool.acquire() as conn:
                    return await sync.sync_study(conn, repo, uid, endpoint_address=address)

            results = list(await asyncio.gather(*(one(uid) for uid in studies)))
            results += list(await asyncio.gather(*(one(uid) for uid in studies)))  # again: nothing changes
            return results
        finally:
            await pool.close()

    results = asyncio.run(run())
    assert [r.changed for r in results] == [True] * len(studies) + [False] * len(studies)
    patients = query(server.dsn, "SELECT id, version, content FROM fhir_resources WHERE resource_type = 'Patient'")
    assert len(patients) == 1
    # The Patient shows the newest study's name, whichever job ran last.
    newest = query(server.dsn, "SELECT study_uid FROM studies ORDER BY study_pk DESC LIMIT 1")[0]["study_uid"]
    assert content(patients[0])["name"] == [{"family": "Race", "given": [newest[-4:]]}]
    endpoints = query(server.dsn, "SELECT content FROM fhir_resources WHERE resource_type = 'Endpoint'")
    assert len(endpoints) == 1 and content(endpoints[0])["address"] == address
    assert {
        r.imaging_study.content["subject"]["reference"] for r in results if r.imaging_study and r.imaging_study.content
    } == {f"Patient/{patients[0]['id']}"}


def test_backfill_at_start_and_removal_of_studies_gone(make_server: Any) -> None:
    # An archive from before FHIR sync: studies in the index, no jobs, no resources; one stale ImagingStudy.
    old = make_server(worker_enabled=False)
    kept, gone = generate_uid(), generate_uid()
    with httpx.Client(base_url=old.url, headers=old.headers, timeout=60) as http:
        stow(http, [ct(kept, PatientID="P2"), ct(kept, PatientID="P2")])
    query(old.dsn, "DELETE FROM jobs WHERE kind = 'fhir.sync'")

    async def stale() -> None:
        conn = await asyncpg.connect(old.dsn)
        try:
            async with conn.transaction():
                await FhirRepository().create(conn, "ImagingStudy", {"status": "available"}, Filing("P9", (), gone))
        finally:
            await conn.close()

    asyncio.run(stale())
    upgraded = make_server()  # the worker's start queues the backfill
    row = wait_version(upgraded.dsn, kept, 1)
    assert content(row)["numberOfInstances"] == 2
    wait_for(lambda: resource(upgraded.dsn, "ImagingStudy", gone)["deleted"], what="the stale ImagingStudy deleted")  # type: ignore[index]

    # A study removed from the index (as a future DICOMweb DELETE would) loses its ImagingStudy at the next sync.
    query(upgraded.dsn, "DELETE FROM studies WHERE study_uid = $1", kept)
    enqueue(upgraded.dsn, kept)
    wait_for(lambda: resource(upgraded.dsn, "ImagingStudy", kept)["deleted"], what="the ImagingStudy deleted")  # type: ignore[index]
    history = query(
        upgraded.dsn,
        "SELECT h.method FROM fhir_history h JOIN fhir_resources r USING (resource_type, id) "
        "WHERE r.resource_type = 'ImagingStudy' AND r.source_key = $1 ORDER BY h.version",
        kept,
    )
    assert [h["method"] for h in history] == ["POST", "DELETE"]


def test_public_url_is_the_endpoint_address(make_server: Any) -> None:
    server: LiveServer = make_server(public_url="https://pacs.example.org/archive")
    study = generate_uid()
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        stow(http, [ct(study)])
    row = wait_version(server.dsn, study, 1)
    endpoint = by_id(server.dsn, "Endpoint", content(row)["endpoint"][0]["reference"].removeprefix("Endpoint/"))
    assert content(endpoint)["address"] == "https://pacs.example.org/archive/dicom-web"


def test_delay_setting() -> None:
    assert Settings.from_env({}).fhir_sync_delay_seconds == 1.0
    assert Settings.from_env({"HOUNSFIELD_FHIR_SYNC_DELAY_MS": "250"}).fhir_sync_delay_seconds == 0.25
    with pytest.raises(SettingsError, match="HOUNSFIELD_FHIR_SYNC_DELAY_MS"):
        Settings.from_env({"HOUNSFIELD_FHIR_SYNC_DELAY_MS": "-1"})


def test_bad_job_payload_fails_for_good(dsn: str) -> None:
    async def run() -> None:
        pool = await db.create_pool(dsn, 1, 2)
        try:
            handler = sync.sync_handler(pool, FhirRepository(), "http://x/dicom-web")
            with pytest.raises(jobs.PermanentJobError):
                await handler(jobs.Job(1, sync.SYNC_JOB, {"nothing": True}, 1, 8))
            async with pool.acquire() as conn:  # a sync of a study never stored changes nothing
                result = await sync.sync_study(conn, FhirRepository(), "1.2.3", endpoint_address="http://x/dicom-web")
                assert result == sync.SyncResult("1.2.3", None, False)
                assert await conn.fetchval("SELECT count(*) FROM fhir_resources") == 0
        finally:
            await pool.close()

    asyncio.run(run())


# --- the pure mapping ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("da", "tm", "tz", "expected"),
    [
        ("20240102", "101530", "+0100", "2024-01-02T10:15:30+01:00"),
        ("20240102", "101530.123456", "-0500", "2024-01-02T10:15:30.123456-05:00"),
        ("20240102", "1015", "+0000", "2024-01-02T10:15:00+00:00"),
        ("20240102", "10", "+1400", "2024-01-02T10:00:00+14:00"),
        ("20240102", "10:15:30", "+0530", "2024-01-02T10:15:30+05:30"),
        ("20240102", "101530", None, "2024-01-02"),  # no offset: the date alone, never a guessed instant
        ("20240102", None, "+0100", "2024-01-02"),
        ("20240102", "251530", "+0100", "2024-01-02"),
        ("20240102", "101530", "+1500", "2024-01-02"),
        ("20240102", "101530", "0100", "2024-01-02"),
        ("2024.01.02", None, None, "2024-01-02"),
        ("20240230", "101530", "+0100", None),
        ("2024", None, None, None),
        (None, "101530", "+0100", None),
    ],
)
def test_datetimes(da: str | None, tm: str | None, tz: str | None, expected: str | None) -> None:
    assert mapping.fhir_datetime(da, tm, tz) == expected


def test_names_gender_codes() -> None:
    assert mapping.human_name("Doe^John Paul^Q^Dr^Jr") == {
        "family": "Doe",
        "given": ["John", "Paul", "Q"],
        "prefix": ["Dr"],
        "suffix": ["Jr"],
    }
    assert mapping.human_name("Doe") == {"family": "Doe"}
    assert mapping.human_name("^^^^") is None
    assert mapping.display_name("Doe^John^^Dr") == "Dr John Doe"
    attrs = Dataset()
    attrs.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    names = mapping.human_names(attrs.to_json_dict(), mapping.PATIENT_NAME)
    assert names == [
        {"family": "Yamada", "given": ["Tarou"]},
        {"family": "山田", "given": ["太郎"]},
        {"family": "やまだ", "given": ["たろう"]},
    ]
    assert [mapping.gender(s) for s in ("M", "F", "O", "f", "", None, "X")] == [
        "male",
        "female",
        "other",
        "female",
        "unknown",
        "unknown",
        "unknown",
    ]
    assert mapping.body_site("CHEST") == {"system": mapping.SCT, "code": "816094009", "display": "Chest"}
    assert mapping.body_site("c spine") == mapping.body_site("CSPINE")
    assert mapping.body_site("cspine") == {"system": mapping.SCT, "code": "122494005", "display": "Cervical spine"}
    assert mapping.body_site("LEFT PINKY") == {"display": "LEFT PINKY"}
    assert mapping.body_site(None) is None
    assert mapping.laterality("R") == {"system": mapping.SCT, "code": "419465000", "display": "Unilateral right"}
    assert mapping.laterality("U") is None
    assert all(code.isdigit() for code, _ in BODY_PARTS.values()) and len(BODY_PARTS) > 90
    assert mapping.dicomweb_address(None, "127.0.0.1", 8080) == "http://127.0.0.1:8080/dicom-web"
    assert mapping.dicomweb_address(None, "::1", 8080) == "http://[::1]:8080/dicom-web"
    assert mapping.dicomweb_address("https://x.org/a/", "0.0.0.0", 1) == "https://x.org/a/dicom-web"


def _qualified(uid: str, kind: str, type_code: str | None = None) -> Dataset:
    ds = Dataset()
    ds.PatientID = "123"
    item = Dataset()
    item.UniversalEntityID = uid
    item.UniversalEntityIDType = kind
    if type_code:
        item.IdentifierTypeCode = type_code
    ds.IssuerOfPatientIDQualifiersSequence = [item]
    return ds


def test_patient_identity_and_resource() -> None:
    iso = mapping.patient_identity(_qualified("2.16.840.1.113883.3.1", "ISO", "MR").to_json_dict())
    assert iso is not None and iso.system == "urn:oid:2.16.840.1.113883.3.1"
    assert iso.source_key == "urn:oid:2.16.840.1.113883.3.1|123"
    resource = mapping.patient_resource({}, iso)
    Patient.model_validate(resource)
    assert resource["identifier"] == [
        {
            "type": {"coding": [{"system": mapping.V2_0203, "code": "MR"}]},
            "system": "urn:oid:2.16.840.1.113883.3.1",
            "value": "123",
        }
    ]
    assert resource["gender"] == "unknown" and "name" not in resource and "birthDate" not in resource
    uuid = mapping.patient_identity(_qualified("6BA7B810-9DAD-11D1-80B4-00C04FD430C8", "UUID").to_json_dict())
    assert uuid is not None and uuid.system == "urn:uuid:6ba7b810-9dad-11d1-80b4-00c04fd430c8"
    # A Universal Entity ID of another kind falls back to Issuer of Patient ID; free text becomes the assigner.
    dns = _qualified("hospital.example", "DNS")
    dns.IssuerOfPatientID = "General Hospital"
    text_issuer = mapping.patient_identity(dns.to_json_dict())
    assert text_issuer is not None and text_issuer.system is None and text_issuer.source_key == "General Hospital|123"
    assert mapping.patient_resource({}, text_issuer)["identifier"] == [
        {"value": "123", "assigner": {"display": "General Hospital"}}
    ]
    plain = Dataset()
    plain.PatientID = "123"
    plain.IssuerOfPatientID = "urn:example:mrn"
    identity = mapping.patient_identity(plain.to_json_dict())
    assert identity is not None and identity.system == "urn:example:mrn"
    plain.IssuerOfPatientID = "HOSP:A"
    identity = mapping.patient_identity(plain.to_json_dict())
    assert identity is not None and identity.system is None and identity.issuer_text == "HOSP:A"
    empty = Dataset()
    empty.PatientID = ""
    assert mapping.patient_identity(empty.to_json_dict()) is None
    broken = {"00100030": {"vr": "DA", "Value": ["19701301"]}, "00100040": {"vr": "CS", "Value": ["M"]}}
    resource = mapping.patient_resource(broken, None)
    Patient.model_validate(resource)
    assert resource == {"resourceType": "Patient", "gender": "male"}


def test_imagingstudy_with_missing_and_odd_attributes() -> None:
    study = Dataset()  # nothing but the UID: no date, accession, description, referrer
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3.4"
    series.SeriesNumber = -1  # IS may be negative; unsignedInt may not
    series.BodyPartExamined = "PINKY"
    series.PerformingPhysicianName = ["Tech^Alice", "Tech^Bob"]
    series.SeriesDate = "20240105"
    series.SeriesTime = "0830"
    series.TimezoneOffsetFromUTC = "-0300"
    data = [
        SeriesData(
            series.to_json_dict(), [InstanceData("1.2.3.4.1", CT_IMAGE, None), InstanceData("1.2.3.4.2", CT_IMAGE, 2)]
        )
    ]
    body = mapping.imaging_study(study.to_json_dict(), data, study_uid="1.2.3", subject="Patient/p", endpoint=None)
    ImagingStudy.model_validate(body)
    assert body["identifier"] == [{"use": "official", "system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}]
    assert "modality" not in body and "started" not in body and "endpoint" not in body and "referrer" not in body
    entry = body["series"][0]
    assert "number" not in entry and entry["modality"] == {"system": mapping.DCM, "code": "OT"}
    assert entry["bodySite"] == {"display": "PINKY"} and entry["started"] == "2024-01-05T08:30:00-03:00"
    assert entry["performer"] == [{"actor": {"display": "Alice Tech"}}, {"actor": {"display": "Bob Tech"}}]
    assert entry["instance"][0] == {
        "uid": "1.2.3.4.1",
        "sopClass": {"system": mapping.RFC3986, "code": f"urn:oid:{CT_IMAGE}"},
    }
    assert body["numberOfSeries"] == 1 and body["numberOfInstances"] == 2

    coded = Dataset()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "24627-2", "LN", "CT Chest"
    local = Dataset()
    local.CodeValue, local.CodingSchemeDesignator, local.CodeMeaning = "X1", "99LOCAL", "Local thing"
    coded.ProcedureCodeSequence = [code, local]
    issuer = Dataset()
    issuer.UniversalEntityID, issuer.UniversalEntityIDType = "1.2.840.99", "ISO"
    coded.AccessionNumber = "A7"
    coded.IssuerOfAccessionNumberSequence = [issuer]
    coded.NameOfPhysiciansReadingStudy = "Reader^Rita"
    body = mapping.imaging_study(
        coded.to_json_dict(), [], study_uid="1.2.3", subject="Patient/p", endpoint="Endpoint/e"
    )
    ImagingStudy.model_validate(body)
    assert body["procedureCode"] == [
        {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}], "text": "CT Chest"},
        {"text": "Local thing"},
    ]
    assert body["identifier"][1]["system"] == "urn:oid:1.2.840.99" and body["identifier"][1]["value"] == "A7"
    assert body["interpreter"] == [{"display": "Rita Reader"}] and body["endpoint"] == [{"reference": "Endpoint/e"}]
    assert body["numberOfSeries"] == 0 and "series" not in body
