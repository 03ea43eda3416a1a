"""Limits on what a request may look like, checked before any handler, guard or query sees it:

- header size: 431 Request Header Fields Too Large (RFC 6585 5) instead of parsing megabytes of headers
  (uvicorn's httptools parser sets no limit of its own);
- no control characters in the request target: a path or query value with NUL, CR, LF or another control
  character (percent-encoded: the HTTP parser refuses raw ones) is a 400 before routing. No identifier the
  server knows (UID, Patient ID, FHIR id, search value) has one; PostgreSQL refuses NUL in text (a 500 deep in
  a query); and CR/LF in a logged value would forge log lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, Scope, Send

from server.platform.http import under


async def _refuse(send: Send, status: int, body: bytes, media_type: bytes, warning: str) -> None:
    """Answer a refused request at once: `body` with a Warning header (`warning` holds no quote or control)."""
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", media_type),
            (b"content-length", str(len(body)).encode()),
            (b"warning", f'299 hounsfield "{warning}"'.encode()),
        ],
    }
    await send(start)
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(end)


def header_limit(max_bytes: int) -> Callable[[ASGIApp], ASGIApp]:
    """A Litestar middleware factory: refuse requests whose header names and values exceed `max_bytes`."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == ScopeType.HTTP:
                total = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
                if total > max_bytes:
                    text = f"request headers exceed {max_bytes} bytes"
                    body, media_type = _refusal(scope["path"], 431, "too-long", text)
                    await _refuse(send, 431, body, media_type, text)
                    return
            await app(scope, receive, send)

        return middleware

    return factory


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
FHIR_PREFIX = "/fhir"
TARGET_ERROR = "control characters are not allowed in the request path or query"


def has_control_characters(scope: Scope) -> bool:
    """Whether the (decoded) path or any percent-decoded query name or value holds a control character."""
    if _CONTROL.search(scope["path"]):
        return True
    query = scope.get("query_string") or b""
    if b"%" not in query:
        return bool(_CONTROL_BYTES.search(query))
    decoded = unquote_to_bytes(query)
    return bool(_CONTROL_BYTES.search(decoded) or _CONTROL.search(decoded.decode("utf-8", "replace")))


def _refusal(path: str, status: int, code: str, text: str) -> tuple[bytes, bytes]:
    """A refusal's body and media type: an OperationOutcome under /fhir (FHIR R4 "Handling errors"; `code` from
    its IssueType value set), else the DICOMweb JSON error of `server.platform.http`."""
    if under(FHIR_PREFIX, path):
        issue = {"severity": "error", "code": code, "diagnostics": text}
        return json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode(), b"application/fhir+json"
    return json.dumps({"error": text, "status": status}).encode(), b"application/json"


def plain_target(app: ASGIApp) -> ASGIApp:
    """ASGI layer before routing: 400 for a request target with control characters (see the module)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP and has_control_characters(scope):
            body, media_type = _refusal(scope["path"], 400, "invalid", TARGET_ERROR)
            await _refuse(send, 400, body, media_type, TARGET_ERROR)
            return
        await app(scope, receive, send)

    return middleware
