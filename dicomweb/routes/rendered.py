"""WADO-RS rendered and thumbnail render, settings (PS3.18 10.4, 8.3.5) as thin Litestar handlers.

`.../rendered` at study, series, instance and frame level and `.../thumbnail` at the same levels, as image/jpeg
(the default), image/png or image/gif, chosen by the `accept` query parameter or the Accept header. What each
level returns is described in `dicomweb.retrieve.rendered`. Images are already compressed: the routes opt out of gzip.
Responses carry an entity tag (304 for a current `If-None-Match`) and Cache-Control like the other WADO-RS
render, settings; an ignored `annotation` is reported in a `Warning: 299` header (PS3.18 8.6.3).
"""

from __future__ import annotations

import uuid
from typing import Any

from litestar import Request, Response, get
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from authz.guard import authz_opt
from dicomweb import uids
from dicomweb.deps import RenderDep, SettingsDep
from dicomweb.retrieve.render_params import Parsed, choose_media_type, rendered_options
from dicomweb.retrieve.service import Plan, parse_frame_list
from dicomweb.routes.common import base_url
from dicomweb.routes.wado import BINARY, accept_ranges, cache_headers, not_modified
from server.platform.http import warning_header

OPT: dict[str, Any] = {**BINARY, **authz_opt("read", "rendered")}
_INSTANCE = "/studies/{study:str}/series/{series:str}/instances/{instance:str}"
_FRAMES = _INSTANCE + "/frames/{frames:str}"


async def send(request: Request[Any, Any, Any], plan: Plan, parsed: Parsed) -> Response[Any]:
    """304 when the client's copy is current, else the rendered body, with any warnings."""
    headers = cache_headers(plan.etag, plan.max_age)
    if not_modified(request, plan.etag):
        return Response(b"", status_code=304, headers=headers)
    body = await plan.build()
    boundary = uuid.uuid4().hex
    length = body.length(boundary)
    if length is not None:
        headers["Content-Length"] = str(length)
    if parsed.warnings:
        headers["Warning"] = ", ".join(warning_header(text) for text in parsed.warnings)
    return Stream(body.chunks(boundary), media_type=body.content_type(boundary), headers=headers)


def _options(
    request: Request[Any, Any, Any],
    accept: list[str] | None,
    window: str | None,
    viewport: str | None,
    quality: str | None,
    annotation: str | None,
    *,
    thumbnail: bool = False,
) -> Parsed:
    media_type = choose_media_type(accept_ranges(request, accept))
    return rendered_options(
        media_type, window=window, viewport=viewport, quality=quality, annotation=annotation, thumbnail=thumbnail
    )


# ---------------------------------------------------------------------------------------------- rendered


@get("/studies/{study:str}/rendered", opt=OPT)
async def rendered_study(
    request: Request[Any, Any, Any],
    render: RenderDep,
    settings: SettingsDep,
    study: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
    window: FromQuery[str | None] = None,
    viewport: FromQuery[str | None] = None,
    quality: FromQuery[str | None] = None,
    annotation: FromQuery[str | None] = None,
) -> Response[Any]:
    parsed = _options(request, accept, window, viewport, quality, annotation)
    plan = await render.plan_many(base_url(request, settings), uids.study_uid(study), None, parsed.options)
    return await send(request, plan, parsed)


@get("/studies/{study:str}/series/{series:str}/rendered", opt=OPT)
async def rendered_series(
    request: Request[Any, Any, Any],
    render: RenderDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
    window: FromQuery[str | None] = None,
    viewport: FromQuery[str | None] = None,
    quality: FromQuery[str | None] = None,
    annotation: FromQuery[str | None] = None,
) -> Response[Any]:
    parsed = _options(request, accept, window, viewport, quality, annotation)
    plan = await render.plan_many(
        base_url(request, settings), uids.study_uid(study), uids.series_uid(series), parsed.options
    )
    return await send(request, plan, parsed)


@get(_INSTANCE + "/rendered", opt=OPT)
async def rendered_instance(
    request: Request[Any, Any, Any],
    render: RenderDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    instance: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
    window: FromQuery[str | None] = None,
    viewport: FromQuery[str | None] = None,
    quality: FromQuery[str | None] = None,
    annotation: FromQuery[str | None] = None,
) -> Response[Any]:
    parsed = _options(request, accept, window, viewport, quality, annotation)
    plan = await render.plan_instance(
        uids.study_uid(study), uids.series_uid(series), uids.instance_uid(instance), parsed.options
    )
    return await send(request, plan, parsed)


@get(_FRAMES + "/rendered", opt=OPT)
async def rendered_frames(
    request: Request[Any, Any, Any],
    render: RenderDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    instance: FromPath[str],
    frames: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
    window: FromQuery[str | None] = None,
    viewport: FromQuery[str | None] = None,
    quality: FromQuery[str | None] = None,
    annotation: FromQuery[str | None] = None,
) -> Response[Any]:
    study_uid, series_uid, instance_uid = uids.study_uid(study), uids.series_uid(series), uids.instance_uid(instance)
    numbers = parse_frame_list(frames)
    parsed = _options(request, accept, window, viewport, quality, annotation)
    plan = await render.plan_frames(
        base_url(request, settings), study_uid, series_uid, instance_uid, numbers, parsed.options
    )
    return await send(request, plan, parsed)


# ---------------------------------------------------------------------------------------------- thumbnails


async def _thumbnail(
    request: Request[Any, Any, Any],
    render: RenderDep,
    settings: SettingsDep,
    query: tuple[list[str] | None, str | None, str | None, str | None, str | None],
    study: str,
    series: str | None = None,
    instance: str | None = None,
    frames: str | None = None,
) -> Response[Any]:
    study_uid = uids.study_uid(study)
    series_uid = uids.series_uid(series) if series is not None else None
    instance_uid = uids.instance_uid(instance) if instance is not None else None
    numbers = parse_frame_list(frames) if frames is not None else None
    accept, window, viewport, quality, annotation = query
    parsed = _options(request, accept, window, viewport, quality, annotation, thumbnail=True)
    plan = await render.plan_thumbnail(study_uid, series_uid, instance_uid, parsed.options, numbers)
    return await send(request, plan, parsed)


@get("/studies/{study:str}/thumbnail", opt=OPT)
async def thumbnail_study(
    request: Request[Any, Any, Any],
    render: RenderDep,
    settings: SettingsDep,
    study: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
    window: FromQuery[str | None] = None,
    viewport: FromQuery[str | None] = None,
    quality: FromQuery[str | None] = None,
    annotation: FromQuery[str | None] = None,
) -> Response[Any]:
    return await _thumbnail(request, render, settings, (accept, window, viewport, quality, annotation), study)


@get("/studies/{study:str}/series/{series:str}/thumbnail", opt=OPT)
async def thumbnail_series(
    request: Request[Any, Any, Any],
    render: RenderDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
    window: FromQuery[str | None] = None,
    viewport: FromQuery[str | None] = None,
    quality: FromQuery[str | None] = None,
    annotation: FromQuery[str | None] = None,
) -> Response[Any]:
    return await _thumbnail(request, render, settings, (accept, window, viewport, quality, annotation), study, series)


@get(_INSTANCE + "/thumbnail", opt=OPT)
async def thumbnail_instance(
    request: Request[Any, Any, Any],
    render: RenderDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    instance: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
    window: FromQuery[str | None] = None,
    viewport: FromQuery[str | None] = None,
    quality: FromQuery[str | None] = None,
    annotation: FromQuery[str | None] = None,
) -> Response[Any]:
    query = (accept, window, viewport, quality, annotation)
    return await _thumbnail(request, render, settings, query, study, series, instance)


@get(_FRAMES + "/thumbnail", opt=OPT)
async def thumbnail_frames(
    request: Request[Any, Any, Any],
    render: RenderDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
    instance: FromPath[str],
    frames: FromPath[str],
    accept: FromQuery[list[str] | None] = None,
    window: FromQuery[str | None] = None,
    viewport: FromQuery[str | None] = None,
    quality: FromQuery[str | None] = None,
    annotation: FromQuery[str | None] = None,
) -> Response[Any]:
    query = (accept, window, viewport, quality, annotation)
    return await _thumbnail(request, render, settings, query, study, series, instance, frames)


ROUTES = [
    rendered_study,
    rendered_series,
    rendered_instance,
    rendered_frames,
    thumbnail_study,
    thumbnail_series,
    thumbnail_instance,
    thumbnail_frames,
]
