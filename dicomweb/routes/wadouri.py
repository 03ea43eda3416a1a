"""WADO-URI (PS3.18 9): `GET /wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..&contentType=..`.

With `contentType=application/dicom` the response is a single `application/dicom` part with no media type
parameters (transfer-syntax parameters are forbidden in the URI service, PS3.18 8.7.3.5.2); the Part 10 file's
own Transfer Syntax UID says how it is encoded. Otherwise the object is rendered (PS3.18 9): image/jpeg
(the default when contentType is absent), image/png or image/gif, with `windowCenter`/`windowWidth`, `rows`,
`columns`, `region`, `frameNumber` (default: the first frame) and `imageQuality`, through the same pipeline as
the WADO-RS rendered retrieve, render, settings (`dicomweb.pixels.render`); other contentType values are 406.

The object is named once: `wado_uri_target` parses `studyUID`, `seriesUID` and `objectUID` for the guard, which
decides on them and keeps them for the handler (`authz.target`); the handler never reads them again. Each must be
present exactly once and non-empty: a request naming two objects (`studyUID=A&studyUID=B`) is refused with 400
before any policy decision, since which of them it means depends on who reads it.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from litestar import Request, Response, get
from litestar.connection import ASGIConnection
from litestar.params import QueryParameter
from litestar.response import Stream

from authz.guard import authz_opt
from authz.target import Target, target_of
from dicomweb import uids
from dicomweb.codecs import mediatypes
from dicomweb.codecs.negotiate import Offer
from dicomweb.deps import RenderDep, RetrieveDep, SettingsDep
from dicomweb.errors import BadRequest, InvalidParameter, NotAcceptable
from dicomweb.retrieve.render_params import UriRendering, uri_media_type, uri_options
from dicomweb.routes.common import base_url
from dicomweb.routes.wado import BINARY, cache_headers, not_modified
from server.platform.http import warning_header

IDENTIFYING = ("studyUID", "seriesUID", "objectUID")
"""The query parameters that name the object (PS3.18 9.2)."""


def _one_uid(values: list[str], name: str) -> uids.UID:
    if len(values) > 1:
        raise InvalidParameter(name, "given more than once; a WADO-URI request names one object (PS3.18 9.2)")
    if not values or values[0] == "":
        raise InvalidParameter(name, "required by WADO-URI (PS3.18 9.2)")
    return uids.UID(values[0], what=name)


async def wado_uri_target(connection: ASGIConnection[Any, Any, Any, Any]) -> Target:
    """The object a WADO-URI request names, for the guard and the handler alike (`authz.target`)."""
    query = connection.query_params
    study, series, instance = (_one_uid(query.getall(name, []), name) for name in IDENTIFYING)
    return Target(study, series, instance)


def _wants_dicom(content_type: str | None) -> bool:
    """Is application/dicom among the contentType values (PS3.18 9.2.3.1)? Anything else is rendering."""
    if content_type is None or not content_type.strip():
        return False
    try:
        ranges = mediatypes.parse_accept([content_type])
    except BadRequest:
        raise InvalidParameter("contentType", f"not a list of media types: {content_type[:80]!r}") from None
    return any(r.essence == mediatypes.DICOM for r in ranges)


@get("/wado", opt={**BINARY, **authz_opt("read", "instance", target=wado_uri_target)})
async def wado_uri(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    render: RenderDep,
    settings: SettingsDep,
    request_type: Annotated[str | None, QueryParameter(name="requestType")] = None,
    content_type: Annotated[str | None, QueryParameter(name="contentType")] = None,
    transfer_syntax: Annotated[str | None, QueryParameter(name="transferSyntax")] = None,
    anonymize: Annotated[str | None, QueryParameter(name="anonymize")] = None,
    window_center: Annotated[str | None, QueryParameter(name="windowCenter")] = None,
    window_width: Annotated[str | None, QueryParameter(name="windowWidth")] = None,
    rows: Annotated[str | None, QueryParameter(name="rows")] = None,
    columns: Annotated[str | None, QueryParameter(name="columns")] = None,
    region: Annotated[str | None, QueryParameter(name="region")] = None,
    frame_number: Annotated[str | None, QueryParameter(name="frameNumber")] = None,
    image_quality: Annotated[str | None, QueryParameter(name="imageQuality")] = None,
    annotation: Annotated[str | None, QueryParameter(name="annotation")] = None,
) -> Response[Any]:
    """`studyUID`, `seriesUID` and `objectUID` (each exactly once) name the object; the guard parsed them."""
    if request_type != "WADO":
        raise InvalidParameter("requestType", "must be WADO (PS3.18 9.2.1)")
    target = target_of(request)
    study_uid, series_uid, instance_uid = target.study, target.series, target.instance
    if study_uid is None or series_uid is None or instance_uid is None:  # wado_uri_target names all three
        raise InvalidParameter("objectUID", "required by WADO-URI (PS3.18 9.2)")
    wants_dicom = _wants_dicom(content_type)
    if transfer_syntax is not None:
        if not wants_dicom:
            raise InvalidParameter("transferSyntax", "only allowed with contentType=application/dicom (PS3.18 9.4.2)")
        if not uids.is_valid_uid(transfer_syntax):
            raise InvalidParameter("transferSyntax", f"not a valid Transfer Syntax UID: {transfer_syntax[:70]!r}")
    if anonymize is not None and anonymize.lower() != "no":
        raise NotAcceptable("de-identified copies (anonymize=yes) are not supported", offered=(mediatypes.DICOM,))
    if not wants_dicom:
        rendering = uri_options(
            uri_media_type(content_type),
            window_center=window_center,
            window_width=window_width,
            rows=rows,
            columns=columns,
            region=region,
            frame_number=frame_number,
            image_quality=image_quality,
            annotation=annotation,
        )
        return await _rendered(request, retrieve, render, settings, (study_uid, series_uid, instance_uid), rendering)
    offers = [Offer(mediatypes.DICOM, transfer_syntax, False)]
    plan = await retrieve.plan_instances(
        offers, base_url(request, settings), study_uid, series_uid, instance_uid, single_part_ok=True
    )
    headers = cache_headers(plan.etag, plan.max_age)
    del headers["Vary"]  # the query string names the representation
    if not_modified(request, plan.etag):
        return Response(b"", status_code=304, headers=headers)
    body = await plan.build()
    part = body.parts[0]
    length = body.length(uuid.uuid4().hex)
    if length is not None:
        headers["Content-Length"] = str(length)
    headers["Content-Disposition"] = f'attachment; filename="{instance_uid}.dcm"'
    return Stream(part.chunks(), media_type=mediatypes.DICOM, headers=headers)


async def _rendered(
    request: Request[Any, Any, Any],
    retrieve: RetrieveDep,
    render: RenderDep,
    settings: SettingsDep,
    target: tuple[uids.UID, uids.UID, uids.UID],
    rendering: UriRendering,
) -> Response[Any]:
    """The object rendered (PS3.18 9): one frame as a single image; the query string names the
    representation, so there is no Vary."""
    options = rendering.parsed.options
    plan = await render.plan_frames(base_url(request, settings), *target, [rendering.frame], options)
    headers = cache_headers(plan.etag, plan.max_age)
    del headers["Vary"]
    if not_modified(request, plan.etag):
        return Response(b"", status_code=304, headers=headers)
    body = await plan.build()
    if rendering.parsed.warnings:
        headers["Warning"] = ", ".join(warning_header(text) for text in rendering.parsed.warnings)
    data = b"".join([chunk async for chunk in body.parts[0].chunks()])
    return Response(data, media_type=options.media_type, headers=headers)


ROUTES = [wado_uri]
