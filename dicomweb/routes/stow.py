"""STOW-RS: POST /studies and /studies/{study} (PS3.18 10.5).

The body is read from the socket chunk by chunk into the multipart parser; each part is spooled to a local
file (hashing as it goes) and ingested when it ends, so memory stays flat whatever the upload size.

Ingest of a part (parse, blob fsync, index commit) overlaps with receiving the next ones: up to `PIPELINE` parts
of one request are in flight at once, which hides the fsync and commit latency of each. The response still
waits for every part (each acknowledged instance is durable, PS3.18 10.5.3), and lists them in request order.

While free space is below the watermark (server/diskspace.py) a request is answered 503 with Retry-After before its
body is read; a part that cannot be spooled (the watermark crossed during the request, or the file system full:
ENOSPC) fails alone with Out of Resources (A700), and the others are stored.

A body that stalls (nothing for `HOUNSFIELD_HTTP_BODY_TIMEOUT_SECONDS`, server/connections.py), or that announced a
longer Content-Length than it sends, ends the request: the parts received whole are stored (each is a durable store
of its own, as when the multipart body breaks off) and the response lists them, with the cut part as a Processing
Failure (0110); the connection is closed after it. With no part received whole, the answer is 408."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from litestar import Request, Response, post
from litestar.params import FromPath

from authz.auditrecord import EventType, request_record
from authz.authn import PRINCIPAL
from authz.decision import Decision, Resource
from authz.guard import DECISION, authz_opt
from dicomweb import multipart, stow, uids
from dicomweb.errors import BadRequest, StorageFull
from dicomweb.ingest import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE
from dicomweb.routes.common import base_url, dicom_json
from dicomweb.store import Outcome, Spool, out_of_resources
from server import telemetry
from server.connections import BodyTimeout
from server.diskspace import RETRY_AFTER_SECONDS, BelowWatermark
from server.errors import warning_header
from server.resources import Resources, ResourcesDep

PIPELINE = 4
"""Parts of one STOW-RS request ingested at once (receiving pauses while this many are in flight)."""


async def _receive(request: Request[Any, Any, Any], resources: ResourcesDep, study: str | None) -> Response[bytes]:
    settings = resources.settings
    boundary = stow.check_request_type(request.headers.get("content-type"))
    refuse_when_full(resources)
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
                        spool = Spool(settings.spool_dir, settings.max_instance_bytes, resources.store.space)
                elif isinstance(event, multipart.PartData):
                    if spool is not None:
                        spool.write(event.data)
                elif isinstance(event, multipart.PartEnd):
                    if spool is not None:
                        await slots.acquire()
                        outcomes.append(asyncio.create_task(_finish_slot(resources, spool, study, slots)))
                        spool = None
        parser.close()
    except BadRequest:
        if spool is not None:
            spool.discard()
        if not outcomes:
            raise
        # Parts before the damage were complete and are stored; report the broken tail as a failure.
        outcomes.append(
            Outcome(
                None,
                None,
                failure=CANNOT_UNDERSTAND,
                comment="multipart body ended before its closing boundary",
            )
        )
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
    except BaseException:
        await _abandon(outcomes)
        raise
    finally:
        if spool is not None:
            spool.discard()
    done = await _collect(outcomes)
    status, body = stow.store_response(done, base_url(request, resources), study)
    await _audit_conflicts(request, resources, done, status)
    headers = {}
    reasons = stow.readable_reasons(done)
    if reasons:
        headers["Warning"] = ", ".join(warning_header(r) for r in reasons[:20])
    return Response(dicom_json(body), status_code=status, media_type="application/dicom+json", headers=headers)


def refuse_when_full(resources: Resources) -> None:
    """503 with Retry-After before the body is read, while free space is below the watermark (server/diskspace.py);
    a volume that runs low during the request fails the parts after that point instead (A700 each)."""
    space = resources.store.space
    low = space.low() if space is not None else []
    if low:
        raise StorageFull(str(BelowWatermark(low).strerror), RETRY_AFTER_SECONDS)


async def _audit_conflicts(
    request: Request[Any, Any, Any], resources: Resources, outcomes: Sequence[Outcome], status: int
) -> None:
    """One record per instance refused because its study is filed under another patient (DICOM Instances
    Transferred, PS3.15 A.5.3.4, minor failure), naming both patients: the response names neither."""
    state = request.scope.get("state", {})
    decision = state.get(DECISION)
    client = request.scope.get("client")
    for outcome in outcomes:
        conflict = outcome.conflict
        if conflict is None:
            continue
        record = request_record(
            state.get(PRINCIPAL),
            decision if isinstance(decision, Decision) else None,
            action="create",
            resource=Resource(
                kind="instance",
                patient_id=conflict.patient_id,
                study_uid=conflict.study_uid,
                series_uid=conflict.series_uid,
                instance_uid=conflict.sop_instance_uid,
            ),
            status=status,
            method=request.method,
            path=request.url.path,
            client_ip=client[0] if client else None,
            outcome_desc=conflict.describe(),
        )
        await resources.audit.append(
            dataclasses.replace(record, type=EventType.INSTANCES_TRANSFERRED, subtype=(), outcome="4")
        )


async def _finish_slot(resources: Resources, spool: Spool, study: str | None, slots: asyncio.Semaphore) -> Outcome:
    try:
        return await _finish(resources, spool, study)
    finally:
        slots.release()


async def _collect(outcomes: list[Outcome | asyncio.Task[Outcome]]) -> list[Outcome]:
    """Every part's outcome in request order, once all ingests have ended (the first unexpected error, if any, is
    raised after the others finished)."""
    tasks = [o for o in outcomes if isinstance(o, asyncio.Task)]
    await asyncio.gather(*tasks, return_exceptions=True)
    return [o.result() if isinstance(o, asyncio.Task) else o for o in outcomes]


async def _abandon(outcomes: list[Outcome | asyncio.Task[Outcome]]) -> None:
    """The request failed before its end (client gone, an unexpected error): the ingests already in flight are
    not cut off halfway; each ends as one whole store (shielded, so a cancelled request does not cancel them)."""
    tasks = [o for o in outcomes if isinstance(o, asyncio.Task)]
    if tasks:
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))


async def _finish(resources: Resources, spool: Spool, study: str | None) -> Outcome:
    sha = spool.finish()
    if spool.error is not None:  # a full disk, or free space below the watermark: this part alone fails
        return Outcome(None, None, failure=OUT_OF_RESOURCES, comment=out_of_resources(spool.error))
    if spool.too_large:
        spool.discard()
        return Outcome(
            None,
            None,
            failure=OUT_OF_RESOURCES,
            comment=f"instance larger than the limit of {resources.settings.max_instance_bytes} bytes",
        )
    telemetry.record_part_size(spool.size)
    outcome = await resources.store.store_file(spool.path, spool.size, sha, study)
    if outcome.ok:
        telemetry.record_stored(1)
    return outcome


@post("/studies", request_max_body_size=None, status_code=200, opt=authz_opt("create", "study"))
async def store_instances(request: Request[Any, Any, Any], resources: ResourcesDep) -> Response[bytes]:
    return await _receive(request, resources, None)


@post("/studies/{study:str}", request_max_body_size=None, status_code=200, opt=authz_opt("create", "study"))
async def store_study_instances(
    request: Request[Any, Any, Any], resources: ResourcesDep, study: FromPath[str]
) -> Response[bytes]:
    return await _receive(request, resources, uids.study_uid(study))


ROUTES = [store_instances, store_study_instances]
