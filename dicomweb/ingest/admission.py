"""The policy's decision on each instance a store files, made on what the ingest parsed.

A STOW-RS request is decided once by the route's guard (`create study`: may this subject store at all, into the
study the URL names), but its body may carry instances of any patient, study and modality; a C-STORE names its
instance only in the data set. Every channel therefore asks the policy again per instance, about the study the
instance goes into, with the facts read by `dicomweb.ingest.parse.parse_instance` (the same values the index files it
under: the Patient ID as written, each value of a multi-valued Modality), before anything is written. A denied
instance fails alone with 0124H Refused: Not Authorized (a PS3.7 Annex C general status), whose comment
names only the decision (`authz.errors.denial_comment`); the reasons go to the audit record.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from authz.decision import Decision, Resource
from authz.errors import denial_comment
from authz.policy_input import dicomweb_resource
from dicomweb.ingest.parse import ParsedInstance

NOT_AUTHORIZED = 0x0124


@dataclass(frozen=True, slots=True)
class Denial:
    """The policy refused to file an instance: what it decided on, and its decision (for the audit record)."""

    resource: Resource
    decision: Decision

    @property
    def comment(self) -> str:
        return denial_comment(self.decision.decision_id)

    @property
    def reasons(self) -> str:
        return "; ".join(self.decision.reasons) or "denied by policy"


Admission = Callable[[ParsedInstance], Awaitable[Denial | None]]
"""Asked by `StoreService.store` once an instance is parsed: None to store it, a `Denial` to refuse it."""

Decide = Callable[[Resource], Awaitable[Decision]]
"""The caller's policy question for `create` on a resource (its subject, address and break-glass session bound)."""


def study_resource(parsed: ParsedInstance) -> Resource:
    """The study an instance goes into, as the policy sees it: its patient and modality. (The series and instance
    are left out, so the decision cache answers the rest of a study's instances; the audit record names them.)"""
    modality = parsed.series.get("modality") or ""
    return dicomweb_resource(
        "instance",
        patient_id=parsed.study.get("patient_id"),
        study_uid=parsed.study_uid,
        modalities_in_study=str(modality).split("\\"),
    )


def instance_resource(parsed: ParsedInstance) -> Resource:
    """The instance itself, for its audit record."""
    return Resource(
        kind="instance",
        patient_id=parsed.study.get("patient_id"),
        study_uid=parsed.study_uid,
        series_uid=parsed.series_uid,
        instance_uid=parsed.sop_instance_uid,
    )


def policy_admission(decide: Decide, decided: list[Decision] | None = None) -> Admission:
    """An admission asking `decide` about each instance's study; each decision is appended to `decided` when
    given (the caller's audit record names it)."""

    async def admit(parsed: ParsedInstance) -> Denial | None:
        resource = study_resource(parsed)
        decision = await decide(resource)
        if decided is not None:
            decided.append(decision)
        return None if decision.allow else Denial(resource, decision)

    return admit
