"""What the guard, the resource hooks and the audit layer use, which dependency injection does not reach: the
authz plugin publishes one `AuthzServices` in the app's state (`authz_services(app)` reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from authz.audit import AuditTrail
from authz.breakglass import BreakGlassService
from authz.decision import PolicyEngine
from authz.factscache import FactsCache
from authz.sessioncache import SessionCache

STATE_KEY = "hounsfield.authz"


@dataclass(frozen=True)
class AuthzServices:
    pool: asyncpg.Pool
    """For the facts the policy decides on and open break-glass sessions."""
    facts: FactsCache
    """The study's patient and modalities, as the archive's index knows them (cached per process)."""
    policy: PolicyEngine
    audit: AuditTrail
    breakglass: BreakGlassService
    sessions: SessionCache | None
    public_paths: tuple[str, ...]
    """Paths answered without a token (`HOUNSFIELD_AUTH_PUBLIC_PATHS`): no decision either."""


def authz_services(app: Any) -> AuthzServices:
    """The services the authz plugin published in `app`'s state (a Litestar app)."""
    services: AuthzServices = app.state[STATE_KEY]
    return services
