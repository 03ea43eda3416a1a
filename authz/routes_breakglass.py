"""Break-glass over HTTP (issue 3; the sessions are `authz.breakglass`), mounted at the application root:

- `POST /break-glass` `{"reason": "...", "patient_id"?, "study_uid"?}`: start emergency access for the caller
  (policy: `create` on `BreakGlass`, with the reason as `resource.attributes.reason`) → 201 and the session;
  400 for a missing or short reason (10..1000 characters), 403 when the policy does not let the caller break the
  glass. (A token with purpose of use `BTG` may instead send `X-Break-Glass-Reason` with any request: the guard.)
- `GET /break-glass?open=true|false&limit=&offset=`: security reviewers list sessions, newest first (`search`).
- `GET /break-glass/{id}`: one session (`read`).
- `POST /break-glass/{id}/close` `{"comment": "..."}`: a reviewer ends a session (`update`) → 200 and the
  session; 404 unknown, 409 already closed.

Who may do what is the policy's business (authz/policies: auditors and admins review; `data.break_glass_roles`
start), declared per route with `authz_opt` and enforced by the guard, never here.
"""

from __future__ import annotations

import uuid
from typing import Any

from litestar import Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import ClientException, NotFoundException, ValidationException
from litestar.params import FromPath, FromQuery

from authz.authn import principal_of
from authz.breakglass import (
    BreakGlassError,
    BreakGlassService,
    InvalidRequest,
    SessionClosed,
    SessionNotFound,
    now_utc,
    parse_close,
    parse_start,
)
from authz.decision import Resource
from authz.guard import authz_opt, decision_of, with_attributes
from server.resources import ResourcesDep

MAX_BODY = 16 * 1024
KIND = "BreakGlass"


def _http_error(exc: BreakGlassError) -> Exception:
    if isinstance(exc, InvalidRequest):
        return ValidationException(exc.detail)
    if isinstance(exc, SessionNotFound):
        return NotFoundException(exc.detail)
    if isinstance(exc, SessionClosed):
        return ClientException(exc.detail, status_code=409)
    return exc


def _client_ip(request: Request[Any, Any, Any]) -> str | None:
    client = request.scope.get("client")
    return client[0] if client else None


async def _start_resource(connection: ASGIConnection[Any, Any, Any, Any], resource: Resource) -> Resource:
    """The guard's view of a start: the reason (which the policy requires) and the patient/study it concerns.
    A malformed body is a 400 before any policy decision."""
    request = connection if isinstance(connection, Request) else Request(connection.scope, connection.receive)
    try:
        start = parse_start(await request.body())
    except InvalidRequest as exc:
        raise _http_error(exc) from None
    resource = Resource(kind=resource.kind, patient_id=start.patient_id, study_uid=start.study_uid)
    return with_attributes(resource, reason=start.reason)


@post(
    "/break-glass",
    opt=authz_opt("create", KIND, resource=_start_resource),
    status_code=201,
    request_max_body_size=MAX_BODY,
    tags=["Break-glass"],
)
async def start_session(request: Request[Any, Any, Any], resources: ResourcesDep) -> Response[dict[str, Any]]:
    """Start emergency access for the authenticated caller (the guard has let the policy decide)."""
    try:
        start = parse_start(await request.body())  # the body the guard read (cached); it parsed then
    except InvalidRequest as exc:
        raise _http_error(exc) from None
    session = await BreakGlassService.of(resources).start(
        principal_of(request), start, decision=decision_of(request.scope), client_ip=_client_ip(request)
    )
    return Response(session.to_json(now_utc()), status_code=201, headers={"Location": f"/break-glass/{session.id}"})


@get("/break-glass", opt=authz_opt("search", KIND), tags=["Break-glass"])
async def list_sessions(
    resources: ResourcesDep,
    open: FromQuery[bool | None] = None,
    limit: FromQuery[int] = 100,
    offset: FromQuery[int] = 0,
) -> list[dict[str, Any]]:
    """Sessions newest first: `open=true` only open ones (not closed, not expired), `open=false` only ended."""
    if limit < 1 or offset < 0:
        raise ValidationException("limit must be at least 1 and offset at least 0")
    now = now_utc()
    sessions = await BreakGlassService.of(resources).sessions(open_=open, limit=limit, offset=offset, now=now)
    return [s.to_json(now) for s in sessions]


@get("/break-glass/{session_id:uuid}", opt=authz_opt("read", KIND), tags=["Break-glass"])
async def get_session(resources: ResourcesDep, session_id: FromPath[uuid.UUID]) -> dict[str, Any]:
    try:
        session = await BreakGlassService.of(resources).get(session_id)
    except BreakGlassError as exc:
        raise _http_error(exc) from None
    return session.to_json(now_utc())


@post(
    "/break-glass/{session_id:uuid}/close",
    opt=authz_opt("update", KIND),
    status_code=200,
    request_max_body_size=MAX_BODY,
    tags=["Break-glass"],
)
async def close_session(
    request: Request[Any, Any, Any], resources: ResourcesDep, session_id: FromPath[uuid.UUID]
) -> dict[str, Any]:
    """A security reviewer ends a session with a comment (DCM 110113 / 110138 Emergency Override Stopped)."""
    try:
        comment = parse_close(await request.body())
        session = await BreakGlassService.of(resources).close(
            session_id,
            principal_of(request),
            comment,
            decision=decision_of(request.scope),
            client_ip=_client_ip(request),
        )
    except BreakGlassError as exc:
        raise _http_error(exc) from None
    return session.to_json(now_utc())


ROUTES: list[Any] = [start_session, list_sessions, get_session, close_session]
