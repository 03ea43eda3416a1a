"""STOW-RS: POST /studies and /studies/{study} (PS3.18 10.5).

The body is read from the socket chunk by chunk into the multipart parser; each part is spooled to a local
file (hashing as it goes) and ingested when it ends, so memory stays flat whatever the upload size.

Ingest of a part (parse, blob fsync, index commit) overlaps with receiving the next ones: up to `PIPELINE` parts
of one request are in flight at once, which hides the fsync and commit latency of each. The response still
waits for every part (each acknowledged instance is durable, PS3.18 10.5.3), and lists them in request order.

Each stored instance's audit record (DICOM Instances Transferred, PS3.15 A.5.3.4) commits with its index rows; the
request's own record follows when the response is known (`authz.recording`). The response is the truth about
every part, however the request ends: when the body stops early (client gone, a broken tail), the server shuts
down before the body arrived (uvicorn's graceful shutdown cancels the request), or an error ends the receiving,
the parts in flight finish storing, and the answer (202 when some were stored, 409 when none) lists each stored
instance and a failure for the rest, never a 5xx that hides stored instances.

While free space is below the watermark (`server.platform.diskspace`) a request is answered 503 with Retry-After
before its body is read; a part that cannot be spooled (the watermark crossed during the request, or the file system
full: ENOSPC) fails alone with Out of Resources (A700), and the others are stored.

A body that stalls (nothing for `HOUNSFIELD_HTTP_BODY_TIMEOUT_SECONDS`, `server.platform.connections`), or that
announced a longer Content-Length than it sends, ends the request: the parts received whole are stored (each is a
durable store of its own, as when the multipart body breaks off) and the response lists them, with the cut part as a
Processing Failure (0110); the connection is closed after it. With no part received whole, the answer is 408."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from litestar import Request, Response, post
from litestar.exceptions import InternalServerException
from litestar.params import FromPath

from authz.audit import AuditTrail
from authz.auditrecord import AuditRecord, EventType, request_record
from authz.authn import PRINCIPAL, principal_of
from authz.decision import Decision, Resource
from authz.deps import AuditDep
from authz.guard import DECISION, authz_opt, request_actor
from authz.recording import CHANGES_RECORDED
from dicomweb import uids
from dicomweb.codecs import multipart, stow
from dicomweb.deps import SettingsDep, StoreDep
from dicomweb.errors import BadRequest, DicomWebError, StorageFull
from dicomweb.ingest.admission import Admission, policy_admission
from dicomweb.ingest.events import AuditOf, InstanceStored
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.outcome import Outcome
from dicomweb.ingest.reasons import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE, InstanceRejected
from dicomweb.ingest.service import StoreService
from dicomweb.ingest.spool import Spool
from dicomweb.routes.common import base_url, dicom_json
from dicomweb.settings import DicomwebSettings
from server.platform import telemetry
from server.platform.connections import BodyTimeout
from server.platform.diskspace import RETRY_AFTER_SECONDS, BelowWatermark
from server.platform.http import warning_header

PIPELINE = 4
"""Parts of one STOW-RS request ingested at once (receiving pauses while this many are in flight)."""
log = logging.getLogger(__name__)

CUT_BY_SHUTDOWN = "the server is shutting down: the rest of the request was not received; send it again"
CUT_BY_CLIENT = "the request body ended early (connection closed); the rest was not received"
CUT_BY_ERROR = "the server failed while receiving the request; the rest was not stored"


def _record(
    request: Request[Any, Any, Any], resource: Resource, decision: Decision | None = None, **changes: Any
) -> AuditRecord:
    """A DICOM Instances Transferred record (PS3.15 A.5.3.4) of one instance of this request, under `decision`
    (the instance's own) or else the request's."""
    state = request.scope.get("state", {})
    decision = decision if decision is not None else state.get(DECISION)
    client = request.scope.get("client")
    record = request_record(
        state.get(PRINCIPAL),
        decision if isinstance(decision, Decision) else None,
        action="create",
        resource=resource,
        status=200,
        method=request.method,
        path=request.url.path,
        client_ip=client[0] if client else None,
        outcome_desc=changes.pop("outcome_desc", None),
    )
    return dataclasses.replace(record, type=EventType.INSTANCES_TRANSFERRED, subtype=(), **changes)


@dataclass(frozen=True)
class _Services:
    """What one STOW-RS request uses."""

    settings: DicomwebSettings
    store: StoreService
    audit: AuditTrail


def _audit_stored(request: Request[Any, Any, Any]) -> AuditOf:
    """The ingest's audit record: each stored instance's, written in its index transaction. It carries no HTTP
    status (the request's own record does, once the response is known)."""

    def records(stored: InstanceStored) -> list[AuditRecord]:
        p = stored.parsed
        resource = Resource(
            kind="instance",
            patient_id=p.study["patient_id"],
            study_uid=p.study_uid,
            series_uid=p.series_uid,
            instance_uid=p.sop_instance_uid,
        )
        warnings = "; ".join(text for _code, text in p.warnings) or None
        record = _record(request, resource, outcome_desc=warnings, status=None)
        if stored.replaced:
            record = dataclasses.replace(record, action="U")
        return [record]

    return records


def _admission(request: Request[Any, Any, Any], services: _Services) -> Admission:
    """The policy's decision on each instance of the body (`dicomweb.ingest.admission`), as the guard's on the
    request: the same actor (subject, client address and break-glass session)."""
    actor = request_actor(request)

    async def decide(resource: Resource) -> Decision:
        return await actor.decide("create", resource)

    return policy_admission(decide)


def _origin(request: Request[Any, Any, Any]) -> Origin:
    """The request as the ingest and its listeners see it: the authenticated subject and the client address."""
    client = request.scope.get("client")
    return Origin.stow(principal_of(request).sub, client[0] if client else None)


async def _receive(request: Request[Any, Any, Any], services: _Services, study: str | None) -> Response[bytes]:
    settings = services.settings
    audit = _audit_stored(request)
    admit = _admission(request, services)
    origin = _origin(request)
    boundary = stow.check_request_type(request.headers.get("content-type"))
    refuse_when_full(services)
    parser = multipart.MultipartParser(boundary, max_header_bytes=settings.max_part_header_bytes)
    outcomes: list[Outcome | asyncio.Task[Outcome]] = []
    slots = asyncio.Semaphore(PIPELINE)
    spool: Spool | None = None
    skip_part = False
    try:
        async for chunk in request.stream():
            for event in parser.feed(chunk):
                if isinstance(event, multipart.PartStart):
                    skip_part = not stow.part_is_dicom(event.headers)
                    if skip_part:
                        outcomes.append(
                            Outcome(None, None, failure=CANNOT_UNDERSTAND, comment="part is not application/dicom")
                        )
                    else:
                        spool = services.store.spool.open()
                elif isinstance(event, multipart.PartData):
                    if spool is not None:
                        spool.write(event.data)
                elif isinstance(event, multipart.PartEnd):
                    if spool is not None:
                        await slots.acquire()
                        outcomes.append(
                            asyncio.create_task(_finish_slot(services, spool, origin, study, slots, audit, admit))
                        )
                        spool = None
        parser.close()
    except DicomWebError as exc:
        if spool is not None:
            spool.discard()
        if not outcomes:
            raise
        # Parts before the damage were complete and are stored; report the broken tail as a failure.
        comment = "multipart body ended before its closing boundary" if isinstance(exc, BadRequest) else exc.detail
        outcomes.append(Outcome(None, None, failure=CANNOT_UNDERSTAND, comment=comment))
    except BodyTimeout as exc:
        # The client stopped sending (or announced more than it sent). Parts received whole were stored and stay
        # stored, as after a broken multipart tail; the rest of the body is not read, and the connection is closed
        # after the response. With no part received whole, the answer is the 408 itself.
        if spool is not None:
            spool.discard()
            spool = None
        if not outcomes:
            raise
        if not parser.finished:
            outcomes.append(
                Outcome(
                    None, None, failure=PROCESSING_FAILURE, comment=f"{exc.detail}; the rest of the body was not read"
                )
            )
    except asyncio.CancelledError:
        # uvicorn's graceful shutdown ran out of time for this request: answer with what was stored.
        _uncancel()
        outcomes.append(Outcome(None, None, failure=OUT_OF_RESOURCES, comment=CUT_BY_SHUTDOWN))
    except Exception as exc:
        if isinstance(exc, InternalServerException) and "disconnected" in exc.detail:  # `Request.stream`
            outcomes.append(Outcome(None, None, failure=CANNOT_UNDERSTAND, comment=CUT_BY_CLIENT))
        else:
            log.exception("STOW-RS receiving failed")
            outcomes.append(Outcome(None, None, failure=PROCESSING_FAILURE, comment=CUT_BY_ERROR))
    finally:
        if spool is not None:
            spool.discard()
    answering = asyncio.ensure_future(_answer(request, services, outcomes, study))
    try:
        return await asyncio.shield(answering)
    except asyncio.CancelledError:  # the shutdown came while the last parts were being stored: they are the answer
        _uncancel()
        return await answering


def _uncancel() -> None:
    """This request answers its cancellation (uvicorn's graceful shutdown running out) instead of ending."""
    current = asyncio.current_task()
    if current is not None:
        current.uncancel()


async def _answer(
    request: Request[Any, Any, Any],
    services: _Services,
    outcomes: list[Outcome | asyncio.Task[Outcome]],
    study: str | None,
) -> Response[bytes]:
    """The response, once the parts in flight ended (each as one whole store)."""
    done = await _collect(outcomes)
    if any(o.committed for o in done):
        request.scope.setdefault("state", {})[CHANGES_RECORDED] = True
    status, body = stow.store_response(done, base_url(request, services.settings), study)
    await _audit_conflicts(request, services, done, status)
    headers = {}
    reasons = stow.readable_reasons(done)
    if reasons:
        headers["Warning"] = ", ".join(warning_header(r) for r in reasons[:20])
    return Response(dicom_json(body), status_code=status, media_type="application/dicom+json", headers=headers)


def refuse_when_full(services: _Services) -> None:
    """503 with Retry-After before the body is read, while free space is below the watermark
    (`server.platform.diskspace`); a volume that runs low during the request fails the parts after that point
    instead (A700 each)."""
    space = services.store.space
    low = space.low() if space is not None else []
    if low:
        raise StorageFull(str(BelowWatermark(low).strerror), RETRY_AFTER_SECONDS)


async def _audit_conflicts(
    request: Request[Any, Any, Any], services: _Services, outcomes: Sequence[Outcome], status: int
) -> None:
    """One record per instance refused because its study is filed under another patient (DICOM Instances
    Transferred, PS3.15 A.5.3.4, minor failure), naming both patients, and per instance the policy refused, with
    its decision and reasons: the response names neither. Nothing was stored for them: when the records cannot
    be written the response stands (the request's own record decides whether it goes out)."""
    records = [
        _record(
            request,
            dataclasses.replace(denial.resource, series_uid=o.series_uid, instance_uid=o.sop_instance_uid),
            denial.decision,
            outcome_desc=denial.reasons,
            status=status,
            outcome="4",
        )
        for o, denial in ((o, o.denial) for o in outcomes)
        if denial is not None
    ]
    records += [
        _record(
            request,
            Resource(
                kind="instance",
                patient_id=conflict.patient_id,
                study_uid=conflict.study_uid,
                series_uid=conflict.series_uid,
                instance_uid=conflict.sop_instance_uid,
            ),
            outcome_desc=conflict.describe(),
            status=status,
            outcome="4",
        )
        for conflict in (o.conflict for o in outcomes)
        if conflict is not None
    ]
    try:
        await services.audit.append_many(records)
    except Exception:
        log.exception("audit records of refused instances not written")


async def _finish_slot(
    services: _Services,
    spool: Spool,
    origin: Origin,
    study: str | None,
    slots: asyncio.Semaphore,
    audit: AuditOf,
    admit: Admission,
) -> Outcome:
    try:
        return await _finish(services, spool, origin, study, audit, admit)
    finally:
        slots.release()


async def _collect(outcomes: list[Outcome | asyncio.Task[Outcome]]) -> list[Outcome]:
    """Every part's outcome in request order, once all ingests have ended. An ingest that raised stored nothing
    (`StoreService.store`): it is a processing failure."""
    tasks = [o for o in outcomes if isinstance(o, asyncio.Task)]
    await asyncio.gather(*tasks, return_exceptions=True)
    return [_result(o) if isinstance(o, asyncio.Task) else o for o in outcomes]


def _result(task: asyncio.Task[Outcome]) -> Outcome:
    exc = None if task.cancelled() else task.exception()
    if exc is None and not task.cancelled():
        return task.result()
    if exc is not None:
        log.error("STOW-RS part failed", exc_info=exc)
    return Outcome(None, None, failure=PROCESSING_FAILURE, comment="the server failed to store the instance")


async def _finish(
    services: _Services, spool: Spool, origin: Origin, study: str | None, audit: AuditOf, admit: Admission
) -> Outcome:
    try:
        spooled = spool.finish()
    except InstanceRejected as exc:  # a full disk, free space below the watermark, too large: this part alone fails
        return Outcome.rejected(exc)
    telemetry.record_part_size(spooled.size)
    outcome = await services.store.store(spooled, origin, study=study, audit=audit, admit=admit)
    if outcome.ok:
        telemetry.record_stored(1)
    return outcome


@post("/studies", request_max_body_size=None, status_code=200, opt=authz_opt("create", "study"))
async def store_instances(
    request: Request[Any, Any, Any],
    settings: SettingsDep,
    store: StoreDep,
    audit: AuditDep,
) -> Response[bytes]:
    return await _receive(request, _Services(settings, store, audit), None)


@post("/studies/{study:str}", request_max_body_size=None, status_code=200, opt=authz_opt("create", "study"))
async def store_study_instances(
    request: Request[Any, Any, Any],
    settings: SettingsDep,
    store: StoreDep,
    audit: AuditDep,
    study: FromPath[str],
) -> Response[bytes]:
    return await _receive(request, _Services(settings, store, audit), uids.study_uid(study))


ROUTES = [store_instances, store_study_instances]
