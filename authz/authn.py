"""Authentication at the edge: every HTTP request needs `Authorization: Bearer <jwt>` (RFC 6750 2.1), except
the exact paths of `HOUNSFIELD_AUTH_PUBLIC_PATHS` (health checks) and CORS preflight requests (browsers send
`OPTIONS` without credentials, Fetch standard 4.8). WebSocket connections (none yet) need a token on every path;
without one they are closed with 1008 before the handshake completes.

Tokens are taken from the header only, never from a query string (RFC 6750 2.3 allows `access_token`, but URLs
end up in logs, proxies and browser history), nor from a form body.

On success the `Principal` is put in the ASGI scope twice over, as the same object:
`scope["state"]["hounsfield.principal"]` (`PRINCIPAL`, the key `authz.guard` reads; `principal_of(connection)`
returns it and raises `Unauthenticated` when it is missing) and `scope["user"]` (Litestar's slot:
`request.user`).
On failure the answer is 401 with `WWW-Authenticate: Bearer realm="hounsfield", error="invalid_token",
error_description="..."` (RFC 6750 3; no error code when there was no token at all, 3.1), the JSON body
`{"error", "status"}` and a `Warning` header, as for every other error (`authz/httperrors.py` builds it); under
`/fhir` the body is an OperationOutcome (`application/fhir+json`) instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, Scope, Send

from authz.errors import AuthzError, Unauthenticated
from authz.httperrors import authz_error_parts
from authz.principal import Principal
from authz.settings import AuthzSettings
from authz.tokens import TokenValidator

log = logging.getLogger(__name__)

PRINCIPAL = "hounsfield.principal"
"""The key of the authenticated `Principal` in `scope["state"]` (read through `principal_of`)."""


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The token of the `Authorization: Bearer` header (scheme case-insensitive, RFC 7235 2.1); raises
    `Unauthenticated` with error code "" when there is none, "invalid_request" when it is malformed."""
    values = [v for k, v in headers if k == b"authorization"]
    if not values:
        raise Unauthenticated("authentication required: send Authorization: Bearer <token>", error="")
    if len(values) > 1:
        raise Unauthenticated("more than one Authorization header", error="invalid_request")
    try:
        scheme, _, token = values[0].decode("ascii").strip().partition(" ")
    except UnicodeDecodeError:
        raise Unauthenticated("malformed Authorization header", error="invalid_request") from None
    if scheme.lower() != "bearer":
        raise Unauthenticated("authentication required: the Authorization scheme must be Bearer", error="")
    token = token.strip()
    if not token or " " in token:
        raise Unauthenticated("malformed Authorization header: Bearer <token>", error="invalid_request")
    return token


def principal_of(connection: Any) -> Principal:
    """The authenticated principal of a Litestar `Request` (or anything with a `scope`)."""
    principal = (connection.scope.get("state") or {}).get(PRINCIPAL)
    if not isinstance(principal, Principal):
        raise Unauthenticated("authentication required", error="")
    return principal


FHIR_PREFIX = "/fhir"


def _fhir_outcome(exc: AuthzError) -> bytes:
    """Under /fhir the 401 body is an OperationOutcome (R4 "Handling errors"), issue code `login`."""
    issue = {"severity": "error", "code": "login", "diagnostics": exc.detail}
    return json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode()


async def _answer(send: Send, exc: AuthzError, path: str) -> None:
    status, body, headers = authz_error_parts(exc)
    content_type = b"application/json"
    if path == FHIR_PREFIX or path.startswith(FHIR_PREFIX + "/"):
        body, content_type = _fhir_outcome(exc), b"application/fhir+json"
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ],
    }
    await send(start)
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(end)


def authenticate(settings: AuthzSettings, validator: TokenValidator | None = None) -> Callable[[ASGIApp], ASGIApp]:
    """A Litestar middleware factory. Litestar calls the returned function once per route, so the validator
    (keys, JWKS cache) is made here, once per application."""
    validator = validator or TokenValidator(settings)
    public = frozenset(settings.auth_public_paths)

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            kind = scope["type"]
            if kind == ScopeType.WEBSOCKET or (
                scope["type"] == ScopeType.HTTP and scope["path"] not in public and scope["method"] != "OPTIONS"
            ):
                try:
                    principal = await validator.validate(bearer_token(scope["headers"]))
                except AuthzError as exc:
                    log.debug("%s refused: %s", scope["path"], exc.detail)
                    if kind == ScopeType.WEBSOCKET:
                        await send({"type": "websocket.close", "code": 1008, "reason": ""})  # policy violation
                    else:
                        await _answer(send, exc, scope["path"])
                    return
                state = scope.get("state")
                if state is None:
                    state = scope["state"] = {}
                state[PRINCIPAL] = principal
                scope["user"] = principal
            await app(scope, receive, send)

        return middleware

    return factory
