"""What a client sends on the FHIR REST API, checked before anything is written (house style 1: pure, no I/O).

- Formats (R4 3.1.0.1.10 content types and encodings, 2.6.2 `_format`): request bodies must be JSON
  (`application/fhir+json` or `application/json`, any charset parameter), else 415; a client that asks only for
  XML (by `Accept` or `_format`) gets 406: this server speaks JSON only.
- Resources (R4 3.1.0.1.4: a resource that does not conform is rejected with 400 and an OperationOutcome): the
  body parses as JSON, is an object of the `resourceType` the URL names, and validates against the R4 model
  (`fhir.resources.R4B`, pydantic v2): unknown elements, wrong datatypes, malformed dates and missing required
  elements are one OperationOutcome issue each, with the FHIRPath of the element at fault
  (`DiagnosticReport.code.coding[0].system`). The model only checks; what is stored is what the client sent.
- References (R4 2.3.0 references): absolute references to this server's base are made relative, so that one
  resource is always named one way in the store and the search index.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from fhir.errors import FhirError
from fhir.resources.R4B import get_fhir_model_class

JSON_TYPES = ("application/fhir+json", "application/json")
_JSON_ACCEPT = {"application/fhir+json", "application/json", "application/json+fhir", "*/*", "application/*"}
_JSON_FORMATS = {"json", *JSON_TYPES, "application/json+fhir"}
_XML_FORMATS = {"xml", "text/xml", "application/xml", "application/fhir+xml", "application/xml+fhir"}


class InvalidResource(FhirError):
    """A resource that does not conform to its R4 definition: one `problems` entry (diagnostics, FHIRPath) per
    fault, all of them reported in one OperationOutcome."""

    def __init__(self, problems: list[tuple[str, str | None]]) -> None:
        first, expression = problems[0]
        detail = first if len(problems) == 1 else f"{first} (and {len(problems) - 1} more)"
        super().__init__(detail, expression)
        self.problems = problems


class UnsupportedMediaType(FhirError):
    status = 415
    code = "not-supported"


class NotAcceptable(FhirError):
    status = 406
    code = "not-supported"


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def check_content_type(value: str | None) -> None:
    """A request body must be FHIR JSON (R4 3.1.0.1.10); `charset` other than UTF-8 is refused too."""
    if value is None or _media_type(value) not in JSON_TYPES:
        raise UnsupportedMediaType(
            f"request bodies must be {' or '.join(JSON_TYPES)}, not {value or 'untyped'} (this server speaks JSON)"
        )
    for param in value.split(";")[1:]:
        name, _, raw = param.partition("=")
        if name.strip().lower() == "charset" and raw.strip().strip('"').lower() not in {"utf-8", "utf8"}:
            raise UnsupportedMediaType(f"request bodies must be UTF-8, not {raw.strip()}")


def check_accept(accept: str | None, format_param: str | None) -> None:
    """406 unless the client takes JSON: `_format` (R4 2.6.2) overrides `Accept`; an absent `Accept` takes
    anything. Media ranges such as `*/*` and `application/*` include FHIR JSON."""
    if format_param is not None:
        wanted = _media_type(format_param.replace(" ", "+"))  # a `+` in a query string arrives as a space
        if wanted in _XML_FORMATS or wanted not in _JSON_FORMATS:
            raise NotAcceptable(f"_format={format_param} is not supported: this server answers FHIR JSON only")
        return
    if not accept or not accept.strip():
        return
    for item in accept.split(","):
        media = _media_type(item)
        refused = any(p.strip().replace(" ", "") in {"q=0", "q=0.0", "q=0.00", "q=0.000"} for p in item.split(";")[1:])
        if media in _JSON_ACCEPT and not refused:
            return
    raise NotAcceptable(f"Accept: {accept} does not include FHIR JSON, the only format this server answers")


def parse_json(raw: bytes) -> Any:
    """The body as JSON: 400 when it is not (R4 3.1.0.1.4)."""
    if not raw.strip():
        raise FhirError("the request has no body; a FHIR resource in JSON was expected")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FhirError(f"the request body is not valid JSON: {exc}") from None


def fhirpath(resource_type: str, loc: Iterable[int | str]) -> str:
    """A pydantic error location as FHIRPath: ('code', 'coding', 0, 'system') ->
    `DiagnosticReport.code.coding[0].system`; `_status` (a primitive's extension) -> `status`."""
    out = resource_type
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += "." + (part[1:] if part.startswith("_") and len(part) > 1 else part)
    return out


def _problems(resource_type: str, exc: ValidationError) -> list[tuple[str, str | None]]:
    problems: list[tuple[str, str | None]] = []
    for error in exc.errors(include_url=False):
        path = fhirpath(resource_type, [p for p in error["loc"] if isinstance(p, int | str)])
        kind = error["type"]
        if kind == "extra_forbidden":
            message = f"{path}: unknown element"
        elif kind in {"missing", "model_field_validation.missing"}:
            message = f"{path}: required element is missing"
        else:
            message = f"{path}: {error['msg']}"
        problems.append((message, path))
    return problems


def check_resource(resource_type: str, body: Any, *, url_id: str | None = None) -> dict[str, Any]:
    """`body` as a valid `resource_type` (returned as sent). `url_id`: an update's id, which the body's `id` must
    equal (R4 3.1.0.4: 400 when it does not, or when the body has none)."""
    if not isinstance(body, dict):
        raise FhirError(f"the body must be a JSON object (a {resource_type} resource)")
    sent = body.get("resourceType")
    if sent != resource_type:
        raise FhirError(
            f"the body is a {sent if isinstance(sent, str) else 'resource without resourceType'}; "
            f"this URL takes {resource_type}"
        )
    if url_id is not None and body.get("id") != url_id:
        raise FhirError(
            f"the resource id {body.get('id')!r} must equal the id in the URL ({url_id!r})", f"{resource_type}.id"
        )
    try:
        get_fhir_model_class(resource_type).model_validate(body)
    except ValidationError as exc:
        raise InvalidResource(_problems(resource_type, exc)) from None
    except (ValueError, TypeError) as exc:  # a validator that raised outside pydantic's error collection
        raise InvalidResource([(f"{resource_type}: {exc}", resource_type)]) from None
    return body


def map_references(value: Any, change: Callable[[str], str]) -> Any:
    """A copy of `value` with every `Reference.reference` string passed through `change` (contained resources
    included). Everything else is kept as sent."""
    if isinstance(value, list):
        return [map_references(v, change) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                out[key] = change(item)
            else:
                out[key] = map_references(item, change)
        return out
    return value


def references(value: Any, path: str) -> Iterable[tuple[str, str]]:
    """Every (FHIRPath, reference string) in a resource, depth first, in document order."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from references(item, f"{path}[{i}]")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield path, item
            else:
                yield from references(item, f"{path}.{key}")


def localize(content: dict[str, Any], base: str) -> dict[str, Any]:
    """References to this server by absolute URL (`<base>/Patient/1`) made relative (`Patient/1`)."""
    prefix = base.rstrip("/") + "/"
    return dict(map_references(content, lambda ref: ref[len(prefix) :] if ref.startswith(prefix) else ref))
