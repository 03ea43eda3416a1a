"""The authz exception family; `authz/httperrors.py` maps it to 401 (with WWW-Authenticate, RFC 6750 3) and 403."""

from __future__ import annotations

from typing import Any


class AuthzError(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Unauthenticated(AuthzError):
    """No token, or a token that is not valid (401). `error` is the RFC 6750 error code."""

    def __init__(self, detail: str, error: str = "invalid_token") -> None:
        super().__init__(detail)
        self.error = error


DENIED = "access denied by policy"
"""All a caller learns of a policy's denial. The policy's reasons name what they protect (a patient, a care list,
a modality, a research consent): they go to the audit record only."""


def denial_text(decision_id: str | None) -> str:
    """The public text of a policy's denial, with the decision's id: the caller can quote it to the security team,
    who find the reasons in the audit record (`policy.decision_id`, AuditEvent `agent.policy`)."""
    return f"{DENIED} (decision {decision_id})" if decision_id else DENIED


def denial_comment(decision_id: str | None) -> str:
    """`denial_text` for a DIMSE Error Comment (0000,0902), a LO of at most 64 characters (PS3.7 C.4.1.1.3.1,
    PS3.5 6.2): the id of a decision (a UUID) fits whole."""
    return f"{DENIED}: {decision_id}" if decision_id else DENIED


class Forbidden(AuthzError):
    """A refused request (403). `reason` is kept for the audit and the log; `detail` is what the caller sees.

    With a `decision` (the policy denied, or allowed with constraints that cannot be enforced) the caller sees
    only `denial_text` and the decision id, whatever the reason says; without one (a refusal that is no policy
    decision, e.g. a route that declares no rule) the reason is the detail and must name nothing protected."""

    def __init__(self, reason: str, decision: Any = None) -> None:
        self.decision_id: str | None = getattr(decision, "decision_id", None) if decision is not None else None
        super().__init__(reason if decision is None else denial_text(self.decision_id))
        self.reason = reason
        self.decision = decision


class PolicyUnavailable(AuthzError):
    """The policy engine could not decide (OPA unreachable, timeout): fail closed (503)."""
