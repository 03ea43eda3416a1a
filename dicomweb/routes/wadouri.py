"""WADO-URI (PS3.18 9): `GET /wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..&contentType=..`.

Only the DICOM representation (`contentType=application/dicom`, PS3.18 9.4) is served; rendered media types
(image/jpeg, the default when contentType is absent, PS3.18 9.5) are answered 406 with a reason rather than
with something else. The response is a single `application/dicom` part with no media type parameters
(transfer-syntax parameters are forbidden in the URI service, PS3.18 8.7.3.5.2); the Part 10 file's own
Transfer Syntax UID says how it is encoded.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from litestar import Request, Response, get
from litestar.params import QueryParameter
from litestar.response import Stream

from authz.guard import authz_opt
from dicomweb import mediatypes, uids
from dicomweb.errors import BadRequest, InvalidParameter, NotAcceptable
from dicomweb.negotiate import Offer
from dicomweb.retrieve import RetrieveService
from dicomweb.routes.common import base_url
from dicomweb.routes.wado import BINARY, cache_headers, not_modified
from server.resources import ResourcesDep

_RENDERED_DEFAULT = "image/jpeg"


def _required_uid(value: str | None, name: str) -> uids.UID:
    if value is None or value == "":
        raise InvalidParameter(name, "required by WADO-URI (PS3.18 9.2)")
    return uids.UID(value, what=name)


def _wants_dicom(content_type: str | None) -> bool:
    """Is application/dicom among the contentType values (PS3.18 9.2.3.1)? Anything else is rendering."""
    if content_type is None or not content_type.strip():
        return False
    try:
        ranges = mediatypes.parse_accept([content_type])
    except BadRequest:
        raise InvalidParameter("contentType", f"not a list of media types: {content_type[:80]!r}") from None
    return any(r.essence == mediatypes.DICOM for r in ranges)


@get("/wado", opt={**BINARY, **authz_opt("read", "instance")})
async def wado_uri(
    request: Request[Any, Any, Any],
    resources: ResourcesDep,
    request_type: Annotated[str | None, QueryParameter(name="requestType")] = None,
    study: Annotated[str | None, QueryParameter(name="studyUID")] = None,
    series: Annotated[str | None, QueryParameter(name="seriesUID")] = None,
    instance: Annotated[str | None, QueryParameter(name="objectUID")] = None,
    content_type: Annotated[str | None, QueryParameter(name="contentType")] = None,
    transfer_syntax: Annotated[str | None, QueryParameter(name="transferSyntax")] = None,
    anonymize: Annotated[str | None, QueryParameter(name="anonymize")] = None,
) -> Response[Any]:
    if request_type != "WADO":
        raise InvalidParameter("requestType", "must be WADO (PS3.18 9.2.1)")
    study_uid = _required_uid(study, "studyUID")
    series_uid = _required_uid(series, "seriesUID")
    instance_uid = _required_uid(instance, "objectUID")
    wants_dicom = _wants_dicom(content_type)
    if transfer_syntax is not None:
        if not wants_dicom:
            raise InvalidParameter("transferSyntax", "only allowed with contentType=application/dicom (PS3.18 9.4.2)")
        if not uids.is_valid_uid(transfer_syntax):
            raise InvalidParameter("transferSyntax", f"not a valid Transfer Syntax UID: {transfer_syntax[:70]!r}")
    if not wants_dicom:
        raise NotAcceptable(
            f"rendered WADO-URI responses ({content_type or _RENDERED_DEFAULT}) are not implemented yet; "
            "ask for contentType=application/dicom",
            offered=(mediatypes.DICOM,),
        )
    if anonymize is not None and anonymize.lower() != "no":
        raise NotAcceptable("de-identified copies (anonymize=yes) are not supported", offered=(mediatypes.DICOM,))
    offers = [Offer(mediatypes.DICOM, transfer_syntax, False)]
    plan = await RetrieveService(resources.pool, resources.blobs).plan_instances(
        offers, base_url(request, resources), study_uid, series_uid, instance_uid, single_part_ok=True
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


ROUTES = [wado_uri]
