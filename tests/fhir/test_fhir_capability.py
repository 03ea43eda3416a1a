"""The CapabilityStatement and SMART discovery say exactly what the server does: every advertised interaction
has its route, every /fhir route is advertised, and every advertised search parameter is accepted by a strict
search."""

from __future__ import annotations

import re
from typing import Any

import httpx
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.searchparameter import SearchParameter
from litestar import Litestar

from server.app import create_app
from server.settings import Settings
from tests.conftest import LiveServer

ROUTE_OF = {
    "read": ("GET", "/fhir/{T}/{rid}"),
    "vread": ("GET", "/fhir/{T}/{rid}/_history/{vid}"),
    "history-instance": ("GET", "/fhir/{T}/{rid}/_history"),
    "search-type": ("GET", "/fhir/{T}"),
    "create": ("POST", "/fhir/{T}"),
    "update": ("PUT", "/fhir/{T}/{rid}"),
    "delete": ("DELETE", "/fhir/{T}/{rid}"),
}
NOT_RESOURCE_ROUTES = {
    ("GET", "/fhir/metadata"),
    ("GET", "/fhir/.well-known/smart-configuration"),
    ("GET", "/fhir/SearchParameter/{rid}"),
    ("POST", "/fhir"),
    ("GET", "/fhir/AuditEvent/$export"),
    ("GET", "/fhir/AuditEvent/$verify"),
}
SAMPLE_VALUE = {
    "token": "x",
    "string": "x",
    "date": "2020",
    "reference": "Patient/x",
    "uri": "http://example.org/x",
    "number": "1",
    "quantity": "1",
}


def _fhir_routes(app: Litestar) -> set[tuple[str, str]]:
    out = set()
    for route in app.routes:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        if not path.startswith("/fhir"):
            continue
        for method in getattr(route, "methods", ()):
            if method not in {"OPTIONS", "HEAD"}:
                out.add((method, path))
    return out


def _advertised(statement: dict[str, Any]) -> set[tuple[str, str]]:
    out = set()
    for resource in statement["rest"][0]["resource"]:
        for interaction in resource["interaction"]:
            method, path = ROUTE_OF[interaction["code"]]
            out.add((method, path.replace("{T}", resource["type"])))
            if interaction["code"] == "search-type" and resource["type"] != "AuditEvent":
                out.add(("POST", f"/fhir/{resource['type']}/_search"))  # R4 3.1.1.1.2: the same search by POST
    return out


def _refusing_writes(statement: dict[str, Any]) -> set[tuple[str, str]]:
    """Types without write interactions still have the write routes, which answer 405 (derived resources)."""
    out = set()
    for resource in statement["rest"][0]["resource"]:
        codes = {i["code"] for i in resource["interaction"]}
        for code in {"create", "update", "delete"} - codes:
            method, path = ROUTE_OF[code]
            out.add((method, path.replace("{T}", resource["type"])))
    return out


def test_capability_statement_is_public_valid_r4_and_exact(server: LiveServer) -> None:
    answer = httpx.get(server.url + "/fhir/metadata")  # no token: discovery comes first
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    body = answer.json()
    CapabilityStatement.model_validate(body)
    assert body["fhirVersion"] == "4.0.1"
    assert {i["code"] for i in body["rest"][0]["interaction"]} == {"batch", "transaction"}
    served = _fhir_routes(create_app(Settings.from_env({})))
    advertised = _advertised(body)
    assert advertised - served == set(), "advertised but not served"
    audit = {(m, p) for (m, p) in served if p.startswith("/fhir/AuditEvent")}
    refusing = _refusing_writes(body) & served
    assert served - advertised - NOT_RESOURCE_ROUTES - audit - refusing == set(), "served but not advertised"
    assert ("POST", "/fhir/ImagingStudy") in refusing
    for method, path in refusing:
        answer = httpx.request(method, server.url + path.replace("{rid}", "x"), headers=server.headers, json={})
        assert answer.status_code == 405, (method, path, answer.status_code)
        assert answer.json()["resourceType"] == "OperationOutcome"
    types = {r["type"] for r in body["rest"][0]["resource"]}
    assert {"ImagingStudy", "DiagnosticReport", "Patient", "Endpoint", "AuditEvent"} <= types
    report = next(r for r in body["rest"][0]["resource"] if r["type"] == "DiagnosticReport")
    custom = next(p for p in report["searchParam"] if p["name"] == "imaging-study")
    assert custom["definition"].endswith("/SearchParameter/DiagnosticReport-imaging-study")
    parameter = httpx.get(custom["definition"].replace(custom["definition"].split("/fhir/")[0], server.url))
    assert parameter.status_code == 200
    SearchParameter.model_validate(parameter.json())


def test_every_advertised_search_parameter_is_accepted_strictly(server: LiveServer, http: httpx.Client) -> None:
    body = http.get("/fhir/metadata").json()
    checked = 0
    for resource in body["rest"][0]["resource"]:
        if resource["type"] == "AuditEvent":
            continue  # its own tests (tests/authz/test_audit_api.py)
        for param in resource.get("searchParam", []):
            value = SAMPLE_VALUE[param["type"]]
            if param["name"] == "_lastUpdated":
                value = "gt2020-01-01"
            answer = http.get(
                f"/fhir/{resource['type']}", params={param["name"]: value}, headers={"Prefer": "handling=strict"}
            )
            assert answer.status_code == 200, (resource["type"], param["name"], answer.text)
            assert answer.json()["resourceType"] == "Bundle"
            checked += 1
    assert checked > 40


def test_smart_configuration(make_server: Any) -> None:
    plain = make_server()
    for path in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        answer = httpx.get(plain.url + path)
        assert answer.status_code == 200
        doc = answer.json()
        assert doc["issuer"] == "hounsfield" and "permission-v2" in doc["capabilities"]
        assert "token_endpoint" not in doc and doc["grant_types_supported"] == []
    configured = make_server(
        smart_authorization_url="https://idp.example/authorize", smart_token_url="https://idp.example/token"
    )
    doc = httpx.get(configured.url + "/.well-known/smart-configuration").json()
    assert doc["token_endpoint"] == "https://idp.example/token"
    assert doc["authorization_endpoint"] == "https://idp.example/authorize"
    assert set(doc["grant_types_supported"]) == {"authorization_code", "client_credentials"}
    statement = httpx.get(configured.url + "/fhir/metadata").json()
    uris = statement["rest"][0]["security"]["extension"][0]["extension"]
    assert {u["url"]: u["valueUri"] for u in uris} == {
        "authorize": "https://idp.example/authorize",
        "token": "https://idp.example/token",
    }


def test_discovery_needs_a_token_when_taken_out_of_the_public_paths(make_server: Any) -> None:
    closed = make_server(auth_public_paths=("/healthz",))
    assert httpx.get(closed.url + "/fhir/metadata").status_code == 401
    assert httpx.get(closed.url + "/.well-known/smart-configuration").status_code == 401
