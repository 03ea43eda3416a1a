"""The one policy input document and the decision every engine returns (house style 10: a Protocol at the
boundary). The same policies run in-process (regopy) or on an OPA server; both take `PolicyInput.to_dict()`
and their result is read by `Decision.from_result`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Action = Literal["search", "read", "create", "update", "delete", "export"]
RESOURCE_KINDS = (
    "study",
    "series",
    "instance",
    "frames",
    "bulkdata",
    "metadata",
    "rendered",
    "ImagingStudy",
    "DiagnosticReport",
    "Patient",
    "Endpoint",
    "AuditEvent",
    "Subscription",
    "Bundle",
    "BreakGlass",
    "system",
    "Model",
    "InferenceRequest",
)


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    instance_uid: str | None = None
    modalities: tuple[str, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_input(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "patient_id": self.patient_id,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "instance_uid": self.instance_uid,
            "modalities": list(self.modalities),
            **({"attributes": self.attributes} if self.attributes else {}),
        }


@dataclass(frozen=True, slots=True)
class Context:
    time: str
    """RFC 3339 UTC time of the request."""
    client_ip: str | None = None
    break_glass: dict[str, Any] | None = None
    """An open break-glass session of this subject: {"id", "reason", "expires", "patient_id", "study_uid"};
    None otherwise."""
    channel: str = "http"
    """Through which the subject acts: `http`, `dimse`, `ai` or `rest-hook` (`authz.actor.CHANNELS`)."""

    def to_input(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "client_ip": self.client_ip,
            "break_glass": self.break_glass,
            "channel": self.channel,
        }


@dataclass(frozen=True, slots=True)
class PolicyInput:
    subject: dict[str, Any]
    action: Action
    resource: Resource
    context: Context

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "action": self.action,
            "resource": self.resource.to_input(),
            "context": self.context.to_input(),
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy said. `constraints` narrow searches (they become SQL filters): e.g.
    {"patient_ids": ["P1", "P2"]} or {"modalities_excluded": ["MG"]}; an absent key means no constraint.
    `obligations` e.g. {"audit": "detailed", "break_glass": true}."""

    allow: bool
    reasons: tuple[str, ...] = ()
    obligations: dict[str, Any] = field(default_factory=dict)
    constraints: dict[str, Any] = field(default_factory=dict)
    revision: str = ""
    decision_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @classmethod
    def from_result(cls, result: Any, revision: str) -> Decision:
        """Read the policy's `data.hounsfield.authz.decision` object; anything malformed is a denial."""
        if not isinstance(result, dict) or not isinstance(result.get("allow"), bool):
            return cls(False, ("policy returned no decision",), revision=revision)
        reasons = result.get("reasons") or []
        return cls(
            allow=result["allow"],
            reasons=tuple(str(r) for r in reasons) if isinstance(reasons, list | set | tuple) else (str(reasons),),
            obligations=dict(result.get("obligations") or {}),
            constraints=dict(result.get("constraints") or {}),
            revision=revision,
        )


DecisionScope = Literal["study", "instance"]


class PolicyEngine(Protocol):
    async def decide(self, policy_input: PolicyInput) -> Decision:
        """Evaluate `data.hounsfield.authz.decision` for the input. Raises PolicyUnavailable when it cannot."""
        ...

    @property
    def revision(self) -> str:
        """Identifies the loaded policies and data (a hash); recorded with every decision."""
        ...

    @property
    def decision_scope(self) -> DecisionScope:
        """What the policy's decisions depend on (`data.hounsfield.authz.decision_scope`): `study` when they depend
        on the study's facts and never on the series or instance UID (a cache may then answer another series or
        instance of the study with one decision), else `instance`."""
        ...

    async def reload(self) -> None:
        """Load policies and data again (without restart)."""
        ...

    async def close(self) -> None: ...
