"""Authorization as a guard on the route (house style 7), declared by route metadata:

    @get("/studies", opt=authz_opt("search", "study"))

Every request reaching a handler has been authenticated (`authz.authn`), and this guard asks the policy engine
about the action on the resource, with facts about the resource (its patient and modalities) looked up in the
index. A route without an `authz` declaration is refused (fail closed). The request's actor (`authz.actor`: the
principal, its address and open break-glass session, channel `http`) is made once and kept in the request state
with the decision, for the handler (further decisions, search constraints) and for the audit record. The study,
series and instance a request names are parsed once, by the route's target parser (`authz.target`), before
anything else; the handler reads that same value.

Break-glass (`authz.breakglass`): every request passes the subject's open session to the policy as
`context.break_glass` (from the process's cache of open sessions, `authz.sessioncache`, or one index probe).
A request whose token carries purpose of use `BTG` (HL7 v3 ActReason) and the header `X-Break-Glass-Reason:
<free text>` starts a session for the patient (and study) the request is about first, unless the subject's open
session covers it (the policy decides, as for `POST /break-glass`; a request about no patient is a 400, an open
session for another patient a 409); the session is bound to the token's subject and issuer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import ClientException, ValidationException
from litestar.handlers.base import BaseRouteHandler

from authz.actor import HTTP, Actor, refusal
from authz.authn import principal_of
from authz.breakglass import (
    InvalidRequest,
    SessionConflict,
    StartRequest,
    check_reason,
    open_session,
)
from authz.decision import Action, Decision, Resource
from authz.errors import Forbidden
from authz.facts import FactsSource, StudyFacts
from authz.principal import Principal
from authz.services import authz_services
from authz.sessioncache import OpenSession
from authz.target import TARGET, Target, TargetParser, path_target
from dicomweb import uids
from server.platform.db import Connection, vouch_stateless

OPT_KEY = "authz"
ACTOR = "hounsfield.actor"
"""The request's `Actor`, made by the guard once the request is authenticated."""
DECISION = "hounsfield.decision"
RESOURCE = "hounsfield.resource"
BREAK_GLASS = "hounsfield.break_glass"
"""The subject's open break-glass session as passed to the policy ({"id", "reason", "expires"}), when it has one."""
RESOURCE_HOOK_KEY = "authz_resource"
TARGET_KEY = "authz_target"
OPENAPI_PATH = "/openapi"
BTG = "BTG"
"""HL7 v3 ActReason "break the glass"."""
BREAK_GLASS_HEADER = "x-break-glass-reason"

ResourceHook = Callable[[ASGIConnection[Any, Any, Any, Any], Resource], Awaitable[Resource]]
"""Completes the resource of a request from the request itself (e.g. the reason in a body); may raise an HTTP
error (400) for a malformed request, which then never reaches the policy."""


def authz_opt(
    action: Action,
    kind: str,
    *,
    resource: ResourceHook | None = None,
    target: TargetParser | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Route metadata declaring what a route does: `opt=authz_opt("read", "frames")`. `resource` completes the
    resource the policy sees from the request (e.g. `resource.attributes.reason` of a break-glass start).
    `target` parses the study/series/instance the request names (`authz.target`; default: the path)."""
    hook = {RESOURCE_HOOK_KEY: resource} if resource is not None else {}
    parser = {TARGET_KEY: target} if target is not None else {}
    return {OPT_KEY: (action, kind), **hook, **parser, **extra}


def decision_of(scope: Any) -> Decision | None:
    value = scope.get("state", {}).get(DECISION)
    return value if isinstance(value, Decision) else None


def actor_of(scope: Any) -> Actor | None:
    """The request's actor as the guard made it (with the break-glass session it passed to the policy)."""
    value = scope.get("state", {}).get(ACTOR)
    return value if isinstance(value, Actor) else None


def request_actor(connection: ASGIConnection[Any, Any, Any, Any]) -> Actor:
    """The actor of a request the guard allowed (a handler's further decisions are this actor's)."""
    actor = actor_of(connection.scope)
    if actor is None:  # every routed request passed the guard; never decide for an unknown subject
        raise Forbidden("no authorized actor for this request")
    return actor


def _plain(uid: uids.UID | None) -> str | None:
    """The policy input is encoded by msgspec, which takes `str` itself only."""
    return str(uid) if uid is not None else None


def _on_facts(kind: str, target: Target, found: StudyFacts | None) -> Resource:
    """The resource a request names, with its study's facts (None: a study not stored, or none named)."""
    study, series, instance = _plain(target.study), _plain(target.series), _plain(target.instance)
    if study is None:
        return Resource(kind=kind)
    if found is None:
        return Resource(kind=kind, study_uid=study, series_uid=series, instance_uid=instance)
    return Resource(
        kind=kind,
        patient_id=found.patient_id,
        study_uid=study,
        series_uid=series,
        instance_uid=instance,
        modalities=found.modalities,
    )


async def _resource(facts: FactsSource, conn: Connection, kind: str, target: Target) -> Resource:
    study = _plain(target.study)
    return _on_facts(kind, target, await facts.study_facts(conn, study) if study is not None else None)


async def with_study(
    connection: ASGIConnection[Any, Any, Any, Any], resource: Resource, study: str | None, series: str | None = None
) -> Resource:
    """`resource` as the policy sees a request about `study` (its patient and modalities from the index), for the
    resource hooks of routes that name a study elsewhere than in their path. An unknown study adds only its UID."""
    if study is None or not uids.is_valid_uid(study):
        return resource  # not a UID: never stored
    checked = uids.UID(series) if series is not None and uids.is_valid_uid(series) else None
    services = authz_services(connection.app)
    async with services.pool.acquire() as conn:
        found = await _resource(services.facts, conn, resource.kind, Target(uids.UID(study), checked))
        vouch_stateless(conn)
    return dataclasses.replace(
        resource,
        patient_id=found.patient_id,
        study_uid=found.study_uid,
        series_uid=found.series_uid,
        modalities=found.modalities,
    )


async def _facts(
    connection: ASGIConnection[Any, Any, Any, Any], kind: str, target: Target, principal: Principal, now: dt.datetime
) -> tuple[Resource, dict[str, Any] | None]:
    """The resource with its facts from the index, and the subject's open break-glass session. A request whose
    study's facts (or that names no study) and whose subject's session state are cached needs no database round
    trip at all (`authz.factscache`, `authz.sessioncache`)."""
    services = authz_services(connection.app)
    sessions = services.sessions
    key = (principal.issuer, principal.sub)
    known, context = sessions.get(key, now) if sessions is not None else (False, None)
    study = _plain(target.study)
    peeked, found = services.facts.peek(study) if study is not None else (True, None)
    if known and peeked:
        return _on_facts(kind, target, found), context
    async with services.pool.acquire() as conn:
        resource = await _resource(services.facts, conn, kind, target)
        if not known:

            async def fetch() -> OpenSession | None:
                return await open_session(conn, principal, now)

            if sessions is not None:
                context = await sessions.lookup(key, fetch)
            else:
                session = await fetch()
                context = session.context if session is not None else None
        vouch_stateless(conn)  # SELECTs only: the release needs no reset query
    return resource, context


def _header_text(raw: str) -> str:
    """Header values arrive as Latin-1; a client that sent UTF-8 gets its text back."""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return raw


def _session_covers(session: dict[str, Any] | None, resource: Resource) -> bool:
    """Whether the open session (the policy's `context.break_glass`) already reaches the resource's patient
    and study, or the request is about no patient (there is nothing to start a session for)."""
    if session is None:
        return False
    if resource.patient_id is None:
        return True
    study = session.get("study_uid")
    return session.get("patient_id") == resource.patient_id and study in (None, resource.study_uid)


async def _break_glass_by_header(
    connection: ASGIConnection[Any, Any, Any, Any], actor: Actor, resource: Resource, now: dt.datetime
) -> dict[str, Any] | None:
    """Start a session for a `BTG` token that sends `X-Break-Glass-Reason`, for the patient (and stored study)
    the request is about. A reason that does not show enough characters, or a request about no patient, is a
    400; a subject the policy does not let break the glass gets 403; an open session for another patient 409."""
    principal = actor.principal
    raw = connection.headers.get(BREAK_GLASS_HEADER)
    if raw is None or BTG not in principal.purpose_of_use:
        return None
    try:
        reason = check_reason(_header_text(raw), "X-Break-Glass-Reason")
    except InvalidRequest as exc:
        raise ValidationException(exc.detail) from None
    if resource.patient_id is None:
        raise ValidationException(
            "X-Break-Glass-Reason: this request is about no stored patient; break-glass is for one patient"
            " (POST /break-glass with a patient_id)"
        )
    services = authz_services(connection.app)
    start = StartRequest(reason, resource.patient_id, resource.study_uid)
    target = Resource(
        kind="BreakGlass", patient_id=start.patient_id, study_uid=start.study_uid, attributes={"reason": reason}
    )
    decision = await actor.decide("create", target, now=now)  # the actor of a request without a session
    if not decision.allow:
        connection.scope.setdefault("state", {})[DECISION] = decision
        raise Forbidden("break-glass refused: " + ("; ".join(decision.reasons) or "denied by policy"), decision)
    try:
        session, _created = await services.breakglass.start(
            principal, start, decision=decision, client_ip=actor.client_ip, now=now
        )
    except SessionConflict as exc:
        raise ClientException(exc.detail, status_code=409) from None
    return session.context()


async def authorize(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The app-wide guard: authenticated principal + declared action → policy decision, or 401/403."""
    services = authz_services(connection.app)
    if connection.scope["path"] in services.public_paths:
        return
    if connection.scope.get("method") == "OPTIONS":
        return  # Litestar's automatic OPTIONS answers carry no data (CORS preflight sends no token)
    principal = principal_of(connection)  # set by authz.authn; 401 when missing
    client = connection.scope.get("client")
    actor = Actor(principal, services.policy, services.audit, HTTP, client[0] if client else None)
    state = connection.scope.setdefault("state", {})
    state[ACTOR] = actor
    spec = handler.opt.get(OPT_KEY)
    if spec is None and connection.scope["path"].startswith(OPENAPI_PATH):
        spec = ("read", "system")  # the API description (Litestar's own routes)
    if spec is None:
        raise Forbidden("this route declares no authorization rule")
    action, kind = spec
    now = dt.datetime.now(dt.UTC)
    parse: TargetParser = handler.opt.get(TARGET_KEY, path_target)
    target = state[TARGET] = await parse(connection)  # a 400 here comes before any decision or data access
    resource, session = await _facts(connection, kind, target, principal, now)
    hook = handler.opt.get(RESOURCE_HOOK_KEY)
    if hook is not None:
        resource = await hook(connection, resource)
    state[RESOURCE] = resource
    if kind != "BreakGlass" and not _session_covers(session, resource):
        session = await _break_glass_by_header(connection, actor, resource, now) or session
    if session is not None:
        state[BREAK_GLASS] = session
        actor = state[ACTOR] = actor.with_break_glass(session)
    decision = await actor.decide(action, resource, now=now)
    state[DECISION] = decision
    if not decision.allow:
        raise refusal(decision)


def break_glass_of(scope: Any) -> dict[str, Any] | None:
    """The open break-glass session the guard passed to the policy for this request, if any."""
    value = scope.get("state", {}).get(BREAK_GLASS)
    return value if isinstance(value, dict) else None


def with_attributes(resource: Resource, **attributes: Any) -> Resource:
    """The resource with more `attributes` (for resource hooks)."""
    return dataclasses.replace(resource, attributes={**resource.attributes, **attributes})
