"""What the FHIR handlers and resource hooks use: one `FhirServices`, a dependency (`fhir`) of the route handlers
and, for the resource hooks the guard runs (which dependency injection does not reach), in the app's state
(`fhir_services(app)`). The fhir plugin opens it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg

from authz.audit import AuditTrail
from fhir.repository import FhirRepository
from fhir.settings import FhirSettings
from server.platform.deps import Provided

STATE_KEY = "hounsfield.fhir"


@dataclass(frozen=True)
class FhirServices:
    settings: FhirSettings
    pool: asyncpg.Pool
    repository: FhirRepository
    """The versioned resources (its write hooks queue Subscription notifications)."""
    audit: AuditTrail


def fhir_services(app: Any) -> FhirServices:
    """The services the fhir plugin published in `app`'s state (a Litestar app)."""
    services: FhirServices = app.state[STATE_KEY]
    return services


FhirDep: TypeAlias = Provided[FhirServices]
"""`fhir`: as route handlers declare it (a Litestar named dependency provided by `fhir.plugin`)."""
