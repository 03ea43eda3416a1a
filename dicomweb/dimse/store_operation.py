"""One C-STORE as the audit trail and the store see it, shared by the answer (`handlers_store`) and the index
store that may run after it (`indexer`): who sent it, from where, which instance, what the policy decided, and the
record of its outcome (DICOM Instances Transferred, PS3.15 A.5.3.4).

A stored instance's record is written in its index transaction (`audit_of`); other outcomes (a failure,
bytes already stored) are recorded after the store (`settle`), and when that record cannot be written the
outcome stands all the same."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from authz.auditrecord import AuditRecord
from authz.decision import Decision, Resource
from authz.principal import Principal
from dicomweb.dimse.audit import operation_record
from dicomweb.ingest.admission import NOT_AUTHORIZED, Admission, Denial, instance_resource, policy_admission
from dicomweb.ingest.events import AuditOf, InstanceStored
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.outcome import Outcome
from dicomweb.ingest.parse import ParsedInstance
from server.platform.db import unavailable

if TYPE_CHECKING:
    from authz.actor import Actor
    from authz.audit import AuditTrail

log = logging.getLogger(__name__)

SUCCESS = 0x0000


@dataclass(slots=True)
class StoreOperation:
    """One C-STORE as the audit trail names it: who, from where, which instance, and what the policy decided
    about it (on the instance as the ingest parsed it: `dicomweb.ingest.admission`)."""

    principal: Principal
    address: str | None
    instance: Resource
    origin: Origin
    decision: Decision | None = None

    def record(self, status: int, desc: str | None, *, replaced: bool = False) -> AuditRecord:
        return operation_record(
            self.principal,
            self.decision,
            action="update" if replaced else "create",
            command="C-STORE",
            resource=self.instance,
            status=status,
            address=self.address,
            outcome_desc=desc,
        )

    def admission(self, actor: Actor) -> Admission:
        """The policy's decision, as `actor` (the peer: `Node.actor`), on the parsed instance, kept here for the
        audit record."""
        decided: list[Decision] = []

        async def decide(resource: Resource) -> Decision:
            return await actor.decide("create", resource)

        ask = policy_admission(decide, decided)

        async def admit(parsed: ParsedInstance) -> Denial | None:
            self.instance = instance_resource(parsed)
            denial = await ask(parsed)
            self.decision = decided[-1]
            return denial

        return admit


def status_of(outcome: Outcome) -> tuple[int, str | None]:
    """The C-STORE status and Error Comment of an outcome (a denial's reasons go to the audit record only)."""
    if outcome.denial is not None:
        return NOT_AUTHORIZED, outcome.denial.comment
    if outcome.failure is not None:
        return outcome.failure, outcome.comment
    if outcome.warnings:
        return outcome.warnings[0][0], outcome.warnings[0][1]
    return SUCCESS, None


def audit_of(operation: StoreOperation) -> AuditOf:
    """`StoreService.store`'s `audit`: the stored instance's record, written in its index transaction."""

    def audit(stored: InstanceStored) -> list[AuditRecord]:
        operation.instance = instance_resource(stored.parsed)  # a replayed entry's, named once parsed
        warnings = stored.parsed.warnings
        status, comment = (warnings[0][0], warnings[0][1]) if warnings else (SUCCESS, None)
        return [operation.record(status, comment, replaced=stored.replaced)]

    return audit


async def settle(trail: AuditTrail, operation: StoreOperation, outcome: Outcome, note: str = "") -> None:
    """After the store: a committed record goes into the chain now; any other outcome is recorded here. A study
    filed under another patient: the record names both patients (the response names neither)."""
    if outcome.committed:
        trail.nudge()
        return
    status, comment = status_of(outcome)
    try:
        detail = outcome.conflict.describe() if outcome.conflict else comment
        if outcome.denial is not None:
            detail = outcome.denial.reasons
        await trail.append(operation.record(status, f"{note}{detail}" if detail else (note or None)))
    except Exception as exc:  # the answer is the truth about the instance all the same
        if unavailable(exc):
            log.warning("C-STORE audit record not written (database unavailable)")
        else:
            log.exception("C-STORE audit record not written")
