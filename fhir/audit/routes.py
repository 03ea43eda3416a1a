"""The audit trail for security teams, as FHIR R4 AuditEvent fhir (IHE BALP records rendered by
`authz.auditevent`). Mounted under `/fhir`:

- `GET /fhir/AuditEvent?...`: search (https://hl7.org/fhir/R4/auditevent.html#search; parameters in
  `fhir.audit.search`): a `searchset` Bundle, newest first (`_sort=date` for oldest first), `_count` entries a
  page (default 100, at most 1000) with `self` and `next` links (keyset paging on the chain position, so
  records appended meanwhile never shift a page). Unknown parameters are ignored, left out of the self link and
  reported in an OperationOutcome entry (search mode `outcome`); with `Prefer: handling=strict` they are a 400.
- `GET /fhir/AuditEvent/{id}`: read; the id is the record's position in the hash chain.
- `GET /fhir/AuditEvent/$export?_since=T&_until=T&<search parameters>`: every match in chain order as
  `application/fhir+ndjson`, one AuditEvent a line, streamed from a database cursor in one snapshot. A
  synchronous export: not the asynchronous kick-off/poll pattern of FHIR Bulk Data `$export`.
- `GET /fhir/AuditEvent/$verify`: re-hash the whole chain and check the chain head and every signed checkpoint
  with the server's key, and the chain against the anchored checkpoints of the file and S3 sinks (what
  `hounsfield audit verify` does); JSON `{ok, checked, head_seq, checkpoints, last_checkpoint, anchored,
  last_anchored, problems: [{seq, kind, detail}]}`, 200 whether or not the trail is intact.

Errors are OperationOutcome fhir (`fhir.outcome`). The policy decides with action search, read or export
on kind `AuditEvent` (auditor and admin roles; authz/policies/tables.rego); reading the trail is itself audited
like any request (authz/recording.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import anyio.to_thread
from litestar import MediaType, Request, Response, get
from litestar.params import FromPath
from litestar.response import Stream

from authz import auditquery, keys
from authz.audit import key_verifier
from authz.auditanchor import AnchorError, read_anchored
from authz.auditevent import to_fhir
from authz.auditquery import AuditFilter, Page, Row, UnenforceableConstraint
from authz.auditrecord import AuditRecord
from authz.auditverify import verify
from authz.deps import AnchorsDep, AuthzSettingsDep
from authz.errors import Forbidden
from authz.guard import authz_opt, decision_of
from dicomweb.routes.common import DICOMWEB_ROOT, base_url, dicom_json
from fhir.audit.search import AuditSearch, parse_export, parse_search, strict_handling
from fhir.outcome import (
    FHIR_JSON,
    FHIR_NDJSON,
    RecordDamaged,
    ResourceNotFound,
    issue,
    operation_outcome,
)
from fhir.services import FhirDep
from server.platform.deps import PoolDep
from server.platform.settings import PlatformSettings

log = logging.getLogger(__name__)

FHIR_ROOT = "/fhir"
EXPORT_BATCH = 1000


def fhir_base(request: Request[Any, Any, Any], settings: PlatformSettings) -> str:
    """The FHIR base URL (R4 3.1.0.1.2): configured, or from the request's Host."""
    return base_url(request, settings).removesuffix(DICOMWEB_ROOT) + FHIR_ROOT


def _restricted(request: Request[Any, Any, Any], flt: AuditFilter) -> AuditFilter:
    """The filter within the policy's constraints: searches never see more than the decision allows."""
    decision = decision_of(request.scope)
    if decision is None:  # the guard decides every route; never search without its decision
        raise Forbidden("no policy decision for this search")
    try:
        return flt.restricted(decision.constraints)
    except UnenforceableConstraint as exc:
        raise Forbidden(str(exc), decision) from None


def _record(row: Row) -> AuditRecord | None:
    try:
        return AuditRecord.from_json(json.loads(row.record))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("audit record %d cannot be read: %s", row.seq, exc)
        return None


def damaged_detail(seq: int) -> str:
    return f"audit record {seq} cannot be read: the trail may have been altered (see $verify)"


def _search_request(request: Request[Any, Any, Any]) -> tuple[bool, list[tuple[str, str]]]:
    return strict_handling(request.headers.getall("prefer", [])), list(request.query_params.multi_items())


def searchset(base: str, search: AuditSearch, page: Page) -> dict[str, Any]:
    """The R4 `searchset` Bundle of one page (R4 3.1.1.6 paging links; 3.1.1.7 outcome entries)."""
    url = f"{base}/AuditEvent"
    entries: list[dict[str, Any]] = []
    damaged: list[int] = []
    for row in page.rows:
        record = _record(row)
        if record is None:
            damaged.append(row.seq)
            continue
        event = to_fhir(record, row.seq, recorded_at=row.recorded_at)
        entries.append({"fullUrl": f"{url}/{row.seq}", "resource": event, "search": {"mode": "match"}})
    issues = [issue("not-supported", f"search parameter {name} was ignored", "warning") for name in search.ignored]
    issues += [issue("exception", damaged_detail(seq)) for seq in damaged]
    if issues:
        entries.append({"resource": operation_outcome(*issues), "search": {"mode": "outcome"}})
    links = [{"relation": "self", "url": f"{url}?{urlencode(search.link_params(), safe=':|,/')}"}]
    if page.more and page.rows:
        query = urlencode(search.link_params(after=page.rows[-1].seq), safe=":|,/")
        links.append({"relation": "next", "url": f"{url}?{query}"})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "searchset",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if page.total is not None:
        bundle["total"] = page.total
    bundle["link"] = links
    if entries:
        bundle["entry"] = entries
    return bundle


@get(
    "/AuditEvent",
    opt=authz_opt("search", "AuditEvent"),
    media_type=FHIR_JSON,
    summary="Search the audit trail (FHIR R4 AuditEvent search)",
)
async def search_audit_events(request: Request[Any, Any, Any], fhir: FhirDep) -> Response[bytes]:
    strict, items = _search_request(request)
    search = parse_search(items, strict=strict)
    page = await auditquery.search(
        fhir.pool,
        _restricted(request, search.filter),
        count=search.count,
        newest_first=search.newest_first,
        after=search.after,
        total=search.total,
    )
    bundle = searchset(fhir_base(request, fhir.settings), search, page)
    return Response(dicom_json(bundle), media_type=FHIR_JSON)


async def _ndjson(pool: PoolDep, flt: AuditFilter) -> AsyncIterator[bytes]:
    """One AuditEvent a line, a database batch at a time. An unreadable record is left out (and logged); a
    failure part way ends the response without its final chunk, so the client sees an incomplete transfer."""
    async for rows in auditquery.export(pool, flt, batch=EXPORT_BATCH):
        chunk = bytearray()
        for row in rows:
            record = _record(row)
            if record is not None:
                chunk += dicom_json(to_fhir(record, row.seq, recorded_at=row.recorded_at)) + b"\n"
        if chunk:
            yield bytes(chunk)


@get(
    "/AuditEvent/$export",
    opt=authz_opt("export", "AuditEvent"),
    media_type=FHIR_NDJSON,
    summary="Export the audit trail as FHIR AuditEvent NDJSON, in chain order",
)
async def export_audit_events(request: Request[Any, Any, Any], fhir: FhirDep) -> Stream:
    strict, items = _search_request(request)
    flt = _restricted(request, parse_export(items, strict=strict))
    return Stream(_ndjson(fhir.pool, flt), media_type=FHIR_NDJSON)


@get(
    "/AuditEvent/$verify",
    opt=authz_opt("read", "AuditEvent"),
    media_type=MediaType.JSON,
    summary="Verify the audit trail's hash chain and signed checkpoints",
)
async def verify_audit_trail(pool: PoolDep, settings: AuthzSettingsDep, anchors: AnchorsDep) -> Response[bytes]:
    key = await anyio.to_thread.run_sync(keys.load_or_create, settings.data_dir)
    readable = anchors.readable()
    try:
        anchored = await read_anchored(readable) if readable else None
    except AnchorError as exc:  # the trail cannot be vouched for: say why, as the CLI does
        log.error("audit $verify: %s", exc)
        body = {"ok": False, "anchor_error": "an anchor sink cannot be read (see the server log)"}
        return Response(dicom_json(body), media_type=MediaType.JSON)
    max_age = dt.timedelta(seconds=settings.audit_checkpoint_seconds + settings.audit_anchor_grace_seconds)
    result = await verify(pool, key_verifier({key.kid: key.public_jwk}), anchors=anchored, max_age=max_age)
    body = {
        "ok": result.ok,
        "checked": result.checked,
        "head_seq": result.head_seq,
        "checkpoints": result.checkpoints,
        "last_checkpoint": result.last_checkpoint,
        "anchored": result.anchored,
        "last_anchored": result.last_anchored,
        "problems": [{"seq": p.seq, "kind": p.kind, "detail": p.detail} for p in result.problems],
    }
    return Response(dicom_json(body), media_type=MediaType.JSON)


@get(
    "/AuditEvent/{rid:str}",
    opt=authz_opt("read", "AuditEvent"),
    media_type=FHIR_JSON,
    summary="Read one AuditEvent (its id is its position in the audit chain)",
)
async def read_audit_event(rid: FromPath[str], fhir: FhirDep) -> Response[bytes]:
    seq = int(rid) if rid.isascii() and rid.isdigit() and len(rid) <= 18 else None
    row = await auditquery.read(fhir.pool, seq) if seq is not None else None
    if row is None:
        raise ResourceNotFound(f"AuditEvent/{rid} is not known")
    record = _record(row)
    if record is None:
        raise RecordDamaged(damaged_detail(row.seq))
    event = to_fhir(record, row.seq, recorded_at=row.recorded_at)
    return Response(dicom_json(event), media_type=FHIR_JSON)


ROUTES: list[Any] = [search_audit_events, export_audit_events, verify_audit_trail, read_audit_event]
