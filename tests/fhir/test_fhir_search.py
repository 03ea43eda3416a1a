"""FHIR R4 search over HTTP on a live server: ImagingStudy, DiagnosticReport, Patient and Endpoint
written through the repository into the server's database, searched with httpx and fhirpy (a FHIR client).
Each parameter type, modifiers, date prefixes, chains, _include/_revinclude, paging followed to the end, sort,
_summary/_elements, strict handling, 400s, and the policy's constraints (a referring physician's care list, a
researcher without opted-out patients, excluded modalities) in pages, totals and included resources. The pure
index extraction and parsing, and the API other parts call (check_query, matching_ids, search_bundle), below."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from dicomweb.search.access import AccessConstraints
from fhir.errors import FhirError
from fhir.repository import FhirRepository, Filing
from fhir.search.index import SearchEntry, entries
from fhir.search.query import (
    DateMatch,
    InvalidSearch,
    ReferenceMatch,
    SearchAccess,
    UnsupportedSearch,
    check_query,
    parse_search,
)
from fhir.search.service import matching_ids, search_bundle
from tests.conftest import LiveServer, bearer

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UID = "urn:dicom:uid"
MRN = "urn:oid:1.2.3.4"
CT_IMAGE = "urn:oid:1.2.840.10008.5.1.4.1.1.2"
UTC = dt.UTC


def utc(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def study(uid: str, patient: str, modality: str, started: str | None, **more: Any) -> dict[str, Any]:
    content: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "status": more.pop("status", "available"),
        "identifier": [{"use": "official", "system": UID, "value": f"urn:oid:{uid}"}],
        "subject": {"reference": f"Patient/{patient}"},
        "endpoint": [{"reference": "Endpoint/dicomweb"}],
        "series": [
            {
                "uid": f"{uid}.1",
                "modality": {"system": DCM, "code": modality},
                "bodySite": {"system": SCT, "code": "51185008", "display": "Thorax"},
                "instance": [{"uid": f"{uid}.1.1", "sopClass": {"system": "urn:ietf:rfc:3986", "code": CT_IMAGE}}],
            }
        ],
        **more,
    }
    if started is not None:
        content["started"] = started
    return content


def patient(mrn: str, family: str, given: list[str], gender: str, birth: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": family, "given": given}],
        "gender": gender,
        "birthDate": birth,
    }


def report(pid: str, sid: str, status: str, when: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "imagingStudy": [{"reference": f"ImagingStudy/{sid}"}],
        **when,
        **more,
    }


# (type, id, content, filing): patients pat1..pat3 are DICOM patients P1..P3; study s4 is a mammogram (MG).
SEED: list[tuple[str, str, dict[str, Any], Filing]] = [
    ("Endpoint", "dicomweb", {
        "status": "active", "name": "Hounsfield DICOMweb",
        "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                           "code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM WADO-RS"}], "address": "http://127.0.0.1/dicom-web",
    }, Filing()),
    ("Patient", "pat1", patient("P1", "Müller", ["Anna"], "female", "1970-05-17"), Filing("P1", (), "|P1")),
    ("Patient", "pat2", patient("P2", "Smith", ["John", "Paul"], "male", "1980"), Filing("P2", (), "|P2")),
    ("Patient", "pat3", {
        **patient("P3", "Doe", ["Jane"], "female", "1990-01-01"), "active": True,
        "telecom": [{"system": "phone", "value": "555-1234"}], "address": [{"city": "Zürich", "country": "CH"}],
        "meta": {"tag": [{"system": "http://example.org/tags", "code": "vip"}]},
    }, Filing("P3", (), "|P3")),
    ("ImagingStudy", "s1", study("1.2.1", "pat1", "CT", "2024-05-17T10:00:00Z",
                                 referrer={"reference": "Practitioner/dr1"},
                                 basedOn=[{"reference": "ServiceRequest/sr1"}]), Filing("P1", ("CT",))),
    ("ImagingStudy", "s2", study("1.2.2", "pat2", "MR", "2024-06-02"), Filing("P2", ("MR",))),
    ("ImagingStudy", "s3", study("1.2.3", "pat3", "MR", "2023-12-31T23:30:00+01:00"), Filing("P3", ("MR",))),
    ("ImagingStudy", "s4", study("1.2.4", "pat1", "MG", "2025-01-10T08:00:00Z"), Filing("P1", ("MG",))),
    ("ImagingStudy", "s5", study("1.2.5", "pat2", "CT", None, status="registered"), Filing("P2", ("CT",))),
    ("DiagnosticReport", "r1", report("pat1", "s1", "final", {"effectiveDateTime": "2024-05-18"},
                                      issued="2024-05-18T12:00:00Z", result=[{"reference": "Observation/o1"}],
                                      performer=[{"reference": "Practitioner/dr1"}]), Filing("P1", ("CT",))),
    ("DiagnosticReport", "r2", report("pat2", "s2", "preliminary",
                                      {"effectivePeriod": {"start": "2024-06-02", "end": "2024-06-03"}},
                                      issued="2024-06-03T09:00:00Z"), Filing("P2", ("MR",))),
    ("DiagnosticReport", "r3", report("pat3", "s3", "final", {"effectiveDateTime": "2024-01-02"},
                                      issued="2024-01-02T09:00:00Z"), Filing("P3", ("MR",))),
    ("DiagnosticReport", "r4", report("pat1", "s4", "final", {"effectiveDateTime": "2025-01-11"},
                                      issued="2025-01-11T09:00:00Z"), Filing("P1", ("MG",))),
]  # fmt: skip


def seed(dsn: str, extra: list[tuple[str, str, dict[str, Any], Filing]] = ()) -> None:  # type: ignore[assignment]
    """Write the resources as the sync job and the REST routes do: through the repository, in a transaction
    (lastUpdated one second apart, in seed order)."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        repo = FhirRepository()
        start = utc(2025, 3, 1)
        try:
            async with conn.transaction():
                for i, (kind, rid, content, filing) in enumerate([*SEED, *extra]):
                    body = {k: v for k, v in content.items() if k != "resourceType"}
                    await repo.create(conn, kind, body, filing, rid=rid, now=start + dt.timedelta(seconds=i))
        finally:
            await conn.close()

    asyncio.run(run())


@dataclass
class Fhir:
    server: LiveServer
    headers: dict[str, str]

    def get(self, path: str, params: Any = None, status: int = 200, **headers: str) -> dict[str, Any]:
        response = httpx.get(
            f"{self.server.url}/fhir/{path}", params=params, headers={**self.headers, **headers}, timeout=60
        )
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/fhir+json")
        body: dict[str, Any] = response.json()
        if status == 200:
            Bundle.model_validate(body)
            assert body["type"] == "searchset"
        else:
            assert body["resourceType"] == "OperationOutcome"
        return body

    def ids(self, path: str, params: Any = None) -> set[str]:
        return matches(self.get(path, params))


def matches(body: dict[str, Any], mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == mode}


def included(body: dict[str, Any]) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in body.get("entry", []) if
            e["search"]["mode"] == "include"}  # fmt: skip


def link(body: dict[str, Any], relation: str) -> str | None:
    return next((x["url"] for x in body["link"] if x["relation"] == relation), None)


def only(resource_type: str, constraints: AccessConstraints, **others: AccessConstraints) -> SearchAccess:
    """A search's access: `constraints` on the searched type, `others` by type, no other type at all."""

    async def other(kind: str) -> AccessConstraints | None:
        return others.get(kind)

    return SearchAccess(resource_type, constraints, other)


@pytest.fixture
def fhir(server: LiveServer) -> Fhir:
    seed(server.dsn)
    return Fhir(server, server.headers)


# --- HTTP ------------------------------------------------------------------------------------------------------


def test_tokens_strings_dates_references(fhir: Fhir) -> None:
    ids = fhir.ids
    # token: code, system|code, |code, system|, :not, :text; comma = OR; repeat = AND
    assert ids("ImagingStudy", {"modality": "CT"}) == {"s1", "s5"}
    assert ids("ImagingStudy", {"modality": f"{DCM}|MR"}) == {"s2", "s3"}
    assert ids("ImagingStudy", {"modality": "|MR"}) == set()  # the coding has a system
    assert ids("ImagingStudy", {"modality": "CT,MG"}) == {"s1", "s4", "s5"}
    assert ids("ImagingStudy", [("modality", "CT,MR"), ("status", "registered")]) == {"s5"}
    assert ids("ImagingStudy", {"modality:not": "CT"}) == {"s2", "s3", "s4"}
    assert ids("ImagingStudy", {"status": "http://hl7.org/fhir/imagingstudy-status|available"}) == {
        "s1", "s2", "s3", "s4"}  # fmt: skip
    assert ids("ImagingStudy", {"identifier": f"{UID}|urn:oid:1.2.3"}) == {"s3"}
    assert ids("ImagingStudy", {"identifier": f"{UID}|1.2.3"}) == {"s3"}  # a bare UID finds urn:oid:<UID>
    assert ids("ImagingStudy", {"series": "1.2.2.1"}) == {"s2"}
    assert ids("ImagingStudy", {"instance": "1.2.4.1.1"}) == {"s4"}
    assert len(ids("ImagingStudy", {"dicom-class": CT_IMAGE})) == 5
    assert len(ids("ImagingStudy", {"bodysite": f"{SCT}|51185008"})) == 5
    assert ids("ImagingStudy", {"bodysite:text": "thor"}) == {"s1", "s2", "s3", "s4", "s5"}
    assert ids("ImagingStudy", {"_id": "s1,s3"}) == {"s1", "s3"}
    assert ids("DiagnosticReport", {"code": f"{LOINC}|18748-4", "status": "final"}) == {"r1", "r3", "r4"}
    assert ids("DiagnosticReport", {"category": "RAD", "status:not": "final"}) == {"r2"}
    assert ids("Patient", {"gender": "female"}) == {"pat1", "pat3"}
    assert ids("Patient", {"identifier": f"{MRN}|P2"}) == {"pat2"}
    assert ids("Patient", {"identifier": "|P2"}) == set()
    assert ids("Endpoint", {"connection-type": "dicom-wado-rs", "status": "active"}) == {"dicomweb"}
    assert ids("Patient", {"active": "true"}) == {"pat3"} and ids("Patient", {"active:missing": "true"}) == {
        "pat1", "pat2"}  # fmt: skip
    assert ids("Patient", {"telecom": "phone|555-1234"}) == {"pat3"}
    assert ids("Patient", {"_tag": "http://example.org/tags|vip"}) == {"pat3"}
    assert ids("Patient", {"address": "zur"}) == {"pat3"}
    assert ids("Patient", {"_id:missing": "false", "_id:not": "pat1"}) == {"pat2", "pat3"}
    # string: starts with, case and accents ignored; :exact; :contains
    assert ids("Patient", {"name": "mul"}) == {"pat1"}
    assert ids("Patient", {"family": "MÜLLER"}) == {"pat1"}
    assert ids("Patient", {"family:exact": "Muller"}) == set()
    assert ids("Patient", {"family:exact": "Müller"}) == {"pat1"}
    assert ids("Patient", {"given": "pau"}) == {"pat2"}
    assert ids("Patient", {"name:contains": "mit"}) == {"pat2"}
    assert ids("Patient", {"name": "j"}) == {"pat2", "pat3"}
    assert ids("Endpoint", {"name": "hounsfield"}) == {"dicomweb"}
    # date: implicit ranges and prefixes
    assert ids("ImagingStudy", {"started": "2024-05"}) == {"s1"}
    assert ids("ImagingStudy", {"started": "2024"}) == {"s1", "s2"}
    assert ids("ImagingStudy", {"started": "2023-12-31T22:30:00Z"}) == {"s3"}  # +01:00 is UTC 22:30
    assert ids("ImagingStudy", {"started": "2024-05-17T10:00"}) == {"s1"}
    assert ids("ImagingStudy", {"started": "gt2024-05-17"}) == {"s2", "s4"}
    assert ids("ImagingStudy", {"started": "ge2024-05-17"}) == {"s1", "s2", "s4"}
    assert ids("ImagingStudy", {"started": "lt2024-05-17"}) == {"s3"}
    assert ids("ImagingStudy", {"started": "le2024-06-02"}) == {"s1", "s2", "s3"}
    assert ids("ImagingStudy", {"started": "ne2024"}) == {"s3", "s4"}
    assert ids("ImagingStudy", {"started": "sa2024-05-17"}) == {"s2", "s4"}
    assert ids("ImagingStudy", {"started": "eb2024-05-17T10:00:00Z"}) == {"s3"}
    assert ids("ImagingStudy", [("started", "ge2024"), ("started", "lt2025")]) == {"s1", "s2"}
    assert ids("ImagingStudy", {"started": "2024-05,2025"}) == {"s1", "s4"}
    assert ids("ImagingStudy", {"started:missing": "true"}) == {"s5"}
    assert ids("ImagingStudy", {"started:missing": "false"}) == {"s1", "s2", "s3", "s4"}
    assert ids("DiagnosticReport", {"date": "2024-06-02"}) == set()  # the period runs into June 3
    assert ids("DiagnosticReport", {"date": "2024-06"}) == {"r2"}
    assert ids("DiagnosticReport", {"date": "ge2024-06-02T12:00:00Z"}) == {"r2", "r4"}
    assert ids("DiagnosticReport", {"issued": "lt2024-05-18T12:00:01Z"}) == {"r1", "r3"}
    assert ids("Patient", {"birthdate": "1980"}) == {"pat2"}
    assert ids("Patient", {"birthdate": "1980-02"}) == set()  # 1980 is a longer period than February
    assert ids("ImagingStudy", {"_lastUpdated": "2025-03-01T00:00:04Z"}) == {"s1"}
    assert ids("ImagingStudy", {"_lastUpdated": "ge2025-03-01T00:00:07Z"}) == {"s4", "s5"}
    # reference: Type/id, bare id, absolute URL on our base, :Type, other absolute URLs
    base = fhir.server.url + "/fhir"
    assert ids("ImagingStudy", {"patient": "Patient/pat1"}) == {"s1", "s4"}
    assert ids("ImagingStudy", {"patient": "pat1"}) == {"s1", "s4"}
    assert ids("ImagingStudy", {"subject": f"{base}/Patient/pat2"}) == {"s2", "s5"}
    assert ids("ImagingStudy", {"subject:Patient": "pat3"}) == {"s3"}
    assert ids("ImagingStudy", {"subject": "Device/pat3"}) == set()
    assert ids("ImagingStudy", {"patient": "http://elsewhere.example/fhir/Patient/pat1"}) == set()
    assert ids("ImagingStudy", {"patient": "pat1,pat3"}) == {"s1", "s3", "s4"}
    assert ids("ImagingStudy", {"endpoint": "Endpoint/dicomweb"}) == {"s1", "s2", "s3", "s4", "s5"}
    assert ids("ImagingStudy", {"referrer": "Practitioner/dr1"}) == {"s1"}
    assert ids("ImagingStudy", {"basedon": "ServiceRequest/sr1"}) == {"s1"}
    assert ids("ImagingStudy", {"referrer:missing": "false"}) == {"s1"}
    assert ids("DiagnosticReport", {"imaging-study": "ImagingStudy/s2"}) == {"r2"}
    assert ids("DiagnosticReport", {"result": "o1"}) == {"r1"}
    assert ids("DiagnosticReport", {"performer": "Practitioner/dr1", "subject": "Patient/pat1"}) == {"r1"}
    assert ids("DiagnosticReport", {"based-on:missing": "true"}) == {"r1", "r2", "r3", "r4"}


def test_chains_includes_sort_summary_elements(fhir: Fhir) -> None:
    ids = fhir.ids
    assert ids("ImagingStudy", {"patient.identifier": f"{MRN}|P2"}) == {"s2", "s5"}
    assert ids("ImagingStudy", {"subject.identifier": "P1"}) == {"s1", "s4"}
    assert ids("ImagingStudy", {"subject:Patient.name": "doe"}) == {"s3"}
    assert ids("DiagnosticReport", {"patient.gender": "male"}) == {"r2"}
    assert ids("DiagnosticReport", {"imaging-study.modality": "MR"}) == {"r2", "r3"}
    assert ids("DiagnosticReport", {"patient.identifier": "P1,P3", "status": "final"}) == {"r1", "r3", "r4"}
    # _include and _revinclude
    body = fhir.get("ImagingStudy", [("_id", "s1"), ("_include", "ImagingStudy:patient"),
                                     ("_include", "ImagingStudy:endpoint")])  # fmt: skip
    assert matches(body) == {"s1"} and included(body) == {"Patient/pat1", "Endpoint/dicomweb"}
    assert body["total"] == 1  # included resources are not counted
    body = fhir.get("ImagingStudy", [("modality", "MR"), ("_revinclude", "DiagnosticReport:imaging-study")])
    assert matches(body) == {"s2", "s3"} and included(body) == {"DiagnosticReport/r2", "DiagnosticReport/r3"}
    body = fhir.get("DiagnosticReport", {"_id": "r1", "_include": "DiagnosticReport:subject:Patient"})
    assert included(body) == {"Patient/pat1"}
    body = fhir.get("DiagnosticReport", {"_id": "r1", "_include": "DiagnosticReport:subject:Group"})
    assert included(body) == set()
    body = fhir.get("DiagnosticReport", {"_id": "r2", "_include:iterate": "ImagingStudy:patient"})
    assert included(body) == set() and matches(body) == {"r2"}  # _include:iterate is not supported
    assert any(e["search"]["mode"] == "outcome" for e in body["entry"])
    body = fhir.get("DiagnosticReport", {"_id": "r1", "_include": "DiagnosticReport:result"})
    assert included(body) == set()  # Observation/o1 is not held here
    entry = next(e for e in fhir.get("ImagingStudy", {"_id": "s1", "_include": "ImagingStudy:subject"})["entry"]
                 if e["search"]["mode"] == "include")  # fmt: skip
    assert entry["fullUrl"] == f"{fhir.server.url}/fhir/Patient/pat1"
    # _sort: several keys, descending, missing values last
    order = [e["resource"]["id"] for e in fhir.get("ImagingStudy", {"_sort": "-started"})["entry"]]
    assert order == ["s4", "s2", "s1", "s3", "s5"]
    order = [e["resource"]["id"] for e in fhir.get("ImagingStudy", {"_sort": "started"})["entry"]]
    assert order == ["s3", "s1", "s2", "s4", "s5"]
    order = [e["resource"]["id"] for e in fhir.get("ImagingStudy", {"_sort": "status,-_lastUpdated"})["entry"]]
    assert order == ["s4", "s3", "s2", "s1", "s5"]
    order = [e["resource"]["id"] for e in fhir.get("DiagnosticReport", {"_sort": "-issued"})["entry"]]
    assert order == ["r4", "r2", "r1", "r3"]
    order = [e["resource"]["id"] for e in fhir.get("DiagnosticReport", {"_sort": "date,_id"})["entry"]]
    assert order == ["r3", "r1", "r2", "r4"]
    order = [e["resource"]["id"] for e in fhir.get("Patient", {"_sort": "-family"})["entry"]]
    assert order == ["pat2", "pat1", "pat3"]
    # _summary=count: the total only; _elements and _summary=true mark the resources SUBSETTED
    body = fhir.get("ImagingStudy", {"modality": "CT", "_summary": "count"})
    assert body["total"] == 2 and "entry" not in body
    assert fhir.get("ImagingStudy", {"_count": "0"})["total"] == 5
    body = fhir.get("ImagingStudy", {"_id": "s1", "_elements": "started,identifier"})
    resource = body["entry"][0]["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "status", "subject", "started", "identifier"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"} in resource[
        "meta"]["tag"]  # fmt: skip
    resource = fhir.get("DiagnosticReport", {"_id": "r2", "_elements": "effective"})["entry"][0]["resource"]
    assert "effectivePeriod" in resource and "imagingStudy" not in resource and "code" in resource
    resource = fhir.get("DiagnosticReport", {"_id": "r1", "_summary": "true"})["entry"][0]["resource"]
    assert "result" not in resource and "issued" in resource and resource["meta"]["tag"][0]["code"] == "SUBSETTED"
    resource = fhir.get("ImagingStudy", {"_id": "s1", "_summary": "text"})["entry"][0]["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "status", "subject"}
    assert "series" in fhir.get("ImagingStudy", {"_id": "s1", "_summary": "data"})["entry"][0]["resource"]
    assert fhir.get("ImagingStudy", {"_id": "s1", "_total": "none"}).get("total") is None


def test_paging_links_and_fhir_client(fhir: Fhir) -> None:
    from fhirpy import SyncFHIRClient

    extra = [("ImagingStudy", f"x{i:02d}", study(f"1.3.{i}", "pat2", "CT", f"2022-01-{i + 1:02d}"),
              Filing("P2", ("CT",))) for i in range(23)]  # fmt: skip
    seed_more(fhir.server.dsn, extra)
    body = fhir.get("ImagingStudy", {"modality": "CT", "_count": "10", "_sort": "started", "unknown": "1"})
    seen, pages = [], 0
    while True:
        pages += 1
        assert body["total"] == 25
        seen += [e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"]
        self_query = dict(parse_qsl(urlsplit(link(body, "self") or "").query))
        assert "unknown" not in self_query and self_query["modality"] == "CT" and self_query["_count"] == "10"
        outcome = [e for e in body["entry"] if e["search"]["mode"] == "outcome"]
        assert bool(outcome) == (pages == 1)  # the next links leave the unknown parameter out
        assert not outcome or "unknown" in outcome[0]["resource"]["issue"][0]["diagnostics"]
        following = link(body, "next")
        if following is None:
            break
        response = httpx.get(following, headers=fhir.headers)
        assert response.status_code == 200
        body = response.json()
    assert pages == 3 and len(seen) == 25 and len(set(seen)) == 25
    assert seen[:3] == ["x00", "x01", "x02"] and seen[-2:] == ["s1", "s5"]
    previous = link(body, "previous")
    assert previous is not None
    back = httpx.get(previous, headers=fhir.headers).json()
    assert [e["resource"]["id"] for e in back["entry"] if e["search"]["mode"] == "match"] == seen[10:20]
    assert fhir.get("ImagingStudy", {"_count": "5000"})["link"][0]["url"].count("_count=1000") == 1
    client = SyncFHIRClient(f"{fhir.server.url}/fhir", authorization=fhir.headers["Authorization"])
    found = client.resources("ImagingStudy").search(patient="pat2").sort("started").limit(7).fetch_all()
    assert len(found) == 25 and found[0]["id"] == "x00" and {r["id"] for r in found[-2:]} == {"s2", "s5"}
    assert client.resources("ImagingStudy").search(modality="MR").count() == 2
    first = client.resources("Patient").search(family="smi").first()
    assert first is not None and first["id"] == "pat2"


def seed_more(dsn: str, extra: list[tuple[str, str, dict[str, Any], Filing]]) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                for kind, rid, content, filing in extra:
                    body = {k: v for k, v in content.items() if k != "resourceType"}
                    await FhirRepository().create(conn, kind, body, filing, rid=rid)
        finally:
            await conn.close()

    asyncio.run(run())


def test_post_search_strict_handling_and_errors(fhir: Fhir) -> None:
    url = f"{fhir.server.url}/fhir/ImagingStudy/_search"
    response = httpx.post(url, data={"modality": "MR", "started": "lt2024"}, headers=fhir.headers)
    assert response.status_code == 200 and matches(response.json()) == {"s3"}
    response = httpx.post(url + "?patient=pat2", data={"modality": "MR,CT"}, headers=fhir.headers)
    assert response.status_code == 200 and matches(response.json()) == {"s2", "s5"}
    response = httpx.post(
        url, content=b'{"modality": "MR"}', headers={**fhir.headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 415 and response.json()["resourceType"] == "OperationOutcome"
    # unknown parameters and unsupported modifiers: ignored with a warning, or 400 under handling=strict
    body = fhir.get("ImagingStudy", {"modality": "CT", "colour": "red", "modality:below": "C"})
    assert matches(body) == {"s1", "s5"}
    outcome = next(e["resource"] for e in body["entry"] if e["search"]["mode"] == "outcome")
    assert {i["severity"] for i in outcome["issue"]} == {"warning"} and len(outcome["issue"]) == 2
    strict = fhir.get("ImagingStudy", {"colour": "red"}, 400, Prefer="handling=strict")
    assert strict["issue"][0]["code"] == "not-supported" and "colour" in strict["issue"][0]["diagnostics"]
    fhir.get("ImagingStudy", {"modality:below": "C"}, 400, Prefer="handling=strict")
    lenient = fhir.get("ImagingStudy", {"modality": "MR", "colour": "red"}, Prefer="handling=lenient")
    assert matches(lenient) == {"s2", "s3"}
    # malformed values: 400 naming the parameter, whatever the handling
    for params in ({"started": "2024-13"}, {"started": "xx2024"}, {"_count": "-1"}, {"_count": "many"},
                   {"started:missing": "maybe"}, {"_total": "some"}, {"_summary": "short"},
                   {"_offset": "x"}, {"_elements": "a b"}, {"started": "2024-05-17T10"}):  # fmt: skip
        name = next(iter(params))
        problem = fhir.get("ImagingStudy", params, 400)
        assert problem["issue"][0]["code"] == "invalid" and name in problem["issue"][0]["diagnostics"], params
    chain = fhir.get("DiagnosticReport", {"subject.name": "x"}, 200)  # only Patient of the targets is held here
    assert matches(chain) == set()


def test_policy_constraints_on_pages_totals_and_includes(fhir: Fhir) -> None:
    server = fhir.server
    who = Fhir(server, bearer(server.token(sub="dr-who", roles=["referring"], scopes=[])))  # P1, P2; no MG
    assert who.ids("ImagingStudy") == {"s1", "s2", "s5"}
    body = who.get("ImagingStudy", {"_count": "2", "_sort": "_id"})
    assert body["total"] == 3 and matches(body) == {"s1", "s2"}
    following = link(body, "next")
    assert following is not None
    last = httpx.get(following, headers=who.headers).json()
    assert last["total"] == 3 and matches(last) == {"s5"} and link(last, "next") is None
    assert who.get("ImagingStudy", {"_summary": "count"})["total"] == 3
    assert who.ids("ImagingStudy", {"patient": "pat3"}) == set()
    assert who.ids("ImagingStudy", {"modality": "MG"}) == set()
    assert who.ids("DiagnosticReport") == {"r1", "r2", "r4"}  # the policy limits modalities of imaging only
    assert who.ids("Patient") == {"pat1", "pat2"}
    assert who.ids("Endpoint") == {"dicomweb"}  # no patient: not limited by the care list
    assert who.ids("DiagnosticReport", {"patient.identifier": "P3"}) == set()
    body = who.get("ImagingStudy", [("_revinclude", "DiagnosticReport:imaging-study"),
                                    ("_include", "ImagingStudy:patient")])  # fmt: skip
    assert included(body) == {"DiagnosticReport/r1", "DiagnosticReport/r2", "Patient/pat1", "Patient/pat2"}
    researcher = Fhir(server, bearer(server.token(sub="res", roles=["researcher"], scopes=[])))
    assert researcher.ids("ImagingStudy") == {"s1", "s2", "s5"}  # P3 opted out; MG is not theirs
    assert researcher.get("DiagnosticReport", {"_summary": "count"})["total"] == 3
    body = researcher.get("DiagnosticReport", [("_include", "DiagnosticReport:subject"),
                                               ("_include", "DiagnosticReport:imaging-study")])  # fmt: skip
    assert matches(body) == {"r1", "r2", "r4"}
    # included resources as the policy decides a search of their type: researchers may not see Patient
    # resources, nor MG imaging (r4's study)
    assert included(body) == {"ImagingStudy/s1", "ImagingStudy/s2"}
    researcher.get("Patient", status=403)
    radiologist = Fhir(server, bearer(server.token(sub="rad", roles=["radiologist"], scopes=[])))
    assert radiologist.ids("ImagingStudy", {"modality": "MG"}) == {"s4"}
    context = Fhir(server, bearer(server.token(sub="app", roles=["radiologist"], scopes=["patient/*.rs"],
                                               patient="P2")))  # fmt: skip
    assert context.ids("ImagingStudy") == {"s2", "s5"} and context.ids("DiagnosticReport") == {"r2"}
    auditor = Fhir(server, bearer(server.token(sub="sec", roles=["auditor"], scopes=[])))
    assert auditor.get("ImagingStudy", status=403)["issue"][0]["code"] == "forbidden"
    assert httpx.get(f"{server.url}/fhir/ImagingStudy").status_code == 401


# --- the API other parts call ----------------------------------------------------------------------------------


def test_matching_ids_and_search_bundle(server: LiveServer) -> None:
    seed(server.dsn)

    async def run() -> None:
        conn = await asyncpg.connect(server.dsn)
        try:
            every = SearchAccess.unrestricted("ImagingStudy")
            assert await matching_ids(conn, "ImagingStudy", "modality=CT", access=every, limit=10) == ["s1", "s5"]
            assert await matching_ids(conn, "ImagingStudy", "?modality=CT&patient=Patient/pat1", access=every) == [
                "s1"]  # fmt: skip
            assert await matching_ids(conn, "ImagingStudy", "modality=CT", access=every, only_id="s5") == ["s5"]
            assert await matching_ids(conn, "ImagingStudy", "modality=CT", access=every, only_id="s2") == []
            assert await matching_ids(conn, "ImagingStudy", "", access=every, limit=2) == ["s1", "s2"]
            limited = AccessConstraints(patient_ids=("P2",))
            assert await matching_ids(conn, "ImagingStudy", "modality=CT", access=only("ImagingStudy", limited)) == [
                "s5"]  # fmt: skip
            hidden = only("DiagnosticReport", AccessConstraints(modalities_excluded=("CT",)))
            assert await matching_ids(conn, "DiagnosticReport", "status=final", access=hidden, limit=5) == [
                "r3", "r4"]  # fmt: skip
            with pytest.raises(FhirError) as caught:
                await matching_ids(conn, "ImagingStudy", "colour=red", access=every)
            assert caught.value.status == 400
            body = await search_bundle(
                conn, "DiagnosticReport", [("status", "final"), ("_count", "1"), ("colour", "red")],
                base="http://example.org/fhir", access=only("DiagnosticReport", limited), strict=False,
            )  # fmt: skip
            assert (
                body["total"] == 0
                and body["link"][0]["url"] == "http://example.org/fhir/DiagnosticReport?status=final&_count=1"
            )
            body = await search_bundle(
                conn, "DiagnosticReport", [("status", "final"), ("_count", "1")],
                base="http://example.org/fhir", access=SearchAccess.unrestricted("DiagnosticReport"), strict=True,
            )  # fmt: skip
            assert body["total"] == 3 and body["entry"][0]["fullUrl"] == "http://example.org/fhir/DiagnosticReport/r1"
            assert link(body, "next") == "http://example.org/fhir/DiagnosticReport?status=final&_count=1&_offset=1"
            # included and chained types get their own type's constraints, never the searched type's
            with_studies = [("_id", "r1,r4"), ("_include", "DiagnosticReport:imaging-study")]
            no_mg = AccessConstraints(modalities_excluded=("MG",))
            access = only("DiagnosticReport", AccessConstraints(), ImagingStudy=no_mg)
            body = await search_bundle(conn, "DiagnosticReport", with_studies, base="b", access=access, strict=True)
            assert matches(body) == {"r1", "r4"} and included(body) == {"ImagingStudy/s1"}
            chained = [("imaging-study.modality", "MG")]
            body = await search_bundle(conn, "DiagnosticReport", chained, base="b", access=access, strict=True)
            assert matches(body) == set()
            unseen = only("DiagnosticReport", AccessConstraints())  # no other type may be searched
            body = await search_bundle(conn, "DiagnosticReport", with_studies, base="b", access=unseen, strict=True)
            assert matches(body) == {"r1", "r4"} and included(body) == set()
            with pytest.raises(ValueError):
                await search_bundle(conn, "Patient", [], base="b", access=unseen, strict=True)
        finally:
            await conn.close()

    asyncio.run(run())


def test_check_query() -> None:
    check_query("DiagnosticReport", "status=final&patient=Patient/1")
    check_query("ImagingStudy", "modality=CT,MR&started=ge2024-01-01&patient.identifier=sys|1&_count=5")
    check_query("Patient", "")
    for kind, query in (("ImagingStudy", "colour=red"), ("ImagingStudy", "modality:below=CT"),
                        ("ImagingStudy", "started=yesterday"), ("Observation", "code=1"),
                        ("ImagingStudy", "_include=ImagingStudy:colour")):  # fmt: skip
        with pytest.raises(FhirError) as caught:
            check_query(kind, query)
        assert caught.value.status == 400


# --- pure parts ------------------------------------------------------------------------------------------------


def test_index_entries() -> None:
    got = set(entries("ImagingStudy", study("1.2.9", "p9", "CT", "2024-05-17")))
    assert SearchEntry("patient", code="Patient/p9") in got and SearchEntry("subject", code="Patient/p9") in got
    assert SearchEntry("modality", DCM, "CT") in got and SearchEntry("series", None, "1.2.9.1") in got
    assert SearchEntry("identifier", UID, "urn:oid:1.2.9") in got
    assert SearchEntry("status", "http://hl7.org/fhir/imagingstudy-status", "available") in got
    assert SearchEntry("bodysite", SCT, "51185008", "thorax") in got
    day = [e for e in got if e.param == "started"]
    assert day == [SearchEntry("started", low=utc(2024, 5, 17), high=utc(2024, 5, 18))]
    device = entries("ImagingStudy", {"subject": {"reference": "https://x.org/fhir/Device/d1/_history/2"}})
    assert device == [SearchEntry("subject", code="https://x.org/fhir/Device/d1")]  # not a `patient` value
    named = entries("Patient", {"name": [{"family": "Ñúñez", "given": ["Zoë"], "text": "Zoë Ñúñez"}],
                                "identifier": [{"system": MRN, "value": "7"}]})  # fmt: skip
    assert SearchEntry("family", None, "Ñúñez", "nunez") in named and SearchEntry("given", None, "Zoë", "zoe") in named
    assert SearchEntry("name", None, "Zoë Ñúñez", "zoe nunez") in named
    assert SearchEntry("identifier", MRN, "7") in named
    period = entries("DiagnosticReport", {"effectivePeriod": {"start": "2024-01-01T10:00:00Z"},
                                          "subject": {"reference": "#contained"},
                                          "performer": [{"identifier": {"system": "npi", "value": "9"}}]})  # fmt: skip
    assert (
        SearchEntry(
            "date",
            low=utc(2024, 1, 1, 10),
            high=utc(9999, 12, 31, 23, 59, 59, 999999),
        )
        in period
    )
    assert not [e for e in period if e.param in ("subject", "patient")]
    assert SearchEntry("performer:identifier", "npi", "9") in period
    assert entries("Observation", {"status": "final"}) == []
    long = entries("Endpoint", {"name": "x" * 5000})
    assert long and all(len((e.code or "").encode()) <= 1024 and len(e.text_value or "") <= 1024 for e in long)


def test_parse_values() -> None:
    now = utc(2025, 1, 1)
    query = parse_search("ImagingStudy", [("started", "ge2024-05"), ("patient", "pat1")], base="http://h/fhir", now=now)
    assert query.clauses[0].matches == (DateMatch("ge", utc(2024, 5, 1), utc(2024, 6, 1)),)
    assert query.clauses[1].matches == (ReferenceMatch(("Patient/pat1", "http://h/fhir/Patient/pat1")),)
    assert parse_search("ImagingStudy", [("patient", "http://h/fhir/Patient/p/_history/3")], base="http://h/fhir").clauses[
        0].matches == (ReferenceMatch(("Patient/p", "http://h/fhir/Patient/p")),)  # fmt: skip
    assert parse_search("ImagingStudy", [("patient", "Device/1")]).clauses[0].matches == (ReferenceMatch(()),)
    ignored = parse_search("ImagingStudy", [("colour", "x"), ("_include", "Patient:foo"), ("modality", "")])
    assert len(ignored.ignored) == 2 and ignored.clauses == () and ignored.echo == ()
    assert parse_search("ImagingStudy", [("_count", "5000")]).count == 1000
    near = parse_search("ImagingStudy", [("started", "ap2024-11-01")], now=now).clauses[0].matches[0]
    assert near == DateMatch("ap", utc(2024, 10, 25, 21, 36), utc(2024, 11, 8, 2, 24))
    with pytest.raises(UnsupportedSearch):
        parse_search("ImagingStudy", [("colour", "x")], strict=True)
    with pytest.raises(InvalidSearch, match="started"):
        parse_search("ImagingStudy", [("started", "zz2024")])
    with pytest.raises(InvalidSearch, match="subject"):
        parse_search("DiagnosticReport", [("performer.name", "x"), ("subject", "a" * 2000)])
    escaped = parse_search("Patient", [("name", r"a\,b,c")]).clauses[0].matches
    assert [m.value for m in escaped] == ["a,b", "c"]  # type: ignore[union-attr]


def test_unenforceable_constraints_are_refused(dsn: str) -> None:
    """A constraint the search cannot turn into SQL is a 403, never a wider search (fail closed); on an included
    type it hides that type."""
    from authz.actor import Actor
    from authz.audit import AuditTrail
    from authz.decision import Decision
    from authz.engine_rego import RegoEngine
    from authz.engines import SHIPPED_POLICIES
    from authz.errors import Forbidden
    from authz.principal import Principal
    from fhir.rest.interactions import Caller, search_access

    async def run() -> None:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            await refused(pool)
        finally:
            await pool.close()

    async def refused(pool: asyncpg.Pool) -> None:
        principal = Principal("rad", "test", roles=("radiologist",))
        caller = Caller(Actor(principal, RegoEngine(SHIPPED_POLICIES), AuditTrail(pool)))
        allowed = await search_access(caller, "ImagingStudy", Decision(True, constraints={"patient_ids": ["P1"]}))
        assert allowed.constraints.patient_ids == ("P1",)
        assert await allowed.of("Patient") == AccessConstraints()  # decided by the policy for Patient
        assert await allowed.of("Observation") is None  # not served here
        for problem in (
            Decision(False),
            Decision(True, constraints={"sites": ["A"]}),
            Decision(True, constraints={"patient_ids": "P1"}),
        ):
            with pytest.raises(Forbidden):
                await search_access(caller, "ImagingStudy", problem)
        assert caller.decided == []  # included types are not the request's own decision

    asyncio.run(run())
