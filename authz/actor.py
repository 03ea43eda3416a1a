"""Who acts, through which channel: the one place that asks the policy and writes what the policy decided.

Every channel acts for a principal: an HTTP request for its token's subject (`authz.guard` makes the request's
actor once), a DIMSE association for its calling AE title's peer, the AI service for its own identity, a FHIR
Subscription's delivery for the Subscription's owner. Each asks the same policy the same kind of question (the
input document of `authz.policy_input`, whose `context.channel` names the channel) and writes the same kind of
record to the same tamper-evident trail (`authz.auditrecord.request_record`, whose `channel` names it too).

An `Actor` is that value: the principal, the channel, the client's address and the subject's open break-glass
session, with the policy engine and the audit trail it uses. `decide` asks, `require` asks and raises the
authz `Forbidden` (carrying the decision) on a denial, `record_of`/`record` build and append the record.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from authz.auditrecord import AuditRecord, request_record
from authz.decision import Action, Decision, PolicyInput, Resource
from authz.errors import Forbidden
from authz.policy_input import policy_input
from authz.principal import Principal

HTTP: Final = "http"
"""DICOMweb, FHIR (a Bundle's entries included) and the server's own HTTP API."""
DIMSE: Final = "dimse"
"""DICOM Message Service Elements over an association (PS3.7): C-STORE, C-FIND, C-MOVE, C-GET."""
AI: Final = "ai"
"""The AI service's reads of source series and writes of results, under its own identity."""
REST_HOOK: Final = "rest-hook"
"""A FHIR Subscription's notification (R4 2.46.7.1 `rest-hook`), decided on and recorded for its owner."""
CHANNELS: Final = (HTTP, DIMSE, AI, REST_HOOK)


class Decider(Protocol):
    """The policy engine as an actor asks it (`authz.decision.PolicyEngine`, the decision cache in front)."""

    async def decide(self, policy_input: PolicyInput) -> Decision: ...


class AuditSink(Protocol):
    """The audit trail as an actor appends to it (`authz.audit.AuditTrail`)."""

    async def append(self, record: AuditRecord) -> object: ...


def by_break_glass(decision: Decision) -> bool:
    """The policy allowed this only because of an open break-glass session (its `obligations.break_glass`): the
    access is flagged in the audit record, with the session's reason."""
    return decision.allow and bool(decision.obligations.get("break_glass"))


def refusal(decision: Decision) -> Forbidden:
    """The 403 of a policy's denial: the caller sees the decision's id only, the reasons go to the record."""
    return Forbidden("; ".join(decision.reasons) or "denied by policy", decision)


@dataclass(frozen=True, slots=True)
class Actor:
    principal: Principal
    policy: Decider
    audit: AuditSink
    channel: str = HTTP
    """`context.channel` of every question and `channel` of every record (one of `CHANNELS`)."""
    client_ip: str | None = None
    """The peer's address (HTTP client, DIMSE requestor); None for the server's own identities."""
    break_glass: Mapping[str, Any] | None = None
    """The subject's open break-glass session as the policy sees it (`context.break_glass`), when it has one."""

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(f"unknown channel {self.channel!r}")

    def with_break_glass(self, session: Mapping[str, Any] | None) -> Actor:
        """This actor with `session` as its open break-glass session (None: without one)."""
        return dataclasses.replace(self, break_glass=session)

    def question(self, action: Action, resource: Resource, *, now: dt.datetime | None = None) -> PolicyInput:
        """The policy input document of `action` on `resource` by this actor, at `now` (default: now)."""
        return policy_input(
            self.principal,
            action,
            resource,
            self.client_ip,
            self.break_glass,
            now=now if now is not None else dt.datetime.now(dt.UTC),
            channel=self.channel,
        )

    async def decide(self, action: Action, resource: Resource, *, now: dt.datetime | None = None) -> Decision:
        """The policy's decision; `by_break_glass(decision)` tells whether a break-glass session allowed it."""
        return await self.policy.decide(self.question(action, resource, now=now))

    async def require(self, action: Action, resource: Resource, *, now: dt.datetime | None = None) -> Decision:
        """The policy's decision when it allows; else the authz `Forbidden` carrying the decision."""
        decision = await self.decide(action, resource, now=now)
        if not decision.allow:
            raise refusal(decision)
        return decision

    def record_of(
        self,
        action: Action,
        resource: Resource | None,
        decision: Decision | None,
        *,
        status: int = 200,
        method: str | None = None,
        path: str | None = None,
        query_string: str | bytes | None = None,
        outcome_desc: str | None = None,
        break_glass: bool = False,
        reason: str | None = None,
        time: dt.datetime | None = None,
    ) -> AuditRecord:
        """The record of one access by this actor (`authz.auditrecord.request_record`): its principal as the
        agent, from its address, through its channel; `status` the HTTP status (or 200 for a DIMSE operation,
        whose own status its record sets)."""
        return request_record(
            self.principal,
            decision,
            action=action,
            resource=resource,
            status=status,
            method=method,
            path=path,
            query_string=query_string,
            client_ip=self.client_ip,
            channel=self.channel,
            break_glass=break_glass,
            reason=reason,
            outcome_desc=outcome_desc,
            time=time,
        )

    async def record(
        self,
        action: Action,
        resource: Resource | None,
        decision: Decision | None,
        *,
        status: int = 200,
        method: str | None = None,
        outcome_desc: str | None = None,
    ) -> None:
        """Append `record_of(...)` to the trail; returns once it is committed."""
        record = self.record_of(action, resource, decision, status=status, method=method, outcome_desc=outcome_desc)
        await self.audit.append(record)
