"""A policy's denial says nothing about what it protects: DICOMweb, FHIR (direct and in a batch) and DIMSE
answer "access denied by policy" and the decision's id, never a patient, a modality, a care list or a subject;
the policy's reasons are in the audit record of that request, under the same decision id.

A referring physician (dr-who: care list P1, P2 in authz/policies/data.json) asks for P5's mammography."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from tests.authz.test_access_http import audit_rows
from tests.conftest import LiveServer, bearer
from tests.fhir.test_fhir_rest import FHIR_JSON, outcome, seed
from tests.support.dimse_util import TITLE, dimse_audit, dimse_port, require_dcmtk, start
from tests.support.factory import ct, multipart, part10, stow_headers

DENIED = re.compile(r"^access denied by policy \(decision ([0-9a-f-]{36})\)$")
SECRETS = ("P5", "MG", "dr-who", "care list", "mammo", "restricted", "opted")


def revealing(text: str) -> list[str]:
    return [word for word in SECRETS if word.lower() in text.lower()]


def decision_in(text: str) -> str:
    match = DENIED.match(text)
    assert match, text
    return match.group(1)


def store_mg(server: LiveServer) -> Dataset:
    ds = ct(PatientID="P5", Modality="MG")
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        response = http.post("/dicom-web/studies", content=multipart([part10(ds)]), headers=stow_headers())
    assert response.status_code == 200, response.text
    return ds


def record_of(server: LiveServer, decision_id: str) -> dict[str, Any]:
    """The latest record naming the decision (a decision answered from the cache names several requests)."""
    found = [r for r in audit_rows(server.dsn) if r.get("policy", {}).get("decision_id") == decision_id]
    assert found, decision_id
    return found[-1]


def test_dicomweb_denials_carry_the_decision_id_only(server: LiveServer) -> None:
    mg = store_mg(server)
    who = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    study = mg.StudyInstanceUID
    urls = [
        f"/dicom-web/studies/{study}/metadata",
        f"/dicom-web/studies/{study}/series/{mg.SeriesInstanceUID}/instances/{mg.SOPInstanceUID}",
        f"/wado?requestType=WADO&studyUID={study}&seriesUID={mg.SeriesInstanceUID}&objectUID={mg.SOPInstanceUID}",
    ]
    for url in urls:
        denied = httpx.get(server.url + url, headers=who, timeout=60)
        assert denied.status_code == 403, (url, denied.text)
        body = denied.json()
        assert body["status"] == 403 and decision_in(body["error"]) == body["decision_id"]
        assert revealing(denied.text) == [] and revealing(denied.headers["warning"]) == [], denied.text
        assert body["decision_id"] in denied.headers["warning"]
        record = record_of(server, body["decision_id"])
        assert record["http"]["path"] == url.split("?", 1)[0] and record["http"]["status"] == 403
        assert record["entity"]["patient_id"] == "P5"
        assert "P5" in record["outcome_desc"] and "care list" in record["outcome_desc"]  # the reasons: audit only
        assert "MG" in record["outcome_desc"]
    # The security team finds the reasons by the decision id the caller quotes.
    auditor = bearer(server.token(sub="sec", roles=["auditor"], scopes=[]))
    found = httpx.get(server.url + "/fhir/AuditEvent", params={"policy": body["decision_id"]}, headers=auditor)
    assert found.status_code == 200, found.text
    descriptions = [e["resource"].get("outcomeDesc", "") for e in found.json()["entry"]]
    assert descriptions and all("care list" in d for d in descriptions)


def test_fhir_read_and_batch_entry_denials_carry_the_decision_id_only(server: LiveServer) -> None:
    seed(server, ("P1", "P5"))
    who = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    with httpx.Client(base_url=server.url, headers=who, timeout=60) as fhir:
        read = fhir.get("/fhir/ImagingStudy/study-P5")
        [issue] = outcome(read, 403)
        assert issue["code"] == "forbidden" and revealing(read.text) == [], read.text
        read_id = decision_in(issue["diagnostics"])
        assert read_id in read.headers["warning"] and revealing(read.headers["warning"]) == []

        entries = [
            {"request": {"method": "GET", "url": "ImagingStudy/study-P1"}},
            {"request": {"method": "GET", "url": "ImagingStudy/study-P5"}},
            {"request": {"method": "GET", "url": "Patient/pat-P5"}},
        ]
        body = {"resourceType": "Bundle", "type": "batch", "entry": entries}
        batch = fhir.post("/fhir", content=json.dumps(body).encode(), headers={"Content-Type": FHIR_JSON})
        assert batch.status_code == 200, batch.text
        answers = batch.json()["entry"]
        assert [a["response"]["status"] for a in answers] == ["200 OK", "403 Forbidden", "403 Forbidden"]
        entry_ids = []
        for answer in answers[1:]:
            [entry_issue] = answer["response"]["outcome"]["issue"]
            assert entry_issue["code"] == "forbidden" and revealing(json.dumps(answer)) == [], answer
            entry_ids.append(decision_in(entry_issue["diagnostics"]))

        transaction = fhir.post(
            "/fhir",
            content=json.dumps({**body, "type": "transaction", "entry": entries[1:2]}).encode(),
            headers={"Content-Type": FHIR_JSON},
        )
        [failed] = outcome(transaction, 403)
        assert revealing(transaction.text) == [] and decision_in(failed["diagnostics"])

    for decision_id in (read_id, *entry_ids):
        record = record_of(server, decision_id)
        assert record["entity"]["patient_id"] == "P5" and "care list" in record["outcome_desc"]


def test_break_glass_and_audit_api_denials(server: LiveServer) -> None:
    tech = bearer(server.token(sub="tech", roles=["technologist"], scopes=[]))
    refused = httpx.post(server.url + "/break-glass", json={"reason": "x" * 20, "patient_id": "P5"}, headers=tech)
    assert refused.status_code == 403 and revealing(refused.text) == []
    assert "technologist" not in refused.text and decision_in(refused.json()["error"])
    record = record_of(server, refused.json()["decision_id"])
    assert "technologist" in record["outcome_desc"]
    audit = httpx.get(server.url + "/fhir/AuditEvent", params={"patient": "P5"}, headers=tech, timeout=60)
    [issue] = outcome(audit, 403)
    assert "technologist" not in audit.text and decision_in(issue["diagnostics"])


@pytest.mark.timeout(120)
def test_dimse_denials_carry_the_decision_id_only(make_server: Any) -> None:
    require_dcmtk()
    server = start(make_server)
    mg = store_mg(server)

    def associate(calling: str, model: str) -> Any:
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", dimse_port(server), contexts=[build_context(model)], ae_title=TITLE)
        assert assoc.is_established
        return assoc

    get = StudyRootQueryRetrieveInformationModelGet
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", mg.StudyInstanceUID
    assoc = associate("REF", get)  # REF is dr-who: P5 is not in the care list
    try:
        [status] = [s for s, _ in assoc.send_c_get(query, get)]
    finally:
        assoc.release()
    assert status.Status == 0x0124
    comment = str(status.ErrorComment)
    assert comment.startswith("access denied by policy: ") and revealing(comment) == [], comment
    assert len(comment) <= 64
    [record] = [r for r in dimse_audit(server.dsn, "C-GET") if r["outcome"] != "0"]
    assert record["policy"]["decision_id"] == comment.removeprefix("access denied by policy: ")
    assert "care list" in record["outcome_desc"] and "P5" in record["outcome_desc"]

    find = StudyRootQueryRetrieveInformationModelFind
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID = "STUDY", ""
    assoc = associate("AUD", find)  # an auditor may not search images
    try:
        statuses = [s for s, _ in assoc.send_c_find(query, find)]
    finally:
        assoc.release()
    assert [s.Status for s in statuses] == [0x0124]
    assert str(statuses[0].ErrorComment).startswith("access denied by policy: ")
    assert "auditor" not in str(statuses[0].ErrorComment)
