"""FHIR R4 search over HTTP (https://hl7.org/fhir/R4/http.html#search, R4 3.1.1.1.2): `GET /fhir/{Type}?...`
and `POST /fhir/{Type}/_search` (parameters in an `application/x-www-form-urlencoded` body, and in the URL)
for ImagingStudy, DiagnosticReport, Patient and Endpoint; the answer is a `searchset` Bundle
(`application/fhir+json`). Parameters and semantics: `fhir.search`.

The policy decides `search` on the type; its constraints (care lists, consent, patient-context tokens, excluded
modalities) become conditions of the SQL, so pages and totals only see permitted rows. Included resources of
another type are subject to the policy's decision on searching that type (left out when it is denied). With
`Prefer: handling=strict`, unknown parameters are a 400 instead of a warning in an outcome entry.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import parse_qsl

from litestar import Request, Response, get, post

from authz.authn import principal_of
from authz.decision import Decision, Resource
from authz.errors import Forbidden
from authz.guard import authz_opt, break_glass_of, decision_of
from authz.policy_input import policy_input
from dicomweb.access import AccessConstraints, UnknownConstraint
from dicomweb.routes.common import dicom_json
from fhir.auditsearch import strict_handling
from fhir.errors import FhirError
from fhir.outcome import EXCEPTION_HANDLERS, FHIR_JSON
from fhir.routes_audit import fhir_base
from fhir.search import IncludeAccess, search_bundle
from fhir.types import TYPES
from server.resources import Resources, ResourcesDep

SEARCHABLE = ("ImagingStudy", "DiagnosticReport", "Patient", "Endpoint")
FORM = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024


class UnsupportedMediaType(FhirError):
    status = 415
    code = "not-supported"


def constraints_of(decision: Decision | None) -> AccessConstraints:
    """The policy's search constraints; 403 when there is no decision or a constraint cannot be enforced."""
    if decision is None:  # the guard decides every route; never search without its decision
        raise Forbidden("no policy decision for this search")
    try:
        return AccessConstraints.from_policy(decision.constraints)
    except UnknownConstraint as exc:
        raise Forbidden(str(exc), decision) from None


def include_access(request: Request[Any, Any, Any], resources: Resources, searched: str) -> IncludeAccess:
    """The constraints on included resources of each type: the policy's decision on searching that type."""
    own = constraints_of(decision_of(request.scope))
    known: dict[str, AccessConstraints | None] = {searched: own}
    client = request.scope.get("client")

    async def access(resource_type: str) -> AccessConstraints | None:
        if resource_type not in known:
            served = TYPES.get(resource_type)
            if served is None:
                return None
            subject = policy_input(
                principal_of(request),
                "search",
                Resource(kind=served.kind),
                client[0] if client else None,
                break_glass_of(request.scope),
                now=dt.datetime.now(dt.UTC),
            )
            decision = await resources.policy.decide(subject)
            try:
                known[resource_type] = AccessConstraints.from_policy(decision.constraints) if decision.allow else None
            except UnknownConstraint:
                known[resource_type] = None
        return known[resource_type]

    return access


async def _search(
    request: Request[Any, Any, Any], resources: Resources, resource_type: str, items: list[tuple[str, str]]
) -> Response[bytes]:
    constraints = constraints_of(decision_of(request.scope))
    strict = strict_handling(request.headers.getall("prefer", []))
    async with resources.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # page, total, includes agree
            body = await search_bundle(
                conn,
                resources,
                resource_type,
                items,
                base=fhir_base(request, resources),
                constraints=constraints,
                strict=strict,
                include_access=include_access(request, resources, resource_type),
            )
    return Response(dicom_json(body), media_type=FHIR_JSON)


async def _form(request: Request[Any, Any, Any]) -> list[tuple[str, str]]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if not raw:
        return []
    if media_type != FORM:
        raise UnsupportedMediaType(f"POST _search takes {FORM} (R4 3.1.1.1.2), not {media_type or 'no type'}")
    if len(raw) > MAX_FORM_BYTES:
        raise FhirError(f"the search form is larger than {MAX_FORM_BYTES} bytes")
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FhirError(f"the search form cannot be read: {exc}") from None


def _routes(resource_type: str) -> list[Any]:
    kind = TYPES[resource_type].kind

    async def search_get(request: Request[Any, Any, Any], resources: ResourcesDep) -> Response[bytes]:
        return await _search(request, resources, resource_type, list(request.query_params.multi_items()))

    async def search_post(request: Request[Any, Any, Any], resources: ResourcesDep) -> Response[bytes]:
        items = list(request.query_params.multi_items()) + await _form(request)
        return await _search(request, resources, resource_type, items)

    name = resource_type.lower()
    search_get.__name__ = search_get.__qualname__ = f"search_{name}"
    search_post.__name__ = search_post.__qualname__ = f"search_{name}_post"
    common: dict[str, Any] = dict(
        opt=authz_opt("search", kind), exception_handlers=EXCEPTION_HANDLERS, media_type=FHIR_JSON
    )
    return [
        get(f"/{resource_type}", summary=f"Search {resource_type} (FHIR R4 search)", **common)(search_get),
        post(
            f"/{resource_type}/_search",
            status_code=200,
            summary=f"Search {resource_type} with a form body (FHIR R4 search by POST)",
            **common,
        )(search_post),
    ]


ROUTES: list[Any] = [route for resource_type in SEARCHABLE for route in _routes(resource_type)]
