"""Who is asking: the authenticated subject, made once at the edge from a validated token's claims."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    """The token's `sub`."""
    issuer: str
    roles: tuple[str, ...] = ()
    """From the `roles` claim (a list or a space-separated string)."""
    scopes: tuple[str, ...] = ()
    """SMART v2 scopes from `scope` (space-separated), e.g. `patient/ImagingStudy.rs`, `user/*.cruds`."""
    patient: str | None = None
    """SMART patient context (`patient` claim): a patient-context token reaches only this patient's data."""
    client_id: str | None = None
    """`client_id` (or `azp`)."""
    purpose_of_use: tuple[str, ...] = ()
    """HL7 v3 ActReason codes (`purpose_of_use` claim), e.g. `TREAT`, `BTG` (break the glass)."""
    token_id: str | None = None
    """`jti`, when present."""
    expires_at: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Other claims a policy may need (never logged)."""

    def to_input(self) -> dict[str, Any]:
        """The `subject` part of the policy input document."""
        return {
            "sub": self.sub,
            "issuer": self.issuer,
            "roles": list(self.roles),
            "scopes": list(self.scopes),
            "patient": self.patient,
            "client_id": self.client_id,
            "purpose_of_use": list(self.purpose_of_use),
        }
