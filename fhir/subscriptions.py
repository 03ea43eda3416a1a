"""FHIR R4 Subscriptions with the rest-hook channel (https://hl7.org/fhir/R4/subscription.html).

A client creates a Subscription with `criteria` (a search, `DiagnosticReport?status=final`) and a `rest-hook`
channel. The server checks it (`prepare_subscription`), activates it and records who wrote it
(`transform_subscription`). After every create or update of a served resource, the repository's write hook
(`queue_notifications`) queues a `fhir.notify` job in the write's transaction when an active Subscription names
that type. `fhir.notify` evaluates each one's criteria against that one resource with the search of
`GET [base]/[type]?[query]` (R4: "the search criteria are applied to the new value of the resource", hence no
notification for a deletion) and queues a `fhir.deliver` job per match. `fhir.deliver` sends the notification
(R4 2.46.7.1 REST Hook): no payload, an empty POST to the endpoint; payload `application/fhir+json`, a PUT of
the resource to `[endpoint]/[type]/[id]`; with the channel's headers. A non-2xx answer is retried with the job
queue's backoff; after the last attempt the Subscription is set to `error` with the reason (a new version).

Security:
- Endpoints must start with a prefix in `HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS` (server-side request forgery:
  the server only ever calls where an operator allowed), checked at write and again before every delivery.
- Creating one is decided by the policy (kind `Subscription`). Its writer's identity (sub, issuer, roles, scopes,
  patient context, client; never a token) is kept in the owner extension, and before each delivery the policy
  must let that identity read the resource (as the Subscriptions R5 Backport IG asks: "ensure that
  authorization is (still) in place when sending any event notifications"), asked as its actor through channel
  `rest-hook` (`authz.actor`); a denial is not delivered.
- Each attempt is audited (type `rest`, subtype `subscription-notification`, the resource's patient, the
  criteria as the BALP query entity). Channel headers (a receiver's credentials) and the endpoint's path and
  query are never logged nor audited: only the endpoint's origin is.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
import httpx

from authz.actor import REST_HOOK, Actor, AuditSink, Decider
from authz.auditrecord import Agent, AuditRecord, Code, EventType, Outcome, encode_query
from authz.decision import Decision, Resource
from authz.principal import Principal
from fhir.errors import FhirError, Unprocessable, VersionConflict
from fhir.repository import FhirRepository, Filing, Stored
from fhir.search.query import SearchAccess, check_query
from fhir.served import KINDS
from fhir.settings import FhirSettings
from server.platform import jobs
from server.platform.db import Connection, Queries

log = logging.getLogger(__name__)
SQL = Queries(Path(__file__).with_name("subscriptions.sql"))

TYPE = "Subscription"
NOTIFY_JOB = "fhir.notify"
DELIVER_JOB = "fhir.deliver"
TIMEOUT_SECONDS = 10.0
"""How long a receiver may take to answer one notification."""
OWNER_URL = "urn:hounsfield:extension:subscription-owner"
"""Extension on Subscription: who wrote it, whose read permission each notification needs."""
NOTIFICATION = Code("urn:hounsfield:audit-subtype", "subscription-notification", "Subscription notification")
"""AuditEvent.subtype of a delivery attempt (FHIR R4 restful-interaction has no code for a notification)."""
SETTING = "HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS"
PAYLOAD = "application/fhir+json"
CLIENT_STATUSES = ("requested", "active", "off")
"""What a client may ask for (R4 SubscriptionStatus); `error` is set by the server (send `requested` to resume)."""
_HEADER = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x20-\x7e]*)")
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "keep-alive", "te", "trailer"}
    | {"upgrade", "expect", "proxy-authorization", "proxy-connection"}
)
"""Headers that describe the HTTP message itself, which the server writes."""


class Matcher(Protocol):
    """`fhir.search.service.matching_ids`: the ids of current resources of a type that a search matches."""

    async def __call__(
        self,
        conn: Connection,
        resource_type: str,
        query: str,
        *,
        access: SearchAccess,
        only_id: str | None = None,
        limit: int = 2,
    ) -> list[str]: ...


def _served_types() -> Sequence[str]:
    return [name for name in KINDS if name != TYPE]


def _kind_of(resource_type: str) -> str:
    return KINDS[resource_type]


# --- the Subscription's rules ----------------------------------------------------------------------------------


def split_criteria(criteria: Any) -> tuple[str, str]:
    """`Type?query` (or a bare `Type`: every change) as (type, query); the type must be one we serve."""
    if not isinstance(criteria, str) or not criteria.strip():
        raise Unprocessable(
            "Subscription.criteria is required: a search such as 'DiagnosticReport?status=final'",
            "Subscription.criteria",
        )
    resource_type, _, query = criteria.strip().partition("?")
    if resource_type not in _served_types():
        raise Unprocessable(
            f"Subscription.criteria must search one of {', '.join(_served_types())}, not {resource_type!r}",
            "Subscription.criteria",
        )
    return resource_type, query


def endpoint_allowed(endpoint: str, prefixes: Sequence[str]) -> bool:
    """Whether `endpoint` is under one of the allowed URL prefixes: same scheme, host and port, and the prefix's
    path is a whole-segment prefix of the endpoint's (`https://h/hooks` allows `https://h/hooks/a`, never
    `https://h/hooksx` nor `https://h:444/hooks`). No credentials, fragments, `..` segments or odd characters."""
    if any(c.isspace() or ord(c) < 32 or c == "\\" for c in endpoint):
        return False
    try:
        target = urlsplit(endpoint)
        port = _port(target.scheme, target.port)
    except ValueError:
        return False
    if target.scheme not in ("http", "https") or not target.hostname or "@" in target.netloc or target.fragment:
        return False
    if any(segment in (".", "..") for segment in unquote(target.path).split("/")):
        return False
    for prefix in prefixes:
        try:
            allowed = urlsplit(prefix)
            allowed_port = _port(allowed.scheme, allowed.port)
        except ValueError:
            continue
        if (target.scheme, target.hostname, port) != (allowed.scheme, allowed.hostname, allowed_port):
            continue
        base = allowed.path
        if base in ("", "/") or target.path == base or target.path.startswith(base.rstrip("/") + "/"):
            return True
    return False


def _port(scheme: str, port: int | None) -> int | None:
    return port if port is not None else {"http": 80, "https": 443}.get(scheme)


def headers_of(channel: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`channel.header` (R4: "name: value" strings) as pairs; raises Unprocessable for a malformed one or one
    that the server writes itself. Error messages name the header, never its value."""
    raw = channel.get("header") or []
    if not isinstance(raw, list):
        raise Unprocessable("channel.header must be a list of 'Name: value' strings", "Subscription.channel.header")
    pairs = []
    for i, item in enumerate(raw):
        where = f"Subscription.channel.header[{i}]"
        match = _HEADER.fullmatch(item) if isinstance(item, str) else None
        if match is None:
            raise Unprocessable("a channel header must be 'Name: value' in visible ASCII", where)
        if match.group(1).lower() in _RESERVED_HEADERS:
            raise Unprocessable(f"channel header {match.group(1)} is set by the server", where)
        pairs.append((match.group(1), match.group(2).strip()))
    return pairs


def _instant(value: Any, where: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise Unprocessable(f"{value!r} is not an instant", where) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _ended(content: Mapping[str, Any], now: dt.datetime) -> bool:
    """R4 `end`: "the time for the server to turn the subscription off"."""
    end = content.get("end")
    return end is not None and _instant(end, "Subscription.end") <= now


def _channel(content: Mapping[str, Any]) -> Mapping[str, Any]:
    channel = content.get("channel")
    if not isinstance(channel, Mapping):
        raise Unprocessable("Subscription.channel is required", "Subscription.channel")
    return channel


async def prepare_subscription(conn: Connection, repo: FhirRepository, body: dict[str, Any]) -> Filing:
    """The checks of `fhir.types.Prepare` (422 with the element's path): a status a client may ask for, criteria
    that are a valid search on a type we serve (`fhir.search.query.check_query`), a `rest-hook` channel with an
    endpoint, no payload or `application/fhir+json`, well-formed headers, a valid `end`. A Subscription belongs to
    no patient. (The endpoint's allow-list is checked by `transform_subscription`, which has the settings.)"""
    status = body.get("status")
    if status not in CLIENT_STATUSES:
        raise Unprocessable(
            f"Subscription.status must be one of {', '.join(CLIENT_STATUSES)} (the server sets active and error)",
            "Subscription.status",
        )
    resource_type, query = split_criteria(body.get("criteria"))
    try:
        check_query(resource_type, query)
    except FhirError as exc:
        raise Unprocessable(f"Subscription.criteria: {exc.detail}", "Subscription.criteria") from None
    channel = _channel(body)
    if channel.get("type") != "rest-hook":
        raise Unprocessable(
            f"channel.type {channel.get('type')!r} is not supported: only rest-hook", "Subscription.channel.type"
        )
    if not isinstance(channel.get("endpoint"), str) or not channel["endpoint"]:
        raise Unprocessable("a rest-hook channel needs an endpoint URL", "Subscription.channel.endpoint")
    payload = channel.get("payload")
    if payload is not None and payload != PAYLOAD:
        raise Unprocessable(
            f"channel.payload must be absent or {PAYLOAD}, not {payload!r}", "Subscription.channel.payload"
        )
    headers_of(channel)
    if body.get("end") is not None:
        _instant(body["end"], "Subscription.end")
    return Filing()


def transform_subscription(body: dict[str, Any], principal: Principal, settings: FhirSettings) -> dict[str, Any]:
    """The content the server stores for a client's Subscription (`fhir.types.Transform`): the endpoint must be
    allowed by `HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS` (else 422 naming the setting); `requested` (or
    `active`) becomes `active` (R4: the server activates it) and a previous `error` is cleared; the writer is
    recorded as owner (any owner extension sent by the client is replaced)."""
    endpoint = str(_channel(body).get("endpoint") or "")
    if not endpoint_allowed(endpoint, settings.fhir_subscription_endpoints):
        raise Unprocessable(
            f"the channel endpoint is not under a URL prefix allowed by {SETTING}"
            + ("" if settings.fhir_subscription_endpoints else " (none is configured)"),
            "Subscription.channel.endpoint",
        )
    content = dict(body)
    if content.get("status") in ("requested", "active"):
        content["status"] = "active"
        content.pop("error", None)
    others = [e for e in content.get("extension") or [] if not (isinstance(e, Mapping) and e.get("url") == OWNER_URL)]
    content["extension"] = [*others, owner_extension(principal)]
    return content


def owner_extension(principal: Principal) -> dict[str, Any]:
    parts: list[tuple[str, str | None]] = [("sub", principal.sub), ("issuer", principal.issuer)]
    parts += [("role", role) for role in principal.roles] + [("scope", scope) for scope in principal.scopes]
    parts += [("patient", principal.patient), ("client", principal.client_id)]
    return {"url": OWNER_URL, "extension": [{"url": k, "valueString": v} for k, v in parts if v]}


def owner_document(issuer: str, sub: str) -> str:
    """JSON that the content of every Subscription written by (issuer, sub) contains (`@>`): what a search of
    Subscriptions is narrowed to (`fhir.types.ResourceType.owned`)."""
    parts = [{"url": "sub", "valueString": sub}, {"url": "issuer", "valueString": issuer}]
    return json.dumps({"extension": [{"url": OWNER_URL, "extension": parts}]}, ensure_ascii=False)


def owner_of(content: Mapping[str, Any]) -> Principal | None:
    """The identity a Subscription's notifications are checked against (None when none was recorded)."""
    for ext in content.get("extension") or []:
        if isinstance(ext, Mapping) and ext.get("url") == OWNER_URL:
            values: dict[str, list[str]] = {}
            for part in ext.get("extension") or []:
                values.setdefault(str(part.get("url")), []).append(str(part.get("valueString")))
            if "sub" in values and "issuer" in values:
                return Principal(
                    sub=values["sub"][0],
                    issuer=values["issuer"][0],
                    roles=tuple(values.get("role", ())),
                    scopes=tuple(values.get("scope", ())),
                    patient=values.get("patient", [None])[0],
                    client_id=values.get("client", [None])[0],
                )
    return None


# --- the write hook and the notify job -------------------------------------------------------------------------


async def queue_notifications(conn: Connection, stored: Stored) -> None:
    """`FhirRepository` write hook: queue `fhir.notify` for a new version of a served type when an active
    Subscription names that type (one indexed query otherwise). Deletions notify nobody (R4)."""
    if stored.deleted or stored.resource_type == TYPE or stored.resource_type not in _served_types():
        return
    if await conn.fetchval(SQL["any_active"], stored.resource_type):
        key = f"{stored.resource_type}/{stored.id}/_history/{stored.version}"
        payload = {"type": stored.resource_type, "id": stored.id, "version": stored.version}
        await jobs.enqueue(conn, NOTIFY_JOB, payload, dedupe_key=key)


def _target(job: jobs.Job) -> tuple[str, str, int]:
    try:
        return str(job.payload["type"]), str(job.payload["id"]), int(job.payload["version"])
    except (KeyError, TypeError, ValueError):
        raise jobs.PermanentJobError(f"{job.kind} job {job.id} without type, id and version") from None


def notify_handler(
    pool: asyncpg.Pool, repo: FhirRepository, settings: FhirSettings, matching_ids: Matcher
) -> jobs.Handler:
    """`fhir.notify`: which active Subscriptions on the type match this version (the strict search of
    `matching_ids` restricted to its id); one `fhir.deliver` job each, queued in one transaction (a retried notify
    job skips deliveries already queued). A version that is no longer current is left to the notify job of the
    newer one. Subscriptions past their `end` are turned off; criteria that no longer parse set the Subscription
    to `error`."""

    async def handle(job: jobs.Job) -> None:
        resource_type, rid, version = _target(job)
        now = dt.datetime.now(dt.UTC)
        async with pool.acquire() as conn:
            current = await repo.find(conn, resource_type, rid)
            if current is None or current.deleted or current.version != version:
                return
            matched: list[str] = []
            closed: list[tuple[str, str, str | None]] = []
            for row in await conn.fetch(SQL["active_on_type"], resource_type):
                content = json.loads(row["content"]) if isinstance(row["content"], str) else row["content"]
                try:
                    if _ended(content, now):
                        closed.append((row["id"], "off", None))
                        continue
                    _, query = split_criteria(content.get("criteria"))
                    # the server's own matching: each owner's read is decided on delivery (deliver_handler)
                    everything = SearchAccess.unrestricted(resource_type)
                    if await matching_ids(conn, resource_type, query, access=everything, only_id=rid, limit=1):
                        matched.append(row["id"])
                except FhirError as exc:
                    closed.append((row["id"], "error", f"cannot be evaluated: {exc.detail}"))
            async with conn.transaction():
                for sid, status, error in closed:
                    await _set_status(conn, repo, sid, status, error)
                for sid in matched:
                    key = f"{sid}:{resource_type}/{rid}/_history/{version}"
                    if job.attempts > 1 and await conn.fetchval(SQL["job_known"], DELIVER_JOB, key):
                        continue
                    payload = {"subscription": sid, "type": resource_type, "id": rid, "version": version}
                    await jobs.enqueue(
                        conn,
                        DELIVER_JOB,
                        payload,
                        dedupe_key=key,
                        max_attempts=settings.fhir_subscription_attempts,
                    )

    return handle


async def _set_status(conn: Connection, repo: FhirRepository, sid: str, status: str, error: str | None) -> None:
    """A new version of the Subscription with this status (and `error` text); left alone when it changed
    meanwhile (its writer decided anew) or is gone. Run inside a transaction."""
    current = await repo.find(conn, TYPE, sid)
    if current is None or current.deleted or current.content is None:
        return
    content = dict(current.content)
    content["status"] = status
    if error is not None:
        content["error"] = error[:1000]
    try:
        await repo.update(conn, TYPE, sid, content, current.filing, expected_version=current.version)
    except VersionConflict:
        log.info("Subscription/%s changed meanwhile: status %s not set", sid, status)
        return
    log.warning("Subscription/%s set to %s", sid, status)


# --- the deliver job -------------------------------------------------------------------------------------------


class DeliveryFailed(Exception):
    """The receiver did not take the notification (the job is retried). `status`: its HTTP answer, if any."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.status = status


def notification_request(endpoint: str, headers: Sequence[tuple[str, str]], resource: Stored | None) -> httpx.Request:
    """R4 2.46.7.1: without payload an empty POST to the endpoint; with payload a PUT of the resource to
    `[endpoint]/[type]/[id]` (the endpoint's query, if any, kept)."""
    all_headers = [("User-Agent", "hounsfield"), *headers]
    timeout = httpx.Timeout(TIMEOUT_SECONDS).as_dict()
    if resource is None:
        return httpx.Request("POST", endpoint, headers=all_headers, content=b"", extensions={"timeout": timeout})
    parts = urlsplit(endpoint)
    url = urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{resource.resource_type}/{resource.id}"))
    body = json.dumps(resource.content, separators=(",", ":")).encode("utf-8")
    all_headers.append(("Content-Type", f"{PAYLOAD}; charset=utf-8"))
    return httpx.Request("PUT", url, headers=all_headers, content=body, extensions={"timeout": timeout})


async def send(request: httpx.Request) -> int:
    """Send without following redirects; the answer's status when 2xx, else DeliveryFailed. The transport is
    used directly: httpx's client logs each URL (an endpoint's path or query may carry a secret)."""
    try:
        async with httpx.AsyncHTTPTransport() as transport:
            response = await transport.handle_async_request(request)
            await response.aclose()
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"receiver unreachable: {type(exc).__name__}") from None
    if not 200 <= response.status_code < 300:
        raise DeliveryFailed(f"receiver answered {response.status_code}", response.status_code)
    return response.status_code


def _origin(endpoint: str) -> str:
    try:
        parts = urlsplit(endpoint)
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "an invalid endpoint"


def delivery_record(
    subscription: Stored,
    resource: Stored,
    owner: Principal | None,
    decision: Decision | None,
    *,
    method: str | None,
    status: int | None,
    outcome: Outcome,
    detail: str,
) -> AuditRecord:
    """The audit record of one delivery attempt: the owner as the recipient agent, the resource's patient (and
    study), the criteria as the query entity, the resource version as the path, the receiver's HTTP status."""
    content = subscription.content or {}
    study = resource.filing.source_key if resource.resource_type == "ImagingStudy" else None
    return AuditRecord(
        time=dt.datetime.now(dt.UTC),
        type=EventType.REST,
        subtype=(NOTIFICATION,),
        action="E",
        outcome=outcome,
        outcome_desc=f"{TYPE}/{subscription.id} notification to {_origin(_channel(content).get('endpoint', ''))}: "
        + detail,
        agent=Agent(
            sub=owner.sub if owner else None,
            issuer=owner.issuer if owner else None,
            roles=owner.roles if owner else (),
            client_id=owner.client_id if owner else None,
        ),
        patient_id=resource.filing.patient_key,
        study_uid=study,
        query=encode_query(str(content.get("criteria", ""))),
        method=method,
        path=f"{resource.resource_type}/{resource.id}/_history/{resource.version}",
        status=status,
        decision_id=decision.decision_id if decision else None,
        policy_revision=decision.revision if decision else None,
        channel=REST_HOOK,
    )


def deliver_handler(
    pool: asyncpg.Pool, repo: FhirRepository, settings: FhirSettings, policy: Decider, audit_log: AuditSink
) -> jobs.Handler:
    """`fhir.deliver`: one notification of one resource version to one Subscription, if it is still active, its
    endpoint still allowed and its owner may read the resource; each attempt audited. A failed attempt raises
    (the queue retries with backoff); the last one also sets the Subscription to `error`."""

    async def handle(job: jobs.Job) -> None:
        resource_type, rid, version = _target(job)
        sid = str(job.payload.get("subscription"))
        async with pool.acquire() as conn:
            subscription = await repo.find(conn, TYPE, sid)
            try:
                resource = await repo.vread(conn, resource_type, rid, version)
            except FhirError:
                raise jobs.PermanentJobError(f"{resource_type}/{rid}/_history/{version} is gone") from None
        content = subscription.content if subscription is not None else None
        if content is None or content.get("status") != "active" or _ended(content, dt.datetime.now(dt.UTC)):
            log.info("notification to Subscription/%s dropped: no longer active", sid)
            return
        assert subscription is not None
        channel = _channel(content)
        endpoint = str(channel.get("endpoint", ""))
        owner = owner_of(content)
        decision: Decision | None = None

        async def audit(method: str | None, status: int | None, outcome: Outcome, detail: str) -> None:
            record = delivery_record(
                subscription, resource, owner, decision, method=method, status=status, outcome=outcome, detail=detail
            )
            await audit_log.append(record)

        if owner is None:
            await audit(None, None, "4", "not delivered: the Subscription records no owner")
            return
        target = Resource(
            kind=_kind_of(resource_type),
            patient_id=resource.filing.patient_key,
            study_uid=resource.filing.source_key if resource_type == "ImagingStudy" else None,
            modalities=resource.filing.modalities,
            attributes={"id": rid},
        )
        decision = await Actor(owner, policy, audit_log, REST_HOOK).decide("read", target)
        if not decision.allow:
            reasons = "; ".join(decision.reasons) or "denied by policy"
            await audit(None, None, "4", f"not delivered: the owner may not read it ({reasons})")
            return
        if not endpoint_allowed(endpoint, settings.fhir_subscription_endpoints):
            await audit(None, None, "4", f"not delivered: endpoint not allowed by {SETTING}")
            async with pool.acquire() as conn, conn.transaction():
                await _set_status(conn, repo, sid, "error", f"endpoint not allowed by {SETTING}")
            return
        request = notification_request(
            endpoint, headers_of(channel), resource if channel.get("payload") == PAYLOAD else None
        )
        try:
            status = await send(request)
        except DeliveryFailed as exc:
            last = job.attempts >= job.max_attempts
            outcome: Outcome = "4" if exc.status and exc.status < 500 else "8"
            detail = f"attempt {job.attempts} of {job.max_attempts} failed: {exc}"
            await audit(request.method, exc.status, outcome, detail)
            log.warning(
                "notification %s to Subscription/%s failed (attempt %d of %d): %s",
                job.id,
                sid,
                job.attempts,
                job.max_attempts,
                exc,
            )
            if last:
                async with pool.acquire() as conn, conn.transaction():
                    await _set_status(
                        conn, repo, sid, "error", f"notification failed {job.attempts} times, last: {exc}"
                    )
            raise
        await audit(request.method, status, "0", f"delivered (attempt {job.attempts})")

    return handle


def handlers(
    pool: asyncpg.Pool,
    repo: FhirRepository,
    settings: FhirSettings,
    *,
    policy: Decider,
    audit_log: AuditSink,
    matching_ids: Matcher,
) -> dict[str, jobs.Handler]:
    """The job handlers its plugin registers (fhir/plugin.py): the Subscriptions' `repo` in `pool`, the policy that
    decides each owner's read, the audit trail of delivery attempts and the search that matches criteria."""
    return {
        NOTIFY_JOB: notify_handler(pool, repo, settings, matching_ids),
        DELIVER_JOB: deliver_handler(pool, repo, settings, policy, audit_log),
    }
