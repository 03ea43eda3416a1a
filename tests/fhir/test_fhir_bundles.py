"""Batch and transaction Bundles over HTTP (fhir/rest/bundles.py, fhir/rest/bundle.py): a transaction is all or
nothing with `urn:uuid:` references resolved; a batch succeeds entry by entry; every entry is decided by the
policy on its own (a token bound to patient P1 gets nothing of P3, not even inside a bundle) and audited on its
own; oversized and malformed bundles are refused with an OperationOutcome. Pure parsing is tested below."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from fhir.errors import FhirError
from fhir.rest.bundles import Entry, TooLarge, full_url_map, parse_bundle, parse_target, processing_order, resolve
from server.settings import Settings, SettingsError
from tests.conftest import LiveServer, bearer
from tests.fhir.test_fhir_rest import FHIR_JSON, count_reports, outcome, report, seed


def send(client: httpx.Client, kind: str, entries: list[dict[str, Any]], **headers: str) -> httpx.Response:
    body = {"resourceType": "Bundle", "type": kind, "entry": entries}
    return client.post("/fhir", content=json.dumps(body).encode(), headers={"Content-Type": FHIR_JSON, **headers})


def create_entry(body: dict[str, Any], full_url: str | None = None, **request: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": body, "request": {"method": "POST", "url": "DiagnosticReport", **request}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def statuses(response: httpx.Response, kind: str) -> list[str]:
    assert response.status_code == 200, response.text
    bundle = response.json()
    Bundle.model_validate(bundle)
    assert bundle["type"] == f"{kind}-response"
    return [e["response"]["status"] for e in bundle["entry"]]


def test_transaction_resolves_urn_references(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    first = "urn:uuid:6f0a3f6e-8d4c-4e39-9a8f-2a1b0c9d8e7f"
    linked = report(conclusion="see earlier", basedOn=[], result=[])
    linked["extension"] = [{"url": "http://example.org/replaces", "valueReference": {"reference": first}}]
    existing = http.post(
        "/fhir/DiagnosticReport", content=json.dumps(report()).encode(), headers={"Content-Type": FHIR_JSON}
    ).json()
    entries = [
        {"request": {"method": "GET", "url": f"DiagnosticReport/{existing['id']}"}},
        create_entry(linked),
        create_entry(report(), first),
        {"request": {"method": "DELETE", "url": f"DiagnosticReport/{existing['id']}"}},
    ]
    response = send(http, "transaction", entries)
    # processing order: DELETE, POST, PUT, GET; so the GET sees the deletion and fails the whole transaction
    assert outcome(response, 410)
    assert count_reports(server) == 1

    entries[0] = {"request": {"method": "GET", "url": "DiagnosticReport?status=final"}}
    response = send(http, "transaction", entries)
    assert statuses(response, "transaction") == ["200 OK", "201 Created", "201 Created", "204 No Content"]
    answer = response.json()["entry"]
    made = answer[2]["response"]["location"].split("/")
    assert made[-4:-2] == ["DiagnosticReport", made[-3]] and made[-1] == "1"
    reference = answer[1]["resource"]["extension"][0]["valueReference"]["reference"]
    assert reference == f"DiagnosticReport/{made[-3]}"
    found = {e["resource"]["id"] for e in answer[0]["resource"].get("entry", []) if e["search"]["mode"] == "match"}
    assert made[-3] in found and existing["id"] not in found  # the search ran after the writes
    assert http.get(f"/fhir/DiagnosticReport/{existing['id']}").status_code == 410


def test_transaction_is_all_or_nothing(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    entries = [
        create_entry(report("P1")),
        create_entry(report("P2")),
        create_entry(report("P3", subject={"reference": "Patient/nobody"}, imagingStudy=[])),
    ]
    failed = send(http, "transaction", entries)
    issues = outcome(failed, 422)
    assert issues[0]["expression"] == ["DiagnosticReport.subject"]
    invalid = send(http, "transaction", [create_entry(report()), create_entry(report(issued="soon"))])
    assert outcome(invalid, 400)[0]["expression"] == ["DiagnosticReport.issued"]
    bad_url = send(http, "transaction", [create_entry(report()), {"request": {"method": "PATCH", "url": "X/1"}}])
    assert outcome(bad_url, 405)
    twice = [
        {"resource": report(id="r1"), "request": {"method": "PUT", "url": "DiagnosticReport/r1"}},
        {"request": {"method": "DELETE", "url": "DiagnosticReport/r1"}},
    ]
    assert outcome(send(http, "transaction", twice), 400)
    assert count_reports(server) == 0
    assert statuses(send(http, "transaction", entries[:2]), "transaction") == ["201 Created", "201 Created"]
    assert count_reports(server) == 2


def test_batch_partial_success(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    entries = [
        create_entry(report("P1")),
        create_entry(report("P1", colour="red")),
        {"request": {"method": "GET", "url": "DiagnosticReport/missing"}},
        {"resource": report("P2", id="b2"), "request": {"method": "PUT", "url": "DiagnosticReport/b2"}},
        {"request": {"method": "DELETE", "url": "ImagingStudy/study-P1"}},
        {"request": {"method": "GET", "url": "Observation/1"}},
        {"request": {"method": "GET", "url": "ImagingStudy/study-P2"}},
        create_entry(report("P1", result=[{"reference": "urn:uuid:aa"}]), "urn:uuid:bb"),
        "not an entry",
    ]
    response = send(http, "batch", entries)
    got = statuses(response, "batch")
    assert got == [
        "201 Created",
        "400 Bad Request",
        "404 Not Found",
        "201 Created",
        "405 Method Not Allowed",
        "404 Not Found",
        "200 OK",
        "422 Unprocessable Entity",
        "400 Bad Request",
    ]
    answer = response.json()["entry"]
    assert answer[1]["response"]["outcome"]["issue"][0]["expression"] == ["DiagnosticReport.colour"]
    assert answer[0]["response"]["etag"] == 'W/"1"' and answer[0]["resource"]["subject"]["reference"]
    assert answer[6]["resource"]["id"] == "study-P2"
    assert count_reports(server) == 2
    minimal = send(http, "batch", [create_entry(report())], Prefer="return=minimal")
    assert "resource" not in minimal.json()["entry"][0] and minimal.json()["entry"][0]["response"]["location"]


def test_conditional_create_in_a_transaction(server: LiveServer, http: httpx.Client) -> None:
    seed(server)
    ident = {"identifier": [{"system": "urn:example:acc", "value": "T-1"}]}
    entry = create_entry(report(**ident), "urn:uuid:1", ifNoneExist="identifier=urn:example:acc|T-1")
    pointing = report(extension=[{"url": "http://example.org/x", "valueReference": {"reference": "urn:uuid:1"}}])
    first = send(http, "transaction", [entry, create_entry(pointing)])
    assert statuses(first, "transaction") == ["201 Created", "201 Created"]
    rid = first.json()["entry"][0]["response"]["location"].split("/")[-3]
    second = send(http, "transaction", [entry, create_entry(pointing)])
    assert statuses(second, "transaction") == ["200 OK", "201 Created"]
    assert second.json()["entry"][0]["resource"]["id"] == rid
    ref = second.json()["entry"][1]["resource"]["extension"][0]["valueReference"]["reference"]
    assert ref == f"DiagnosticReport/{rid}"  # the fullUrl names the existing match
    assert count_reports(server) == 3


def test_every_entry_is_decided(server: LiveServer, http: httpx.Client, token: Any) -> None:
    seed(server)
    p1 = http.post("/fhir/DiagnosticReport", content=json.dumps(report("P1")), headers={"Content-Type": FHIR_JSON})
    p3 = http.post("/fhir/DiagnosticReport", content=json.dumps(report("P3")), headers={"Content-Type": FHIR_JSON})
    p1_id, p3_id = p1.json()["id"], p3.json()["id"]
    # an application bound to patient P1 (admin role, patient scopes): the envelope passes, entries are decided
    app = bearer(token(sub="app", roles=["admin"], scopes=["patient/*.cruds"], patient="P1"))
    with httpx.Client(base_url=server.url, headers=app, timeout=60) as bound:
        entries = [
            {"request": {"method": "GET", "url": f"DiagnosticReport/{p1_id}"}},
            {"request": {"method": "GET", "url": f"DiagnosticReport/{p3_id}"}},
            {"request": {"method": "GET", "url": f"DiagnosticReport/{p3_id}/_history/1"}},
            create_entry(report("P3")),
            {"resource": report("P1", id=p3_id), "request": {"method": "PUT", "url": f"DiagnosticReport/{p3_id}"}},
            {"resource": report("P3", id=p1_id), "request": {"method": "PUT", "url": f"DiagnosticReport/{p1_id}"}},
            {"request": {"method": "DELETE", "url": f"DiagnosticReport/{p3_id}"}},
            {"request": {"method": "GET", "url": "DiagnosticReport"}},
        ]
        response = send(bound, "batch", entries)
        got = statuses(response, "batch")
        assert got == ["200 OK"] + ["403 Forbidden"] * 6 + ["200 OK"], response.text
        answer = response.json()["entry"]
        assert answer[1]["response"]["outcome"]["issue"][0]["code"] == "forbidden" and "resource" not in answer[1]
        searched = {e["resource"]["id"] for e in answer[7]["resource"].get("entry", [])}
        assert searched == {p1_id}  # the search entry only sees P1
        assert outcome(send(bound, "transaction", [entries[0], entries[3]]), 403)
    assert count_reports(server) == 2
    assert http.get(f"/fhir/DiagnosticReport/{p1_id}").headers["etag"] == 'W/"1"'
    assert http.get(f"/fhir/DiagnosticReport/{p3_id}").headers["etag"] == 'W/"1"'
    who = bearer(token(sub="dr-who", roles=["referring"], scopes=[]))
    with httpx.Client(base_url=server.url, headers=who, timeout=60) as referring:
        # any role may send a Bundle; each entry is decided alone (dr-who's care list has P1 and P2, not P3)
        assert statuses(send(referring, "batch", [entries[1]]), "batch") == ["403 Forbidden"]
        assert outcome(send(referring, "transaction", [entries[1]]), 403)

    # each entry has its own audit record, the denials with the policy's reason
    auditor = bearer(token(sub="sec", roles=["auditor"], scopes=[]))
    events = httpx.get(f"{server.url}/fhir/AuditEvent", params={"_count": 200}, headers=auditor).json()["entry"]
    paths = [
        (e["resource"]["outcome"], e["resource"].get("outcomeDesc", ""))
        for e in events
        if any(p3_id in str(x.get("what", "")) for x in e["resource"].get("entity", []))
        or p3_id in json.dumps(e["resource"])
    ]
    assert any(o != "0" and "outside the token's patient context" in d for o, d in paths), paths


def test_bundle_limits(make_server: Any) -> None:
    server = make_server(fhir_max_bundle_entries=3)
    seed(server)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        too_many = send(http, "batch", [create_entry(report())] * 4)
        assert outcome(too_many, 413)[0]["code"] == "too-costly"
        big = b'{"resourceType": "Bundle", "type": "batch", "entry": [' + b" " * 11_000_000 + b"]}"
        huge = http.post("/fhir", content=big, headers={"Content-Type": FHIR_JSON})
        assert huge.status_code == 413
        assert outcome(send(http, "collection", []), 400)[0]["expression"] == ["Bundle.type"]
        not_bundle = http.post("/fhir", content=json.dumps(report()), headers={"Content-Type": FHIR_JSON})
        assert outcome(not_bundle, 400)
        assert outcome(http.post("/fhir", content=b"{", headers={"Content-Type": FHIR_JSON}), 400)
        assert outcome(http.post("/fhir", content=b"<Bundle/>", headers={"Content-Type": "application/xml"}), 415)
        assert statuses(send(http, "batch", []), "batch") == []
    assert count_reports(server) == 0


def test_max_bundle_entries_setting() -> None:
    assert Settings.from_env({}).fhir_max_bundle_entries == 1000
    assert Settings.from_env({"HOUNSFIELD_FHIR_MAX_BUNDLE_ENTRIES": "50"}).fhir_max_bundle_entries == 50
    with pytest.raises(SettingsError, match="HOUNSFIELD_FHIR_MAX_BUNDLE_ENTRIES"):
        Settings.from_env({"HOUNSFIELD_FHIR_MAX_BUNDLE_ENTRIES": "0"})


BASE = "http://h/fhir"


def test_parse_targets_and_order() -> None:
    assert parse_target("DiagnosticReport", BASE, "u").query is None
    assert parse_target("DiagnosticReport?status=final", BASE, "u").query == "status=final"
    assert parse_target(f"{BASE}/DiagnosticReport/1", BASE, "u").key == "DiagnosticReport/1"
    version = parse_target("DiagnosticReport/1/_history/2", BASE, "u")
    assert version.history and version.version == "2"
    for bad in ("http://other/fhir/DiagnosticReport/1", "diagnosticReport/1", "DiagnosticReport/a b", "A/1/x"):
        with pytest.raises(FhirError):
            parse_target(bad, BASE, "u")
    parsed = parse_bundle(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"request": {"method": "GET", "url": "DiagnosticReport/1"}},
                {"request": {"method": "PUT", "url": "DiagnosticReport/2"}, "resource": {}},
                {"request": {"method": "POST", "url": "DiagnosticReport"}, "resource": {}, "fullUrl": "urn:uuid:a"},
                {"request": {"method": "DELETE", "url": "DiagnosticReport/3"}},
                {"request": {"method": "POST", "url": "Observation"}, "resource": {}},
            ],
        },
        base=BASE,
        served=frozenset({"DiagnosticReport"}),
        max_entries=10,
    )
    entries = [e for e in parsed.entries if isinstance(e, Entry)]
    assert isinstance(parsed.entries[4], FhirError) and parsed.entries[4].status == 404
    assert [e.method for e in processing_order(entries)] == ["DELETE", "POST", "PUT", "GET"]
    mapping = full_url_map(entries, {2: "new"})
    assert mapping == {"urn:uuid:a": "DiagnosticReport/new"}
    assert resolve({"a": [{"reference": "urn:uuid:a"}, {"reference": "urn:uuid:b"}]}, mapping) == {
        "a": [{"reference": "DiagnosticReport/new"}, {"reference": "urn:uuid:b"}]
    }
    with pytest.raises(TooLarge):
        parse_bundle(
            {"resourceType": "Bundle", "type": "batch", "entry": [{}] * 3}, base=BASE, served=frozenset(), max_entries=2
        )


def test_more_concurrent_bundles_than_pool_connections_all_answer(make_server: Any) -> None:
    """A Bundle holds a pool connection while its entries' audit records are written: the audit writer has
    connections of its own, so twice as many concurrent Bundles as the pool has connections all answer, and
    the server still serves afterwards."""
    server: LiveServer = make_server(db_pool_max=2)
    headers = {**bearer(server.token()), "Content-Type": FHIR_JSON}
    body = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": "Patient"}}]}

    async def run() -> tuple[list[int], int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            answers = await asyncio.gather(*(http.post("/fhir", json=body, headers=headers) for _ in range(4)))
            after = await http.get("/dicom-web/studies", headers=headers)
            return [a.status_code for a in answers], after.status_code

    statuses, after = asyncio.run(run())
    assert statuses == [200] * 4 and after in (200, 204)
