"""The authz exception family; `server/errors.py` maps it to 401 (with WWW-Authenticate, RFC 6750 3) and 403."""

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


class Forbidden(AuthzError):
    """The policy denied the request (403). Carries the decision for the audit record."""

    def __init__(self, detail: str, decision: Any = None) -> None:
        super().__init__(detail)
        self.decision = decision


class PolicyUnavailable(AuthzError):
    """The policy engine could not decide (OPA unreachable, timeout): fail closed (503)."""
