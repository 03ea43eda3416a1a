"""The resource types served under `/fhir` and what clients may do with each: one table that the REST routes,
bundles and the CapabilityStatement all read, so that what is advertised is what is implemented."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fhir.repository import FhirRepository, Filing
from server.db import Connection

Prepare = Callable[[Connection, FhirRepository, dict[str, Any]], Awaitable[Filing]]
"""For a writable type: checks a client's resource beyond its model (references resolve, values the server
requires) and returns where it is filed for the policy. Raises a `fhir.errors.FhirError` (422 usually)."""


@dataclass(frozen=True, slots=True)
class ResourceType:
    name: str
    kind: str
    """The resource kind the policy decides on (authz/policies/tables.rego `kind_group`)."""
    writable: bool
    """Clients may create, update and delete (others are derived from the archive: read-only)."""
    prepare: Prepare | None = None


def _types() -> Mapping[str, ResourceType]:
    # PLACEHOLDER: the REST helper fills in DiagnosticReport's `prepare`; the Subscription helper adds Subscription.
    return {
        "ImagingStudy": ResourceType("ImagingStudy", "ImagingStudy", writable=False),
        "Patient": ResourceType("Patient", "Patient", writable=False),
        "Endpoint": ResourceType("Endpoint", "Endpoint", writable=False),
        "DiagnosticReport": ResourceType("DiagnosticReport", "DiagnosticReport", writable=True),
    }


TYPES: Mapping[str, ResourceType] = _types()
