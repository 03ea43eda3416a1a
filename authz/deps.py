"""Authorization's dependencies as route handlers declare them (Litestar named dependencies provided by
`authz.plugin`, and the server's settings as authz reads them)."""

from __future__ import annotations

from typing import TypeAlias

from authz.audit import AuditTrail
from authz.auditanchor import AuditAnchors
from authz.breakglass import BreakGlassService
from authz.decision import PolicyEngine
from authz.settings import AuthzSettings
from server.platform.deps import Provided

AuthzSettingsDep: TypeAlias = Provided[AuthzSettings]
AuditDep: TypeAlias = Provided[AuditTrail]
PolicyDep: TypeAlias = Provided[PolicyEngine]
BreakGlassDep: TypeAlias = Provided[BreakGlassService]
AnchorsDep: TypeAlias = Provided[AuditAnchors]
