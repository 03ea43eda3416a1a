"""`POST [base]` with a batch or transaction Bundle (R4 3.1.0.11; the Bundle as values is `fhir.rest.bundles`).

- batch: each entry runs on its own, in its own database transaction; the `batch-response` has each entry's
  `response.status`, `location`, `etag`, `lastModified`, the resource (as `Prefer` asks) and, for an entry that
  failed, its OperationOutcome in `response.outcome`.
- transaction: all entries in ONE database transaction: any failing entry fails the whole request with that
  entry's status and OperationOutcome, and nothing is written; `urn:uuid:` references between entries are
  resolved (R4 3.1.0.11.2). The `transaction-response` is answered after the commit.

Every entry is decided by the policy as if it were its own request (`fhir.rest.interactions.Caller`: its action on
its type and the patient of the stored or new resource), by the same code as that request sent directly: a
search entry by `fhir.rest.interactions.search_access` (its own search decision, and each included or chained type
decided as a search of that type), a vread on the filing of the version read, a history on the filing of each
version. Each entry gets its own audit record (the request itself is recorded by the middleware like any
other), flagged when a break-glass session allowed any of its accesses: a denied entry is 403 in a batch and
fails a transaction. The route itself is declared as `create` on kind `Bundle` (the envelope; each entry is the
policy's real question).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from litestar import Request, Response, post

from authz.decision import Action, Decision, Resource
from authz.errors import AuthzError, Forbidden, PolicyUnavailable
from authz.guard import authz_opt
from fhir.audit.routes import fhir_base
from fhir.audit.search import SearchError
from fhir.errors import FhirError
from fhir.outcome import error_outcome, issue, operation_outcome
from fhir.rest import bundles
from fhir.rest.access import filed
from fhir.rest.bundles import Entry, response_entry
from fhir.rest.instance import FHIR_JSON_UTF8, MINIMAL, OUTCOME, caller_of, json_response, prefer_return, request_body
from fhir.rest.interactions import (
    Caller,
    Written,
    conditional_matches,
    create,
    history_bundle,
    instant,
    location,
    read,
    remove,
    search_access,
    update,
    vread,
)
from fhir.search.query import query_items
from fhir.search.service import search_bundle
from fhir.services import FhirDep, FhirServices
from fhir.types import TYPES
from server.platform.db import Connection

_ACTIONS: dict[str, Action] = {"GET": "read", "POST": "create", "PUT": "update", "DELETE": "delete"}


class EntryFailed(Exception):
    """A transaction entry failed: the whole transaction is rolled back and answers with `error`."""

    def __init__(self, entry: Entry, error: Exception) -> None:
        super().__init__(str(error))
        self.entry = entry
        self.error = error


@dataclass
class Run:
    """One Bundle's run: what every entry needs, and each entry's decision for its audit record."""

    conn: Connection
    fhir: FhirServices
    caller: Caller
    base: str
    prefer: str
    ids: dict[int, str]
    mapping: dict[str, str]
    decided: dict[int, tuple[Action, Resource, Decision]]
    flagged: set[int]
    """Entries some access of which only a break-glass session allowed."""


def _error_parts(exc: Exception) -> tuple[int, dict[str, Any]]:
    if isinstance(exc, FhirError):
        return exc.status, error_outcome(exc)
    if isinstance(exc, SearchError):
        return 400, operation_outcome(issue(exc.code, exc.detail))
    if isinstance(exc, Forbidden):
        return 403, operation_outcome(issue("forbidden", exc.detail))
    if isinstance(exc, PolicyUnavailable):
        return 503, operation_outcome(issue("transient", exc.detail))
    return 500, operation_outcome(issue("exception", "internal server error"))


async def _stored_resource(run: Run, action: Action, resource_type: str, rid: str) -> Resource:
    """The policy allows `action` on this stored resource (a bare one when it does not exist: the entry then
    answers 404)."""
    kind = TYPES[resource_type].kind
    stored = await run.fhir.repository.find(run.conn, resource_type, rid)
    resource = filed(kind, rid, stored.filing) if stored is not None else Resource(kind=kind, attributes={"id": rid})
    await run.caller.require(action, resource)
    return resource


def _written_entry(run: Run, written: Written) -> dict[str, Any]:
    stored = written.stored
    if stored is None:
        return response_entry(204)
    if stored.deleted:
        return response_entry(204, etag=stored.etag, last_modified=instant(stored.last_updated))
    resource = None if run.prefer in (MINIMAL, OUTCOME) else stored.content
    outcome = operation_outcome(issue("informational", "done", "information")) if run.prefer == OUTCOME else None
    return response_entry(
        written.status,
        full_url=f"{run.base}/{stored.resource_type}/{stored.id}",
        resource=resource,
        location=location(run.base, stored),
        etag=stored.etag,
        last_modified=instant(stored.last_updated),
        outcome=outcome,
    )


async def _get(run: Run, entry: Entry) -> dict[str, Any]:
    target, spec = entry.target, TYPES[entry.target.resource_type]
    if target.id is None:
        access = await search_access(run.caller, spec.name)
        items = query_items(target.query or "")
        bundle = await search_bundle(run.conn, spec.name, items, base=run.base, access=access, strict=False)
        return response_entry(200, resource=bundle)
    if target.version is not None:
        stored = await vread(run.conn, run.fhir, run.caller, spec.name, target.id, target.version, decided=None)
    elif target.history:
        decided = await _stored_resource(run, "read", spec.name, target.id)
        items = query_items(target.query or "")
        history = await history_bundle(
            run.conn, run.fhir, run.caller, spec.name, target.id, items, run.base, decided=decided
        )
        return response_entry(200, resource=history)
    else:
        stored = await read(run.conn, run.fhir, run.caller, spec.name, target.id, decided=None)
    return response_entry(
        200,
        full_url=f"{run.base}/{spec.name}/{target.id}",
        resource=stored.content,
        etag=stored.etag,
        last_modified=instant(stored.last_updated),
    )


async def run_entry(run: Run, entry: Entry) -> dict[str, Any]:
    """One entry, as its own request would run (inside the caller's transaction)."""
    run.caller.decided.clear()
    run.caller.flagged = False
    try:
        target = entry.target
        if entry.method == "GET":
            return await _get(run, entry)
        body = bundles.resolve(entry.resource, run.mapping)
        if entry.method == "POST":
            written = await create(
                run.conn,
                run.fhir,
                run.caller,
                target.resource_type,
                body,
                base=run.base,
                if_none_exist=entry.if_none_exist,
                rid=run.ids[entry.index],
            )
        elif entry.method == "PUT":
            assert target.id is not None
            decided = await _stored_resource(run, "update", target.resource_type, target.id)
            written = await update(
                run.conn,
                run.fhir,
                run.caller,
                target.resource_type,
                target.id,
                body,
                base=run.base,
                decided=decided,
                if_match=entry.if_match,
            )
        else:
            assert target.id is not None
            await _stored_resource(run, "delete", target.resource_type, target.id)
            written = await remove(
                run.conn, run.fhir, run.caller, target.resource_type, target.id, if_match=entry.if_match
            )
        return _written_entry(run, written)
    finally:
        if run.caller.decided:
            run.decided[entry.index] = run.caller.decided[-1]
        if run.caller.flagged:
            run.flagged.add(entry.index)


async def _assign_ids(run: Run, entries: list[Entry], *, transaction: bool) -> None:
    """Each POST's id; in a transaction, a conditional create that matches takes the match's id (its fullUrl
    then names that resource), and fullUrls map to `Type/id` (R4 3.1.0.11.2)."""
    for entry in entries:
        if entry.method != "POST" or entry.assigned_id is None:
            continue
        run.ids[entry.index] = entry.assigned_id
        if transaction and entry.if_none_exist:
            spec = TYPES[entry.target.resource_type]
            try:
                matches = await conditional_matches(run.conn, run.caller, spec, entry.if_none_exist)
            except (FhirError, AuthzError, SearchError) as exc:
                raise EntryFailed(entry, exc) from None
            if len(matches) == 1:
                run.ids[entry.index] = matches[0]
    if transaction:
        run.mapping.update(bundles.full_url_map(entries, run.ids))


async def _transaction(run: Run, entries: list[Entry]) -> list[dict[str, Any]]:
    answers: dict[int, dict[str, Any]] = {}
    await _assign_ids(run, entries, transaction=True)
    for entry in bundles.processing_order(entries):
        try:
            answers[entry.index] = await run_entry(run, entry)
        except (FhirError, AuthzError, SearchError) as exc:
            raise EntryFailed(entry, exc) from None
    return [answers[e.index] for e in entries]


async def _batch(run: Run, parsed: list[Entry | FhirError]) -> list[dict[str, Any]]:
    answers: dict[int, dict[str, Any]] = {}
    entries = [e for e in parsed if isinstance(e, Entry)]
    await _assign_ids(run, entries, transaction=False)
    for entry in bundles.processing_order(entries):
        try:
            async with run.conn.transaction():
                answers[entry.index] = await run_entry(run, entry)
        except (FhirError, AuthzError, SearchError) as exc:
            status, outcome = _error_parts(exc)
            answers[entry.index] = response_entry(status, outcome=outcome)
    for index, item in enumerate(parsed):
        if isinstance(item, FhirError):
            status, outcome = _error_parts(item)
            answers[index] = response_entry(status, outcome=outcome)
    return [answers[i] for i in range(len(parsed))]


async def _audit(
    request: Request[Any, Any, Any],
    run: Run,
    parsed: list[Entry | FhirError],
    statuses: dict[int, int],
    failed: Entry | None = None,
) -> None:
    """One audit record per entry: its decision, its action on its resource, its status."""
    records = []
    for index, item in enumerate(parsed):
        if not isinstance(item, Entry):
            continue
        action, resource, decision = run.decided.get(
            index, (_ACTIONS[item.method], Resource(kind=TYPES[item.target.resource_type].kind), None)
        )
        status = statuses.get(index, 500)
        query = item.target.query if item.method == "GET" and item.target.id is None else None
        records.append(
            run.caller.actor.record_of(
                action,
                resource,
                decision,
                status=status,
                method=item.method,
                path=f"{request.url.path.rstrip('/')}/{item.url.split('?', 1)[0]}",
                query_string=query,
                break_glass=index in run.flagged,
                outcome_desc=None if failed is None or failed is item else f"rolled back: entry {failed.index} failed",
                time=dt.datetime.now(dt.UTC),
            )
        )
    if records:
        await run.fhir.audit.append_many(records)


def _status_of(answer: dict[str, Any]) -> int:
    return int(str(answer["response"]["status"]).split(" ", 1)[0])


@post(
    "/",
    opt=authz_opt("create", "Bundle"),
    media_type=FHIR_JSON_UTF8,
    status_code=200,
    summary="Batch or transaction Bundle (FHIR R4 3.1.0.11)",
)
async def post_bundle(request: Request[Any, Any, Any], fhir: FhirDep) -> Response[bytes]:
    body = await request_body(request)
    base = fhir_base(request, fhir.settings)
    parsed = bundles.parse_bundle(
        body, base=base, served=frozenset(TYPES), max_entries=fhir.settings.fhir_max_bundle_entries
    )
    caller = caller_of(request)
    caller.state = None  # entry decisions have records of their own
    async with fhir.pool.acquire() as conn:
        run = Run(conn, fhir, caller, base, prefer_return(request), {}, {}, {}, set())
        if parsed.kind == "batch":
            answers = await _batch(run, parsed.entries)
            await _audit(request, run, parsed.entries, {i: _status_of(a) for i, a in enumerate(answers)})
            return json_response(bundles.response_bundle("batch", answers))
        failure: FhirError | None = next((e for e in parsed.entries if isinstance(e, FhirError)), None)
        if failure is not None:
            raise failure
        entries = [e for e in parsed.entries if isinstance(e, Entry)]
        bundles.check_overlap(entries)
        try:
            async with conn.transaction():
                answers = await _transaction(run, entries)
        except EntryFailed as failed:
            status, _ = _error_parts(failed.error)
            statuses = {e.index: status for e in entries}
            await _audit(request, run, parsed.entries, statuses, failed.entry)
            raise failed.error from None
        await _audit(request, run, parsed.entries, {e.index: _status_of(answers[e.index]) for e in entries})
        return json_response(bundles.response_bundle("transaction", answers))


ROUTES: list[Any] = [post_bundle]
