"""The resource types served under `/fhir` and what clients may do with each: one table that the REST routes,
bundles and the CapabilityStatement all read, so that what is advertised is what is implemented."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from authz.principal import Principal
from fhir.reports import prepare_report
from fhir.repository import FhirRepository, Filing
from fhir.served import KINDS
from fhir.settings import FhirSettings
from fhir.subscriptions import owner_of, prepare_subscription, transform_subscription
from server.platform.db import Connection

Prepare = Callable[[Connection, FhirRepository, dict[str, Any]], Awaitable[Filing]]
"""For a writable type: checks a client's resource beyond its model (references resolve, values the server
requires) and returns where it is filed for the policy. Raises a `fhir.errors.FhirError` (422 usually)."""

Owner = Callable[[Mapping[str, Any]], Principal | None]
"""The identity that owns a stored resource's content (None: none recorded, so nobody's)."""

Transform = Callable[[dict[str, Any], Principal, FhirSettings], dict[str, Any]]
"""For a writable type whose stored content the server completes (Subscription: the endpoint checked against the
configured allow-list, `requested` made `active`, the writer recorded as owner): called on create and update
after `prepare`, with the writer and the settings; returns the content to store; may raise a `FhirError`."""


@dataclass(frozen=True, slots=True)
class ResourceType:
    name: str
    kind: str
    """The resource kind the policy decides on (authz/policies/tables.rego `kind_group`)."""
    writable: bool
    """Clients may create, update and delete (others are derived from the archive: read-only)."""
    prepare: Prepare | None = None
    transform: Transform | None = None
    owner: Owner | None = None
    """For a type whose resources belong to their writer (a Subscription's channel may carry the receiver's
    credentials): the recorded writer of a stored resource (the owner extension that `transform` sets). Such
    resources exist only for their owner: a search lists the caller's own, and a read, vread, history, update
    or delete by id of another's answers as for an unknown id (`fhir.rest.interactions`), whatever the policy allows
    (an update is refused)."""

    @property
    def owned(self) -> bool:
        return self.owner is not None


def _types() -> Mapping[str, ResourceType]:
    """Every served type (`fhir.served.KINDS`): read-only, except those clients write, with their rules."""
    writable = (
        ResourceType("DiagnosticReport", KINDS["DiagnosticReport"], writable=True, prepare=prepare_report),
        ResourceType(
            "Subscription",
            KINDS["Subscription"],
            writable=True,
            prepare=prepare_subscription,
            transform=transform_subscription,
            owner=owner_of,
        ),
    )
    rules = {spec.name: spec for spec in writable}
    return {name: rules.get(name) or ResourceType(name, kind, writable=False) for name, kind in KINDS.items()}


TYPES: Mapping[str, ResourceType] = _types()
