"""The AI service acts under its own identity: role `ai-service`, decided by the same policy as any
user (authz/policies: it reads imaging, creates imaging and DiagnosticReports, nothing else) and recorded in the
same tamper-evident audit trail. No bypass: every read of a source series and every write of a result goes
through `ServiceActor.require` and `ServiceActor.record`, the AI service's `authz.actor.Actor`.

Its accesses carry `context.channel = "ai"` in the policy input and the audit record (DICOM PS3.15 A.5.3 event
types as for the DIMSE channel: reading a series is DICOM Instances Accessed, storing a result DICOM Instances
Transferred; a DiagnosticReport create is a RESTful create).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from authz.actor import AI, Actor, Decider
from authz.audit import AuditTrail
from authz.auditrecord import AuditRecord, EventSubtype, EventType
from authz.decision import Action, Decision, Resource
from authz.errors import Forbidden
from authz.principal import Principal
from inference.errors import InferenceError

ISSUER = "hounsfield-inference"
"""The `issuer` of the AI service identity: it is the server's own, not a token's."""


class NotPermitted(InferenceError):
    """The policy refused the AI service an access (the run fails and says why)."""


def service_principal(subject: str) -> Principal:
    return Principal(sub=subject, issuer=ISSUER, roles=("ai-service",), client_id="hounsfield-inference")


@dataclass(frozen=True, slots=True)
class ServiceActor:
    """The AI service's `authz.actor.Actor` (channel `ai`), with the trail its stored results' records commit
    with: a denial fails the run (`NotPermitted`) once it is recorded, and a DiagnosticReport it writes is recorded
    as a RESTful create."""

    actor: Actor
    audit: AuditTrail

    @classmethod
    def of(cls, subject: str, policy: Decider, audit: AuditTrail) -> ServiceActor:
        return cls(Actor(service_principal(subject), policy, audit, AI), audit)

    @property
    def principal(self) -> Principal:
        return self.actor.principal

    async def decide(self, action: Action, resource: Resource) -> Decision:
        return await self.actor.decide(action, resource)

    async def require(self, action: Action, resource: Resource, *, method: str) -> Decision:
        """The policy's decision, or `NotPermitted` after the denial is audited."""
        try:
            return await self.actor.require(action, resource)
        except Forbidden as exc:
            await self.record(action, resource, exc.decision, method=method, status=403)
            raise NotPermitted(f"the AI service may not {action} {resource.kind}: {exc.detail}") from None

    async def record(
        self,
        action: Action,
        resource: Resource,
        decision: Decision | None,
        *,
        method: str,
        status: int = 200,
        detail: str | None = None,
    ) -> None:
        await self.audit.append(self.record_of(action, resource, decision, method=method, status=status, detail=detail))

    def record_of(
        self,
        action: Action,
        resource: Resource,
        decision: Decision | None,
        *,
        method: str,
        status: int = 200,
        detail: str | None = None,
    ) -> AuditRecord:
        """The record `record` appends (or a caller writes in its own transaction: a stored result's)."""
        record = self.actor.record_of(action, resource, decision, status=status, method=method, outcome_desc=detail)
        if resource.kind == "DiagnosticReport":
            record = dataclasses.replace(
                record, type=EventType.REST, subtype=(EventSubtype.CREATE,) if action == "create" else ()
            )
        return record
