"""The CapabilityStatement (`GET /fhir/metadata`, R4 3.1.0.13) and SMART discovery
(`/.well-known/smart-configuration`, SMART App Launch 2.x).

Built from the same tables the routes are built from (`fhir.types.TYPES` for interactions,
`fhir.search.index.PARAMS` for search parameters), so the statement lists exactly what is implemented;
tests/fhir/test_fhir_capability.py checks every advertised interaction and search parameter against the server.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from authz.settings import AuthzSettings
from fhir.search import index as searchindex
from fhir.types import TYPES

FHIR_VERSION = "4.0.1"
SOFTWARE_VERSION = "0.1.0"
IMAGING_STUDY_PARAM = "DiagnosticReport-imaging-study"
"""The id of our custom SearchParameter (R4 has no search parameter for DiagnosticReport.imagingStudy)."""

INCLUDES: Mapping[str, tuple[str, ...]] = {
    "ImagingStudy": ("ImagingStudy:endpoint", "ImagingStudy:patient", "ImagingStudy:subject"),
    "DiagnosticReport": ("DiagnosticReport:subject", "DiagnosticReport:patient", "DiagnosticReport:result"),
}
REVINCLUDES: Mapping[str, tuple[str, ...]] = {"ImagingStudy": ("DiagnosticReport:imaging-study",)}

SMART_SCOPES = (
    "patient/ImagingStudy.rs",
    "patient/DiagnosticReport.rs",
    "patient/Patient.rs",
    "user/ImagingStudy.rs",
    "user/DiagnosticReport.cruds",
    "user/Patient.rs",
    "user/Endpoint.rs",
    "system/ImagingStudy.rs",
    "system/DiagnosticReport.cruds",
    "system/*.rs",
)


def search_parameter(base: str) -> dict[str, Any]:
    """Our custom SearchParameter resource, served at `[base]/SearchParameter/DiagnosticReport-imaging-study`."""
    return {
        "resourceType": "SearchParameter",
        "id": IMAGING_STUDY_PARAM,
        "url": f"{base}/SearchParameter/{IMAGING_STUDY_PARAM}",
        "name": "imaging-study",
        "status": "active",
        "description": "The ImagingStudy a DiagnosticReport reports on (DiagnosticReport.imagingStudy)",
        "code": "imaging-study",
        "base": ["DiagnosticReport"],
        "type": "reference",
        "expression": "DiagnosticReport.imagingStudy",
        "xpathUsage": "normal",
        "target": ["ImagingStudy"],
    }


def _search_params(resource_type: str, base: str) -> list[dict[str, Any]]:
    params = {**searchindex.COMMON, **searchindex.PARAMS.get(resource_type, {})}
    out = []
    for name, definition in sorted(params.items()):
        entry: dict[str, Any] = {"name": name, "type": definition.type}
        if resource_type == "DiagnosticReport" and name == "imaging-study":
            entry["definition"] = f"{base}/SearchParameter/{IMAGING_STUDY_PARAM}"
            entry["documentation"] = "Custom: DiagnosticReport.imagingStudy (R4 defines no such parameter)"
        out.append(entry)
    return out


def _resource(resource_type: str, base: str) -> dict[str, Any]:
    spec = TYPES[resource_type]
    interactions = ["read", "vread", "history-instance"]
    if resource_type in searchindex.PARAMS:
        interactions.append("search-type")
    if spec.writable:
        interactions += ["create", "update", "delete"]
    entry: dict[str, Any] = {
        "type": resource_type,
        "interaction": [{"code": code} for code in interactions],
        "versioning": "versioned-update" if spec.writable else "versioned",
        "readHistory": True,
    }
    if spec.writable:
        entry |= {
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "not-supported",
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
        }
    else:
        entry["documentation"] = "Derived from the DICOM archive; read-only."
    if spec.owned:
        entry["documentation"] = "A search lists the caller's own resources (recorded owner: the last writer)."
    if resource_type in searchindex.PARAMS:
        entry["searchInclude"] = list(INCLUDES.get(resource_type, ()))
        entry["searchRevInclude"] = list(REVINCLUDES.get(resource_type, ()))
        entry["searchParam"] = _search_params(resource_type, base)
    return entry


def _audit_event() -> dict[str, Any]:
    params = ["date", "agent", "patient", "entity", "type", "subtype", "outcome", "purpose", "address"]
    return {
        "type": "AuditEvent",
        "documentation": "The tamper-evident audit trail (IHE BALP); read-only.",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [{"name": name, "type": "date" if name == "date" else "token"} for name in params],
        "operation": [
            {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"},
            {"name": "verify", "definition": "urn:hounsfield:operation:audit-verify"},
        ],
    }


def security(settings: AuthzSettings) -> dict[str, Any]:
    """CapabilityStatement.rest.security: SMART on FHIR bearer tokens (with the OAuth URIs when an
    authorization server is configured)."""
    out: dict[str, Any] = {
        "cors": bool(settings.cors_origins),
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ]
            }
        ],
        "description": "Bearer JWTs (RFC 6750) with SMART v2 scopes; every access decided by policy and audited.",
    }
    uris = [
        {"url": "authorize", "valueUri": settings.smart_authorization_url},
        {"url": "token", "valueUri": settings.smart_token_url},
    ]
    uris = [u for u in uris if u["valueUri"]]
    if uris:
        out["extension"] = [
            {"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris", "extension": uris}
        ]
    return out


def capability_statement(base: str, settings: AuthzSettings, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or dt.datetime.now(dt.UTC)
    resources = [_resource(name, base) for name in sorted(TYPES)] + [_audit_event()]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now.date().isoformat(),
        "publisher": "Hounsfield",
        "kind": "instance",
        "software": {"name": "Hounsfield", "version": SOFTWARE_VERSION},
        "implementation": {"description": "Hounsfield imaging archive FHIR API", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "security": security(settings),
                "resource": sorted(resources, key=lambda r: str(r["type"])),
                "interaction": [{"code": "batch"}, {"code": "transaction"}],
            }
        ],
    }


def smart_configuration(settings: AuthzSettings) -> dict[str, Any]:
    """SMART App Launch `.well-known/smart-configuration`. The token and authorization endpoints are those of
    the configured authorization server; the embedded default has none (tokens come from `hounsfield token`),
    and then the document says so by listing no grant types."""
    out: dict[str, Any] = {
        "issuer": settings.auth_issuer,
        "scopes_supported": list(SMART_SCOPES),
        "response_types_supported": ["code"] if settings.smart_authorization_url else [],
        "capabilities": ["permission-v2", "permission-patient", "permission-user"],
        "code_challenge_methods_supported": ["S256"],
        "grant_types_supported": [],
    }
    if settings.auth_jwks_url:
        out["jwks_uri"] = settings.auth_jwks_url
    if settings.smart_authorization_url:
        out["authorization_endpoint"] = settings.smart_authorization_url
        out["grant_types_supported"].append("authorization_code")
        out["capabilities"] += ["launch-standalone", "context-standalone-patient"]
    if settings.smart_token_url:
        out["token_endpoint"] = settings.smart_token_url
        out["grant_types_supported"].append("client_credentials")
        out["token_endpoint_auth_methods_supported"] = ["private_key_jwt"]
        out["capabilities"].append("client-confidential-asymmetric")
    return out
