"""The FHIR R4 RESTful interactions on one resource over HTTP (https://hl7.org/fhir/R4/http.html), for every
type in `fhir.types.TYPES`, built per type because each type is its own policy kind (the work itself is in
`fhir.rest.interactions`):

- `GET [base]/{T}/{id}` read (404 unknown, 410 deleted), `GET [base]/{T}/{id}/_history/{vid}` vread,
  `GET [base]/{T}/{id}/_history` the resource's `history` Bundle (`_count`, `_since`, `_offset`). Answers carry
  `ETag: W/"<version>"` and `Last-Modified`.
- Writable types: `POST [base]/{T}` create (201 with `Location: [base]/{T}/{id}/_history/{v}`; `If-None-Exist`),
  `PUT [base]/{T}/{id}` update (`If-Match`), `DELETE [base]/{T}/{id}` (204; 200 with an OperationOutcome under
  `Prefer: return=OperationOutcome`). `Prefer: return=minimal|representation|OperationOutcome` (R4 3.1.0.1.7;
  default representation). Read-only types (derived from the archive) answer 405 to create, update, delete.
- Formats (`fhir.validation`): bodies must be FHIR JSON (415); XML is never answered (406); answers are
  `application/fhir+json; charset=utf-8`.

Authorization: the guard decides on the stored resource as filed now (read, history, update, delete), on the
version as filed when it was written (vread), or, for create, on the patient the new resource names
(`new_resource` reads the body's subject: the policy sees the patient of a report before it exists). A write
whose content names another patient than the one decided on is decided again for that patient
(`fhir.rest.interactions.Caller.require`), and a denial is what the request's audit record says. A history Bundle
holds only the versions the caller may read, each decided on its own filing (`fhir.rest.interactions.history_bundle`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from litestar import Request, Response, delete, get, post, put
from litestar.connection import ASGIConnection
from litestar.params import FromPath

from authz.decision import Resource
from authz.guard import RESOURCE, authz_opt, decision_of, request_actor
from authz.recording import BREAK_GLASS_USED
from dicomweb.routes.common import dicom_json
from fhir.audit.routes import fhir_base
from fhir.errors import FhirError
from fhir.outcome import FHIR_JSON, issue, operation_outcome
from fhir.repository import Stored
from fhir.rest.access import stored_resource, stored_version
from fhir.rest.interactions import (
    Caller,
    Written,
    create,
    history_bundle,
    http_date,
    location,
    read,
    remove,
    update,
    vread,
    writable,
)
from fhir.services import FhirDep, fhir_services
from fhir.types import TYPES, ResourceType
from fhir.validation import check_accept, check_content_type, parse_json

FHIR_JSON_UTF8 = f"{FHIR_JSON}; charset=utf-8"
AnyRequest = Request[Any, Any, Any]
REPRESENTATION, MINIMAL, OUTCOME = "representation", "minimal", "OperationOutcome"


# --- HTTP ---------------------------------------------------------------------------------------------------


def prefer_return(request: Request[Any, Any, Any]) -> str:
    """`Prefer: return=...` (R4 3.1.0.1.7); representation when absent or unknown."""
    for header in request.headers.getall("prefer", []):
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            if name.strip().lower() == "return" and value.strip().strip('"') in {MINIMAL, OUTCOME, REPRESENTATION}:
                return value.strip().strip('"')
    return REPRESENTATION


def caller_of(request: Request[Any, Any, Any]) -> Caller:
    """The request's actor, for decisions after the guard's; a denial is recorded in the request's state."""
    return Caller(request_actor(request), request.scope.setdefault("state", {}))


def note_break_glass(request: Request[Any, Any, Any], caller: Caller) -> None:
    """The request's audit record is flagged when a decision after the guard's was a break-glass one."""
    if caller.flagged:
        request.scope.setdefault("state", {})[BREAK_GLASS_USED] = True


def negotiate(request: Request[Any, Any, Any]) -> None:
    check_accept(request.headers.get("accept"), request.query_params.get("_format"))


async def request_body(request: Request[Any, Any, Any]) -> Any:
    negotiate(request)
    check_content_type(request.headers.get("content-type"))
    return parse_json(await request.body())


def version_headers(stored: Stored) -> dict[str, str]:
    return {"ETag": stored.etag, "Last-Modified": http_date(stored.last_updated)}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(dicom_json(body), status_code=status, headers=headers or {}, media_type=FHIR_JSON_UTF8)


def written_response(written: Written, prefer: str, base: str, message: str) -> Response[bytes]:
    """A write's answer: headers always; the body as `Prefer` asks."""
    stored = written.stored
    if stored is None:  # a delete of nothing
        if prefer == OUTCOME:
            return json_response(operation_outcome(issue("informational", message, "information")))
        return Response(b"", status_code=204)
    headers = version_headers(stored)
    if written.status == 201 or (stored.method == "POST" and written.status == 200):
        headers["Location"] = location(base, stored)
    if stored.deleted:
        if prefer == OUTCOME:
            return json_response(operation_outcome(issue("informational", message, "information")), 200, headers)
        return Response(b"", status_code=204, headers=headers)
    if prefer == MINIMAL:
        return Response(b"", status_code=written.status, headers=headers)
    if prefer == OUTCOME:
        return json_response(operation_outcome(issue("informational", message, "information")), written.status, headers)
    return json_response(stored.content, written.status, headers)


def new_resource(resource_type: str) -> Any:
    """A resource hook for create: the policy sees the patient the new resource would be filed under (its
    subject Patient's DICOM Patient ID). A body that cannot be read leaves the resource bare: the handler then
    answers 400/415."""

    async def hook(connection: ASGIConnection[Any, Any, Any, Any], resource: Resource) -> Resource:
        if not isinstance(connection, Request):
            return resource
        try:
            check_content_type(connection.headers.get("content-type"))
            body = json.loads(await connection.body())
        except (FhirError, ValueError, RecursionError):
            return resource
        fhir = fhir_services(connection.app)
        subject = body.get("subject") if isinstance(body, dict) else None
        ref = subject.get("reference") if isinstance(subject, dict) else None
        if not isinstance(ref, str):
            return resource
        ref = ref.removeprefix(fhir_base(connection, fhir.settings) + "/")
        rtype, _, rid = ref.partition("/")
        if rtype != "Patient" or not rid:
            return resource
        async with fhir.pool.acquire() as conn:
            patient_key = await fhir.repository.patient_key_of(conn, rid)
        return dataclasses.replace(resource, patient_id=patient_key)

    return hook


def _guard_resource(request: Request[Any, Any, Any]) -> Resource | None:
    resource = request.scope.get("state", {}).get(RESOURCE)
    return resource if isinstance(resource, Resource) and decision_of(request.scope) is not None else None


def type_routes(spec: ResourceType) -> list[Any]:
    """The read, vread, history, create, update and delete routes of one type."""
    name, kind = spec.name, spec.kind
    one = f"/{name}/{{rid:str}}"
    on_stored = stored_resource(name)
    common: dict[str, Any] = {"media_type": FHIR_JSON_UTF8}

    @get(one, opt=authz_opt("read", kind, resource=on_stored), summary=f"Read a {name} (FHIR R4 read)", **common)
    async def read_one(request: AnyRequest, fhir: FhirDep, rid: FromPath[str]) -> Response[bytes]:
        negotiate(request)
        caller = caller_of(request)
        async with fhir.pool.acquire() as conn:
            stored = await read(conn, fhir, caller, name, rid, decided=_guard_resource(request))
        return json_response(stored.content, headers=version_headers(stored))

    @get(
        f"{one}/_history/{{vid:str}}",
        opt=authz_opt("read", kind, resource=stored_version(name)),
        summary=f"vread {name}",
        **common,
    )
    async def vread_one(
        request: Request[Any, Any, Any], fhir: FhirDep, rid: FromPath[str], vid: FromPath[str]
    ) -> Response[bytes]:
        negotiate(request)
        caller = caller_of(request)
        async with fhir.pool.acquire() as conn:
            stored = await vread(conn, fhir, caller, name, rid, vid, decided=_guard_resource(request))
        note_break_glass(request, caller)
        return json_response(stored.content, headers=version_headers(stored))

    @get(f"{one}/_history", opt=authz_opt("read", kind, resource=on_stored), summary=f"History of a {name}", **common)
    async def history_one(request: AnyRequest, fhir: FhirDep, rid: FromPath[str]) -> Response[bytes]:
        negotiate(request)
        items = list(request.query_params.multi_items())
        caller = caller_of(request)
        base = fhir_base(request, fhir.settings)
        async with fhir.pool.acquire() as conn:
            bundle = await history_bundle(conn, fhir, caller, name, rid, items, base, decided=_guard_resource(request))
        note_break_glass(request, caller)
        return json_response(bundle)

    @post(f"/{name}", opt=authz_opt("create", kind, resource=new_resource(name)), summary=f"Create a {name}", **common)
    async def create_one(request: Request[Any, Any, Any], fhir: FhirDep) -> Response[bytes]:
        writable(name)
        body = await request_body(request)
        base = fhir_base(request, fhir.settings)
        caller = caller_of(request)
        async with fhir.pool.acquire() as conn, conn.transaction():
            written = await create(
                conn,
                fhir,
                caller,
                name,
                body,
                base=base,
                decided=_guard_resource(request),
                if_none_exist=request.headers.get("if-none-exist"),
            )
        return written_response(written, prefer_return(request), base, f"{name} created")

    @put(one, opt=authz_opt("update", kind, resource=on_stored), summary=f"Update a {name}", **common)
    async def update_one(request: AnyRequest, fhir: FhirDep, rid: FromPath[str]) -> Response[bytes]:
        writable(name)
        body = await request_body(request)
        base = fhir_base(request, fhir.settings)
        caller = caller_of(request)
        async with fhir.pool.acquire() as conn, conn.transaction():
            written = await update(
                conn,
                fhir,
                caller,
                name,
                rid,
                body,
                base=base,
                decided=_guard_resource(request),
                if_match=request.headers.get("if-match"),
            )
        return written_response(written, prefer_return(request), base, f"{name}/{rid} updated")

    @delete(
        one, opt=authz_opt("delete", kind, resource=on_stored), summary=f"Delete a {name}", status_code=200, **common
    )
    async def delete_one(request: AnyRequest, fhir: FhirDep, rid: FromPath[str]) -> Response[bytes]:
        writable(name)
        negotiate(request)
        async with fhir.pool.acquire() as conn, conn.transaction():
            written = await remove(conn, fhir, caller_of(request), name, rid, if_match=request.headers.get("if-match"))
        message = f"{name}/{rid} deleted" if written.stored is not None else f"{name}/{rid} did not exist"
        return written_response(written, prefer_return(request), fhir_base(request, fhir.settings), message)

    return [read_one, vread_one, history_one, create_one, update_one, delete_one]


ROUTES: list[Any] = [route for spec in TYPES.values() for route in type_routes(spec)]
