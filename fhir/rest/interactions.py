"""The FHIR REST interactions on one resource without HTTP (R4 https://hl7.org/fhir/R4/http.html): what
`fhir.rest.instance` answers for one request and `fhir.rest.bundle` runs for each entry of a batch or
transaction Bundle, on a connection the caller owns (writes run inside the caller's transaction).

- create (R4 3.1.0.7) and conditional create (`If-None-Exist`, 3.1.0.8: no match creates, one match is that
  resource unchanged, several are 412), update and update as create (3.1.0.4; `If-Match` 412), delete (3.1.0.6:
  deleting what is absent or deleted succeeds), vread (3.1.0.3: a deleted version is 410) and the `history`
  Bundle of one resource (3.1.0.10: newest first, `_count`, `_since`, `_offset`).
- What a search may see (`search_access`), for the search route and bundle entries alike: the searched type as
  the policy decided it, every included or chained type as the policy decides a search of THAT type.
- vread and history are decided on the patient and modalities each version was filed under when it was written
  (`fhir.repository` keeps the filing with every version): a version the caller may not read is a 403 (vread)
  or left out (history, whose `total` counts only the versions the caller may read).
- A write is checked (`fhir.validation.check_resource`, then the type's `prepare` in `fhir.types`) and filed
  under the patient its content names. When that is not the patient the policy already decided on (an update
  that moves a report, an update that creates, a bundle entry), `Caller.require` asks the policy again for the
  new one: a resource is never written into a patient the user may not see.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
from dataclasses import dataclass, field
from typing import Any

from authz.actor import Actor, by_break_glass, refusal
from authz.decision import Action, Decision, Resource
from authz.errors import Forbidden
from authz.guard import DECISION, RESOURCE
from authz.principal import Principal
from dicomweb.search.access import AccessConstraints, UnknownConstraint
from fhir.errors import FhirError, NotSupported, ResourceGone, ResourceNotFound, VersionConflict
from fhir.repository import Filing, Stored, parse_etag
from fhir.rest.access import filed, version_number
from fhir.search.query import SearchAccess
from fhir.search.service import matching_ids
from fhir.services import FhirServices
from fhir.types import TYPES, ResourceType
from fhir.validation import check_resource, localize
from server.platform.db import Connection

HISTORY_COUNT = 100
MAX_COUNT = 1000


# --- who asks: decisions after the guard's ----------------------------------------------------------------------


@dataclass
class Caller:
    """The request's `authz.actor.Actor`, for decisions the guard could not make alone (a write's new patient,
    bundle entries, the types a search includes, history versions), and what those decisions mean for the
    request's audit record: a denial is recorded in `state` (the request's audit record names it) when given;
    `decided` are the request's own decisions; `flagged`: some access allowed here was allowed by a break-glass
    session (`authz.actor.by_break_glass`), so the request's audit record is flagged too."""

    actor: Actor
    state: dict[str, Any] | None = None
    decided: list[tuple[Action, Resource, Decision]] = field(default_factory=list)
    flagged: bool = False

    @property
    def principal(self) -> Principal:
        return self.actor.principal

    async def ask(self, action: Action, resource: Resource) -> Decision:
        """A decision that filters what a request returns (an included type, a history version): it is not the
        request's own decision, so it is not one of `decided` (the audit record's), but it may flag the record."""
        decision = await self.actor.decide(action, resource)
        if by_break_glass(decision):
            self.flagged = True
        return decision

    async def decide(self, action: Action, resource: Resource) -> Decision:
        decision = await self.ask(action, resource)
        self.decided.append((action, resource, decision))
        return decision

    async def require(self, action: Action, resource: Resource) -> Decision:
        decision = await self.decide(action, resource)
        if not decision.allow:
            if self.state is not None:
                self.state[DECISION], self.state[RESOURCE] = decision, resource
            raise refusal(decision)
        return decision


async def search_access(caller: Caller, resource_type: str, decided: Decision | None = None) -> SearchAccess:
    """What a search of `resource_type` may see: the one place that decides it, for the search route (`decided`:
    the guard's decision on this very search) and for a bundle's search entry and a conditional create (decided
    here: 403 when the caller may not search the type). Every other type the search reaches (`_include`,
    `_revinclude`, a chain's target) is decided as a search of THAT type, once, when first reached: denied, or
    with a constraint this server cannot enforce, nothing of it is seen."""
    spec = TYPES.get(resource_type)
    if spec is None:
        raise ResourceNotFound(f"this server does not serve {resource_type}")
    decision = decided if decided is not None else await caller.require("search", Resource(kind=spec.kind))
    if not decision.allow:
        raise refusal(decision)
    try:
        constraints = _own(spec, caller, AccessConstraints.from_policy(decision.constraints))
    except UnknownConstraint as exc:
        raise Forbidden(str(exc), decision) from None
    known: dict[str, AccessConstraints | None] = {}

    async def other(name: str) -> AccessConstraints | None:
        if name not in known:
            served = TYPES.get(name)
            answer = await caller.ask("search", Resource(kind=served.kind)) if served is not None else None
            known[name] = None
            if served is not None and answer is not None and answer.allow:
                try:
                    known[name] = _own(served, caller, AccessConstraints.from_policy(answer.constraints))
                except UnknownConstraint:
                    pass
        return known[name]

    return SearchAccess(resource_type, constraints, other)


def _own(spec: ResourceType, caller: Caller, constraints: AccessConstraints) -> AccessConstraints:
    """The caller's own fhir only, for a type whose searches list those (`ResourceType.owned`)."""
    if not spec.owned:
        return constraints
    return dataclasses.replace(constraints, owner=(caller.principal.issuer, caller.principal.sub))


def _foreign(spec: ResourceType, caller: Caller, stored: Stored | None) -> bool:
    """`stored` belongs to another than the caller, for a type whose fhir have owners (`ResourceType.owner`;
    a version with no content, a deletion, has none to tell)."""
    if spec.owner is None or stored is None or stored.content is None:
        return False
    owner = spec.owner(stored.content)
    return owner is None or (owner.issuer, owner.sub) != (caller.principal.issuer, caller.principal.sub)


async def _own_or_absent(conn: Connection, fhir: FhirServices, caller: Caller, spec: ResourceType, rid: str) -> None:
    """404 when the resource belongs to another (types with owners): it does not exist for the caller."""
    if spec.owner is not None and _foreign(spec, caller, await fhir.repository.find(conn, spec.name, rid)):
        raise ResourceNotFound(f"{spec.name}/{rid} is not known")


def _covers(decided: Resource | None, resource: Resource) -> bool:
    """`decided`, a resource the policy already allowed, is this one as the policy sees it: the same patient,
    study and modalities."""
    return (
        decided is not None
        and decided.patient_id == resource.patient_id
        and decided.study_uid == resource.study_uid
        and sorted(decided.modalities) == sorted(resource.modalities)
    )


async def _authorize_filing(
    caller: Caller, action: Action, spec: ResourceType, rid: str | None, filing: Filing, decided: Resource | None
) -> None:
    """The policy has allowed `action` on the resource as filed under `filing` (asked again unless `decided`,
    the resource already allowed, is that one)."""
    resource = filed(spec.kind, rid, filing)
    if not _covers(decided, resource):
        await caller.require(action, resource)


# --- the interaction core (no HTTP) -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Written:
    status: int
    """201 created, 200 updated (or an existing match of a conditional create), 204 nothing was deleted."""
    stored: Stored | None


def writable(resource_type: str) -> ResourceType:
    spec = TYPES.get(resource_type)
    if spec is None:
        raise ResourceNotFound(f"this server does not serve {resource_type}")
    if not spec.writable:
        raise NotSupported(f"{resource_type} is derived from the archive and read-only here")
    return spec


async def prepared(
    conn: Connection,
    fhir: FhirServices,
    caller: Caller,
    spec: ResourceType,
    body: Any,
    base: str,
    url_id: str | None = None,
) -> tuple[dict[str, Any], Filing]:
    """A client's resource checked (model, then the type's rules), filed, and completed by the type's
    `transform` (e.g. a Subscription's owner) when it has one."""
    content = localize(check_resource(spec.name, body, url_id=url_id), base)
    filing = await spec.prepare(conn, fhir.repository, content) if spec.prepare is not None else Filing()
    if spec.transform is not None:
        content = spec.transform(content, caller.principal, fhir.settings)
    return content, filing


async def conditional_matches(conn: Connection, caller: Caller, spec: ResourceType, query: str) -> list[str]:
    """Up to two ids matching an `If-None-Exist` query, among what the caller may search (a conditional create
    cannot probe for fhir the caller may not see)."""
    access = await search_access(caller, spec.name)
    return await matching_ids(conn, spec.name, query.removeprefix("?"), access=access, limit=2)


async def create(
    conn: Connection,
    fhir: FhirServices,
    caller: Caller,
    resource_type: str,
    body: Any,
    *,
    base: str,
    decided: Resource | None = None,
    if_none_exist: str | None = None,
    rid: str | None = None,
) -> Written:
    """Create (R4 3.1.0.7) or conditionally create (3.1.0.8). Run inside a transaction."""
    spec = writable(resource_type)
    content, filing = await prepared(conn, fhir, caller, spec, body, base)
    if if_none_exist is not None and if_none_exist.strip():
        ids = await conditional_matches(conn, caller, spec, if_none_exist)
        if len(ids) > 1:
            raise VersionConflict(f"If-None-Exist {if_none_exist!r} matches more than one {resource_type}")
        if ids:
            existing = await fhir.repository.read(conn, resource_type, ids[0])
            await _authorize_filing(caller, "read", spec, existing.id, existing.filing, None)
            return Written(200, existing)
    await _authorize_filing(caller, "create", spec, None, filing, decided)
    return Written(201, await fhir.repository.create(conn, resource_type, content, filing, rid=rid))


async def update(
    conn: Connection,
    fhir: FhirServices,
    caller: Caller,
    resource_type: str,
    rid: str,
    body: Any,
    *,
    base: str,
    decided: Resource | None = None,
    if_match: str | None = None,
) -> Written:
    """Update, or update as create (R4 3.1.0.4). `decided`: the stored resource the policy allowed to update.
    Run inside a transaction."""
    spec = writable(resource_type)
    expected = parse_etag(if_match) if if_match else None
    if spec.owner is not None and _foreign(spec, caller, await fhir.repository.find(conn, resource_type, rid)):
        raise Forbidden(f"{resource_type}/{rid} belongs to another owner")  # never taken over by a write
    content, filing = await prepared(conn, fhir, caller, spec, body, base, url_id=rid)
    await _authorize_filing(caller, "update", spec, rid, filing, decided)
    stored, created = await fhir.repository.update(conn, resource_type, rid, content, filing, expected_version=expected)
    return Written(201 if created else 200, stored)


async def remove(
    conn: Connection,
    fhir: FhirServices,
    caller: Caller,
    resource_type: str,
    rid: str,
    *,
    if_match: str | None = None,
) -> Written:
    """Delete (R4 3.1.0.6); the policy decided on the stored resource. Run inside a transaction. Another
    owner's resource is, for the caller, one that does not exist: nothing is deleted (204)."""
    spec = writable(resource_type)
    expected = parse_etag(if_match) if if_match else None
    if spec.owner is not None and _foreign(spec, caller, await fhir.repository.find(conn, resource_type, rid)):
        return Written(204, None)
    stored = await fhir.repository.delete(conn, resource_type, rid, expected_version=expected)
    return Written(200 if stored is not None else 204, stored)


async def _authorize_read(
    caller: Caller, spec: ResourceType, rid: str, stored: Stored | None, decided: Resource | None
) -> None:
    """The policy allows reading `stored` as filed (an unknown resource: what the subject may read at all)."""
    if stored is not None:
        await _authorize_filing(caller, "read", spec, rid, stored.filing, decided)
        return
    bare = Resource(kind=spec.kind, attributes={"id": rid})
    if not _covers(decided, bare):
        await caller.require("read", bare)


async def read(
    conn: Connection, fhir: FhirServices, caller: Caller, resource_type: str, rid: str, *, decided: Resource | None
) -> Stored:
    """read (R4 3.1.0.2) of the current version, decided on the filing of the version it serves (`decided`: what
    the guard already allowed; asked again when the resource was filed elsewhere meanwhile): 404 unknown, 410
    deleted."""
    spec = TYPES[resource_type]
    stored = await fhir.repository.find(conn, resource_type, rid)
    if _foreign(spec, caller, stored):
        stored = None  # another owner's: unknown to the caller
    await _authorize_read(caller, spec, rid, stored, decided)
    if stored is None:
        raise ResourceNotFound(f"{resource_type}/{rid} is not known")
    if stored.deleted:
        raise ResourceGone(f"{resource_type}/{rid} was deleted (version {stored.version})")
    return stored


async def vread(
    conn: Connection,
    fhir: FhirServices,
    caller: Caller,
    resource_type: str,
    rid: str,
    vid: str,
    *,
    decided: Resource | None,
) -> Stored:
    """vread (R4 3.1.0.3), decided on the patient and modalities this version was filed under when written
    (`decided`: what the guard already allowed; asked again when that is not this version's filing): 403 when
    the caller may not read this version. A version that does not exist is decided on the resource as it is now
    (403 when the caller may not read it, else 404); a deletion is 410."""
    spec = TYPES[resource_type]
    number = version_number(vid)
    await _own_or_absent(conn, fhir, caller, spec, rid)
    stored = await fhir.repository.find_version(conn, resource_type, rid, number) if number is not None else None
    if stored is None:
        await _authorize_read(caller, spec, rid, await fhir.repository.find(conn, resource_type, rid), decided)
        raise ResourceNotFound(f"{resource_type}/{rid} has no version {vid!r}")
    await _authorize_read(caller, spec, rid, stored, decided)
    if stored.deleted:
        raise ResourceGone(f"{resource_type}/{rid} version {vid} is a deletion")
    return stored


def instant(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def http_date(moment: dt.datetime) -> str:
    return email.utils.format_datetime(moment.astimezone(dt.UTC), usegmt=True)


def location(base: str, stored: Stored) -> str:
    return f"{base}/{stored.resource_type}/{stored.id}/_history/{stored.version}"


_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}


def status_text(status: int) -> str:
    return _STATUS_TEXT.get(status, str(status))


def _history_params(items: list[tuple[str, str]]) -> tuple[int, dt.datetime | None, int]:
    values = dict(items)
    try:
        count = int(values.get("_count", HISTORY_COUNT))
        offset = int(values.get("_offset", 0))
    except ValueError:
        raise FhirError("_count and _offset must be integers") from None
    if count < 1 or offset < 0:
        raise FhirError("_count must be positive and _offset not negative")
    since = None
    if "_since" in values:
        try:
            since = dt.datetime.fromisoformat(values["_since"].replace("Z", "+00:00").replace(" ", "+"))
        except ValueError:
            raise FhirError(f"_since {values['_since']!r} is not an instant", "_since") from None
        if since.tzinfo is None:
            raise FhirError("_since must be an instant with a time zone (e.g. 2024-01-02T03:04:05Z)", "_since")
    return min(count, MAX_COUNT), since, offset


async def readable_versions(
    conn: Connection,
    fhir: FhirServices,
    caller: Caller,
    resource_type: str,
    rid: str,
    since: dt.datetime | None,
    decided: Resource | None,
) -> list[int]:
    """The versions of one resource the caller may read, newest first: each decided on the patient and
    modalities it was filed under (once per distinct filing; `decided`, the resource the guard allowed, needs no
    second decision). 404 when the resource never existed."""
    spec = TYPES[resource_type]
    await _own_or_absent(conn, fhir, caller, spec, rid)
    allowed: dict[Filing, bool] = {}
    readable = []
    for version, filing in await fhir.repository.history_filings(conn, resource_type, rid, since=since):
        if filing not in allowed:
            resource = filed(spec.kind, rid, filing)
            allowed[filing] = _covers(decided, resource) or (await caller.ask("read", resource)).allow
        if allowed[filing]:
            readable.append(version)
    return readable


async def history_bundle(
    conn: Connection,
    fhir: FhirServices,
    caller: Caller,
    resource_type: str,
    rid: str,
    items: list[tuple[str, str]],
    base: str,
    *,
    decided: Resource | None = None,
) -> dict[str, Any]:
    """The `history` Bundle of one resource, newest first (R4 3.1.0.10), of the versions the caller may read
    (`readable_versions`): a version filed under a patient or modality the caller may not read is left out, and
    `total` is the number of versions the caller may read (since `_since`), so the others are not even counted.
    Their numbers still show as gaps between `versionId`s: those belong to the resource, not to the caller."""
    count, since, offset = _history_params(items)
    readable = await readable_versions(conn, fhir, caller, resource_type, rid, since, decided)
    page = await fhir.repository.versions(conn, resource_type, rid, readable[offset : offset + count])
    more = len(readable) > offset + count
    url = f"{base}/{resource_type}/{rid}"
    entries: list[dict[str, Any]] = []
    for stored in page:
        entry: dict[str, Any] = {"fullUrl": url}
        if stored.content is not None:
            entry["resource"] = stored.content
        method = stored.method or "PUT"
        status = {"POST": 201, "PUT": 200, "DELETE": 204}.get(method, 200)
        entry["request"] = {"method": method, "url": resource_type if method == "POST" else f"{resource_type}/{rid}"}
        entry["response"] = {
            "status": status_text(status),
            "etag": stored.etag,
            "lastModified": instant(stored.last_updated),
        }
        entries.append(entry)
    query = f"_count={count}" + (f"&_since={instant(since)}" if since is not None else "")
    links = [{"relation": "self", "url": f"{url}/_history?{query}" + (f"&_offset={offset}" if offset else "")}]
    if more:
        links.append({"relation": "next", "url": f"{url}/_history?{query}&_offset={offset + count}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "total": len(readable), "link": links}
    if entries:
        bundle["entry"] = entries
    return bundle
