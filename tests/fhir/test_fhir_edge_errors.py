"""Every request under /fhir that no route takes (unknown path, wrong method) or that the edge refuses is
answered with an OperationOutcome (FHIR R4 http.html "Handling errors"); DICOMweb keeps its JSON errors."""

from __future__ import annotations

import httpx

from tests.conftest import LiveServer


def outcome(answer: httpx.Response, status: int, code: str) -> str:
    assert answer.status_code == status, (answer.request.method, answer.request.url, answer.status_code, answer.text)
    assert answer.headers["content-type"].startswith("application/fhir+json"), answer.headers
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == code, body
    return str(body["issue"][0]["diagnostics"])


def test_unmatched_fhir_requests_get_an_operation_outcome(server: LiveServer, http: httpx.Client) -> None:
    outcome(http.get("/fhir/Observation"), 404, "not-found")
    outcome(http.get("/fhir/Patient/a/b/c/d"), 404, "not-found")
    outcome(http.get("/fhir"), 405, "not-supported")  # the batch endpoint takes POST only
    outcome(http.request("PATCH", "/fhir/Patient/x"), 405, "not-supported")
    outcome(http.delete("/fhir/metadata"), 405, "not-supported")
    outcome(http.put("/fhir/Subscription"), 405, "not-supported")
    # Without a token, an unknown path is still an unknown path (no route: nothing to authenticate for).
    outcome(httpx.get(server.url + "/fhir/Observation"), 404, "not-found")
    # Refused at the edge: request headers too large.
    big = {"X-Big": "a" * (server.settings.max_request_header_bytes + 10)}
    outcome(http.get("/fhir/Patient", headers=big), 431, "too-long")
    # DICOMweb and the rest keep their JSON error.
    for answer in (http.get("/dicom-web/nothing"), http.get("/fhirx"), http.get("/dicom-web/studies", headers=big)):
        assert answer.headers["content-type"].startswith("application/json"), answer.text
        assert answer.json()["status"] == answer.status_code
