"""The resource types served under `/fhir`, each with the resource kind the policy decides on
(authz/policies/tables.rego `kind_group`). `fhir.types.TYPES` is built over these names and adds what clients may
do with each type; the write rules that table names (`fhir.reports`, `fhir.subscriptions`) read the served types
here, below it."""

from __future__ import annotations

from collections.abc import Mapping

KINDS: Mapping[str, str] = {
    "ImagingStudy": "ImagingStudy",
    "Patient": "Patient",
    "Endpoint": "Endpoint",
    "DiagnosticReport": "DiagnosticReport",
    "Subscription": "Subscription",
}
"""Each served type's policy kind, in the order of `fhir.types.TYPES`."""
