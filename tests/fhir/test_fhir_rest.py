"""FHIR R4 REST interactions over HTTP (fhir/rest/instance.py, fhir/rest/interactions.py): a FHIR client (fhirpy)
creates, reads, updates, deletes DiagnosticReports and reads their history; httpx checks headers and statuses
(ETag/If-Match, conditional create, vread, 410, Prefer, 405, 415, 406); bad input is a 4xx OperationOutcome
naming the element and writes nothing; the policy sees each report's patient (care lists, patient-context
tokens), also when an update would move a report to another patient. Patients and ImagingStudies are filed
through the repository (they are derived from the archive by another part)."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
from typing import Any

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from fhir.repository import FhirRepository, Filing
from fhir.validation import check_accept, fhirpath
from tests.conftest import LiveServer, bearer

PATIENTS = ("P1", "P2", "P3")
FHIR_JSON = "application/fhir+json"


def seed(server: LiveServer, patients: tuple[str, ...] = PATIENTS) -> None:
    """Patient `pat-<key>` and ImagingStudy `study-<key>` (CT) for each DICOM Patient ID."""

    async def run() -> None:
        conn = await asyncpg.connect(server.dsn)
        repo = FhirRepository()
        try:
            async with conn.transaction():
                for key in patients:
                    patient = {"resourceType": "Patient", "identifier": [{"value": key}]}
                    await repo.create(conn, "Patient", patient, Filing(key, (), f"|{key}"), rid=f"pat-{key}")
                    study = {
                        "resourceType": "ImagingStudy",
                        "status": "available",
                        "subject": {"reference": f"Patient/pat-{key}"},
                    }
                    # no natural key: the archive's sync job would delete an ImagingStudy of a study not in its index
                    await repo.create(conn, "ImagingStudy", study, Filing(key, ("CT",)), rid=f"study-{key}")
        finally:
            await conn.close()

    asyncio.run(run())


def count_reports(server: LiveServer) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(server.dsn)
        try:
            sql = "SELECT count(*) FROM fhir_history WHERE resource_type = 'DiagnosticReport'"
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()

    return asyncio.run(run())


def report(patient: str = "P1", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}], "text": "CT report"},
        "subject": {"reference": f"Patient/pat-{patient}"},
        "imagingStudy": [{"reference": f"ImagingStudy/study-{patient}"}],
        "conclusion": "No acute findings.",
    }
    body.update(extra)
    return body


def post(http: httpx.Client, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post("/fhir/DiagnosticReport", content=raw, headers={"Content-Type": FHIR_JSON, **(headers or {})})


def put(http: httpx.Client, rid: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    raw = json.dumps(body).encode()
    url = f"/fhir/DiagnosticReport/{rid}"
    return http.put(url, content=raw, headers={"Content-Type": FHIR_JSON, **(headers or {})})


def outcome(response: httpx.Response, status: int) -> list[dict[str, Any]]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    issues: list[dict[str, Any]] = body["issue"]
    return issues


def test_crud_with_fhirpy(server: LiveServer) -> None:
    from fhirpy import SyncFHIRClient
    from fhirpy.base.exceptions import ResourceNotFound

    seed(server)
    client = SyncFHIRClient(f"{server.url}/fhir", authorization=f"Bearer {server.token()}")
    body = report()
    body.pop("resourceType")
    created = client.resource("DiagnosticReport", **body)
    created.save()
    rid = created["id"]
    assert created["meta"]["versionId"] == "1"
    again = client.reference("DiagnosticReport", rid).to_resource()
    assert again["conclusion"] == "No acute findings." and again["subject"]["reference"] == "Patient/pat-P1"
    DiagnosticReport.model_validate(dict(again.serialize()))
    again["status"] = "amended"
    again["conclusion"] = "Small nodule."
    again.save()
    assert again["meta"]["versionId"] == "2"
    assert client.reference("DiagnosticReport", rid).to_resource()["conclusion"] == "Small nodule."
    history = client.execute(f"DiagnosticReport/{rid}/_history", method="get")
    Bundle.model_validate(dict(history))
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    assert [e["request"]["method"] for e in history["entry"]] == ["PUT", "POST"]
    again.delete()
    with pytest.raises(ResourceNotFound):
        client.reference("DiagnosticReport", rid).to_resource()


def test_headers_versions_and_history(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    created = post(http, report(id="ignored-by-server"))
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    assert rid != "ignored-by-server"
    assert created.headers["location"] == f"{server.url}/fhir/DiagnosticReport/{rid}/_history/1"
    assert created.headers["etag"] == 'W/"1"'
    assert created.headers["content-type"] == "application/fhir+json; charset=utf-8"
    modified = email.utils.parsedate_to_datetime(created.headers["last-modified"])
    assert abs(modified - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    read = http.get(f"/fhir/DiagnosticReport/{rid}")
    assert read.status_code == 200 and read.headers["etag"] == 'W/"1"'
    assert read.json()["conclusion"] == "No acute findings."  # stored as sent, with meta added
    assert read.json()["code"]["coding"][0] == {"system": "http://loinc.org", "code": "18748-4"}

    body = read.json() | {"status": "amended"}
    stale = put(http, rid, body, {"If-Match": 'W/"7"'})
    assert outcome(stale, 412)[0]["code"] == "conflict"
    updated = put(http, rid, body, {"If-Match": 'W/"1"'})
    assert updated.status_code == 200 and updated.headers["etag"] == 'W/"2"'
    assert outcome(put(http, rid, body, {"If-Match": "version one"}), 400)

    assert http.get(f"/fhir/DiagnosticReport/{rid}/_history/1").json()["status"] == "final"
    assert http.get(f"/fhir/DiagnosticReport/{rid}/_history/2").headers["etag"] == 'W/"2"'
    assert outcome(http.get(f"/fhir/DiagnosticReport/{rid}/_history/9"), 404)
    assert outcome(http.get(f"/fhir/DiagnosticReport/{rid}/_history/x"), 404)

    assert outcome(http.delete(f"/fhir/DiagnosticReport/{rid}", headers={"If-Match": 'W/"1"'}), 412)
    gone = http.delete(f"/fhir/DiagnosticReport/{rid}")
    assert gone.status_code == 204 and gone.headers["etag"] == 'W/"3"'
    assert http.delete(f"/fhir/DiagnosticReport/{rid}").status_code == 204  # idempotent
    assert http.delete("/fhir/DiagnosticReport/never-was").status_code == 204
    assert outcome(http.get(f"/fhir/DiagnosticReport/{rid}"), 410)[0]["code"] == "deleted"
    assert outcome(http.get(f"/fhir/DiagnosticReport/{rid}/_history/3"), 410)
    assert outcome(http.get("/fhir/DiagnosticReport/never-was"), 404)[0]["code"] == "not-found"

    history = http.get(f"/fhir/DiagnosticReport/{rid}/_history", params={"_count": 2})
    Bundle.model_validate(history.json())
    entries = history.json()["entry"]
    assert [e["response"]["etag"] for e in entries] == ['W/"3"', 'W/"2"']
    assert "resource" not in entries[0] and entries[0]["request"]["method"] == "DELETE"
    following = next(link["url"] for link in history.json()["link"] if link["relation"] == "next")
    rest = httpx.get(following, headers=server.headers).json()
    assert [e["response"]["etag"] for e in rest["entry"]] == ['W/"1"']
    assert not [link for link in rest["link"] if link["relation"] == "next"]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    since = http.get(f"/fhir/DiagnosticReport/{rid}/_history", params={"_since": later.isoformat()}).json()
    assert "entry" not in since
    assert outcome(http.get(f"/fhir/DiagnosticReport/{rid}/_history", params={"_since": "yesterday"}), 400)
    assert outcome(http.get("/fhir/DiagnosticReport/never-was/_history"), 404)

    # update as create: the client chooses the id
    made = put(http, "my-report-1", report(id="my-report-1"))
    assert made.status_code == 201 and made.headers["etag"] == 'W/"1"'
    assert made.headers["location"].endswith("/fhir/DiagnosticReport/my-report-1/_history/1")


def test_prefer(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    minimal = post(http, report(), {"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.content == b"" and minimal.headers["location"]
    rid = minimal.headers["location"].split("/")[-3]
    info = post(http, report(), {"Prefer": "return=OperationOutcome"})
    assert outcome(info, 201)[0]["severity"] == "information"
    full = put(http, rid, report(id=rid), {"Prefer": "return=representation"})
    assert full.json()["meta"]["versionId"] == "2"
    assert put(http, rid, report(id=rid), {"Prefer": "return=minimal"}).content == b""
    deleted = http.delete(f"/fhir/DiagnosticReport/{rid}", headers={"Prefer": "return=OperationOutcome"})
    assert outcome(deleted, 200)[0]["severity"] == "information"


def test_conditional_create(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    ident = {"identifier": [{"system": "urn:example:acc", "value": "A-1"}]}
    first = post(http, report(**ident), {"If-None-Exist": "identifier=urn:example:acc|A-1"})
    assert first.status_code == 201, first.text
    second = post(http, report(**ident, conclusion="other"), {"If-None-Exist": "identifier=urn:example:acc|A-1"})
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    assert second.json()["conclusion"] == "No acute findings." and second.headers["etag"] == 'W/"1"'
    assert post(http, report(**ident)).status_code == 201  # unconditional: a second one
    several = post(http, report(**ident), {"If-None-Exist": "identifier=urn:example:acc|A-1"})
    assert outcome(several, 412)
    assert outcome(post(http, report(), {"If-None-Exist": "nonsense-parameter=1"}), 400)
    assert count_reports(server) == 2


def test_formats(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    xml = http.post(
        "/fhir/DiagnosticReport", content=b"<DiagnosticReport/>", headers={"Content-Type": "application/fhir+xml"}
    )
    assert outcome(xml, 415)[0]["code"] == "not-supported"
    untyped = http.post("/fhir/DiagnosticReport", content=json.dumps(report()).encode())
    assert outcome(untyped, 415)
    plain_json = post(http, report(), {"Content-Type": "application/json; charset=utf-8"})
    assert plain_json.status_code == 201
    rid = plain_json.json()["id"]
    assert outcome(http.get(f"/fhir/DiagnosticReport/{rid}", headers={"Accept": "application/fhir+xml"}), 406)
    assert outcome(http.get(f"/fhir/DiagnosticReport/{rid}", params={"_format": "xml"}), 406)
    assert http.get(f"/fhir/DiagnosticReport/{rid}", params={"_format": "json"}).status_code == 200
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"  # a browser
    assert http.get(f"/fhir/DiagnosticReport/{rid}", headers={"Accept": accept}).status_code == 200
    assert count_reports(server) == 1


def test_check_accept_and_fhirpath() -> None:
    check_accept("application/fhir+json;q=1", None)
    check_accept(None, "application/fhir+json")
    check_accept("application/fhir+xml", "json")  # _format wins
    for accept in ("application/fhir+xml", "text/xml", "application/json;q=0", "image/png"):
        with pytest.raises(Exception, match="Accept"):
            check_accept(accept, None)
    assert fhirpath("DiagnosticReport", ("code", "coding", 0, "system")) == "DiagnosticReport.code.coding[0].system"
    assert fhirpath("DiagnosticReport", ("_status", "extension", 1)) == "DiagnosticReport.status.extension[1]"


def test_read_only_types_answer_405(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    study = http.get("/fhir/ImagingStudy/study-P1")
    assert study.status_code == 200 and study.headers["etag"] == 'W/"1"'
    assert http.get("/fhir/Patient/pat-P1").json()["identifier"][0]["value"] == "P1"
    body = json.dumps(study.json()).encode()
    headers = {"Content-Type": FHIR_JSON}
    assert outcome(http.post("/fhir/ImagingStudy", content=body, headers=headers), 405)[0]["code"] == "not-supported"
    assert outcome(http.put("/fhir/ImagingStudy/study-P1", content=body, headers=headers), 405)
    assert outcome(http.delete("/fhir/ImagingStudy/study-P1"), 405)
    assert outcome(http.delete("/fhir/Patient/pat-P1"), 405)
    assert http.get("/fhir/ImagingStudy/study-P1").headers["etag"] == 'W/"1"'  # unchanged


BAD_INPUT: list[tuple[str, Any, int, str | None]] = [
    ("malformed JSON", b'{"resourceType": "DiagnosticReport", ', 400, None),
    ("not an object", [report()], 400, None),
    ("wrong resourceType", report(resourceType="Observation"), 400, None),
    ("no resourceType", {k: v for k, v in report().items() if k != "resourceType"}, 400, None),
    ("unknown element", report(colour="blue"), 400, "DiagnosticReport.colour"),
    ("bad date", report(issued="2024-02-30T10:00:00Z"), 400, "DiagnosticReport.issued"),
    ("bad dateTime", report(effectiveDateTime="yesterday"), 400, "DiagnosticReport.effectiveDateTime"),
    (
        "wrong datatype",
        report(code={"coding": [{"system": 42, "code": "x"}]}),
        400,
        "DiagnosticReport.code.coding[0].system",
    ),
    ("missing status", {k: v for k, v in report().items() if k != "status"}, 400, "DiagnosticReport.status"),
    ("status not in value set", report(status="done"), 400, "DiagnosticReport.status"),
    ("unknown patient", report(subject={"reference": "Patient/nobody"}), 422, "DiagnosticReport.subject"),
    ("subject not a patient", report(subject={"reference": "Group/1"}), 422, "DiagnosticReport.subject"),
    ("no subject", {k: v for k, v in report().items() if k != "subject"}, 422, "DiagnosticReport.subject"),
    (
        "study of another patient",
        report(imagingStudy=[{"reference": "ImagingStudy/study-P2"}]),
        422,
        "DiagnosticReport.imagingStudy[0]",
    ),
    (
        "unknown study",
        report(imagingStudy=[{"reference": "ImagingStudy/none"}]),
        422,
        "DiagnosticReport.imagingStudy[0]",
    ),
    ("result not hosted", report(result=[{"reference": "Observation/o1"}]), 422, "DiagnosticReport.result[0]"),
    ("missing contained", report(result=[{"reference": "#o1"}]), 422, "DiagnosticReport.result[0]"),
    ("urn outside a bundle", report(result=[{"reference": "urn:uuid:0b5d"}]), 422, "DiagnosticReport.result[0]"),
]


@pytest.mark.parametrize(("case", "body", "status", "expression"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_changes_nothing(
    server: LiveServer, http: httpx.Client, case: str, body: Any, status: int, expression: str | None
) -> None:
    seed(server)
    issues = outcome(post(http, body), status)
    assert issues[0]["severity"] == "error" and issues[0]["diagnostics"]
    if expression is not None:
        assert expression in [e for i in issues for e in i.get("expression", [])], issues
    assert count_reports(server) == 0


def test_several_problems_one_outcome(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    issues = outcome(post(http, report(colour="blue", issued="never", code={"text": 5})), 400)
    paths = {e for i in issues for e in i["expression"]}
    assert {"DiagnosticReport.colour", "DiagnosticReport.issued", "DiagnosticReport.code.text"} <= paths


def test_references_that_resolve(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    contained = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "nodule"}}
    body = report(
        contained=[contained],
        result=[{"reference": "#o1"}, {"reference": "https://elsewhere.example/fhir/Observation/9"}],
        subject={"reference": f"{server.url}/fhir/Patient/pat-P1"},
    )
    created = post(http, body)
    assert created.status_code == 201, created.text
    stored = created.json()
    assert stored["subject"]["reference"] == "Patient/pat-P1"  # our base made relative
    assert stored["contained"] == [contained] and stored["result"][1]["reference"].startswith("https://elsewhere")
    update = put(http, stored["id"], stored | {"id": "other-id"})
    assert outcome(update, 400)[0]["expression"] == ["DiagnosticReport.id"]


def test_policy_sees_the_reports_patient(server: LiveServer, http: httpx.Client, token: Any) -> None:
    seed(server)
    p1 = post(http, report("P1")).json()["id"]
    p3 = post(http, report("P3")).json()["id"]
    who = bearer(token(sub="dr-who", roles=["referring"], scopes=[]))
    assert httpx.get(f"{server.url}/fhir/DiagnosticReport/{p1}", headers=who).status_code == 200
    denied = httpx.get(f"{server.url}/fhir/DiagnosticReport/{p3}", headers=who)
    assert outcome(denied, 403)[0]["code"] == "forbidden"
    assert httpx.get(f"{server.url}/fhir/DiagnosticReport/{p3}/_history", headers=who).status_code == 403
    assert httpx.get(f"{server.url}/fhir/DiagnosticReport/{p3}/_history/1", headers=who).status_code == 403
    who_post = httpx.post(
        f"{server.url}/fhir/DiagnosticReport",
        content=json.dumps(report("P1")).encode(),
        headers={**who, "Content-Type": FHIR_JSON},
    )
    assert outcome(who_post, 403)  # referring clinicians do not write reports

    # a radiologist app bound to patient P1 by its token
    app = bearer(token(sub="rad", roles=["radiologist"], scopes=["patient/DiagnosticReport.cruds"], patient="P1"))
    with httpx.Client(base_url=server.url, headers=app, timeout=60) as bound:
        assert post(bound, report("P1")).status_code == 201
        assert outcome(post(bound, report("P3")), 403)
        assert outcome(post(bound, report("P1", subject={"reference": "Patient/pat-P3"}, imagingStudy=[])), 403)
        moved = put(bound, p1, report("P3", id=p1))  # move a P1 report to P3
        assert outcome(moved, 403)
        assert outcome(put(bound, "new-one", report("P3", id="new-one")), 403)  # update as create into P3
        assert outcome(put(bound, p3, report("P1", id=p3)), 403)  # take P3's report
        assert bound.delete(f"/fhir/DiagnosticReport/{p3}").status_code == 403
    assert http.get(f"/fhir/DiagnosticReport/{p1}").json()["subject"]["reference"] == "Patient/pat-P1"
    assert http.get(f"/fhir/DiagnosticReport/{p3}").headers["etag"] == 'W/"1"'
    assert outcome(http.get("/fhir/DiagnosticReport/new-one"), 404)
    ai = bearer(token(sub="model-1", roles=["ai-service"], scopes=[]))
    made = httpx.post(
        f"{server.url}/fhir/DiagnosticReport",
        content=json.dumps(report("P3")).encode(),
        headers={**ai, "Content-Type": FHIR_JSON},
    )
    assert made.status_code == 201
