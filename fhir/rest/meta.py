"""FHIR discovery: `GET /fhir/metadata` (the CapabilityStatement, R4 3.1.0.13), SMART App Launch discovery at
`[base]/.well-known/smart-configuration` (and at the server root, where some clients look), and our custom
SearchParameter resource. These are in the default `HOUNSFIELD_AUTH_PUBLIC_PATHS` (clients read them before
they have a token; they carry no patient data); they still declare an authorization rule for servers that
take them out of that list."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.params import FromPath

from authz.deps import AuthzSettingsDep
from authz.guard import authz_opt
from fhir.audit.routes import fhir_base
from fhir.capability import IMAGING_STUDY_PARAM, capability_statement, search_parameter, smart_configuration
from fhir.errors import ResourceNotFound
from fhir.outcome import FHIR_JSON


@get("/metadata", opt=authz_opt("read", "system"))
async def metadata(request: Request[Any, Any, Any], settings: AuthzSettingsDep) -> Response[dict[str, Any]]:
    """The CapabilityStatement: exactly the interactions and search parameters this server implements."""
    body = capability_statement(fhir_base(request, settings), settings)
    return Response(body, media_type=FHIR_JSON)


@get("/SearchParameter/{rid:str}", opt=authz_opt("read", "system"))
async def read_search_parameter(
    request: Request[Any, Any, Any], settings: AuthzSettingsDep, rid: FromPath[str]
) -> Response[dict[str, Any]]:
    if rid != IMAGING_STUDY_PARAM:
        raise ResourceNotFound(f"SearchParameter/{rid} is not known")
    return Response(search_parameter(fhir_base(request, settings)), media_type=FHIR_JSON)


@get("/.well-known/smart-configuration", opt=authz_opt("read", "system"))
async def smart(settings: AuthzSettingsDep) -> Response[dict[str, Any]]:
    return Response(smart_configuration(settings), media_type="application/json")


@get("/.well-known/smart-configuration", opt=authz_opt("read", "system"), name="smart-root")
async def smart_root(settings: AuthzSettingsDep) -> Response[dict[str, Any]]:
    """The same document at the server root."""
    return Response(smart_configuration(settings), media_type="application/json")


ROUTES = [metadata, read_search_parameter, smart]
ROOT_ROUTES = [smart_root]
