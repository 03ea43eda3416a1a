"""Every HTTP access, allowed or denied, writes one audit record before its response starts.

An ASGI layer around the whole application (`server.app.edge`: outside routing and authentication, so 401s,
and 404s, 405s and 400s of requests that matched no route, are recorded too): when the response's status is
known (`http.response.start`) it builds the record from what authentication and the guard left in the
request state and hands it to `AuditTrail.append`, which answers only after the record is committed. Nothing of
the response goes out before that answer, so no record can be lost after a response was sent; the handler goes on
producing the body meanwhile (held, bounded: `_Recorder`), so the commit's WAL flush overlaps reading the blob
instead of preceding it. If the record cannot be written, the client gets 503 instead of the data (fail closed).
An access inside a break-glass window (the decision's `obligations.break_glass`) is flagged, with the session's
reason and id.

One exception to failing closed: a request whose changes were each recorded in their own transaction (a stored
instance's record commits with it, `CHANGES_RECORDED`) gets its response even when its own record cannot be
written, because that response is the only report of what was changed; the failure is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Message, Receive, Scope, Send

from authz.audit import AuditTrail
from authz.auditrecord import request_record
from authz.authn import PRINCIPAL
from authz.decision import Action, Decision, Resource
from authz.guard import DECISION, OPT_KEY, RESOURCE, actor_of, break_glass_of
from authz.services import authz_services
from server.platform.db import RETRY_AFTER_SECONDS, unavailable

log = logging.getLogger(__name__)
CHANGES_RECORDED = "hounsfield.changes_recorded"
"""Request state: the handler changed data and each change's audit record committed with the change; the response
says what was changed and goes out even when the request's own record cannot be written."""
BREAK_GLASS_USED = "hounsfield.break_glass_used"
"""Request state: a handler's further decisions (a type a FHIR search includes, a history version) allowed some
access only because of a break-glass session; the record is flagged as when the guard's decision says so."""
AUDIT_NOTE = "hounsfield.audit_note"
"""Request state: what a handler did beyond the decided access that the record must show (an on-demand inference
run overriding the model's input selector); it goes into the record's outcome_desc."""


def _resource(scope: Scope, kind: str) -> Resource:
    state = scope.get("state", {})
    resource = state.get(RESOURCE)
    if isinstance(resource, Resource):
        return resource
    params = scope.get("path_params") or {}
    return Resource(
        kind=kind,
        study_uid=params.get("study"),
        series_uid=params.get("series"),
        instance_uid=params.get("instance"),
    )


def without_tokens(query: bytes) -> bytes:
    """The query string without `access_token` parameters (RFC 6750 2.3): tokens never enter the trail, not
    even base64-encoded in a search's query."""
    kept = [p for p in query.split(b"&") if unquote_to_bytes(p.partition(b"=")[0]).lower() != b"access_token"]
    return b"&".join(kept)


def record_for(scope: Scope, status: int) -> Any:
    handler = scope.get("route_handler")
    spec = handler.opt.get(OPT_KEY) if handler is not None else None
    action: Action = spec[0] if spec else "read"
    kind: str = spec[1] if spec else "system"
    state = scope.get("state", {})
    client = scope.get("client")
    query = without_tokens(scope.get("query_string") or b"")
    decision = state.get(DECISION)
    # An access the policy allowed only because of a break-glass session is flagged, with the session's reason.
    flagged = isinstance(decision, Decision) and bool(decision.obligations.get("break_glass"))
    flagged = flagged or state.get(BREAK_GLASS_USED) is True
    session = break_glass_of(scope) if flagged else None
    notes = [f"break-glass session {session['id']}"] if session and status < 400 else []
    if isinstance(state.get(AUDIT_NOTE), str):
        notes.append(state[AUDIT_NOTE])
    resource = _resource(scope, kind)
    method, path = str(scope.get("method", "")), str(scope.get("path", ""))
    query_string = query if action == "search" else None
    reason = str(session["reason"]) if session else None
    outcome_desc = "; ".join(notes) or None
    actor = actor_of(scope)
    if actor is not None:  # the guard made the request's actor: its record
        return actor.record_of(
            action,
            resource,
            decision,
            status=status,
            method=method,
            path=path,
            query_string=query_string,
            break_glass=flagged,
            reason=reason,
            outcome_desc=outcome_desc,
        )
    return request_record(  # refused before the guard made an actor (401, no route): whoever authentication saw
        state.get(PRINCIPAL),
        decision,
        action=action,
        resource=resource,
        status=status,
        method=method,
        path=path,
        query_string=query_string,
        client_ip=client[0] if client else None,
        break_glass=flagged,
        reason=reason,
        outcome_desc=outcome_desc,
    )


def audit_requests(public_paths: tuple[str, ...]) -> Callable[[ASGIApp], ASGIApp]:
    """ASGI layer factory: record each HTTP request (public health checks and CORS preflight excepted), whether
    or not it matched a route."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or scope["path"] in public_paths or scope.get("method") == "OPTIONS":
                await app(scope, receive, send)
                return
            trail = authz_services(scope["litestar_app"]).audit
            recorder = _Recorder(scope, send, trail)
            try:
                await app(scope, receive, recorder.send)
            except BaseException:
                # What the handler sent before it failed goes out once recorded, as it would have unheld.
                with contextlib.suppress(Exception):
                    await recorder.release()
                raise
            await recorder.release()

        return middleware

    return factory


HOLD_BYTES = 4 * 1024 * 1024
"""The most body bytes held back while the request's record is being committed; past it the sender waits."""


class _Recorder:
    """The `send` of one request. At `http.response.start` the record is handed to the trail, and nothing goes
    to the client until it has committed: the start and the first body messages are held (up to `HOLD_BYTES`),
    so that the handler's work on the body (reading a blob, encoding) runs during the commit instead of after it.
    When the record cannot be written, the held messages are dropped and the client gets 503 (nothing was sent
    yet)."""

    __slots__ = ("_held", "_held_bytes", "_open", "_record", "_send", "failed", "scope", "trail")

    def __init__(self, scope: Scope, send: Send, trail: AuditTrail) -> None:
        self.scope, self._send, self.trail = scope, send, trail
        self._record: asyncio.Future[int] | None = None
        self._held: list[Message] = []
        self._held_bytes = 0
        self._open = False
        """True once the record committed and the held messages went out: later messages pass through."""
        self.failed = False

    async def send(self, message: Message) -> None:
        if self.failed:
            return
        if self._open:
            await self._send(message)
            return
        if message["type"] == "http.response.start":
            record = record_for(self.scope, int(message["status"]))
            self._record = self.trail.submit(record)
            self._held.append(message)
            return
        if self._record is None:  # not a response message (e.g. a trailer before start): pass it on
            await self._send(message)
            return
        self._held.append(message)
        body = message.get("body", b"")
        self._held_bytes += len(body) if isinstance(body, bytes | bytearray | memoryview) else 0
        if self._record.done() or self._held_bytes >= HOLD_BYTES or not message.get("more_body", False):
            await self.release()

    async def release(self) -> None:
        """Wait for the record; then send what is held, or 503 when the record could not be written."""
        if self._record is None or self._open or self.failed:
            return
        try:
            await asyncio.shield(self._record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.scope.get("state", {}).get(CHANGES_RECORDED) is True:
                log.exception("audit record not written; responding all the same: each change was recorded")
            else:
                if unavailable(exc):  # the database is down: the server reconnects by itself
                    log.warning("audit record could not be written (database unavailable); refusing")
                else:
                    log.exception("audit record could not be written; refusing the response")
                self.failed = True
                self._held.clear()
                path = str(self.scope["path"])
                await _unavailable(self._send, fhir=path == "/fhir" or path.startswith("/fhir/"))
                return
        self._open = True
        held, self._held = self._held, []
        for message in held:
            await self._send(message)


UNAVAILABLE = "audit trail unavailable"


async def _unavailable(send: Send, *, fhir: bool) -> None:
    """503 with Retry-After (the trail is in the database, which the server reconnects to by itself): a FHIR
    OperationOutcome on /fhir (issue code `transient`), the DICOMweb error JSON elsewhere."""
    if fhir:
        issue = {"severity": "error", "code": "transient", "diagnostics": UNAVAILABLE}
        body = json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode()
        media_type = b"application/fhir+json"
    else:
        body = json.dumps({"error": UNAVAILABLE, "status": 503}).encode()
        media_type = b"application/json"
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", media_type),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
        ],
    }
    await send(start)
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(end)
