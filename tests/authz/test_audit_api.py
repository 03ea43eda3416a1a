"""The audit trail for security teams over HTTP: FHIR R4 AuditEvent search (who saw what, when, why, with what
outcome), paging, read, NDJSON export, chain verification; only auditors and admins get in; bad parameters are
400 OperationOutcomes. Records are made by real requests of several identities; a FHIR client (fhirpy) searches
too. Pure parsing and the SQL plans are checked below the HTTP tests."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from authz.auditevent import validate
from authz.auditquery import EARLIEST, LATEST, SQL, AuditFilter, Term, UnenforceableConstraint
from authz.decision import Resource
from authz.engine_rego import RegoEngine
from authz.engines import SHIPPED_POLICIES
from authz.policy_input import policy_input
from authz.principal import Principal
from fhir.audit.search import SearchError, date_range, date_windows, parse_search, split_values, strict_handling, token
from tests.conftest import LiveServer, bearer
from tests.support.factory import ct, multipart, part10, stow_headers

DCM = "http://dicom.nema.org/resources/ontology/DCM"
REST = "http://hl7.org/fhir/restful-interaction"


@dataclass
class Trail:
    """What `populate` did: the studies by patient, and the auditor's headers."""

    studies: dict[str, str]
    auditor: dict[str, str]
    started: dt.datetime


def populate(server: LiveServer, http: httpx.Client, token: Any) -> Trail:
    """Records by several identities: the admin stores four studies; referring dr-who (purpose TREAT) reads
    P1's study and is denied P3's; radiologist rad searches and reads P5's; an anonymous request is refused."""
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    studies, parts = {}, []
    for patient, modality in (("P1", "CT"), ("P2", "CT"), ("P3", "MR"), ("P5", "MG")):
        ds = ct(PatientID=patient, Modality=modality)
        studies[patient] = ds.StudyInstanceUID
        parts.append(part10(ds))
    assert http.post("/dicom-web/studies", content=multipart(parts), headers=stow_headers()).status_code == 200
    url = server.url + "/dicom-web/studies"
    who = bearer(token(sub="dr-who", roles=["referring"], scopes=[], purpose_of_use=["TREAT"]))
    assert httpx.get(f"{url}/{studies['P1']}/metadata", headers=who).status_code == 200
    assert httpx.get(f"{url}/{studies['P3']}/metadata", headers=who).status_code == 403
    rad = bearer(token(sub="rad", roles=["radiologist"], scopes=[]))
    assert httpx.get(url, headers=rad).status_code == 200
    assert httpx.get(f"{url}/{studies['P5']}/metadata", headers=rad).status_code == 200
    assert httpx.get(url).status_code == 401
    auditor = bearer(token(sub="sec", roles=["auditor"], scopes=[]))
    return Trail(studies, auditor, started)


def bundle(server: LiveServer, headers: dict[str, str], query: str = "", status: int = 200) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/fhir/AuditEvent{query}", headers=headers, timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    if status == 200:
        Bundle.model_validate(body)  # a valid R4 Bundle of valid AuditEvents
        assert body["type"] == "searchset"
    return body


def events(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in body.get("entry", []) if e["search"]["mode"] == "match"]


def user(event: dict[str, Any]) -> str | None:
    who = event["agent"][0]["who"]
    return who["identifier"]["value"] if who["display"] != "unauthenticated" else None


def users(body: dict[str, Any]) -> set[str | None]:
    return {user(e) for e in events(body)}


def patients(event: dict[str, Any]) -> set[str]:
    return {e["what"]["identifier"]["value"] for e in event.get("entity", []) if e["role"]["code"] == "1"}


def statuses(event: dict[str, Any]) -> set[str]:
    return {d["valueString"] for e in event.get("entity", []) for d in e.get("detail", []) if d["type"] == "status"}


def test_auditor_answers_who_saw_what(server: LiveServer, http: httpx.Client, token: Any) -> None:
    trail = populate(server, http, token)
    auditor = trail.auditor
    everything = bundle(server, auditor, "?_count=1000")
    assert users(everything) == {"test-admin", "dr-who", "rad", None}
    ids = [int(e["id"]) for e in events(everything)]
    assert ids == sorted(ids, reverse=True), "newest first"
    recorded = [e["recorded"] for e in events(everything)]
    assert recorded == sorted(recorded, reverse=True)

    # who: by sub, by issuer system|sub (plain and :identifier), and the unauthenticated
    who = events(bundle(server, auditor, "?agent=dr-who"))
    assert len(who) == 2 and {user(e) for e in who} == {"dr-who"}
    system = who[0]["agent"][0]["who"]["identifier"]["system"]
    assert len(events(bundle(server, auditor, f"?agent={system}|dr-who"))) == 2
    assert len(events(bundle(server, auditor, f"?agent:identifier={system}|dr-who"))) == 2
    assert events(bundle(server, auditor, "?agent=urn:other-issuer|dr-who")) == []
    assert users(bundle(server, auditor, "?agent=dr-who,rad")) == {"dr-who", "rad"}
    anonymous = events(bundle(server, auditor, "?agent:missing=true"))
    assert len(anonymous) == 1 and statuses(anonymous[0]) == {"401"}
    assert None not in users(bundle(server, auditor, "?agent:missing=false&_count=1000"))
    assert users(bundle(server, auditor, "?agent-role=referring")) == {"dr-who"}

    # what: the patient and the study
    # P3: dr-who's denial, then (older) the admin's stored instance, recorded with it (Instances Transferred)
    p3_all = events(bundle(server, auditor, "?patient=P3"))
    assert [user(e) for e in p3_all] == ["dr-who", "test-admin"]
    assert p3_all[1]["type"]["code"] == "110104" and p3_all[1]["outcome"] == "0"
    p3 = p3_all[:1]
    assert statuses(p3[0]) == {"403"} and p3[0]["outcome"] == "4" and "care list" in p3[0]["outcomeDesc"]
    ids = [e["id"] for e in p3_all]
    assert [e["id"] for e in events(bundle(server, auditor, "?patient=Patient/P3"))] == ids
    assert [e["id"] for e in events(bundle(server, auditor, "?entity=Patient/P3"))] == ids
    uid = trail.studies["P1"]
    by_study = events(bundle(server, auditor, f"?entity-identifier=urn:dicom:uid|urn:oid:{uid}"))
    assert [user(e) for e in by_study] == ["dr-who", "test-admin"] and patients(by_study[0]) == {"P1"}
    assert events(bundle(server, auditor, f"?entity=urn:oid:{uid}")) == by_study
    assert events(bundle(server, auditor, f"?entity-identifier={uid}")) == by_study
    assert events(bundle(server, auditor, "?entity-identifier=|P1")) == by_study  # the patient entity

    # outcome: denials and refusals; combined with the agent
    failures = events(bundle(server, auditor, "?outcome=4"))
    assert {user(e) for e in failures} == {"dr-who", None}
    assert [e["id"] for e in events(bundle(server, auditor, "?outcome=4&agent=dr-who"))] == [p3[0]["id"]]
    assert events(bundle(server, auditor, "?outcome=http://hl7.org/fhir/audit-event-outcome|8")) == []

    # type, subtype and action
    stores = events(bundle(server, auditor, f"?subtype={REST}|create"))
    assert [user(e) for e in stores] == ["test-admin"] and stores[0]["action"] == "C"
    searches = events(bundle(server, auditor, "?subtype=search-type&agent=rad"))
    assert len(searches) == 1 and searches[0]["entity"][-1]["what"]["display"] == "GET /dicom-web/studies"
    assert events(bundle(server, auditor, "?action=E&agent=rad")) == searches
    assert len(events(bundle(server, auditor, "?type=rest&agent=rad"))) == 2
    assert events(bundle(server, auditor, f"?type={DCM}|110113")) == []  # no Security Alert yet

    # why, where, which decision
    assert users(bundle(server, auditor, "?purpose=TREAT")) == {"dr-who"}
    assert users(bundle(server, auditor, "?purpose=http://terminology.hl7.org/CodeSystem/v3-ActReason|TREAT")) == {
        "dr-who"
    }
    assert events(bundle(server, auditor, "?purpose=BTG")) == []
    assert len(events(bundle(server, auditor, "?address=127.0&agent=rad"))) == 2
    assert len(events(bundle(server, auditor, "?address:exact=127.0.0.1&agent=rad"))) == 2
    assert events(bundle(server, auditor, "?address=10.&agent=rad")) == []
    decision = p3[0]["agent"][0]["policy"][0]
    assert [e["id"] for e in events(bundle(server, auditor, f"?policy={decision}"))] == [p3[0]["id"]]

    # when: the time the record was stored, at any precision, with prefixes
    stamp = trail.started.isoformat().replace("+00:00", "Z")
    assert users(bundle(server, auditor, f"?date=ge{stamp}&agent=dr-who")) == {"dr-who"}
    assert events(bundle(server, auditor, f"?date=lt{stamp}")) == []
    day = p3[0]["recorded"][:10]
    assert p3[0]["id"] in {e["id"] for e in events(bundle(server, auditor, f"?date={day}&outcome=4"))}
    assert p3[0]["id"] in {e["id"] for e in events(bundle(server, auditor, f"?date=eq{day[:7]}&outcome=4"))}
    assert events(bundle(server, auditor, f"?date=ne{day}")) == []
    assert events(bundle(server, auditor, f"?date=gt{day}")) == []
    moment = p3[0]["recorded"]
    exact = events(bundle(server, auditor, f"?date={moment}"))
    assert [e["id"] for e in exact] == [p3[0]["id"]]
    around = f"?date=ge{moment}&date=le{moment}&agent=dr-who"
    assert [e["id"] for e in events(bundle(server, auditor, around))] == [p3[0]["id"]]
    either = f"?date=lt{stamp},ge{moment}&patient=P3"  # an or of two windows
    assert [e["id"] for e in events(bundle(server, auditor, either))] == [p3[0]["id"]]


def test_paging_follows_next_links(server: LiveServer, http: httpx.Client, token: Any) -> None:
    pager = bearer(token(sub="pager", roles=["radiologist"], scopes=[]))
    for _ in range(7):
        assert httpx.get(server.url + "/dicom-web/studies", headers=pager).status_code == 200
    auditor = bearer(token(sub="sec", roles=["auditor"], scopes=[]))
    full = [e["id"] for e in events(bundle(server, auditor, "?agent=pager"))]
    assert len(full) == 7
    seen: list[str] = []
    url: str | None = f"{server.url}/fhir/AuditEvent?agent=pager&_count=3"
    pages = 0
    while url:
        body = httpx.get(url, headers=auditor).json()
        links = {link["relation"]: link["url"] for link in body["link"]}
        assert dict(parse_qsl(urlsplit(links["self"]).query))["agent"] == "pager"
        seen += [e["id"] for e in events(body)]
        url = links.get("next")
        pages += 1
        # records appended meanwhile (each of these searches is audited) never shift a page
        assert httpx.get(server.url + "/dicom-web/studies", headers=pager).status_code == 200
    assert pages == 3 and seen == full
    oldest_first = [e["id"] for e in events(bundle(server, auditor, "?agent=pager&_sort=date&_count=7"))]
    assert oldest_first == full[::-1]
    counted = bundle(server, auditor, "?agent=pager&_total=accurate&_count=2")
    assert counted["total"] == 10 and len(events(counted)) == 2
    only_count = bundle(server, auditor, "?agent=pager&_count=0")
    assert only_count["total"] == 10 and "entry" not in only_count
    capped = bundle(server, auditor, "?_count=5000")
    assert "_count=1000" in capped["link"][0]["url"]


def test_read_by_id(server: LiveServer, http: httpx.Client, token: Any) -> None:
    trail = populate(server, http, token)
    found = events(bundle(server, trail.auditor, "?patient=P3"))[0]
    response = httpx.get(f"{server.url}/fhir/AuditEvent/{found['id']}", headers=trail.auditor)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/fhir+json")
    assert response.json() == found
    AuditEvent.model_validate(response.json())
    for missing in ("999999", "abc", "1.5", "99999999999999999999999"):
        gone = httpx.get(f"{server.url}/fhir/AuditEvent/{missing}", headers=trail.auditor)
        assert gone.status_code == 404, missing
        assert gone.json()["resourceType"] == "OperationOutcome" and gone.json()["issue"][0]["code"] == "not-found"


def test_export_streams_ndjson_in_chain_order(server: LiveServer, http: httpx.Client, token: Any) -> None:
    trail = populate(server, http, token)
    lines: list[str] = []
    with httpx.stream("GET", f"{server.url}/fhir/AuditEvent/$export", headers=trail.auditor, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/fhir+ndjson")
        lines = list(r.iter_lines())
    exported = [json.loads(line) for line in lines if line]
    for event in exported:
        validate(event)  # each line a valid R4 AuditEvent
    ids = [int(e["id"]) for e in exported]
    assert ids == list(range(1, len(ids) + 1)), "the whole chain, in chain order"
    assert {user(e) for e in exported} >= {"test-admin", "dr-who", "rad", None}

    moment = exported[2]["recorded"]
    since = httpx.get(f"{server.url}/fhir/AuditEvent/$export?_since={moment}", headers=trail.auditor)
    assert next(json.loads(x)["id"] for x in since.text.splitlines()) == "3"
    until = httpx.get(f"{server.url}/fhir/AuditEvent/$export?_until={moment}", headers=trail.auditor)
    assert [json.loads(x)["id"] for x in until.text.splitlines()] == ["1", "2"]
    denials = httpx.get(f"{server.url}/fhir/AuditEvent/$export?outcome=4&agent=dr-who", headers=trail.auditor)
    assert [patients(json.loads(x)) for x in denials.text.splitlines()] == [{"P3"}]
    bad = httpx.get(f"{server.url}/fhir/AuditEvent/$export?_since=yesterday", headers=trail.auditor)
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    exports = events(bundle(server, trail.auditor, f"?type={DCM}|110106"))
    assert len(exports) == 5 and {user(e) for e in exports} == {"sec"}  # exporting is itself audited


def test_verify_api(server: LiveServer, http: httpx.Client, token: Any) -> None:
    trail = populate(server, http, token)
    response = httpx.get(f"{server.url}/fhir/AuditEvent/$verify", headers=trail.auditor)
    assert response.status_code == 200
    result = response.json()
    assert result["ok"] is True and result["problems"] == [] and result["checked"] >= 6

    async def tamper() -> None:
        conn = await asyncpg.connect(server.dsn)
        try:
            await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
            await conn.execute("""UPDATE audit_log SET record = jsonb_set(record, '{outcome}', '"8"') WHERE seq = 3""")
            await conn.execute("""UPDATE audit_log SET record = '{"garbage": true}' WHERE seq = 4""")
            await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")
        finally:
            await conn.close()

    asyncio.run(tamper())
    result = httpx.get(f"{server.url}/fhir/AuditEvent/$verify", headers=trail.auditor).json()
    assert result["ok"] is False
    assert {(p["seq"], p["kind"]) for p in result["problems"]} == {(3, "modified"), (4, "modified")}
    damaged = httpx.get(f"{server.url}/fhir/AuditEvent/4", headers=trail.auditor)
    assert damaged.status_code == 500 and "$verify" in damaged.json()["issue"][0]["diagnostics"]
    body = bundle(server, trail.auditor, "?_count=1000")
    outcomes = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "outcome"]
    assert "audit record 4 cannot be read" in outcomes[0]["issue"][0]["diagnostics"]


def test_only_auditors_and_admins(server: LiveServer, http: httpx.Client, token: Any) -> None:
    rad = bearer(token(sub="rad", roles=["radiologist"], scopes=[]))
    for path in ("", "/1", "/$export", "/$verify"):
        denied = httpx.get(f"{server.url}/fhir/AuditEvent{path}", headers=rad)
        assert denied.status_code == 403, path
        assert denied.json()["resourceType"] == "OperationOutcome" and denied.json()["issue"][0]["code"] == "forbidden"
        assert "Warning" in denied.headers
        assert httpx.get(f"{server.url}/fhir/AuditEvent{path}").status_code == 401
    assert http.get("/fhir/AuditEvent?_count=1").status_code == 200  # admin
    scoped = bearer(token(sub="sec2", roles=["auditor"], scopes=["user/AuditEvent.rs"]))
    assert httpx.get(f"{server.url}/fhir/AuditEvent", headers=scoped).status_code == 200
    wrong_scope = bearer(token(sub="sec3", roles=["auditor"], scopes=["user/ImagingStudy.rs"]))
    assert httpx.get(f"{server.url}/fhir/AuditEvent", headers=wrong_scope).status_code == 403
    auditor = bearer(token(sub="sec", roles=["auditor"], scopes=[]))
    denials = events(bundle(server, auditor, "?agent=rad&outcome=4"))
    assert len(denials) == 4, "each denial is itself audited"
    assert {e["entity"][-1]["what"]["display"].split()[1] for e in denials} == {
        "/fhir/AuditEvent",
        "/fhir/AuditEvent/1",
        "/fhir/AuditEvent/$export",
        "/fhir/AuditEvent/$verify",
    }


BAD = [
    ("?date=2024-13-01", "invalid"),
    ("?date=yesterday", "invalid"),
    ("?date=ap2024", "not-supported"),
    ("?date:missing=true", "not-supported"),
    ("?date=,", "invalid"),
    ("?_count=abc", "invalid"),
    ("?_count=-1", "invalid"),
    ("?_cursor=x", "invalid"),
    ("?_sort=agent", "invalid"),
    ("?_total=some", "invalid"),
    ("?outcome=7", "invalid"),
    ("?action=X", "invalid"),
    ("?patient=Group/1", "invalid"),
    ("?agent:contains=x", "not-supported"),
    ("?agent:missing=maybe", "invalid"),
    ("?agent=a%00b", "invalid"),
    ("?_format=xml", "not-supported"),
    ("?patient=" + "x" * 2000, "invalid"),
]


def test_bad_parameters_are_400_operation_outcomes(server: LiveServer, token: Any) -> None:
    auditor = bearer(token(sub="sec", roles=["auditor"], scopes=[]))
    for query, code in BAD:
        body = bundle(server, auditor, query, status=400)
        assert body["resourceType"] == "OperationOutcome", query
        assert body["issue"][0]["code"] == code, (query, body)
    # values that look like jsonpath or SQL are only values
    for query in ('?agent=a" || $.outcome == "0', "?patient=P1'; DROP TABLE audit_log; --", "?address=\\\\"):
        assert events(bundle(server, auditor, query)) == []
    # unknown parameters: ignored, left out of the self link and reported; refused when strict
    lenient = bundle(server, auditor, "?foo=1&outcome=0&_count=5")
    self_link = lenient["link"][0]["url"]
    assert "foo" not in self_link and "outcome=0" in self_link
    outcome = next(e["resource"] for e in lenient["entry"] if e["search"]["mode"] == "outcome")
    assert "foo" in outcome["issue"][0]["diagnostics"] and outcome["issue"][0]["severity"] == "warning"
    strict = httpx.get(
        f"{server.url}/fhir/AuditEvent?foo=1", headers={**auditor, "Prefer": "handling=strict"}, timeout=30
    )
    assert strict.status_code == 400 and "foo" in strict.json()["issue"][0]["diagnostics"]


async def test_fhir_client_searches(server: LiveServer, token: Any) -> None:
    """fhirpy (an async FHIR client) searches, follows next links and counts."""
    from fhirpy import AsyncFHIRClient

    rad = bearer(token(sub="rad", roles=["radiologist"], scopes=[]))
    async with httpx.AsyncClient(base_url=server.url, headers=rad) as peer:
        for _ in range(5):
            assert (await peer.get("/dicom-web/studies")).status_code == 200
    client = AsyncFHIRClient(f"{server.url}/fhir", authorization=f"Bearer {token(sub='sec', roles=['auditor'])}")
    found = await client.resources("AuditEvent").search(agent="rad", outcome="0").limit(2).fetch_all()
    assert len(found) == 5 and all(e["agent"][0]["who"]["display"] == "rad" for e in found)
    assert [int(e.id) for e in found] == sorted((int(e.id) for e in found), reverse=True)
    assert await client.resources("AuditEvent").search(agent="rad").count() == 5
    first = await client.resources("AuditEvent").search(subtype="search-type", agent="rad").first()
    assert first is not None and first["subtype"][0]["code"] == "search-type"
    read = await client.reference("AuditEvent", first.id).to_resource()
    assert read["id"] == first["id"]


# --- the policy: who may search, read and export the trail -------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> RegoEngine:
    data = tmp_path_factory.mktemp("policy") / "data.json"
    data.write_text(json.dumps({"care_lists": {"dr-who": ["P1"]}, "research_opt_out": [], "break_glass_roles": []}))
    return RegoEngine(SHIPPED_POLICIES, data)


@pytest.mark.parametrize("action", ["search", "read", "export"])
@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        ("auditor", True),
        ("admin", True),
        ("radiologist", False),
        ("referring", False),
        ("technologist", False),
        ("ai-service", False),
        ("researcher", False),
    ],
)
def test_policy_audit_access(engine: RegoEngine, role: str, allowed: bool, action: str) -> None:
    principal = Principal(sub="someone", issuer="hounsfield", roles=(role,))
    decision = asyncio.run(engine.decide(policy_input(principal, action, Resource(kind="AuditEvent"))))  # type: ignore[arg-type]
    assert decision.allow is allowed, decision.reasons
    if allowed:
        assert decision.constraints == {}, "the trail is not limited by patient for those who may see it"


# --- pure parts ---------------------------------------------------------------------------------------------


def test_date_ranges_and_prefixes() -> None:
    utc = dt.UTC
    assert date_range("date", "2024") == (dt.datetime(2024, 1, 1, tzinfo=utc), dt.datetime(2025, 1, 1, tzinfo=utc))
    assert date_range("date", "2024-12")[1] == dt.datetime(2025, 1, 1, tzinfo=utc)
    assert date_range("date", "2024-02-28")[1] == dt.datetime(2024, 2, 29, tzinfo=utc)
    assert date_range("date", "2024-02-28T10:00+02:00")[0] == dt.datetime(2024, 2, 28, 8, tzinfo=utc)
    assert date_range("date", "2024-02-28T10:00 02:00") == date_range("date", "2024-02-28T10:00+02:00")
    lo, hi = date_range("date", "2024-02-28T10:00:05.25Z")
    assert hi - lo == dt.timedelta(milliseconds=10) and lo.microsecond == 250000
    assert date_range("date", "9999")[1] == LATEST
    day = date_range("date", "2024-05-17")
    assert date_windows("date", "lt2024-05-17") == [(EARLIEST, day[0])]
    assert date_windows("date", "le2024-05-17") == [(EARLIEST, day[1])]
    assert date_windows("date", "gt2024-05-17") == date_windows("date", "sa2024-05-17") == [(day[1], LATEST)]
    assert date_windows("date", "ne2024-05-17") == [(EARLIEST, day[0]), (day[1], LATEST)]
    search = parse_search([("date", "ge2024"), ("date", "lt2024-03")])
    assert search.filter.windows == ((dt.datetime(2024, 1, 1, tzinfo=utc), dt.datetime(2024, 3, 1, tzinfo=utc)),)
    assert parse_search([("date", "lt2024"), ("date", "gt2025")]).filter.impossible
    for bad in ("2024-1", "24", "2024-05-17T25:00", "2024-05-17T10", "0000", "2024-05-17T10:00+2"):
        with pytest.raises(SearchError):
            date_range("date", bad)


def test_values_tokens_and_escapes() -> None:
    assert split_values("a,b\\,c,,d") == ["a", "b\\,c", "d"]
    assert token("sys|code") == ("sys", "code") and token("|code") == ("", "code") and token("code") == (None, "code")
    assert token("a\\|b") == (None, "a|b") and token("a\\|b|c") == ("a|b", "c")
    assert strict_handling(["return=minimal, handling=strict"]) and not strict_handling(["handling=lenient"])
    search = parse_search([("agent", "auth0|123"), ("subtype", f"{REST}|read,search-type")])
    agent, subtype = search.filter.all_of
    assert Term("agent", "auth0|123") in agent and Term("agent", "123", "auth0") in agent
    assert subtype == (Term("subtype", "read", REST), Term("subtype", "search-type"))
    issuer = parse_search([("agent:identifier", "urn:hounsfield:hounsfield|x")]).filter.all_of[0]
    assert issuer == (Term("agent", "x", "hounsfield"), Term("agent", "x", "urn:hounsfield:hounsfield"))
    assert parse_search([("purpose", "urn:other|BTG")]).filter.impossible
    assert parse_search([("unknown", "1"), ("patient", "")]).ignored == ("unknown",)


def test_filter_as_jsonpath_and_constraints() -> None:
    flt = parse_search([("agent", 'x"y'), ("outcome", "4,8"), ("agent:missing", "false")]).filter
    assert flt.jsonpath() == ('$.agent.sub == "x\\"y" && ($.outcome == "4" || $.outcome == "8") && exists($.agent.sub)')
    assert flt.params()[-1] is False
    anonymous = parse_search([("agent:missing", "true")]).filter
    assert anonymous.jsonpath() is None and anonymous.params()[-1] is True
    assert parse_search([("agent:missing", "true"), ("agent:missing", "false")]).filter.impossible
    assert Term("type", "110113", "").jsonpath() == '($.type.code == "110113" && !exists($.type.system))'
    assert Term("address", "10.", prefix=True).jsonpath() == '$.agent.address like_regex "^10\\\\." flag "i"'
    assert Term("purpose", "BTG").jsonpath() == '($.purpose_of_use[*] == "BTG" || $.policy.break_glass == true)'
    limited = AuditFilter().restricted({"patient_ids": ["P1", "P2"], "patient_ids_excluded": ["P3"]})
    assert limited.jsonpath() == (
        '($.entity.patient_id == "P1" || $.entity.patient_id == "P2") && !($.entity.patient_id == "P3")'
    )
    assert AuditFilter().restricted({"patient_ids": []}).impossible
    with pytest.raises(UnenforceableConstraint):
        AuditFilter().restricted({"modalities_excluded": ["MG"]})
    assert AuditFilter().jsonpath() is None


# --- the SQL is index-backed --------------------------------------------------------------------------------


def test_searches_use_the_indexes(dsn: str) -> None:
    """On 50,000 synthetic records, the named queries (with custom plans, as auditquery runs them) find a rare
    agent through the GIN index and a time range newest first through the (recorded_at, seq) btree."""

    async def run() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                """INSERT INTO audit_log (seq, recorded_at, record, prev_hash, hash)
                SELECT i, now() - (50000 - i) * interval '1 second', jsonb_build_object(
                    'v', 1, 'time', '2024-01-01T00:00:00.000000Z', 'action', 'R', 'channel', 'http',
                    'outcome', CASE WHEN i % 50 = 0 THEN '4' ELSE '0' END,
                    'type', '{"system": "urn:test", "code": "rest"}'::jsonb,
                    'agent', jsonb_build_object('sub', 'user' || (i % 1000), 'issuer', 'hounsfield'),
                    'entity', jsonb_build_object('patient_id', 'P' || (i % 20000))), '\\x00', '\\x00'
                FROM generate_series(1, 50000) AS i"""
            )
            await conn.execute("ANALYZE audit_log")
            plans = []
            for query in ([("agent", "user7")], [("date", "ge2020")], [("patient", "P42"), ("outcome", "4")]):
                flt = parse_search(query).filter
                async with conn.transaction():
                    await conn.execute(SQL["custom_plans"])
                    rows = await conn.fetch("EXPLAIN " + SQL["search_desc"], *flt.params(), None, 101)
                plans.append("\n".join(r[0] for r in rows))
            return plans
        finally:
            await conn.close()

    by_agent, by_date, by_patient = asyncio.run(run())
    assert "audit_log_search" in by_agent, by_agent
    assert "audit_log_recorded" in by_date and "Sort" not in by_date, by_date
    assert "audit_log_search" in by_patient, by_patient


def test_query_is_kept_base64_in_search_results(server: LiveServer, token: Any) -> None:
    """BALP: the query of a search is an entity with its query base64-encoded, never plain text."""
    rad = bearer(token(sub="rad", roles=["radiologist"], scopes=[]))
    assert httpx.get(server.url + "/dicom-web/studies?PatientID=P1", headers=rad).status_code == 200
    auditor = bearer(token(sub="sec", roles=["auditor"], scopes=[]))
    event = events(bundle(server, auditor, "?agent=rad"))[0]
    query = next(e["query"] for e in event["entity"] if e["role"]["code"] == "24")
    assert base64.b64decode(query) == b"PatientID=P1"
