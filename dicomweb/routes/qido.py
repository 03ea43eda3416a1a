"""QIDO-RS: search for studies, series and instances (PS3.18 10.6).

Six pool, settings (Table 10.6.1-1); each parses its path UIDs and query into a `dicomweb.search.query.Query`, runs it
through `dicomweb.search.service`, and answers `application/dicom+json` (or `application/json` when that is what the
client asks for): a JSON array, `[]` when nothing matches (PS3.18 10.6.3.2 allows 200 with an empty
array). Keys the server ignores, and results cut at the server's maximum, are reported in `Warning: 299`
headers (PS3.18 8.3.4.1, 8.3.4.4).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.params import FromPath

from authz.errors import Forbidden
from authz.guard import authz_opt, decision_of
from dicomweb import uids
from dicomweb.codecs import mediatypes
from dicomweb.deps import SettingsDep
from dicomweb.errors import NotAcceptable
from dicomweb.routes.common import base_url, dicom_json
from dicomweb.search.access import AccessConstraints
from dicomweb.search.query import Level, parse_query
from dicomweb.search.service import search
from dicomweb.uids import UID
from server.platform.deps import PoolDep
from server.platform.http import warning_header


def response_type(request: Request[Any, Any, Any]) -> str:
    """The media type to answer with: the `accept` query parameter, else the Accept header (PS3.18 8.7.5)."""
    ranges = mediatypes.accept_from_request(
        request.query_params.getall("accept", []), request.headers.getall("accept", [])
    )
    for candidate in ranges:
        if candidate.essence == mediatypes.JSON:
            return mediatypes.JSON
        if candidate.matches(mediatypes.DICOM_JSON):
            return mediatypes.DICOM_JSON
    raise NotAcceptable(
        "search results are available as application/dicom+json or application/json",
        offered=(mediatypes.DICOM_JSON, mediatypes.JSON),
    )


async def _search(
    request: Request[Any, Any, Any],
    pool: PoolDep,
    settings: SettingsDep,
    level: Level,
    study: UID | None = None,
    series: UID | None = None,
) -> Response[bytes]:
    media_type = response_type(request)
    query = parse_query(level, list(request.query_params.multi_items()), study_uid=study, series_uid=series)
    decision = decision_of(request.scope)
    if decision is None:  # the guard decides every non-public route; never search unconstrained without it
        raise Forbidden("no policy decision for this search")
    access = AccessConstraints.from_policy(decision.constraints)
    result = await search(pool, query, base_url(request, settings), access)
    headers = {}
    if result.warnings:
        headers["Warning"] = ", ".join(warning_header(w) for w in result.warnings[:20])
    body = dicom_json(result.matches)
    return Response(body, status_code=200, media_type=media_type, headers=headers)


@get("/studies", opt=authz_opt("search", "study"))
async def search_studies(request: Request[Any, Any, Any], pool: PoolDep, settings: SettingsDep) -> Response[bytes]:
    return await _search(request, pool, settings, Level.STUDY)


@get("/series", opt=authz_opt("search", "series"))
async def search_all_series(request: Request[Any, Any, Any], pool: PoolDep, settings: SettingsDep) -> Response[bytes]:
    return await _search(request, pool, settings, Level.SERIES)


@get("/studies/{study:str}/series", opt=authz_opt("search", "series"))
async def search_series(
    request: Request[Any, Any, Any], pool: PoolDep, settings: SettingsDep, study: FromPath[str]
) -> Response[bytes]:
    return await _search(request, pool, settings, Level.SERIES, uids.study_uid(study))


@get("/instances", opt=authz_opt("search", "instance"))
async def search_all_instances(
    request: Request[Any, Any, Any], pool: PoolDep, settings: SettingsDep
) -> Response[bytes]:
    return await _search(request, pool, settings, Level.INSTANCE)


@get("/studies/{study:str}/instances", opt=authz_opt("search", "instance"))
async def search_study_instances(
    request: Request[Any, Any, Any], pool: PoolDep, settings: SettingsDep, study: FromPath[str]
) -> Response[bytes]:
    return await _search(request, pool, settings, Level.INSTANCE, uids.study_uid(study))


@get("/studies/{study:str}/series/{series:str}/instances", opt=authz_opt("search", "instance"))
async def search_series_instances(
    request: Request[Any, Any, Any],
    pool: PoolDep,
    settings: SettingsDep,
    study: FromPath[str],
    series: FromPath[str],
) -> Response[bytes]:
    return await _search(request, pool, settings, Level.INSTANCE, uids.study_uid(study), uids.series_uid(series))


ROUTES = [
    search_studies,
    search_all_series,
    search_series,
    search_all_instances,
    search_study_instances,
    search_series_instances,
]
