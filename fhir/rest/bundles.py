"""Batch and transaction Bundles (R4 3.1.0.11 https://hl7.org/fhir/R4/http.html#transaction) as values: the
posted Bundle read into entries, the order they are processed in, `urn:uuid:` references between entries, and
the response Bundle's shapes. Pure (house style 1): `fhir.rest.bundle` runs the entries.

- `Bundle.type` is `batch` or `transaction`; each entry has `request.method` (GET, POST, PUT, DELETE) and
  `request.url` relative to the base (`DiagnosticReport`, `DiagnosticReport/1`, `DiagnosticReport/1/_history`,
  `DiagnosticReport/1/_history/2`, `DiagnosticReport?status=final`), or absolute on our base. POST takes a type,
  PUT and DELETE one resource (conditional update and delete are not supported); POST and PUT carry `resource`.
  `request.ifMatch` and `request.ifNoneExist` are the headers of the same names.
- Processing order (R4 3.1.0.11.1): DELETE, POST, PUT, GET, each in the order sent; the response has one
  entry per request entry, in the order sent.
- Transactions: every POST gets its id before anything runs, and a reference to an entry's `fullUrl`
  (`urn:uuid:...`, or the entry's absolute URL) anywhere in another entry's resource becomes `Type/id`
  (R4 3.1.0.11.2). Two entries writing the same resource fail the transaction (400).
- More than `HOUNSFIELD_FHIR_MAX_BUNDLE_ENTRIES` entries: 413 `too-costly`.
"""

from __future__ import annotations

import http
import re
from dataclasses import dataclass
from typing import Any

from fhir.errors import FhirError, NotSupported, ResourceNotFound
from fhir.repository import ID_PATTERN, new_id
from fhir.validation import map_references, references

KINDS = ("batch", "transaction")
METHODS = ("DELETE", "POST", "PUT", "GET")
"""In processing order."""
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")


class TooLarge(FhirError):
    status = 413
    code = "too-costly"


@dataclass(frozen=True, slots=True)
class Target:
    """What `request.url` names: a type (search when `query` is set or for GET), one resource, its history or
    one version."""

    resource_type: str
    id: str | None = None
    history: bool = False
    version: str | None = None
    query: str | None = None

    @property
    def key(self) -> str | None:
        return f"{self.resource_type}/{self.id}" if self.id else None


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    method: str
    url: str
    target: Target
    full_url: str | None = None
    resource: Any = None
    if_match: str | None = None
    if_none_exist: str | None = None
    assigned_id: str | None = None
    """The id a POST creates (unless its `ifNoneExist` matches)."""


@dataclass(frozen=True, slots=True)
class Parsed:
    kind: str
    entries: list[Entry | FhirError]
    """One per request entry, in the order sent: an entry, or why it cannot be run (a batch answers that entry
    with the error; a transaction fails)."""


def _text(value: Any, path: str, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise FhirError(f"{path} must be a non-empty string", path)
    return value


def parse_target(url: str, base: str, path: str) -> Target:
    """`request.url` relative to `base` (an absolute URL on our base is accepted too)."""
    rest = url.removeprefix(base.rstrip("/") + "/") if url.startswith(("http://", "https://")) else url
    if rest.startswith(("http://", "https://")):
        raise FhirError(f"{path}: {url} is not on this server ({base})", path)
    rest, mark, query = rest.lstrip("/").partition("?")
    parts = rest.split("/")
    if not _TYPE.fullmatch(parts[0]):
        raise FhirError(f"{path}: {url!r} does not start with a resource type", path)
    if len(parts) == 1:
        return Target(parts[0], query=query if mark else None)
    if not ID_PATTERN.fullmatch(parts[1]):
        raise FhirError(f"{path}: {parts[1]!r} is not a valid resource id", path)
    if len(parts) == 2 and not mark:
        return Target(parts[0], parts[1])
    if len(parts) == 3 and parts[2] == "_history":  # history parameters (_count, _since) allowed
        return Target(parts[0], parts[1], history=True, query=query if mark else None)
    if len(parts) == 4 and parts[2] == "_history" and not mark:
        return Target(parts[0], parts[1], history=True, version=parts[3])
    raise FhirError(f"{path}: {url!r} is not a URL this server answers in a Bundle", path)


def _entry(index: int, raw: Any, base: str, served: frozenset[str]) -> Entry:
    path = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise FhirError(f"{path} must be an object", path)
    request = raw.get("request")
    if not isinstance(request, dict):
        raise FhirError(f"{path}.request is required in a {'/'.join(KINDS)} Bundle", f"{path}.request")
    method = str(_text(request.get("method"), f"{path}.request.method", required=True)).upper()
    url = str(_text(request.get("url"), f"{path}.request.url", required=True))
    if method not in METHODS:
        raise NotSupported(f"{path}.request.method {method} is not supported here", f"{path}.request.method")
    target = parse_target(url, base, f"{path}.request.url")
    if target.resource_type not in served:
        raise ResourceNotFound(f"{path}: this server does not serve {target.resource_type}", f"{path}.request.url")
    resource = raw.get("resource")
    if method != "GET" and (target.history or target.query is not None):
        raise NotSupported(f"{path}: conditional and history {method} are not supported", f"{path}.request.url")
    if method == "POST" and target.id is not None:
        raise FhirError(f"{path}: POST takes a type ({target.resource_type}), not {url!r}", f"{path}.request.url")
    if method in ("PUT", "DELETE") and target.id is None:
        raise NotSupported(f"{path}: conditional {method} is not supported", f"{path}.request.url")
    if method in ("POST", "PUT") and resource is None:
        raise FhirError(f"{path}.resource is required for {method}", f"{path}.resource")
    return Entry(
        index,
        method,
        url,
        target,
        _text(raw.get("fullUrl"), f"{path}.fullUrl"),
        resource,
        _text(request.get("ifMatch"), f"{path}.request.ifMatch"),
        _text(request.get("ifNoneExist"), f"{path}.request.ifNoneExist"),
        new_id() if method == "POST" else None,
    )


def parse_bundle(body: Any, *, base: str, served: frozenset[str], max_entries: int) -> Parsed:
    """The posted Bundle's entries (400 for a Bundle that is not a batch or transaction, 413 for too many
    entries; an entry that cannot be read is that entry's error)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise FhirError("POST [base] takes a Bundle of type batch or transaction")
    kind = body.get("type")
    if kind not in KINDS:
        raise FhirError(f"Bundle.type must be batch or transaction, not {kind!r}", "Bundle.type")
    raw = body.get("entry", [])
    if not isinstance(raw, list):
        raise FhirError("Bundle.entry must be a list", "Bundle.entry")
    if len(raw) > max_entries:
        raise TooLarge(f"the Bundle has {len(raw)} entries; this server takes at most {max_entries}", "Bundle.entry")
    entries: list[Entry | FhirError] = []
    for index, item in enumerate(raw):
        try:
            entries.append(_entry(index, item, base, served))
        except FhirError as exc:
            entries.append(exc)
    return Parsed(str(kind), entries)


def _dependencies_first(group: list[Entry]) -> list[Entry]:
    """Entries of one method in the order sent, except that an entry whose resource references another entry's
    `fullUrl` comes after it (a cycle keeps the order sent: its first reference then does not resolve)."""
    by_url = {e.full_url: e.index for e in group if e.full_url}
    needs = {
        e.index: {by_url[ref] for _, ref in references(e.resource, "") if ref in by_url} - {e.index} for e in group
    }
    ordered: list[Entry] = []
    done: set[int] = set()
    pending = list(group)
    while pending:
        ready = next((e for e in pending if needs[e.index] <= done), pending[0])
        pending.remove(ready)
        ordered.append(ready)
        done.add(ready.index)
    return ordered


def processing_order(entries: list[Entry]) -> list[Entry]:
    """DELETE, POST, PUT, GET (R4 3.1.0.11.1); in the order sent within each, but a POST or PUT that references
    another entry of its method by `fullUrl` after that entry, so that the reference resolves when it is
    checked."""
    ordered: list[Entry] = []
    for method in METHODS:
        group = [e for e in entries if e.method == method]
        ordered += _dependencies_first(group) if method in ("POST", "PUT") else group
    return ordered


def check_overlap(entries: list[Entry]) -> None:
    """A transaction may not write one resource twice (R4 3.1.0.11.1)."""
    seen: dict[str, int] = {}
    for entry in entries:
        key = entry.target.key if entry.method in ("PUT", "DELETE") else None
        if key is None:
            continue
        if key in seen:
            path = f"Bundle.entry[{entry.index}].request.url"
            raise FhirError(f"entries {seen[key]} and {entry.index} both write {key}", path)
        seen[key] = entry.index


def full_url_map(entries: list[Entry], ids: dict[int, str]) -> dict[str, str]:
    """Each write entry's `fullUrl` -> the `Type/id` it becomes (`ids`: a POST's id by entry index)."""
    mapping: dict[str, str] = {}
    for entry in entries:
        if entry.full_url is None:
            continue
        if entry.method == "POST":
            mapping[entry.full_url] = f"{entry.target.resource_type}/{ids[entry.index]}"
        elif entry.method == "PUT" and entry.target.key:
            mapping[entry.full_url] = entry.target.key
    return mapping


def resolve(resource: Any, mapping: dict[str, str]) -> Any:
    """`resource` with references to other entries' `fullUrl` replaced by `Type/id` (R4 3.1.0.11.2)."""
    if not mapping:
        return resource
    return map_references(resource, lambda ref: mapping.get(ref, ref))


def status_line(status: int) -> str:
    """`201 Created`: the form of `Bundle.entry.response.status`."""
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def response_entry(
    status: int,
    *,
    full_url: str | None = None,
    resource: dict[str, Any] | None = None,
    location: str | None = None,
    etag: str | None = None,
    last_modified: str | None = None,
    outcome: dict[str, Any] | None = None,
) -> dict[str, Any]:
    response: dict[str, Any] = {"status": status_line(status)}
    for name, value in (("location", location), ("etag", etag), ("lastModified", last_modified)):
        if value is not None:
            response[name] = value
    if outcome is not None:
        response["outcome"] = outcome
    entry: dict[str, Any] = {}
    if full_url is not None:
        entry["fullUrl"] = full_url
    if resource is not None:
        entry["resource"] = resource
    entry["response"] = response
    return entry


def response_bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": f"{kind}-response", "entry": entries}
