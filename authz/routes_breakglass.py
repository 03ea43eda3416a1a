"""Break-glass over HTTP (the sessions are `authz.breakglass`), mounted at the application root:

- `POST /break-glass` `{"reason": "...", "patient_id": "...", "study_uid"?: "..."}`: start emergency access for
  the caller to one patient (and optionally one study of that patient; a stored study alone names its patient)
  (policy: `create` on `BreakGlass`, with the patient as `resource.patient_id` and the reason as
  `resource.attributes.reason`) → 201 and the session, or 200 and the open session that already covers it;
  400 for a missing patient, a study that is not the patient's, or a reason that does not show 10 characters
  (at most 1000); 403 when the policy does not let the caller break the glass; 409 when the caller's open
  session is for another patient or study. (A token with purpose of use `BTG` may instead send
  `X-Break-Glass-Reason` with a request about the patient: the guard.)
- `GET /break-glass?open=true|false&limit=&offset=`: security reviewers list sessions, newest first (`search`).
- `GET /break-glass/{id}`: one session (`read`).
- `POST /break-glass/{id}/close` `{"comment": "..."}`: a reviewer ends a session (`update`, with the session's
  subject as `resource.attributes.session_subject`: nobody closes their own) → 200 and the session; 403 for
  the session's own subject, 404 unknown, 409 already closed.

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
    InvalidRequest,
    SelfReview,
    SessionClosed,
    SessionConflict,
    SessionNotFound,
    StartRequest,
    now_utc,
    parse_close,
    parse_start,
    scoped_start,
)
from authz.decision import Resource
from authz.deps import BreakGlassDep
from authz.errors import Forbidden
from authz.guard import RESOURCE, authz_opt, decision_of, with_attributes, with_study
from authz.services import authz_services

MAX_BODY = 16 * 1024
KIND = "BreakGlass"


def _http_error(exc: BreakGlassError) -> Exception:
    if isinstance(exc, InvalidRequest):
        return ValidationException(exc.detail)
    if isinstance(exc, SessionNotFound):
        return NotFoundException(exc.detail)
    if isinstance(exc, SessionClosed | SessionConflict):
        return ClientException(exc.detail, status_code=409)
    if isinstance(exc, SelfReview):
        return Forbidden(exc.detail)
    return exc


def _client_ip(request: Request[Any, Any, Any]) -> str | None:
    client = request.scope.get("client")
    return client[0] if client else None


async def _start_resource(connection: ASGIConnection[Any, Any, Any, Any], resource: Resource) -> Resource:
    """The guard's view of a start: the patient (a named study's, looked up in the index), the study and the
    reason, which the policy requires. A malformed body is a 400 before any policy decision; the handler starts
    the session from this same resource."""
    request = connection if isinstance(connection, Request) else Request(connection.scope, connection.receive)
    try:
        start = parse_start(await request.body())
        study = await with_study(connection, Resource(kind=resource.kind), start.study_uid)
        start = scoped_start(start, study.patient_id)
    except InvalidRequest as exc:
        raise _http_error(exc) from None
    resource = Resource(kind=resource.kind, patient_id=start.patient_id, study_uid=start.study_uid)
    return with_attributes(resource, reason=start.reason)


def _started(request: Request[Any, Any, Any]) -> StartRequest:
    """The start the guard decided on (its resource), not a second reading of the body."""
    resource = request.scope.get("state", {}).get(RESOURCE)
    if not isinstance(resource, Resource) or resource.kind != KIND or resource.patient_id is None:
        raise ValidationException("break-glass is for one patient: give patient_id (and optionally study_uid)")
    return StartRequest(str(resource.attributes["reason"]), resource.patient_id, resource.study_uid)


@post(
    "/break-glass",
    opt=authz_opt("create", KIND, resource=_start_resource),
    status_code=201,
    request_max_body_size=MAX_BODY,
    tags=["Break-glass"],
)
async def start_session(request: Request[Any, Any, Any], breakglass: BreakGlassDep) -> Response[dict[str, Any]]:
    """Start emergency access for the authenticated caller (the guard has let the policy decide), or give back
    its open session for the same patient."""
    try:
        session, created = await breakglass.start(
            principal_of(request), _started(request), decision=decision_of(request.scope), client_ip=_client_ip(request)
        )
    except BreakGlassError as exc:
        raise _http_error(exc) from None
    return Response(
        session.to_json(now_utc()),
        status_code=201 if created else 200,
        headers={"Location": f"/break-glass/{session.id}"},
    )


@get("/break-glass", opt=authz_opt("search", KIND), tags=["Break-glass"])
async def list_sessions(
    breakglass: BreakGlassDep,
    open: FromQuery[bool | None] = None,
    limit: FromQuery[int] = 100,
    offset: FromQuery[int] = 0,
) -> list[dict[str, Any]]:
    """Sessions newest first: `open=true` only open ones (not closed, not expired), `open=false` only ended."""
    if limit < 1 or offset < 0:
        raise ValidationException("limit must be at least 1 and offset at least 0")
    now = now_utc()
    sessions = await breakglass.sessions(open_=open, limit=limit, offset=offset, now=now)
    return [s.to_json(now) for s in sessions]


@get("/break-glass/{session_id:uuid}", opt=authz_opt("read", KIND), tags=["Break-glass"])
async def get_session(breakglass: BreakGlassDep, session_id: FromPath[uuid.UUID]) -> dict[str, Any]:
    try:
        session = await breakglass.get(session_id)
    except BreakGlassError as exc:
        raise _http_error(exc) from None
    return session.to_json(now_utc())


async def _closing_resource(connection: ASGIConnection[Any, Any, Any, Any], resource: Resource) -> Resource:
    """The guard's view of a close: whose session it is (the policy refuses self-review). An unknown session
    stays a bare resource (the handler answers 404)."""
    session_id = connection.path_params.get("session_id")
    if not isinstance(session_id, uuid.UUID):
        return resource
    try:
        session = await authz_services(connection.app).breakglass.get(session_id)
    except SessionNotFound:
        return resource
    return with_attributes(resource, session_subject={"sub": session.sub, "issuer": session.issuer})


@post(
    "/break-glass/{session_id:uuid}/close",
    opt=authz_opt("update", KIND, resource=_closing_resource),
    status_code=200,
    request_max_body_size=MAX_BODY,
    tags=["Break-glass"],
)
async def close_session(
    request: Request[Any, Any, Any], breakglass: BreakGlassDep, session_id: FromPath[uuid.UUID]
) -> dict[str, Any]:
    """A security reviewer ends a session with a comment (DCM 110113 / 110138 Emergency Override Stopped)."""
    try:
        comment = parse_close(await request.body())
        session = await breakglass.close(
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
