"""Media types, Accept negotiation and the `accept` query parameter (PS3.18 8.7, RFC 9110 12.5.1).

Pure functions over header strings. Parameters may be quoted or not; a header may list several types, each
with a q-value; a type's `type` and `transfer-syntax` parameters are what DICOMweb negotiates on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dicomweb.errors import BadRequest

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
MULTIPART_RELATED = "multipart/related"


@dataclass(frozen=True, slots=True)
class MediaType:
    type: str
    subtype: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def essence(self) -> str:
        return f"{self.type}/{self.subtype}"

    def param(self, name: str) -> str | None:
        return self.params.get(name)

    def matches(self, essence: str) -> bool:
        """Does this (possibly wildcard) range accept `essence`?"""
        kind, _, sub = essence.partition("/")
        if self.type == "*":
            return True
        if self.type != kind:
            return False
        return self.subtype in ("*", sub)

    def __str__(self) -> str:
        text = self.essence
        for key, value in self.params.items():
            text += f'; {key}="{value}"' if _needs_quotes(value) else f"; {key}={value}"
        return text


def _needs_quotes(value: str) -> bool:
    return any(c in value for c in ' ()<>@,;:\\"/[]?={}\t') or value == ""


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double-quoted strings."""
    out: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
            continue
        if ch == "\\" and quoted:
            current.append(ch)
            escaped = True
            continue
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quoted:
        raise BadRequest(f"unbalanced quotes in media type: {text[:120]!r}")
    out.append("".join(current))
    return out


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        escaped = False
        for ch in inner:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(ch)
        return "".join(out)
    return value


def parse_media_type(text: str) -> MediaType:
    """Parse one media type with parameters: `multipart/related; type="application/dicom"; boundary=x`."""
    pieces = _split(text, ";")
    essence = pieces[0].strip().lower()
    kind, slash, sub = essence.partition("/")
    if not slash or not kind or not sub or " " in essence:
        raise BadRequest(f"malformed media type: {text.strip()[:120]!r}")
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        if not piece.strip():
            continue
        name, eq, value = piece.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            raise BadRequest(f"malformed media type parameter: {piece.strip()[:80]!r}")
        value = _unquote(value)
        if name == "q":
            try:
                q = float(value)
            except ValueError:
                raise BadRequest(f"malformed q-value: {value[:20]!r}") from None
            if not 0.0 <= q <= 1.0:
                raise BadRequest(f"q-value out of range: {value[:20]!r}")
            continue
        params[name] = value if name == "boundary" else value.strip()
    if "type" in params:
        params["type"] = params["type"].lower()
    return MediaType(kind, sub, params, q)


def parse_accept(values: list[str]) -> list[MediaType]:
    """Parse one or more Accept header values into ranges, most preferred first (stable for ties).

    An empty list means "anything" (RFC 9110 12.5.1)."""
    ranges: list[MediaType] = []
    for value in values:
        for item in _split(value, ","):
            if item.strip():
                ranges.append(parse_media_type(item))
    ranges = [r for r in ranges if r.q > 0]
    ranges.sort(key=lambda r: -r.q)
    return ranges


def accept_from_request(query_accept: list[str], header_accept: list[str]) -> list[MediaType]:
    """The `accept` query parameter, when present, replaces the Accept header (PS3.18 8.3.3.1)."""
    if query_accept:
        return parse_accept(query_accept)
    ranges = parse_accept(header_accept)
    return ranges or [MediaType("*", "*")]
