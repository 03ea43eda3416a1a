"""Break-glass sessions: emergency access for a clinician whom the policy would otherwise deny.

A session belongs to one authenticated subject (the token's `sub` and issuer), names one patient (and maybe one
study of that patient) and carries a free-text reason. There is no break-glass for the whole archive. While it
is open (not closed by a reviewer, not past `expires_at` = start + `break_glass_minutes`) the guard puts it in
the policy input as `context.break_glass`; the policy decides what it lifts (authz/policies/authz.rego: care
lists, consent and modality limits for that patient only, for subjects in `data.break_glass_roles`) and flags
those decisions (`obligations.break_glass`), so every access the session allows is marked in its audit record.

A subject has at most one open session: starts are serialized per subject in the database (an advisory lock
held by the starting transaction), a start while a session for the same patient (and study) is open returns
that session, and one for another patient or study is a conflict (409). Nobody closes their own session.

Starting a session writes a Security Alert audit record (DICOM PS3.16 CID 400 DCM 110113, subtype CID 401
DCM 110127 "Emergency Override Started", in the same transaction as the session, so there is no session without
its record), logs a warning (identifiers only: the reason is free text and may name a patient), and queues the
webhook alert (`breakglass.alert` job, in that transaction too: a crash cannot lose it; the worker wakes on the
job's NOTIFY, posts at once and retries with backoff). A reviewer closing a session writes DCM 110113 with
subtype DCM 110138 "Emergency Override Stopped".

Times are the server's clock, the one that also checks token expiry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from authz.audit import AuditTrail
from authz.auditrecord import DCM, EventSubtype, break_glass_record
from authz.decision import Decision
from authz.errors import AuthzError
from authz.policy_input import break_glass_session, rfc3339
from authz.principal import Principal
from authz.sessioncache import OpenSession, SessionCache
from authz.settings import AuthzSettings
from dicomweb.uids import is_valid_uid
from server.platform import jobs
from server.platform.db import Connection, Queries

log = logging.getLogger(__name__)
SQL = Queries(Path(__file__).with_name("breakglass.sql"))

ALERT_JOB = "breakglass.alert"
"""The job kind that posts a session's alert to `settings.break_glass_webhook`."""
ALERT_TIMEOUT_SECONDS = 5.0
REASON_MIN = 10
REASON_MAX = 1000
COMMENT_MAX = 1000
PATIENT_ID_MAX = 64
"""PatientID is LO: at most 64 characters (PS3.5 6.2)."""
LIST_LIMIT_MAX = 1000


class BreakGlassError(AuthzError):
    """A break-glass request that cannot be carried out (the route maps each kind to its status)."""


class InvalidRequest(BreakGlassError):
    """Malformed body or reason (400)."""


class SessionNotFound(BreakGlassError):
    """No session with this id (404)."""


class SessionClosed(BreakGlassError):
    """The session was already closed (409)."""


class SessionConflict(BreakGlassError):
    """The subject has an open session for another patient or study (409): one session per subject."""


class SelfReview(BreakGlassError):
    """The subject of a session may not close it, whatever its roles (403)."""


# --- requests (pure) -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartRequest:
    """`POST /break-glass` body: `{"reason": text, "patient_id"?, "study_uid"?}`: a patient, or a stored study
    whose patient the route looks up, is required (`patient_id` stays None here until then)."""

    reason: str
    patient_id: str | None = None
    study_uid: str | None = None


_INVISIBLE = frozenset({"Cc", "Cf"})
"""Unicode general categories (besides Z*, separators) that show nothing: controls and format characters (zero
width space U+200B, right-to-left override U+202E, ...)."""


def visible_length(text: str) -> int:
    """How many characters of `text` show: not separators (Z*: spaces, NBSP), controls (Cc) or format (Cf)."""
    count = 0
    for ch in text:
        category = unicodedata.category(ch)
        if category[0] != "Z" and category not in _INVISIBLE:
            count += 1
    return count


def check_reason(value: Any, what: str = "reason") -> str:
    """A break-glass reason: free text of at most REASON_MAX characters (surrounding space not counted) of which
    at least REASON_MIN show (a reason of zero-width or blank characters says nothing)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} is required: free text of {REASON_MIN} to {REASON_MAX} characters")
    text = value.strip()
    if "\x00" in text or any(unicodedata.category(ch) == "Cs" for ch in text):
        raise InvalidRequest(f"{what} must be text (no NUL, no lone surrogates)")
    if len(text) > REASON_MAX:
        raise InvalidRequest(f"{what} must be at most {REASON_MAX} characters (got {len(text)})")
    visible = visible_length(text)
    if visible < REASON_MIN:
        raise InvalidRequest(f"{what} must show at least {REASON_MIN} characters (got {visible})")
    return text


def _json_object(body: bytes, allowed: set[str]) -> dict[str, Any]:
    try:
        value = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)[:200]}")
    return value


def _optional_text(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string")
    return value.strip() or None


def parse_start(body: bytes) -> StartRequest:
    """Read and check a start request (raises InvalidRequest): a reason, and a patient_id or a study_uid."""
    value = _json_object(body, {"reason", "patient_id", "study_uid"})
    reason = check_reason(value.get("reason"))
    patient_id = _optional_text(value.get("patient_id"), "patient_id")
    if patient_id is not None and (len(patient_id) > PATIENT_ID_MAX or any(c < " " or c == "\\" for c in patient_id)):
        raise InvalidRequest("patient_id is not a valid PatientID (LO: at most 64 characters)")
    study_uid = _optional_text(value.get("study_uid"), "study_uid")
    if study_uid is not None and not is_valid_uid(study_uid):
        raise InvalidRequest("study_uid is not a valid DICOM UID")
    if patient_id is None and study_uid is None:
        raise InvalidRequest("break-glass is for one patient: give patient_id (and optionally study_uid)")
    return StartRequest(reason, patient_id, study_uid)


def scoped_start(request: StartRequest, study_patient: str | None) -> StartRequest:
    """`request` with its patient settled: a named study must be stored (`study_patient` is its PatientID, None
    when there is no such study or it has none) and belong to the named patient, if one is named."""
    if request.study_uid is None:
        if request.patient_id is None:
            raise InvalidRequest("break-glass is for one patient: give patient_id (and optionally study_uid)")
        return request
    if study_patient is None:
        raise InvalidRequest("study_uid names no stored study of a patient")
    if request.patient_id is not None and request.patient_id != study_patient:
        raise InvalidRequest("study_uid is not a study of patient_id")
    return dataclasses.replace(request, patient_id=study_patient)


def parse_close(body: bytes) -> str:
    """The reviewer's comment of `POST /break-glass/{id}/close` (`{"comment": text}`, 1..1000 characters)."""
    value = _json_object(body, {"comment"})
    comment = value.get("comment")
    if not isinstance(comment, str) or not comment.strip():
        raise InvalidRequest("comment is required")
    comment = comment.strip()
    if len(comment) > COMMENT_MAX or "\x00" in comment:
        raise InvalidRequest(f"comment must be at most {COMMENT_MAX} characters of text")
    return comment


# --- sessions --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    id: uuid.UUID
    sub: str
    issuer: str
    reason: str
    started_at: dt.datetime
    expires_at: dt.datetime
    roles: tuple[str, ...] = ()
    client_id: str | None = None
    client_ip: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    alerted_at: dt.datetime | None = None
    closed_at: dt.datetime | None = None
    closed_by: str | None = None
    close_comment: str | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record | Mapping[str, Any] | None) -> Session:
        if row is None:
            raise SessionNotFound("break-glass session vanished")
        return cls(
            id=row["id"],
            sub=row["sub"],
            issuer=row["issuer"],
            reason=row["reason"],
            started_at=row["started_at"],
            expires_at=row["expires_at"],
            roles=tuple(row["roles"] or ()),
            client_id=row["client_id"],
            client_ip=row["client_ip"],
            patient_id=row["patient_id"],
            study_uid=row["study_uid"],
            alerted_at=row["alerted_at"],
            closed_at=row["closed_at"],
            closed_by=row["closed_by"],
            close_comment=row["close_comment"],
        )

    def is_open(self, now: dt.datetime) -> bool:
        return self.closed_at is None and self.expires_at > now

    def covers(self, patient_id: str | None, study_uid: str | None) -> bool:
        """Whether this session already grants what a start for `patient_id` (and `study_uid`) asks."""
        return self.patient_id == patient_id and self.study_uid in (None, study_uid)

    def context(self) -> dict[str, Any]:
        """The session as the policy sees it (`context.break_glass`)."""
        return break_glass_session(str(self.id), self.reason, self.expires_at, self.patient_id, self.study_uid)

    def to_json(self, now: dt.datetime) -> dict[str, Any]:
        def when(value: dt.datetime | None) -> str | None:
            return rfc3339(value) if value is not None else None

        return {
            "id": str(self.id),
            "sub": self.sub,
            "issuer": self.issuer,
            "roles": list(self.roles),
            "client_id": self.client_id,
            "client_ip": self.client_ip,
            "reason": self.reason,
            "patient_id": self.patient_id,
            "study_uid": self.study_uid,
            "started_at": when(self.started_at),
            "expires_at": when(self.expires_at),
            "open": self.is_open(now),
            "alerted_at": when(self.alerted_at),
            "closed_at": when(self.closed_at),
            "closed_by": self.closed_by,
            "close_comment": self.close_comment,
        }


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def open_session(conn: Connection, principal: Principal, now: dt.datetime) -> OpenSession | None:
    """The subject's open session that lasts longest, or None: one probe of the partial index of sessions not
    closed (the guard asks on every request its cache, `authz.sessioncache`, cannot answer)."""
    row = await conn.fetchrow(SQL["open_session"], principal.issuer, principal.sub, now)
    if row is None:
        return None
    return OpenSession(Session.from_row(row).context(), row["expires_at"])


class BreakGlassService:
    """Starts, lists and closes sessions. Cheap to make: it holds references to the resources it uses."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditTrail,
        *,
        minutes: int,
        webhook: str | None,
        sessions: SessionCache | None = None,
    ) -> None:
        self.pool = pool
        self.audit = audit
        self.minutes = minutes
        self.webhook = webhook
        self.cache = sessions
        """This process's cache of open sessions: cleared at once after a change commits (other processes clear
        theirs on the trigger's notification)."""

    def _changed(self) -> None:
        if self.cache is not None:
            self.cache.clear()

    async def start(
        self,
        principal: Principal,
        request: StartRequest,
        *,
        decision: Decision | None,
        client_ip: str | None = None,
        now: dt.datetime | None = None,
    ) -> tuple[Session, bool]:
        """Open a session for `principal` (the policy has allowed it) and say so (True), or give back the open
        session that already covers the request (False); SessionConflict when the open one is for another patient
        or study. Starts of one subject are serialized by an advisory lock in the transaction, so concurrent
        starts open one session between them. The session, its Security Alert record and its alert job commit
        together."""
        if request.patient_id is None:
            raise InvalidRequest("break-glass is for one patient: give patient_id (and optionally study_uid)")
        started = now or now_utc()
        session_id = uuid.uuid4()
        expires = started + dt.timedelta(minutes=self.minutes)
        record = break_glass_record(
            principal,
            request.reason,
            client_ip=client_ip,
            decision=decision,
            patient_id=request.patient_id,
            study_uid=request.study_uid,
            time=started,
        )
        record = dataclasses.replace(
            record, outcome_desc=f"break-glass session {session_id} started, expires {rfc3339(expires)}"
        )
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(SQL["lock_subject"], principal.issuer, principal.sub)
            current = await conn.fetchrow(SQL["open_session"], principal.issuer, principal.sub, started)
            if current is not None:
                session = Session.from_row(current)
                if session.covers(request.patient_id, request.study_uid):
                    return session, False
                raise SessionConflict(
                    f"break-glass session {session.id} of this subject is open for another patient or study until "
                    f"{rfc3339(session.expires_at)}; a reviewer may close it"
                )
            row = await conn.fetchrow(
                SQL["insert_session"],
                session_id,
                principal.sub,
                principal.issuer,
                list(principal.roles),
                principal.client_id,
                client_ip,
                request.reason,
                request.patient_id,
                request.study_uid,
                started,
                expires,
            )
            if self.webhook:
                await jobs.enqueue(conn, ALERT_JOB, {"session_id": str(session_id)}, dedupe_key=str(session_id))
            await self.audit.append_in(conn, [record])  # commits with the session, or neither does
        self.audit.nudge()
        self._changed()
        session = Session.from_row(row)
        log.warning(  # the patient is named in the audit record, never in the log (PHI)
            "BREAK-GLASS session %s started by sub=%s issuer=%s roles=%s scope=%s, expires %s",
            session.id,
            session.sub,
            session.issuer,
            ",".join(session.roles),
            "study" if session.study_uid else "patient" if session.patient_id else "none",
            rfc3339(session.expires_at),
        )
        return session, True

    async def get(self, session_id: uuid.UUID) -> Session:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(SQL["get_session"], session_id)
        if row is None:
            raise SessionNotFound(f"no break-glass session {session_id}")
        return Session.from_row(row)

    async def sessions(
        self, *, open_: bool | None = None, limit: int = 100, offset: int = 0, now: dt.datetime | None = None
    ) -> list[Session]:
        """Sessions newest first; `open_` True: only open ones, False: only ended ones (closed or expired)."""
        limit = max(1, min(limit, LIST_LIMIT_MAX))
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(SQL["list_sessions"], open_, now or now_utc(), limit, max(0, offset))
        return [Session.from_row(r) for r in rows]

    async def close(
        self,
        session_id: uuid.UUID,
        reviewer: Principal,
        comment: str,
        *,
        decision: Decision | None,
        client_ip: str | None = None,
        now: dt.datetime | None = None,
    ) -> Session:
        """A security reviewer ends a session (open or already expired) with a comment; writes DCM 110113 /
        110138 Emergency Override Stopped in the same transaction. The session's own subject may not (SelfReview),
        whatever roles it holds: the policy says so too, this holds whatever policy is loaded."""
        closed = now or now_utc()
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(SQL["lock_session"], session_id)
            if row is None:
                raise SessionNotFound(f"no break-glass session {session_id}")
            session = Session.from_row(row)
            if (session.sub, session.issuer) == (reviewer.sub, reviewer.issuer):
                raise SelfReview("the subject of a break-glass session may not review it")
            if session.closed_at is not None:
                raise SessionClosed(f"break-glass session {session_id} was already closed")
            record = break_glass_record(
                reviewer,
                comment,
                client_ip=client_ip,
                decision=decision,
                patient_id=session.patient_id,
                study_uid=session.study_uid,
                stopped=True,
                time=closed,
            )
            record = dataclasses.replace(
                record,
                outcome_desc=f"break-glass session {session_id} of {session.sub} ({session.issuer}) closed",
            )
            await self.audit.append_in(conn, [record])  # commits with the closing, or neither does
            row = await conn.fetchrow(SQL["close_session"], session_id, closed, reviewer.sub, comment)
        self.audit.nudge()
        self._changed()
        log.warning("BREAK-GLASS session %s of sub=%s closed by sub=%s", session_id, session.sub, reviewer.sub)
        return Session.from_row(row)


# --- the webhook alert -----------------------------------------------------------------------------------------


class AlertFailed(Exception):
    """The webhook did not take the alert (the job is retried)."""


def alert_payload(session: Session, now: dt.datetime | None = None) -> dict[str, Any]:
    """The JSON posted to the webhook: the event (DCM 110113 / 110127) and the session, reason included (the
    reviewers need it; the webhook is theirs)."""
    started = EventSubtype.EMERGENCY_OVERRIDE_STARTED
    return {
        "type": "break-glass",
        "event": "started",
        "type_code": {"system": DCM, "code": "110113", "display": "Security Alert"},
        "subtype_code": started.to_json(),
        "session": session.to_json(now or now_utc()),
    }


async def post_alert(url: str, payload: Mapping[str, Any], seconds: float = ALERT_TIMEOUT_SECONDS) -> None:
    """POST the alert; raises AlertFailed unless the webhook answers 2xx (redirects are not followed).

    The URL is never logged nor put in an error: webhook URLs often carry a secret. Hence the transport is used
    directly: httpx's client logs every request's URL at INFO level."""
    request = httpx.Request(
        "POST",
        url,
        json=dict(payload),
        headers={"User-Agent": "hounsfield"},
        extensions={"timeout": httpx.Timeout(seconds).as_dict()},
    )
    try:
        async with httpx.AsyncHTTPTransport() as transport:
            response = await transport.handle_async_request(request)
            await response.aclose()
    except httpx.HTTPError as exc:
        raise AlertFailed(f"webhook unreachable: {type(exc).__name__}") from None
    if not 200 <= response.status_code < 300:
        raise AlertFailed(f"webhook answered {response.status_code}")


def alert_handler(pool: asyncpg.Pool, settings: AuthzSettings) -> jobs.Handler:
    """The `breakglass.alert` job: post the session's alert once (idempotent: `alerted_at` marks delivery)."""

    async def handle(job: jobs.Job) -> None:
        try:
            session_id = uuid.UUID(str(job.payload["session_id"]))
        except (KeyError, ValueError):
            raise jobs.PermanentJobError("breakglass.alert job without a session id") from None
        url = settings.break_glass_webhook
        if not url:
            log.warning("break-glass alert for session %s dropped: no webhook configured any more", session_id)
            return
        async with pool.acquire() as conn:
            row = await conn.fetchrow(SQL["get_session"], session_id)
        if row is None:
            raise jobs.PermanentJobError(f"no break-glass session {session_id}")
        session = Session.from_row(row)
        if session.alerted_at is not None:
            return
        try:
            await post_alert(url, alert_payload(session))
        except AlertFailed as exc:
            log.warning(
                "break-glass alert for session %s not delivered (attempt %d of %d): %s",
                session_id,
                job.attempts,
                job.max_attempts,
                exc,
            )
            raise
        async with pool.acquire() as conn:
            await conn.execute(SQL["mark_alerted"], session_id, now_utc())
        log.info("break-glass alert for session %s delivered", session_id)

    return handle
