"""Break-glass end to end through the public interface: a clinician denied a study starts emergency access with a
reason (POST /break-glass, or a BTG token with X-Break-Glass-Reason), reads it inside the window (flagged in the
audit trail), the start is a Security Alert record and a webhook alert (a real HTTP server on 127.0.0.1), expiry
and a reviewer's close end it; who may not break the glass gets 403, a bad reason 400."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import pytest

from authz.audit import key_verifier
from authz.auditverify import verify
from authz.breakglass import (
    InvalidRequest,
    StartRequest,
    check_reason,
    parse_close,
    parse_start,
    scoped_start,
    visible_length,
)
from authz.keys import load_or_create
from server.platform import db
from tests.conftest import LiveServer, bearer
from tests.support.factory import ct, multipart, part10, stow_headers

REASON = "unconscious trauma patient in ED, prior CT needed"


class Webhook:
    """A tiny real HTTP server that records JSON POSTs; the first `fail_first` answers are 500."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail_first = 0
        self.attempts = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.attempts += 1
                if hook.attempts <= hook.fail_first:
                    self.send_response(500)
                else:
                    hook.received.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts?secret=s3cr3t"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, count: int = 1, seconds: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.received

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def store(server: LiveServer) -> dict[str, str]:
    """Studies of P1 (CT), P3 (MR) and P5 (MG); returns study UID by patient."""
    studies, parts = {}, []
    for patient, modality in (("P1", "CT"), ("P3", "MR"), ("P5", "MG")):
        ds = ct(PatientID=patient, Modality=modality)
        studies[patient] = ds.StudyInstanceUID
        parts.append(part10(ds))
    response = httpx.post(
        server.dicomweb + "/studies", content=multipart(parts), headers={**stow_headers(), **server.headers}
    )
    assert response.status_code == 200, response.text
    return studies


def sql(dsn: str, query: str, *args: Any) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [dict(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def audit_records(dsn: str) -> list[dict[str, Any]]:
    rows = sql(dsn, "SELECT record FROM audit_log ORDER BY seq")
    return [json.loads(r["record"]) if isinstance(r["record"], str) else r["record"] for r in rows]


def alerts(records: list[dict[str, Any]], subtype: str) -> list[dict[str, Any]]:
    return [
        r for r in records if r["type"]["code"] == "110113" and any(s["code"] == subtype for s in r.get("subtype", []))
    ]


def chain_verifies(server: LiveServer) -> None:
    async def check() -> None:
        pool = await db.create_pool(server.dsn, 1, 2)
        try:
            key = load_or_create(server.settings.data_dir)
            result = await verify(pool, key_verifier({key.kid: key.public_jwk}))
            assert result.ok, result.problems
        finally:
            await pool.close()

    asyncio.run(check())


def patients(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return sorted(m["00100020"]["Value"][0] for m in response.json())


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def logs() -> Iterator[Collect]:
    """Messages of our loggers and httpx's (handlers on the loggers themselves: the app configures the root)."""
    collect = Collect()
    loggers = [logging.getLogger(name) for name in ("authz", "server", "httpx", "httpcore")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(collect)
        lg.setLevel(logging.DEBUG)
    yield collect
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(collect)
        lg.setLevel(level)


def test_clinician_breaks_the_glass_reads_flagged_until_expiry(
    make_server: Any, webhook: Webhook, logs: Collect
) -> None:
    server: LiveServer = make_server(break_glass_webhook=webhook.url)
    studies = store(server)
    dr = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    p3 = f"{server.dicomweb}/studies/{studies['P3']}/metadata"
    assert httpx.get(p3, headers=dr).status_code == 403  # P3 is not in dr-who's care list
    assert patients(httpx.get(server.dicomweb + "/studies", headers=dr)) == ["P1"]

    started = httpx.post(
        server.url + "/break-glass",
        json={"reason": f"  {REASON} ", "patient_id": "P3", "study_uid": studies["P3"]},
        headers=dr,
    )
    assert started.status_code == 201, started.text
    session = started.json()
    assert started.headers["location"] == f"/break-glass/{session['id']}"
    assert (session["sub"], session["reason"], session["patient_id"], session["open"]) == ("dr-who", REASON, "P3", True)
    assert session["issuer"] and session["roles"] == ["referring"]
    window = dt.datetime.fromisoformat(session["expires_at"]) - dt.datetime.fromisoformat(session["started_at"])
    assert window == dt.timedelta(minutes=server.settings.break_glass_minutes)
    assert session["closed_at"] is None and session["closed_by"] is None

    # Inside the window: the study, and searches add it to the care list (nothing of other patients: not P5's MG).
    assert httpx.get(p3, headers=dr).status_code == 200
    assert patients(httpx.get(server.dicomweb + "/studies", headers=dr)) == ["P1", "P3"]

    records = audit_records(server.dsn)
    (start,) = alerts(records, "110127")
    assert start["agent"]["sub"] == "dr-who" and start["outcome"] == "0"
    assert start["policy"]["break_glass"] is True and start["policy"]["reason"] == REASON
    assert "BTG" in start["purpose_of_use"] and start["entity"]["patient_id"] == "P3"
    assert session["id"] in start["outcome_desc"]
    reads = [r for r in records if r.get("http", {}).get("path", "").endswith("/metadata")]
    assert [(r["http"]["status"], r.get("policy", {}).get("break_glass", False)) for r in reads] == [
        (403, False),
        (200, True),
    ]
    assert reads[1]["policy"]["reason"] == REASON and session["id"] in reads[1]["outcome_desc"]
    search = [
        r
        for r in records
        if r.get("http", {}).get("path") == "/dicom-web/studies" and r["agent"].get("sub") == "dr-who"
    ]
    assert [r.get("policy", {}).get("break_glass", False) for r in search] == [False, True]

    # The webhook got the alert (from the job queue's worker), and the log a warning without the free text.
    (alert,) = webhook.wait(1)
    assert alert["session"]["id"] == session["id"] and alert["session"]["reason"] == REASON
    assert alert["subtype_code"]["code"] == "110127" and alert["type_code"]["code"] == "110113"
    warnings = [m for m in logs.messages if "BREAK-GLASS" in m]
    assert warnings and session["id"] in warnings[0] and "dr-who" in warnings[0]
    assert not any("unconscious" in m or "s3cr3t" in m for m in logs.messages), logs.messages
    deadline = time.monotonic() + 10
    while not sql(server.dsn, "SELECT alerted_at FROM break_glass_sessions")[0]["alerted_at"]:
        assert time.monotonic() < deadline, "alert delivery not recorded"
        time.sleep(0.05)

    # After the window: denied again, searches back to the care list.
    sql(server.dsn, "UPDATE break_glass_sessions SET expires_at = now() - interval '1 second'")
    assert httpx.get(p3, headers=dr).status_code == 403
    assert patients(httpx.get(server.dicomweb + "/studies", headers=dr)) == ["P1"]
    chain_verifies(server)


def test_reviewers_list_and_close_sessions(make_server: Any) -> None:
    server: LiveServer = make_server()
    studies = store(server)
    dr = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    house = bearer(server.token(sub="dr-house", roles=["radiologist"], scopes=[]))
    first = httpx.post(server.url + "/break-glass", json={"reason": REASON, "patient_id": "P3"}, headers=dr).json()
    second = httpx.post(
        server.url + "/break-glass", json={"reason": "cardiac arrest, comparison", "patient_id": "P5"}, headers=house
    )
    assert second.status_code == 201
    auditor = bearer(server.token(sub="sec", roles=["auditor"], scopes=[]))

    listed = httpx.get(server.url + "/break-glass", params={"open": "true"}, headers=auditor)
    assert listed.status_code == 200, listed.text
    assert [s["id"] for s in listed.json()] == [second.json()["id"], first["id"]]  # newest first
    assert all(s["open"] for s in listed.json())
    one = httpx.get(f"{server.url}/break-glass/{first['id']}", headers=auditor)
    assert one.status_code == 200 and one.json()["reason"] == REASON

    # Clinicians do not review (nor close their own).
    assert httpx.get(server.url + "/break-glass", headers=dr).status_code == 403
    close_url = f"{server.url}/break-glass/{first['id']}/close"
    assert httpx.post(close_url, json={"comment": "done"}, headers=dr).status_code == 403

    assert httpx.post(close_url, json={}, headers=auditor).status_code == 400
    assert httpx.post(close_url, json={"comment": "  "}, headers=auditor).status_code == 400
    closed = httpx.post(close_url, json={"comment": "reviewed with the ED lead: justified"}, headers=auditor)
    assert closed.status_code == 200, closed.text
    body = closed.json()
    assert (body["open"], body["closed_by"], body["close_comment"]) == (
        False,
        "sec",
        "reviewed with the ED lead: justified",
    )
    assert httpx.post(close_url, json={"comment": "again"}, headers=auditor).status_code == 409
    missing = f"{server.url}/break-glass/00000000-0000-4000-8000-000000000000/close"
    assert httpx.post(missing, json={"comment": "x"}, headers=auditor).status_code == 404

    open_now = httpx.get(server.url + "/break-glass?open=true", headers=auditor).json()
    assert [s["id"] for s in open_now] == [second.json()["id"]]
    ended = httpx.get(server.url + "/break-glass?open=false", headers=auditor).json()
    assert [s["id"] for s in ended] == [first["id"]]
    admin_view = httpx.get(server.url + "/break-glass?limit=1", headers=server.headers)
    assert admin_view.status_code == 200 and len(admin_view.json()) == 1

    # Closed: the clinician is back to the care list at once.
    p3 = f"{server.dicomweb}/studies/{studies['P3']}/metadata"
    assert httpx.get(p3, headers=dr).status_code == 403

    (stop,) = alerts(audit_records(server.dsn), "110138")
    assert stop["agent"]["sub"] == "sec" and stop["policy"]["reason"] == "reviewed with the ED lead: justified"
    assert first["id"] in stop["outcome_desc"] and "dr-who" in stop["outcome_desc"]
    chain_verifies(server)


def test_who_may_not_break_the_glass_and_bad_reasons(make_server: Any) -> None:
    server: LiveServer = make_server()
    url = server.url + "/break-glass"
    for sub, roles in (("tech", ["technologist"]), ("res", ["researcher"]), ("sec", ["auditor"]), ("adm", ["admin"])):
        who = bearer(server.token(sub=sub, roles=roles, scopes=[]))
        denied = httpx.post(url, json={"reason": REASON, "patient_id": "P3"}, headers=who)
        assert denied.status_code == 403, (roles, denied.text)
        assert denied.json()["error"] == f"access denied by policy (decision {denied.json()['decision_id']})"
        assert "may break the glass" in audit_records(server.dsn)[-1]["outcome_desc"]  # the reason: audit only

    dr = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    for body in (
        {},
        {"reason": None, "patient_id": "P3"},
        {"reason": "too short", "patient_id": "P3"},
        {"reason": "x" * 1001, "patient_id": "P3"},
        {"reason": REASON},  # no patient: there is no break-glass for the whole archive
        {"reason": REASON, "patient_id": "  "},
        {"reason": REASON, "study_uid": "not-a-uid"},
        {"reason": REASON, "patient_id": "P" * 65},
        {"reason": REASON, "extra": 1},
        [REASON],
    ):
        assert httpx.post(url, json=body, headers=dr).status_code == 400, body
    not_json = httpx.post(url, content=b"reason=x", headers={**dr, "Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.headers["Warning"].startswith("299")
    # A technologist's malformed request is a 400 too: the body is checked before the policy decides.
    tech = bearer(server.token(sub="tech", roles=["technologist"], scopes=[]))
    assert httpx.post(url, json={"reason": "short", "patient_id": "P3"}, headers=tech).status_code == 400

    assert sql(server.dsn, "SELECT count(*) AS n FROM break_glass_sessions")[0]["n"] == 0
    records = audit_records(server.dsn)
    assert not alerts(records, "110127")
    assert any(r["agent"].get("sub") == "tech" and r.get("http", {}).get("status") == 403 for r in records)


def test_btg_token_with_reason_header(make_server: Any) -> None:
    server: LiveServer = make_server()
    studies = store(server)
    p3 = f"{server.dicomweb}/studies/{studies['P3']}/metadata"
    btg = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[], purpose_of_use=["BTG"]))
    assert httpx.get(p3, headers=btg).status_code == 403  # BTG alone, without a reason, changes nothing
    assert httpx.get(p3, headers={**btg, "X-Break-Glass-Reason": "urgent"}).status_code == 400

    # A header without the BTG purpose of use is no assertion.
    plain = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    assert httpx.get(p3, headers={**plain, "X-Break-Glass-Reason": REASON}).status_code == 403
    assert sql(server.dsn, "SELECT count(*) AS n FROM break_glass_sessions")[0]["n"] == 0

    reason = "stroke alert, outside hospital imaging — ü"
    read = httpx.get(p3, headers={**btg, "X-Break-Glass-Reason": reason.encode("utf-8")})
    assert read.status_code == 200, read.text
    (row,) = sql(server.dsn, "SELECT * FROM break_glass_sessions")
    assert (row["sub"], row["reason"], row["patient_id"], row["study_uid"]) == ("dr-who", reason, "P3", studies["P3"])
    # The session is open: later requests need no header, and a header starts no second session.
    assert httpx.get(p3, headers=btg).status_code == 200
    assert httpx.get(p3, headers={**btg, "X-Break-Glass-Reason": REASON}).status_code == 200
    assert sql(server.dsn, "SELECT count(*) AS n FROM break_glass_sessions")[0]["n"] == 1
    records = audit_records(server.dsn)
    (start,) = alerts(records, "110127")
    assert start["policy"]["reason"] == reason and start["purpose_of_use"] == ["BTG"]
    flagged = [
        r for r in records if r.get("http", {}).get("path", "").endswith("/metadata") and r["http"]["status"] == 200
    ]
    assert len(flagged) == 3 and all(r["policy"]["break_glass"] for r in flagged)

    # The session belongs to the token's subject: another clinician is not inside it.
    other = bearer(server.token(sub="dr-house", roles=["referring"], scopes=[], purpose_of_use=["BTG"]))
    assert httpx.get(p3, headers=other).status_code == 403
    # Roles the policy does not let break the glass get 403 even with BTG and a reason.
    tech = bearer(server.token(sub="tech", roles=["technologist"], scopes=[], purpose_of_use=["BTG"]))
    mg = f"{server.dicomweb}/studies/{studies['P5']}/metadata"
    refused = httpx.get(mg, headers={**tech, "X-Break-Glass-Reason": REASON})
    assert refused.status_code == 403 and refused.json()["error"].startswith("access denied by policy (decision ")
    assert sql(server.dsn, "SELECT count(*) AS n FROM break_glass_sessions")[0]["n"] == 1
    chain_verifies(server)


def test_webhook_failure_is_retried_by_the_job_queue(make_server: Any, webhook: Webhook) -> None:
    webhook.fail_first = 1
    server: LiveServer = make_server(break_glass_webhook=webhook.url)
    dr = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    started = httpx.post(server.url + "/break-glass", json={"reason": REASON, "patient_id": "P3"}, headers=dr)
    assert started.status_code == 201  # the webhook's failure does not hold up emergency access
    (alert,) = webhook.wait(1, seconds=30)
    assert webhook.attempts == 2 and alert["session"]["id"] == started.json()["id"]
    # The worker marks the job done after the webhook answered: wait for that commit (bounded).
    deadline = time.monotonic() + 10
    while True:
        (job,) = sql(server.dsn, "SELECT state, attempts, last_error FROM jobs WHERE kind = 'breakglass.alert'")
        if job["state"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (job["state"], job["attempts"]) == ("done", 2)


def test_a_session_and_its_security_alert_commit_together(make_server: Any) -> None:
    """The Emergency Override Started record commits with the session or not at all: a start whose transaction
    fails at its commit leaves neither a session nor a record (a constraint trigger, checked at commit, refuses
    the session row after the record was written)."""
    server: LiveServer = make_server()
    for statement in (
        "CREATE FUNCTION refuse_session() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$",
        "CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON break_glass_sessions "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_session()",
    ):
        sql(server.dsn, statement)
    dr = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    started = httpx.post(server.url + "/break-glass", json={"reason": REASON, "patient_id": "P3"}, headers=dr)
    assert started.status_code >= 500
    assert sql(server.dsn, "SELECT count(*) AS n FROM break_glass_sessions")[0]["n"] == 0
    alerts = sql(
        server.dsn,
        "SELECT count(*) AS n FROM (SELECT record::text AS r FROM audit_log UNION ALL "
        "SELECT record::text FROM audit_pending) AS a WHERE r LIKE '%110127%'",
    )
    assert alerts[0]["n"] == 0


def test_request_parsing() -> None:
    assert check_reason(f"  {REASON}\n") == REASON
    for bad in (None, 3, "", "123456789", "x" * 1001, "ten chars\x00!", "\u200b" * 20, "abc\ud800defghijk"):
        with pytest.raises(InvalidRequest):
            check_reason(bad)
    # What counts is what shows: not separators (Z*), controls (Cc) or format characters (Cf).
    assert visible_length("a\u200bb\u00a0c\u202ed\u2028e\tf\u3000g") == 7
    assert check_reason("Notfall \u200bCT!") == "Notfall \u200bCT!"
    start = parse_start(json.dumps({"reason": REASON, "patient_id": " P3 ", "study_uid": "1.2.3"}).encode())
    assert (start.reason, start.patient_id, start.study_uid) == (REASON, "P3", "1.2.3")
    study_only = parse_start(json.dumps({"reason": REASON, "study_uid": "1.2.3"}).encode())
    assert (study_only.patient_id, study_only.study_uid) == (None, "1.2.3")
    assert scoped_start(study_only, "P5") == StartRequest(REASON, "P5", "1.2.3")
    assert scoped_start(start, "P3") == start
    for request, found in ((study_only, None), (start, "P4"), (StartRequest(REASON), None)):
        with pytest.raises(InvalidRequest):
            scoped_start(request, found)
    with pytest.raises(InvalidRequest):
        parse_start(json.dumps({"reason": REASON, "patient_id": ""}).encode())
    for body in (b"", b"null", b"[]", b"{", json.dumps({"reason": REASON, "study_uid": "1.02"}).encode()):
        with pytest.raises(InvalidRequest):
            parse_start(body)
    assert parse_close(b'{"comment": " ok "}') == "ok"
    for body in (b"{}", b'{"comment": 1}', b'{"comment": ""}', json.dumps({"comment": "x" * 1001}).encode()):
        with pytest.raises(InvalidRequest):
            parse_close(body)
