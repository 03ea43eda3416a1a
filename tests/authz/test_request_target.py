"""The guard and the handler decide on one parsed target: a WADO-URI request names its object once.

A referring physician may read the studies of the patients in their care list (authz/policies/data.json: dr-who
has P1 and P2). Naming an own study first and another patient's second (`studyUID=<own>&studyUID=<victim>`) once
let the guard decide on the first value and the handler serve the second; a repeated or empty identifying
parameter is now refused (400) before any policy decision, nothing is served, and the audit record says so."""

from __future__ import annotations

import httpx
import pytest
from pydicom.dataset import Dataset

from tests.authz.test_access_http import audit_rows
from tests.conftest import LiveServer, bearer
from tests.support.factory import ct, multipart, part10, stow_headers

DICM = b"DICM"


def store(http: httpx.Client) -> dict[str, Dataset]:
    """One CT instance of P1 (in dr-who's care list) and one of P3 (not in it, and opted out of research)."""
    found = {patient: ct(PatientID=patient) for patient in ("P1", "P3")}
    body = multipart([part10(ds) for ds in found.values()])
    assert http.post("/dicom-web/studies", content=body, headers=stow_headers()).status_code == 200
    return found


def query(*pairs: tuple[str, str]) -> str:
    """A WADO-URI query string exactly as given (repeated names kept, in order)."""
    return "/wado?" + "&".join(f"{name}={value}" for name, value in (("requestType", "WADO"), *pairs))


def naming(ds: Dataset) -> list[tuple[str, str]]:
    return [
        ("studyUID", str(ds.StudyInstanceUID)),
        ("seriesUID", str(ds.SeriesInstanceUID)),
        ("objectUID", str(ds.SOPInstanceUID)),
    ]


def records_for(server: LiveServer, url: str) -> list[dict]:
    path = url.split("?", 1)[0]
    return [r for r in audit_rows(server.dsn) if r.get("http", {}).get("path") == path]


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text[:300]
    assert DICM not in response.content
    assert response.json()["status"] == 400 and "Warning" in response.headers


def test_own_study_then_victim_study_is_400_and_serves_nothing(server: LiveServer, http: httpx.Client) -> None:
    data = store(http)
    own, victim = data["P1"], data["P3"]
    referring = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    before = len(audit_rows(server.dsn))
    url = query(("studyUID", str(own.StudyInstanceUID)), *naming(victim), ("contentType", "application/dicom"))
    attack = httpx.get(server.url + url, headers=referring, timeout=60)
    assert_refused(attack)
    assert "studyUID" in attack.json()["error"]
    [record] = audit_rows(server.dsn)[before:]
    assert record["http"]["status"] == 400 and record["outcome"] != "0"
    assert record["agent"]["sub"] == "dr-who"
    assert "policy" not in record  # refused before any policy decision
    assert "patient_id" not in record.get("entity", {})  # neither the own patient nor the victim is named
    # Rendered, the same.
    rendered = httpx.get(
        server.url + query(("studyUID", str(own.StudyInstanceUID)), *naming(victim)), headers=referring
    )
    assert rendered.status_code == 400 and not rendered.headers["content-type"].startswith("image/")


def test_empty_first_value_is_400(server: LiveServer, http: httpx.Client) -> None:
    victim = store(http)["P3"]
    researcher = bearer(server.token(sub="res", roles=["researcher"], scopes=[]))
    for headers in (researcher, bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))):
        url = query(("studyUID", ""), *naming(victim), ("contentType", "application/dicom"))
        assert_refused(httpx.get(server.url + url, headers=headers, timeout=60))


@pytest.mark.parametrize("name", ["studyUID", "seriesUID", "objectUID"])
@pytest.mark.parametrize("shape", ["other", "same", "empty-last"])
def test_repeated_identifying_parameter_is_400(server: LiveServer, http: httpx.Client, name: str, shape: str) -> None:
    data = store(http)
    own, victim = dict(naming(data["P1"])), dict(naming(data["P3"]))
    extra = {"other": victim[name], "same": own[name], "empty-last": ""}[shape]
    pairs = [*naming(data["P1"]), (name, extra), ("contentType", "application/dicom")]
    assert_refused(http.get(query(*pairs)))  # even the admin: one request names one object


def test_a_single_named_object_is_served_and_audited(server: LiveServer, http: httpx.Client) -> None:
    data = store(http)
    own, victim = data["P1"], data["P3"]
    referring = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    url = query(*naming(own), ("contentType", "application/dicom"))
    served = httpx.get(server.url + url, headers=referring, timeout=60)
    assert served.status_code == 200 and served.content == part10(own)
    record = records_for(server, url)[-1]
    assert record["http"]["status"] == 200
    assert record["entity"]["patient_id"] == "P1"
    assert record["entity"]["instance_uid"] == str(own.SOPInstanceUID)
    denied = httpx.get(server.url + query(*naming(victim), ("contentType", "application/dicom")), headers=referring)
    assert denied.status_code == 403 and DICM not in denied.content
    assert audit_rows(server.dsn)[-1]["entity"]["patient_id"] == "P3"


def test_malformed_path_uid_is_400_before_the_policy(server: LiveServer) -> None:
    """The default target, the path's study/series/instance, is checked once too (PS3.5 9.1)."""
    referring = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    before = len(audit_rows(server.dsn))
    response = httpx.get(f"{server.url}/dicom-web/studies/1.02.x/metadata", headers=referring, timeout=60)
    assert response.status_code == 400 and response.json()["status"] == 400
    [record] = audit_rows(server.dsn)[before:]
    assert record["http"]["status"] == 400 and "policy" not in record


@pytest.mark.parametrize(
    "body",
    [
        b'{"study": "not-a-uid", "series": "1.2.3", "model": "m"}',
        b'{"series": "1.2.3", "model": "m"}',
        b'["1.2.3"]',
        '{"study": "1.2.3", "series": "1.2.4", "model": "m"}'.encode("utf-16"),
    ],
)
def test_inference_request_target_is_parsed_before_the_policy(server: LiveServer, body: bytes) -> None:
    """POST /inference-requests names its study and series in the body: parsed once, a 400 before any decision."""
    bound = bearer(server.token(sub="app", roles=["radiologist"], scopes=["patient/*.cruds"], patient="P1"))
    before = len(audit_rows(server.dsn))
    headers = {**bound, "Content-Type": "application/json"}
    response = httpx.post(server.url + "/inference-requests", content=body, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    [record] = audit_rows(server.dsn)[before:]
    assert record["http"]["status"] == 400 and "policy" not in record
