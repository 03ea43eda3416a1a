"""STOW-RS: POST /studies and /studies/{study} (PS3.18 10.5).

The body is read from the socket chunk by chunk into the multipart parser; each part is spooled to a local
file (hashing as it goes) and ingested when it ends, so memory stays flat whatever the upload size."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.params import FromPath

from authz.guard import authz_opt
from dicomweb import multipart, stow, uids
from dicomweb.errors import BadRequest
from dicomweb.ingest import CANNOT_UNDERSTAND
from dicomweb.routes.common import base_url, dicom_json
from dicomweb.store import Outcome, Spool
from server import telemetry
from server.errors import warning_header
from server.resources import Resources, ResourcesDep


async def _receive(request: Request[Any, Any, Any], resources: ResourcesDep, study: str | None) -> Response[bytes]:
    settings = resources.settings
    boundary = stow.check_request_type(request.headers.get("content-type"))
    parser = multipart.MultipartParser(boundary, max_header_bytes=settings.max_part_header_bytes)
    outcomes: list[Outcome] = []
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
                        spool = Spool(settings.spool_dir, settings.max_instance_bytes)
                elif isinstance(event, multipart.PartData):
                    if spool is not None:
                        spool.write(event.data)
                elif isinstance(event, multipart.PartEnd):
                    if spool is not None:
                        outcomes.append(await _finish(resources, spool, study))
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
    finally:
        if spool is not None:
            spool.discard()
    status, body = stow.store_response(outcomes, base_url(request, resources), study)
    headers = {}
    reasons = stow.readable_reasons(outcomes)
    if reasons:
        headers["Warning"] = ", ".join(warning_header(r) for r in reasons[:20])
    return Response(dicom_json(body), status_code=status, media_type="application/dicom+json", headers=headers)


async def _finish(resources: Resources, spool: Spool, study: str | None) -> Outcome:
    sha = spool.finish()
    if spool.too_large:
        spool.discard()
        return Outcome(
            None,
            None,
            failure=0xA700,
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
