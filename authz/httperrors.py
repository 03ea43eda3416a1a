"""The authz exception family as HTTP responses (401 with an RFC 6750 challenge, 403, 503), for the authentication
middleware (pure ASGI: it answers without raising) and as the app's exception handler."""

from __future__ import annotations

import json
from typing import Any

from litestar import MediaType, Request, Response

from authz.errors import AuthzError, Forbidden, PolicyUnavailable, Unauthenticated
from server.platform.http import warning_header


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
