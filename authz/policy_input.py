"""Pure helpers that build the policy input document for a request (authz/decision.py `PolicyInput`).

No I/O here: the guard looks up the facts (a study's patient and modalities) and passes them in; the clock is
a parameter so that the result is reproducible in tests.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, get_args

from authz.decision import RESOURCE_KINDS, Action, Context, PolicyInput, Resource
from authz.principal import Principal

ACTIONS: tuple[str, ...] = get_args(Action)


def rfc3339(moment: dt.datetime) -> str:
    """RFC 3339 (section 5.6) UTC timestamp with milliseconds and `Z`, e.g. `2026-01-02T03:04:05.678Z`.
    A naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def modalities(values: Iterable[str | None]) -> tuple[str, ...]:
    """Modality codes (PS3.3 C.7.3.1.1.1) as the policy compares them: stripped, upper-case, sorted, unique."""
    return tuple(sorted({v.strip().upper() for v in values if v and v.strip()}))


def dicomweb_resource(
    kind: str,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_uid: str | None = None,
    modalities_in_study: Iterable[str | None] = (),
    attributes: Mapping[str, Any] | None = None,
) -> Resource:
    """The `resource` of a DICOMweb request (PS3.18 10.4 retrieve, 10.6 search, 10.5 store).

    For a search leave the identifiers out: its limits come back as decision constraints. For a retrieve give
    the study's patient and modalities (ModalitiesInStudy): the policy denies a study when any of its
    modalities is restricted. An empty PatientID (type 2) becomes None.
    """
    if kind not in RESOURCE_KINDS:
        raise ValueError(f"unknown resource kind {kind!r}")
    return Resource(
        kind=kind,
        patient_id=patient_id or None,
        study_uid=study_uid,
        series_uid=series_uid,
        instance_uid=instance_uid,
        modalities=modalities(modalities_in_study),
        attributes=dict(attributes or {}),
    )


def break_glass_session(
    session_id: str, reason: str, expires: dt.datetime, patient_id: str | None, study_uid: str | None = None
) -> dict[str, Any]:
    """`context.break_glass` for an open break-glass session of the subject (None when there is none). The
    policy lifts its limits for the session's patient (and study) only; a session without a patient (none can be
    started any more) grants nothing."""
    return {
        "id": session_id,
        "reason": reason,
        "expires": rfc3339(expires),
        "patient_id": patient_id,
        "study_uid": study_uid,
    }


def policy_input(
    principal: Principal,
    action: Action,
    resource: Resource,
    client_ip: str | None = None,
    break_glass: Mapping[str, Any] | None = None,
    *,
    now: dt.datetime | None = None,
    channel: str = "http",
) -> PolicyInput:
    """The one input document of a decision: who (the token's principal), what action on which resource,
    and the context (time, client address, an open break-glass session)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    return PolicyInput(
        subject=principal.to_input(),
        action=action,
        resource=resource,
        context=Context(
            time=rfc3339(now if now is not None else dt.datetime.now(dt.UTC)),
            client_ip=client_ip,
            break_glass=dict(break_glass) if break_glass is not None else None,
            channel=channel,
        ),
    )
