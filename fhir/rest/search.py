"""FHIR R4 search over HTTP (https://hl7.org/fhir/R4/http.html#search, R4 3.1.1.1.2): `GET /fhir/{Type}?...`
and `POST /fhir/{Type}/_search` (parameters in an `application/x-www-form-urlencoded` body, and in the URL)
for ImagingStudy, DiagnosticReport, Patient, Endpoint and Subscription; the answer is a `searchset` Bundle
(`application/fhir+json`). Parameters and semantics: `fhir.search.query`. A Subscription search lists the caller's own
Subscriptions only (`fhir.types.ResourceType.owned`).

The policy decides `search` on the type; its constraints (care lists, consent, patient-context tokens, excluded
modalities) become conditions of the SQL, so pages and totals only see permitted rows. Included fhir and
chain targets of another type are subject to the policy's decision on searching THAT type (left out when it is
denied), decided by `fhir.rest.interactions.search_access` exactly as for a search entry of a batch or transaction. With
`Prefer: handling=strict`, unknown parameters are a 400 instead of a warning in an outcome entry.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from litestar import Request, Response, get, post

from authz.errors import Forbidden
from authz.guard import authz_opt, decision_of
from dicomweb.routes.common import dicom_json
from fhir.audit.routes import fhir_base
from fhir.audit.search import strict_handling
from fhir.errors import FhirError
from fhir.outcome import FHIR_JSON
from fhir.rest.instance import caller_of, note_break_glass
from fhir.rest.interactions import search_access
from fhir.search.service import search_bundle
from fhir.services import FhirDep
from fhir.types import TYPES

SEARCHABLE = ("ImagingStudy", "DiagnosticReport", "Patient", "Endpoint", "Subscription")
FORM = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024


class UnsupportedMediaType(FhirError):
    status = 415
    code = "not-supported"


async def _search(
    request: Request[Any, Any, Any], fhir: FhirDep, resource_type: str, items: list[tuple[str, str]]
) -> Response[bytes]:
    decision = decision_of(request.scope)
    if decision is None:  # the guard decides every route; never search without its decision
        raise Forbidden("no policy decision for this search")
    caller = caller_of(request)
    access = await search_access(caller, resource_type, decision)
    strict = strict_handling(request.headers.getall("prefer", []))
    async with fhir.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # page, total, includes agree
            body = await search_bundle(
                conn, resource_type, items, base=fhir_base(request, fhir.settings), access=access, strict=strict
            )
    note_break_glass(request, caller)
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

    async def search_get(request: Request[Any, Any, Any], fhir: FhirDep) -> Response[bytes]:
        return await _search(request, fhir, resource_type, list(request.query_params.multi_items()))

    async def search_post(request: Request[Any, Any, Any], fhir: FhirDep) -> Response[bytes]:
        items = list(request.query_params.multi_items()) + await _form(request)
        return await _search(request, fhir, resource_type, items)

    name = resource_type.lower()
    search_get.__name__ = search_get.__qualname__ = f"search_{name}"
    search_post.__name__ = search_post.__qualname__ = f"search_{name}_post"
    common: dict[str, Any] = dict(opt=authz_opt("search", kind), media_type=FHIR_JSON)
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
