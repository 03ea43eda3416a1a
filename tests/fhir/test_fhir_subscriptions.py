"""FHIR R4 rest-hook Subscriptions through the public interface: Subscriptions created over HTTP, reports
written over HTTP, notifications received by a real HTTP server on 127.0.0.1 that records what it gets. Exactly
the matching changes are delivered (with and without payload), failures are retried and end in status `error`,
endpoints outside `HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS` and bad criteria are refused, the owner's read
permission is checked at delivery, and every attempt is in the audit trail without the channel's headers. The
pure rules (endpoint allow-list, headers, the notification request) are checked below the HTTP tests."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import pytest

from fhir import subscriptions
from fhir.errors import Unprocessable
from fhir.repository import FhirRepository, Filing, Stored
from tests.conftest import LiveServer, bearer
from tests.support.factory import ct, multipart, part10, stow_headers

SECRET = "X-Receiver-Key: s3cr3t-receiver-value"
SECRET_VALUE = "s3cr3t-receiver-value"
NOTIFICATION_SUBTYPE = "urn:hounsfield:audit-subtype|subscription-notification"


# --- a real receiver -------------------------------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records every request; it answers `fail` with 500 first, then 200."""

    url: str
    got: list[Received] = field(default_factory=list)
    fail: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            status = 200
            if self.fail > 0:
                self.fail -= 1
                status = 500
            self.got.append(Received(method, path, headers, body, status))
            return status

    def successes(self) -> list[Received]:
        """Requests answered 200 (those after the failures)."""
        with self.lock:
            return [r for r in self.got if r.status == 200]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status = box[0].take(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = _any

        def log_message(self, *_args: Any) -> None:  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.append(Receiver(f"http://127.0.0.1:{httpd.server_address[1]}/hook"))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield box[0]
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


# --- helpers ---------------------------------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def add_patients(server: LiveServer, *keys: str) -> None:
    """Patient `pat-<key>` for each DICOM Patient ID (Patients are derived from DICOM; written here directly)."""

    async def go() -> None:
        conn = await asyncpg.connect(server.dsn)
        try:
            async with conn.transaction():
                for key in keys:
                    patient = {"resourceType": "Patient", "identifier": [{"value": key}]}
                    await FhirRepository().create(
                        conn, "Patient", patient, Filing(key, (), f"|{key}"), rid=f"pat-{key}"
                    )
        finally:
            await conn.close()

    run(go())


def report(patient: str, status: str = "final") -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": status,
        "code": {"text": "CT head report"},
        "subject": {"reference": f"Patient/pat-{patient}"},
        "conclusion": "No acute findings.",
    }


def write_report(http: httpx.Client, patient: str, status: str = "final") -> dict[str, Any]:
    response = http.post("/fhir/DiagnosticReport", json=report(patient, status), headers=FHIR_HEADERS)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


FHIR_HEADERS = {"Content-Type": "application/fhir+json"}


def subscription(endpoint: str, criteria: str = "DiagnosticReport?status=final", **channel: Any) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Final reports for the EHR",
        "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": endpoint, **channel},
    }


def subscribe(http: httpx.Client, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = http.post("/fhir/Subscription", json=body, headers={**FHIR_HEADERS, **(headers or {})})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def refused(response: httpx.Response, status: int, expression: str, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    outcome: dict[str, Any] = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert expression in outcome["issue"][0].get("expression", []), outcome
    for word in words:
        assert word in outcome["issue"][0]["diagnostics"], outcome
    return outcome


def settle(server: LiveServer, timeout: float = 30.0) -> None:
    """Wait until no notify or deliver job is queued or running (retries included)."""

    async def busy() -> int:
        conn = await asyncpg.connect(server.dsn)
        try:
            value = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE kind IN ('fhir.notify', 'fhir.deliver') "
                "AND state IN ('queued', 'running')"
            )
            return int(value)
        finally:
            await conn.close()

    deadline = time.monotonic() + timeout
    while run(busy()):
        assert time.monotonic() < deadline, "notification jobs did not finish"
        time.sleep(0.1)


def delivery_events(server: LiveServer) -> list[dict[str, Any]]:
    """The audit trail's delivery records, as AuditEvents (through the AuditEvent API)."""
    response = httpx.get(
        f"{server.url}/fhir/AuditEvent",
        params={"subtype": NOTIFICATION_SUBTYPE, "_count": "100"},
        headers=server.headers,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", []) if e["search"]["mode"] == "match"]


def start(
    make_server: Callable[..., LiveServer], receiver: Receiver, **settings: Any
) -> tuple[LiveServer, httpx.Client]:
    server = make_server(fhir_subscription_endpoints=(receiver.url,), **settings)
    add_patients(server, "P1", "P2")
    return server, httpx.Client(base_url=server.url, timeout=60, headers=server.headers)


# --- delivery --------------------------------------------------------------------------------------------------


def test_matching_changes_are_put_with_their_payload(make_server: Any, receiver: Receiver) -> None:
    server, http = start(make_server, receiver)
    with http:
        created = subscribe(http, subscription(receiver.url, payload="application/fhir+json", header=[SECRET]))
        assert created["status"] == "active"  # R4: the server activates a requested Subscription
        stored = http.get(f"/fhir/Subscription/{created['id']}").json()
        assert stored["status"] == "active" and stored["channel"]["header"] == [SECRET]
        draft = write_report(http, "P1", status="preliminary")
        finals = [write_report(http, "P1"), write_report(http, "P2")]
        settle(server)
        got = {r.path: r for r in receiver.successes()}
        assert set(got) == {f"/hook/DiagnosticReport/{f['id']}" for f in finals}  # not the preliminary one
        for final in finals:
            hit = got[f"/hook/DiagnosticReport/{final['id']}"]
            assert hit.method == "PUT" and hit.headers["content-type"].startswith("application/fhir+json")
            assert hit.headers["x-receiver-key"] == SECRET_VALUE
            assert json.loads(hit.body) == final  # the version that matched, as stored
        # an update that makes the draft match is a change that matches
        draft["status"] = "final"
        response = http.put(f"/fhir/DiagnosticReport/{draft['id']}", json=draft, headers=FHIR_HEADERS)
        assert response.status_code == 200, response.text
        settle(server)
        last = receiver.successes()[-1]
        assert (
            last.path == f"/hook/DiagnosticReport/{draft['id']}" and json.loads(last.body)["meta"]["versionId"] == "2"
        )
        assert len(receiver.successes()) == 3
        # a deletion notifies nobody (R4: criteria apply to the new value)
        assert http.delete(f"/fhir/DiagnosticReport/{draft['id']}").status_code in (200, 204)
        settle(server)
        assert len(receiver.successes()) == 3
        events = delivery_events(server)
        assert len(events) == 3 and all(e["outcome"] == "0" for e in events)


def test_without_payload_an_empty_post(make_server: Any, receiver: Receiver) -> None:
    server, http = start(make_server, receiver)
    with http:
        subscribe(http, subscription(receiver.url))
        write_report(http, "P1", status="preliminary")
        write_report(http, "P2")
        settle(server)
        got = receiver.successes()
        assert [(r.method, r.path, r.body) for r in got] == [("POST", "/hook", b"")]


def test_failures_are_retried_then_delivered(make_server: Any, receiver: Receiver) -> None:
    server, http = start(make_server, receiver, fhir_subscription_attempts=3)
    receiver.fail = 2
    with http:
        created = subscribe(http, subscription(receiver.url, header=[SECRET]))
        write_report(http, "P1")
        settle(server, timeout=60)  # backoff 2 s, then 4 s
        assert [r.method for r in receiver.got] == ["POST", "POST", "POST"] and receiver.fail == 0
        events = delivery_events(server)
        assert sorted(e["outcome"] for e in events) == ["0", "8", "8"]
        assert http.get(f"/fhir/Subscription/{created['id']}").json()["status"] == "active"


def test_the_last_failure_sets_status_error(make_server: Any, receiver: Receiver) -> None:
    server, http = start(make_server, receiver, fhir_subscription_attempts=2)
    receiver.fail = 100
    with http:
        created = subscribe(http, subscription(receiver.url))
        write_report(http, "P1")
        settle(server, timeout=60)
        assert len(receiver.got) == 2
        now = http.get(f"/fhir/Subscription/{created['id']}").json()
        assert now["status"] == "error" and "500" in now["error"] and now["meta"]["versionId"] == "2"
        # no more notifications while in error; `requested` resumes it
        write_report(http, "P1")
        settle(server)
        assert len(receiver.got) == 2
        now["status"] = "requested"
        response = http.put(f"/fhir/Subscription/{created['id']}", json=now, headers=FHIR_HEADERS)
        assert response.status_code == 200 and response.json()["status"] == "active" and "error" not in response.json()
        receiver.fail = 0
        write_report(http, "P2")
        settle(server)
        assert len(receiver.got) == 3


def test_the_owner_must_be_allowed_to_read_what_is_sent(make_server: Any, receiver: Receiver) -> None:
    """A Subscription of a patient-bound EHR token (SMART `patient/DiagnosticReport.rs`, patient P1) receives
    P1's reports only; the denial for P2 is audited."""
    server, http = start(make_server, receiver)
    with http:
        ehr = bearer(
            server.token(
                sub="ehr-1",
                roles=["ehr"],
                scopes=["system/Subscription.cruds", "patient/DiagnosticReport.rs"],
                patient="P1",
            )
        )
        created = subscribe(http, subscription(receiver.url, payload="application/fhir+json"), headers=ehr)
        p1, p2 = write_report(http, "P1"), write_report(http, "P2")
        settle(server)
        assert [r.path for r in receiver.successes()] == [f"/hook/DiagnosticReport/{p1['id']}"]
        events = delivery_events(server)
        assert sorted(e["outcome"] for e in events) == ["0", "4"]
        denied = next(e for e in events if e["outcome"] == "4")
        assert "may not read" in denied["outcomeDesc"] and f"Subscription/{created['id']}" in denied["outcomeDesc"]
        assert {"value": "P2"} in [e["what"].get("identifier") for e in denied["entity"] if "what" in e]
        assert p2["id"] in json.dumps(denied)
        # roles without Subscription rights may not subscribe
        rad = bearer(server.token(sub="rad", roles=["radiologist"], scopes=[]))
        response = http.post("/fhir/Subscription", json=subscription(receiver.url), headers={**FHIR_HEADERS, **rad})
        assert response.status_code == 403


def test_audit_records_never_hold_channel_headers(make_server: Any, receiver: Receiver) -> None:
    server, http = start(make_server, receiver)
    with http:
        subscribe(http, subscription(receiver.url, header=[SECRET, "Authorization: Bearer receiver-token-1234"]))
        write_report(http, "P1")
        settle(server)
        assert receiver.successes()[0].headers["authorization"] == "Bearer receiver-token-1234"

        async def trail() -> str:
            conn = await asyncpg.connect(server.dsn)
            try:
                rows = await conn.fetch("SELECT record::text AS r FROM audit_log ORDER BY seq")
            finally:
                await conn.close()
            return "\n".join(row["r"] for row in rows)

        text = run(trail())
        assert "subscription-notification" in text
        assert SECRET_VALUE not in text and "receiver-token-1234" not in text and "/hook" not in text
        (event,) = delivery_events(server)
        assert event["type"]["code"] == "rest" and event["outcome"] == "0"
        assert {"value": "P1"} in [e["what"].get("identifier") for e in event["entity"] if "what" in e]


def test_end_turns_a_subscription_off(make_server: Any, receiver: Receiver) -> None:
    server, http = start(make_server, receiver)
    with http:
        body = subscription(receiver.url)
        body["end"] = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
        created = subscribe(http, body)
        write_report(http, "P1")
        settle(server)
        assert receiver.got == []
        assert http.get(f"/fhir/Subscription/{created['id']}").json()["status"] == "off"


def test_imaging_studies_of_one_patient(make_server: Any, receiver: Receiver) -> None:
    """`ImagingStudy?patient=...`: STOW makes ImagingStudies (the `fhir.sync` job); only the patient's new study
    is delivered."""
    server = make_server(fhir_subscription_endpoints=(receiver.url,), fhir_sync_delay_seconds=0.1)

    def stow(patient: str) -> str:
        ds = ct(PatientID=patient)
        response = http.post("/dicom-web/studies", content=multipart([part10(ds)]), headers=stow_headers())
        assert response.status_code == 200, response.text
        return str(ds.StudyInstanceUID)

    def imaging_study(study_uid: str) -> dict[str, Any]:
        async def find() -> Stored | None:
            conn = await asyncpg.connect(server.dsn)
            try:
                return await FhirRepository().find_by_source(conn, "ImagingStudy", study_uid)
            finally:
                await conn.close()

        deadline = time.monotonic() + 30
        while (stored := run(find())) is None or stored.content is None:
            assert time.monotonic() < deadline, "no ImagingStudy"
            time.sleep(0.1)
        return stored.content

    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as http:
        first = imaging_study(stow("P1"))
        patient = first["subject"]["reference"]
        subscribe(http, subscription(receiver.url, f"ImagingStudy?patient={patient}", payload="application/fhir+json"))
        second, other = stow("P1"), stow("P9")
        wanted, unwanted = imaging_study(second), imaging_study(other)
        settle(server)
        got = receiver.successes()
        assert [r.path for r in got] == [f"/hook/ImagingStudy/{wanted['id']}"], [r.path for r in got]
        assert json.loads(got[0].body)["subject"]["reference"] == patient
        assert unwanted["subject"]["reference"] != patient
        (event,) = delivery_events(server)
        assert {"value": "P1"} in [e["what"].get("identifier") for e in event["entity"] if "what" in e]


# --- refused Subscriptions -------------------------------------------------------------------------------------


def test_endpoints_must_be_allowed(make_server: Any, receiver: Receiver) -> None:
    server = make_server()  # no HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS: no Subscription at all
    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as http:
        response = http.post("/fhir/Subscription", json=subscription(receiver.url), headers=FHIR_HEADERS)
        refused(response, 422, "Subscription.channel.endpoint", "HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS")
    server, http = start(make_server, receiver)
    with http:
        port = int(receiver.url.split(":")[2].split("/")[0])
        for endpoint in (
            f"http://127.0.0.1:{port}/hookx",
            f"http://127.0.0.1:{port + 1}/hook",
            f"http://localhost:{port}/hook",
            f"http://x@127.0.0.1:{port}/hook",
            f"http://127.0.0.1:{port}/hook/../admin",
        ):
            response = http.post("/fhir/Subscription", json=subscription(endpoint), headers=FHIR_HEADERS)
            refused(response, 422, "Subscription.channel.endpoint", "HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS")
        assert (
            http.post(
                "/fhir/Subscription", json=subscription(receiver.url + "/ehr-1"), headers=FHIR_HEADERS
            ).status_code
            == 201
        )

        async def count() -> int:
            conn = await asyncpg.connect(server.dsn)
            try:
                return int(
                    await conn.fetchval("SELECT count(*) FROM fhir_resources WHERE resource_type = 'Subscription'")
                )
            finally:
                await conn.close()

        assert run(count()) == 1  # nothing refused was written


@pytest.mark.parametrize(
    ("change", "expression"),
    [
        ({"criteria": "Observation?code=1234-5"}, "Subscription.criteria"),
        ({"criteria": "DiagnosticReport?no-such-parameter=1"}, "Subscription.criteria"),
        ({"criteria": "DiagnosticReport?date=yesterday"}, "Subscription.criteria"),
        ({"criteria": "Subscription?status=active"}, "Subscription.criteria"),
        ({"status": "error"}, "Subscription.status"),
        ({"channel": {"type": "websocket", "endpoint": "RECEIVER"}}, "Subscription.channel.type"),
        (
            {"channel": {"type": "rest-hook", "endpoint": "RECEIVER", "payload": "application/fhir+xml"}},
            "Subscription.channel.payload",
        ),
        (
            {"channel": {"type": "rest-hook", "endpoint": "RECEIVER", "header": ["Host: evil.example"]}},
            "Subscription.channel.header[0]",
        ),
        (
            {"channel": {"type": "rest-hook", "endpoint": "RECEIVER", "header": ["no colon"]}},
            "Subscription.channel.header[0]",
        ),
    ],
)
def test_bad_subscriptions_are_422(
    make_server: Any, receiver: Receiver, change: dict[str, Any], expression: str
) -> None:
    _server, http = start(make_server, receiver)
    with http:
        body = {**subscription(receiver.url), **json.loads(json.dumps(change).replace("RECEIVER", receiver.url))}
        response = http.post("/fhir/Subscription", json=body, headers=FHIR_HEADERS)
        refused(response, 422, expression)


# --- the pure rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [
        ("https://ehr.example.org/hooks", True),
        ("https://ehr.example.org/hooks/", True),
        ("https://ehr.example.org/hooks/a/b?x=1", True),
        ("https://EHR.example.org:443/hooks/a", True),
        ("https://ehr.example.org/hooksx", False),
        ("https://ehr.example.org/", False),
        ("http://ehr.example.org/hooks", False),
        ("https://ehr.example.org:8443/hooks", False),
        ("https://ehr.example.org.evil.net/hooks", False),
        ("https://u:p@ehr.example.org/hooks", False),
        ("https://ehr.example.org@evil.net/hooks", False),
        ("https://ehr.example.org/hooks/../admin", False),
        ("https://ehr.example.org/hooks/%2e%2e/admin", False),
        ("https://ehr.example.org/hooks#frag", False),
        ("https://ehr.example.org/hooks/a b", False),
        ("https://ehr.example.org:99999/hooks", False),
        ("ftp://ehr.example.org/hooks", False),
    ],
)
def test_endpoint_allow_list(endpoint: str, allowed: bool) -> None:
    assert subscriptions.endpoint_allowed(endpoint, ("https://ehr.example.org/hooks",)) is allowed


def test_a_root_prefix_allows_the_whole_origin() -> None:
    assert subscriptions.endpoint_allowed("http://127.0.0.1:9/a/b", ("http://127.0.0.1:9",))
    assert not subscriptions.endpoint_allowed("http://127.0.0.1:9/a", ())


def test_headers_and_the_notification_request() -> None:
    assert subscriptions.headers_of({"header": ["Authorization: Bearer x", "X-A:b"]}) == [
        ("Authorization", "Bearer x"),
        ("X-A", "b"),
    ]
    for bad in (["Content-Length: 5"], ["X: a\r\nY: b"], [""], "X-A: b"):
        with pytest.raises(Unprocessable):
            subscriptions.headers_of({"header": bad})
    resource = Stored("DiagnosticReport", "r1", 2, dt.datetime.now(dt.UTC), False, {"resourceType": "DiagnosticReport"})
    put = subscriptions.notification_request("https://h/hooks/?k=1", [("X-A", "b")], resource)
    assert (put.method, str(put.url)) == ("PUT", "https://h/hooks/DiagnosticReport/r1?k=1")
    assert put.headers["x-a"] == "b" and json.loads(put.content) == {"resourceType": "DiagnosticReport"}
    post = subscriptions.notification_request("https://h/hooks", [], None)
    assert (post.method, str(post.url), post.content) == ("POST", "https://h/hooks", b"")


def test_owner_round_trip_and_forgery() -> None:
    from authz.principal import Principal
    from server.settings import Settings

    writer = Principal("ehr-1", "hounsfield", ("ehr",), ("system/Subscription.cruds",), "P1", "app")
    forged = {"url": subscriptions.OWNER_URL, "extension": [{"url": "sub", "valueString": "admin"}]}
    body = {**subscription("https://h/hooks"), "extension": [forged]}
    settings = Settings.from_env({}).with_overrides(fhir_subscription_endpoints=("https://h/hooks",))
    stored = subscriptions.transform_subscription(body, writer, settings)
    assert stored["status"] == "active" and len(stored["extension"]) == 1
    assert subscriptions.owner_of(stored) == writer
    assert subscriptions.owner_of(subscription("https://h/hooks")) is None
