"""WADO-RS: the Retrieve transaction of the Studies service (PS3.18 10.4) as thin Litestar handlers.

Instances, frames and bulk data are binary and already compressed where it matters: their routes opt out of
the app's gzip middleware (`no_compression`); metadata (JSON) is gzip-encoded for clients that accept it.
Every response carries an entity tag; `If-None-Match` with a current tag gets 304 and no body (RFC 9110 13.1.2).
Bodies of known length advertise `Accept-Ranges: bytes` and answer `Range` (206/416, `If-Range`; RFC 9110 14):
progressive HTJ2K viewers fetch the first bytes of a frame, then the rest.
"""

from __future__ import annotations

import hashlib
from typing import Any

from litestar import Request, Response, get
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from authz.guard import authz_opt
from dicomweb import uids
from dicomweb.codecs import mediatypes, negotiate, ranges
from dicomweb.deps import RetrieveDep, SettingsDep
from dicomweb.retrieve.service import Plan, bulk_tag, parse_frame_list
from dicomweb.routes.common import base_url

BINARY: dict[str, Any] = {"no_compression": True}
"""Route opt that keeps the gzip middleware off binary DICOM payloads."""


def accept_ranges(request: Request[Any, Any, Any], accept: list[str] | None) -> list[mediatypes.MediaType]:
    """The `accept` query parameter replaces the Accept header (PS3.18 8.3.3.1)."""
    return mediatypes.accept_from_request(accept or [], request.headers.getall("accept", []))


def not_modified(request: Request[Any, Any, Any], etag: str) -> bool:
    """If-None-Match with weak comparison, as RFC 9110 13.1.2 asks for GET."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    if header.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in header.split(","))


def cache_headers(etag: str, max_age: int) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": f"private, max-age={max_age}", "Vary": "Accept"}


async def send(request: Request[Any, Any, Any], plan: Plan) -> Response[Any]:
    """304 when the client's copy is current, otherwise the planned body streamed (with its length if known),
    or the byte range asked for (RFC 9110 14; `dicomweb.codecs.ranges` says what is answered when).

    The multipart boundary is derived from the entity tag, so the same representation has the same bytes on
    every request: byte ranges of a multipart body fit together (a random boundary would break them)."""
    headers = cache_headers(plan.etag, plan.max_age)
    if not_modified(request, plan.etag):
        return Response(b"", status_code=304, headers=headers)
    body = await plan.build()
    boundary = hashlib.sha256(plan.etag.encode("ascii")).hexdigest()[:32]
    asked = request.headers.get("range")
    if asked and ranges.if_range_allows(request.headers.get("if-range"), plan.etag):
        if body.length(boundary) is None and plan.rangeable:
            body = await body.materialized()
        complete = body.length(boundary)
        if complete is not None:
            headers["Accept-Ranges"] = "bytes"
            try:
                span = ranges.parse_range(asked, complete)
            except ranges.Unsatisfiable as exc:
                headers["Content-Range"] = exc.content_range
                return Response(b"", status_code=416, headers=headers)
            if span is not None:
                headers["Content-Range"] = span.content_range
                headers["Content-Length"] = str(span.length)
                chunks = body.range_chunks(boundary, span.start, span.stop)
                return Stream(chunks, status_code=206, media_type=body.content_type(boundary), headers=headers)
    length = body.length(boundary)
    if length is not None:
        headers["Content-Length"] = str(length)
        headers["Accept-Ranges"] = "bytes"
    return Stream(body.chunks(boundary), media_type=body.content_type(boundary), headers=headers)


# ---------------------------------------------------------------------------------------------- instances


async def _instances(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    settings: SettingsDep,
    accept: list[str] | None,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> Response[Any]:
    study_uid = uids.study_uid(study)
    series_uid = uids.series_uid(series) if series is not None else None
    instance_uid = uids.instance_uid(instance) if instance is not None else None
    offers = negotiate.offers(accept_ranges(request, accept), mediatypes.DICOM)
    plan = await retrieve.plan_instances(
        offers,
        base_url(request, settings),
        study_uid,
        series_uid,
        instance_uid,
        single_part_ok=instance_uid is not None,
    )
    return await send(request, plan)


@get("/studies/{study:str}", opt={**BINARY, **authz_opt("read", "study")})
async def retrieve_study(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    settings: SettingsDep,
    study: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
) -> Response[Any]:
    return await _instances(request, retrieve, settings, accept, study)


@get("/studies/{study:str}/series/{series:str}", opt={**BINARY, **authz_opt("read", "series")})
async def retrieve_series(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
) -> Response[Any]:
    return await _instances(request, retrieve, settings, accept, study, series)


@get(
    "/studies/{study:str}/series/{series:str}/instances/{instance:str}", opt={**BINARY, **authz_opt("read", "instance")}
)
async def retrieve_instance(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    instance: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
) -> Response[Any]:
    return await _instances(request, retrieve, settings, accept, study, series, instance)


# ---------------------------------------------------------------------------------------------- metadata


async def _metadata(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    settings: SettingsDep,
    accept: list[str] | None,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> Response[Any]:
    study_uid = uids.study_uid(study)
    series_uid = uids.series_uid(series) if series is not None else None
    instance_uid = uids.instance_uid(instance) if instance is not None else None
    media_type = negotiate.choose_metadata(accept_ranges(request, accept))
    meta = await retrieve.metadata(base_url(request, settings), study_uid, series_uid, instance_uid)
    # Weak: the gzip middleware may change the bytes (content coding) under the same tag.
    etag = "W/" + meta.etag
    headers = cache_headers(etag, meta.max_age)  # the gzip middleware adds Accept-Encoding to Vary
    if not_modified(request, etag):
        return Response(b"", status_code=304, headers=headers)
    return Response(meta.body.encode("utf-8"), media_type=media_type, headers=headers)


@get("/studies/{study:str}/metadata", opt=authz_opt("read", "metadata"))
async def study_metadata(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    settings: SettingsDep,
    study: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
) -> Response[Any]:
    return await _metadata(request, retrieve, settings, accept, study)


@get("/studies/{study:str}/series/{series:str}/metadata", opt=authz_opt("read", "metadata"))
async def series_metadata(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
) -> Response[Any]:
    return await _metadata(request, retrieve, settings, accept, study, series)


@get("/studies/{study:str}/series/{series:str}/instances/{instance:str}/metadata", opt=authz_opt("read", "metadata"))
async def instance_metadata(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    instance: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
) -> Response[Any]:
    return await _metadata(request, retrieve, settings, accept, study, series, instance)


# ---------------------------------------------------------------------------------------------- frames, bulk


@get(
    "/studies/{study:str}/series/{series:str}/instances/{instance:str}/frames/{frames:str}",
    opt={**BINARY, **authz_opt("read", "frames")},
)
async def retrieve_frames(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    instance: FromPath[str],
    frames: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
) -> Response[Any]:
    study_uid, series_uid, instance_uid = uids.study_uid(study), uids.series_uid(series), uids.instance_uid(instance)
    numbers = parse_frame_list(frames)
    offers = negotiate.offers(accept_ranges(request, accept), mediatypes.OCTET_STREAM)
    plan = await retrieve.plan_frames(offers, base_url(request, settings), study_uid, series_uid, instance_uid, numbers)
    return await send(request, plan)


@get(
    "/studies/{study:str}/series/{series:str}/instances/{instance:str}/bulk/{tag:str}",
    opt={**BINARY, **authz_opt("read", "bulkdata")},
)
async def retrieve_bulk(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    instance: FromPath[str],
    tag: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
) -> Response[Any]:
    study_uid, series_uid, instance_uid = uids.study_uid(study), uids.series_uid(series), uids.instance_uid(instance)
    offers = negotiate.offers(accept_ranges(request, accept), mediatypes.OCTET_STREAM)
    plan = await retrieve.plan_bulk(
        offers, base_url(request, settings), study_uid, series_uid, instance_uid, bulk_tag(tag)
    )
    return await send(request, plan)


ROUTES = [
    retrieve_study,
    retrieve_series,
    retrieve_instance,
    study_metadata,
    series_metadata,
    instance_metadata,
    retrieve_frames,
    retrieve_bulk,
]
