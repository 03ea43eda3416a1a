"""Errors on the FHIR API as OperationOutcome resources (https://hl7.org/fhir/R4/operationoutcome.html; R4 HTTP
"Handling errors": a 4xx/5xx answer SHOULD carry an OperationOutcome).

The `/fhir` router (`fhir.rest.router.fhir_router`) declares `EXCEPTION_HANDLERS`, which take precedence over the
application's (server/errors.py) for its routes only, guards included: a policy denial on /fhir is a 403
OperationOutcome with the same headers as elsewhere. A request under /fhir that no route takes (404, 405) is
answered with `http_error` by the application's handlers (`server.app`); a missing or invalid token by the
authentication middleware (`authz.authn`), with an OperationOutcome under /fhir too.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

from authz.errors import AuthzError, Forbidden, PolicyUnavailable, Unauthenticated
from authz.httperrors import authz_error_parts
from fhir.audit.search import SearchError
from fhir.errors import FhirError, RecordDamaged, ResourceNotFound
from server.platform.db import RETRY_AFTER_SECONDS
from server.platform.http import DATABASE_UNAVAILABLE, database_unavailable, warning_header
from server.platform.logs import route_of

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
FHIR_NDJSON = "application/fhir+ndjson"


def issue(code: str, diagnostics: str, severity: str = "error", expression: str | None = None) -> dict[str, Any]:
    """An OperationOutcome.issue: `code` from the R4 IssueType value set (invalid, not-found, forbidden, ...);
    `expression` the FHIRPath of the element at fault."""
    out: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = [expression]
    return out


def operation_outcome(*issues: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": list(issues)}


def outcome_response(
    status: int,
    code: str,
    diagnostics: str,
    headers: dict[str, str] | None = None,
    *,
    expression: str | None = None,
) -> Response[dict[str, Any]]:
    headers = dict(headers or {})
    headers.setdefault("Warning", warning_header(diagnostics))
    return Response(
        operation_outcome(issue(code, diagnostics, expression=expression)),
        status_code=status,
        headers=headers,
        media_type=FHIR_JSON,
    )


def error_outcome(exc: FhirError) -> dict[str, Any]:
    """The OperationOutcome of a FHIR error: one issue, or one per problem of an error that lists several
    (`problems`: [(diagnostics, FHIRPath)], e.g. every invalid element of a resource)."""
    problems = getattr(exc, "problems", None) or [(exc.detail, exc.expression)]
    return operation_outcome(*(issue(exc.code, detail, expression=path) for detail, path in problems))


def _fhir_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    assert isinstance(exc, FhirError)
    return Response(
        error_outcome(exc),
        status_code=exc.status,
        headers={"Warning": warning_header(exc.detail)},
        media_type=FHIR_JSON,
    )


def _search_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    assert isinstance(exc, SearchError)
    return outcome_response(400, exc.code, exc.detail)


_AUTHZ_CODES: list[tuple[type[AuthzError], str]] = [
    (Unauthenticated, "login"),
    (Forbidden, "forbidden"),
    (PolicyUnavailable, "transient"),
]


def _authz_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    assert isinstance(exc, AuthzError)
    status, _body, headers = authz_error_parts(exc)
    code = next((c for kind, c in _AUTHZ_CODES if isinstance(exc, kind)), "exception")
    return outcome_response(status, code, exc.detail, headers)


_HTTP_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported"}


def http_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """Litestar's HTTP exceptions (404, 405 with its Allow header, ...) as an OperationOutcome; also the app's
    answer to requests under /fhir that no route matched (`server.app`)."""
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else "error"
    code = _HTTP_CODES.get(exc.status_code, "processing" if exc.status_code < 500 else "exception")
    return outcome_response(exc.status_code, code, detail, dict(exc.headers or {}))


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if database_unavailable(request, exc):
        return outcome_response(503, "transient", DATABASE_UNAVAILABLE, {"Retry-After": str(RETRY_AFTER_SECONDS)})
    log.error("unhandled error on %s %s", request.method, route_of(request.scope), exc_info=exc)
    return outcome_response(500, "exception", "internal server error")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    FhirError: _fhir_error,
    SearchError: _search_error,
    AuthzError: _authz_error,
    HTTPException: http_error,
    Exception: _internal_error,
}
"""The handlers of the `/fhir` router (`fhir.rest.router.fhir_router`)."""

__all__ = [
    "EXCEPTION_HANDLERS",
    "FHIR_JSON",
    "FHIR_NDJSON",
    "FhirError",
    "RecordDamaged",
    "ResourceNotFound",
    "error_outcome",
    "http_error",
    "issue",
    "operation_outcome",
    "outcome_response",
]
