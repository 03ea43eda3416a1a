"""The authorization actor (`authz.actor`) at service level: the in-process regopy engine with the shipped
policies and data, and the real audit trail on the embedded PostgreSQL; no server. Every channel (HTTP, DIMSE,
the AI service, a Subscription's delivery) asks and records through it, so what it puts in the policy input and
in the record is what each channel's users and security team see."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import pytest

from authz.actor import AI, CHANNELS, DIMSE, HTTP, REST_HOOK, Actor, by_break_glass
from authz.audit import AuditTrail
from authz.auditrecord import AuditRecord, EventSubtype, EventType
from authz.decision import Resource
from authz.engine_rego import RegoEngine
from authz.engines import SHIPPED_POLICIES
from authz.errors import Forbidden, denial_text
from authz.policy_input import break_glass_session, dicomweb_resource
from authz.principal import Principal
from fhir.rest.interactions import Caller
from inference.identity import NotPermitted, ServiceActor
from server.platform import db

T = TypeVar("T")
NOW = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
ENGINE = RegoEngine(SHIPPED_POLICIES, SHIPPED_POLICIES / "data.json")
"""The shipped policies and their example data, as the server loads them by default: dr-who cares for P1 and P2;
MG is for radiologists and admins; referring physicians and radiologists may break the glass."""


def principal(*roles: str, sub: str = "dr-who") -> Principal:
    return Principal(sub=sub, issuer="hounsfield", roles=roles, client_id="viewer", purpose_of_use=("TREAT",))


def study(patient: str, *modalities: str) -> Resource:
    return dicomweb_resource("study", patient_id=patient, study_uid="1.2.840.99", modalities_in_study=modalities)


def with_trail(dsn: str, body: Callable[[AuditTrail, asyncpg.Pool], Awaitable[T]]) -> T:
    async def main() -> T:
        pool = await db.create_pool(dsn, 1, 4)
        trail = AuditTrail(pool)
        try:
            return await body(trail, pool)
        finally:
            await trail.close()
            await pool.close()

    return asyncio.run(main())


async def records(pool: asyncpg.Pool) -> list[AuditRecord]:
    """The trail as stored, read back as the audit API reads it."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT record::text AS r FROM audit_log ORDER BY seq")
    return [AuditRecord.from_json(json.loads(row["r"])) for row in rows]


def test_the_same_question_through_each_channel(dsn: str) -> None:
    """The question names its channel (`context.channel`), and the shipped policies answer per channel: they
    decide on who, what and which patient, the same through every channel."""

    async def body(trail: AuditTrail, _pool: asyncpg.Pool) -> None:
        referring = principal("referring")
        for channel in CHANNELS:
            actor = Actor(referring, ENGINE, trail, channel, "10.0.0.7")
            document = actor.question("read", study("P1", "CT"), now=NOW).to_dict()
            assert document["context"] == {
                "time": "2026-03-04T05:06:07.000Z",
                "client_ip": "10.0.0.7",
                "break_glass": None,
                "channel": channel,
            }
            assert document["subject"]["sub"] == "dr-who"
            assert (await actor.decide("read", study("P1", "CT"))).allow, channel
            outside = await actor.decide("read", study("P5", "CT"))
            assert not outside.allow and "patient P5 is not in the care list of dr-who" in outside.reasons
            searched = await actor.decide("search", dicomweb_resource("study"))
            assert searched.constraints == {"patient_ids": ["P1", "P2"], "modalities_excluded": ["MG"]}, channel

    with_trail(dsn, body)


def test_an_unknown_channel_is_refused_at_construction(dsn: str) -> None:
    async def body(trail: AuditTrail, _pool: asyncpg.Pool) -> None:
        with pytest.raises(ValueError, match="unknown channel"):
            Actor(principal("radiologist"), ENGINE, trail, "carrier-pigeon")

    with_trail(dsn, body)


def test_require_raises_with_the_decision(dsn: str) -> None:
    """A denial is the authz `Forbidden` carrying the decision: the caller sees its id, never the reasons."""

    async def body(trail: AuditTrail, _pool: asyncpg.Pool) -> None:
        actor = Actor(principal("radiologist"), ENGINE, trail, DIMSE, "10.0.0.8")
        allowed = await actor.require("read", study("P9", "MR"))
        assert allowed.allow
        with pytest.raises(Forbidden) as raised:
            await actor.require("delete", study("P9", "MR"))
        decision = raised.value.decision
        assert decision is not None and not decision.allow
        assert raised.value.decision_id == decision.decision_id
        assert raised.value.detail == denial_text(decision.decision_id)
        assert "no role of radiologist may delete study" in raised.value.reason
        assert "radiologist" not in raised.value.detail

    with_trail(dsn, body)


def test_a_break_glass_decision_is_flagged(dsn: str) -> None:
    """Allowed only because of an open session: flagged (the record says so, with the session's reason); the
    same actor without the session is refused, and an access its limits allowed anyway is not flagged."""

    async def body(trail: AuditTrail, _pool: asyncpg.Pool) -> None:
        session = break_glass_session("bg-1", "unconscious in ED", NOW + dt.timedelta(hours=1), "P5")
        plain = Actor(principal("referring"), ENGINE, trail, HTTP, "10.0.0.7")
        glass = plain.with_break_glass(session)
        assert glass.question("read", study("P5", "CT")).context.break_glass == session
        broken = await glass.decide("read", study("P5", "CT"))
        assert broken.allow and by_break_glass(broken)
        assert not (await plain.decide("read", study("P5", "CT"))).allow
        in_care = await glass.decide("read", study("P1", "CT"))
        assert in_care.allow and not by_break_glass(in_care)

        caller = Caller(glass)  # FHIR's use of the request's actor: the request's record is flagged
        await caller.ask("read", study("P1", "CT"))
        assert not caller.flagged and caller.decided == []
        await caller.decide("read", study("P5", "CT"))
        assert caller.flagged and len(caller.decided) == 1 and caller.decided[0][2].allow

        record = glass.record_of("read", study("P5", "CT"), broken, status=200, method="GET", path="/x")
        assert record.break_glass is True and record.channel == HTTP

    with_trail(dsn, body)


def test_the_record_names_the_channel_and_the_decision(dsn: str) -> None:
    """What `record` appends to the trail: the actor's principal and address as the agent, its channel, the
    decision's id and policy revision, the event type of the channel (PS3.15 A.5.3 for DIMSE, FHIR REST for
    HTTP), and the policy's reasons for a denial."""

    async def body(trail: AuditTrail, pool: asyncpg.Pool) -> None:
        dimse = Actor(principal("technologist", sub="CT_SCANNER"), ENGINE, trail, DIMSE, "10.0.0.9")
        refused = await dimse.decide("read", study("P1", "MG", "CT"))
        assert not refused.allow
        await dimse.record("read", study("P1", "MG", "CT"), refused, status=403, method="C-GET")
        http = Actor(principal("radiologist"), ENGINE, trail, HTTP, "127.0.0.1")
        allowed = await http.decide("read", study("P9", "MR"))
        await http.record("read", study("P9", "MR"), allowed, method="GET")

        first, second = await records(pool)
        assert first.channel == "dimse" and second.channel == "http"
        assert first.agent.sub == "CT_SCANNER" and first.agent.address == "10.0.0.9" and first.method == "C-GET"
        assert first.type == EventType.INSTANCES_ACCESSED and first.subtype == ()
        assert first.outcome == "4" and "modality MG is restricted" in (first.outcome_desc or "")
        assert (first.decision_id, first.policy_revision) == (refused.decision_id, ENGINE.revision)
        assert second.type == EventType.REST and second.subtype == (EventSubtype.READ,)
        assert second.outcome == "0" and second.agent.address == "127.0.0.1"
        assert second.decision_id == allowed.decision_id

    with_trail(dsn, body)


def test_the_ai_service_is_an_actor_of_the_ai_channel(dsn: str) -> None:
    """The AI service decides and records as its own identity through channel `ai`; a denial is recorded before
    the run fails, and names only the decision."""

    async def body(trail: AuditTrail, pool: asyncpg.Pool) -> None:
        service = ServiceActor.of("hounsfield-ai", ENGINE, trail)
        assert service.actor.channel == AI and service.principal.roles == ("ai-service",)
        assert service.actor.question("read", study("P2", "CT")).context.channel == AI
        await service.require("read", study("P2", "CT"), method="inference.read")
        with pytest.raises(NotPermitted, match="access denied by policy") as raised:
            await service.require("delete", study("P2", "CT"), method="inference.delete")
        (denied,) = await records(pool)
        assert denied.channel == "ai" and denied.outcome == "4" and denied.method == "inference.delete"
        assert denied.agent.sub == "hounsfield-ai" and denied.agent.address is None
        assert denied.decision_id is not None and denied.decision_id in str(raised.value)
        report = Resource(kind="DiagnosticReport", patient_id="P2")
        written = service.record_of("create", report, None, method="inference.report")
        assert written.type == EventType.REST and written.subtype == (EventSubtype.CREATE,)

    with_trail(dsn, body)


def test_a_subscription_owner_gets_the_answers_http_gets(dsn: str) -> None:
    """A delivery is decided for the Subscription's owner through channel `rest-hook`: the policy answers as it
    answers the owner's own read."""

    async def body(trail: AuditTrail, _pool: asyncpg.Pool) -> None:
        owner = principal("referring")
        report = Resource(kind="DiagnosticReport", patient_id="P5", attributes={"id": "r1"})
        hook, http = Actor(owner, ENGINE, trail, REST_HOOK), Actor(owner, ENGINE, trail, HTTP)
        by_hook, by_http = await hook.decide("read", report), await http.decide("read", report)
        assert by_hook.allow is by_http.allow is False
        assert by_hook.reasons == by_http.reasons
        mine = Resource(kind="DiagnosticReport", patient_id="P2", attributes={"id": "r2"})
        assert (await hook.decide("read", mine)).allow

    with_trail(dsn, body)
