"""The one place where domain errors become HTTP responses (house style 3).

DICOMweb errors get their status, a JSON body `{"error": ..., "status": ...}` and a `Warning: 299` header
(PS3.18 8.6.3 asks for a Warning header explaining failures). Anything unexpected is a 500 with no detail
in the body (details go to the log, never PHI).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException

from authz.errors import AuthzError, Forbidden, PolicyUnavailable, Unauthenticated
from dicomweb.errors import (
    BadRequest,
    DicomWebError,
    InvalidParameter,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    StorageFull,
    StorageUnavailable,
    UnsupportedMediaType,
)
from server.db import RETRY_AFTER_SECONDS, unavailable
from server.logs import route_of

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[DicomWebError], int]] = [
    (InvalidParameter, 400),
    (BadRequest, 400),
    (UnsupportedMediaType, 415),
    (NotAcceptable, 406),
    (NotFound, 404),
    (PayloadTooLarge, 413),
    (RangeNotSatisfiable, 416),
    (StorageUnavailable, 503),
]


def warning_header(text: str) -> str:
    r"""One warning-value (RFC 7234 5.5: `299 hounsfield "text"`) whose text is a quoted-string (RFC 7230 3.2.6)
    of printable ASCII whatever `text` holds: a control character, DEL or non-ASCII character is written as its
    Python escape (`\x01`, `\xe9`, `\u20ac`: the backslash a quoted-pair, so the unquoted text reads `\x01`),
    a line break or tab as a space, a double quote as a single quote. A raw control character would make the
    header invalid, and the HTTP server would drop the connection instead of answering."""
    out = []
    for ch in text[:500]:
        if ch == '"':
            out.append("'")
        elif ch in "\r\n\t":
            out.append(" ")
        elif " " <= ch <= "~":
            out.append("\\\\" if ch == "\\" else ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii").replace("\\", "\\\\"))
    return f'299 hounsfield "{"".join(out)}"'


def status_for(exc: DicomWebError) -> int:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def dicomweb_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, object]]:
    assert isinstance(exc, DicomWebError)
    status = status_for(exc)
    headers = {"Warning": warning_header(exc.detail)}
    if isinstance(exc, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{exc.total}"
    if isinstance(exc, StorageFull):
        headers["Retry-After"] = str(exc.retry_after)
    return Response(
        {"error": exc.detail, "status": status},
        status_code=status,
        headers=headers,
        media_type=MediaType.JSON,
    )


def http_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, object]]:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else "error"
    headers = dict(exc.headers or {})
    headers.setdefault("Warning", warning_header(detail))
    return Response(
        {"error": detail, "status": exc.status_code},
        status_code=exc.status_code,
        headers=headers,
        media_type=MediaType.JSON,
    )


def _auth_param(text: str) -> str:
    """An RFC 6750 3 attribute value: printable ASCII without `"` and `\\`."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "'" if c == '"' else "?" for c in text)[:300]


def authz_error_parts(exc: AuthzError) -> tuple[int, bytes, dict[str, str]]:
    """Status, JSON body and headers for the authz family: `Unauthenticated` 401 with `WWW-Authenticate: Bearer`
    (RFC 6750 3; no `error` attribute when the request had no token, 3.1), `Forbidden` 403 (a policy's denial says
    only "access denied by policy" and the decision id, `authz.errors.denial_text`), `PolicyUnavailable` 503
    (fail closed). Shared by the authentication middleware (pure ASGI: it answers without raising) and the
    exception handler below (for guards and handlers)."""
    if isinstance(exc, Unauthenticated):
        status = 401
    elif isinstance(exc, Forbidden):
        status = 403
    elif isinstance(exc, PolicyUnavailable):
        status = 503
    else:
        status = 500
    headers = {"Warning": warning_header(exc.detail)}
    if isinstance(exc, Unauthenticated):
        challenge = 'Bearer realm="hounsfield"'
        if exc.error:
            challenge += f', error="{_auth_param(exc.error)}", error_description="{_auth_param(exc.detail)}"'
        headers["WWW-Authenticate"] = challenge
    content: dict[str, object] = {"error": exc.detail, "status": status}
    if isinstance(exc, Forbidden) and exc.decision_id:
        content["decision_id"] = exc.decision_id  # the policy's reasons stay in the audit record
    body = json.dumps(content).encode()
    return status, body, headers


def authz_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    assert isinstance(exc, AuthzError)
    status, body, headers = authz_error_parts(exc)
    return Response(body, status_code=status, headers=headers, media_type=MediaType.JSON)


DATABASE_UNAVAILABLE = "the database is unavailable; retry later"


def database_unavailable(request: Request[Any, Any, Any], exc: Exception) -> bool:
    """Whether `exc` is the database out of reach (`server.db.unavailable`): logged without a traceback, answered
    503 with Retry-After by the caller (the server reconnects by itself, `server.dbwatch`)."""
    if not unavailable(exc):
        return False
    log.warning("%s %s: database unavailable (%s)", request.method, route_of(request.scope), type(exc).__name__)
    return True


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, object]]:
    if database_unavailable(request, exc):
        return Response(
            {"error": DATABASE_UNAVAILABLE, "status": 503},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Warning": warning_header(DATABASE_UNAVAILABLE)},
            media_type=MediaType.JSON,
        )
    log.error("unhandled error on %s %s", request.method, route_of(request.scope), exc_info=exc)
    return Response({"error": "internal server error", "status": 500}, status_code=500, media_type=MediaType.JSON)


EXCEPTION_HANDLERS = {
    DicomWebError: dicomweb_error,
    AuthzError: authz_error,
    HTTPException: http_error,
    Exception: internal_error,
}


Handler = Callable[[Request[Any, Any, Any], Exception], Response[Any]]


def under(prefix: str, path: str) -> bool:
    """Whether `path` is `prefix` or below it (`/fhir`, `/fhir/Patient`; never `/fhirx`)."""
    return path == prefix or path.startswith(prefix + "/")


def by_path(prefix: str, inside: Handler, outside: Handler) -> Handler:
    """An app-level handler that answers requests under `prefix` with `inside`, all others with `outside`. A
    request no route matched (404, or 405 for a path served with other methods) never reaches route-level
    handlers: its API's error format is chosen here, by path (FHIR R4 http.html: an OperationOutcome)."""

    def handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        return (inside if under(prefix, request.scope["path"]) else outside)(request, exc)

    return handler
