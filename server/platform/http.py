"""HTTP errors every package answers alike: the Warning header (PS3.18 8.6.3), Litestar's HTTPException as a JSON
error, the database out of reach as 503 with Retry-After, anything unexpected as a 500 with no detail in the
body (details go to the log, never PHI), and the choice of an error format by path. Each package maps its own
exception family to responses (`dicomweb.httperrors`, `authz.httperrors`, `fhir.outcome`); `server.errors`
puts the handlers together for the app."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException

from server.platform.db import RETRY_AFTER_SECONDS, unavailable
from server.platform.logs import route_of

log = logging.getLogger(__name__)


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


DATABASE_UNAVAILABLE = "the database is unavailable; retry later"


def database_unavailable(request: Request[Any, Any, Any], exc: Exception) -> bool:
    """Whether `exc` is the database out of reach (`server.platform.db.unavailable`): logged without a traceback,
    answered 503 with Retry-After by the caller (the server reconnects by itself, `server.platform.dbwatch`)."""
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
