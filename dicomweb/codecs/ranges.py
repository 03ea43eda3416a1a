"""HTTP byte ranges (RFC 9110 14): parsing `Range`, evaluating `If-Range`. Pure functions over header strings.

What we answer (documented in the README and the conformance statement):
* one satisfiable range: 206 Partial Content with `Content-Range: bytes first-last/complete`;
* several ranges: they are merged when they overlap or touch; if more than one is left, the whole
  representation (200), which RFC 9110 14.2 allows (a server may ignore Range); we do not send
  multipart/byteranges;
* no satisfiable range: 416 with `Content-Range: bytes */complete`;
* a malformed header, another unit, or an `If-Range` that does not match the current strong ETag (or is a date:
  we send no Last-Modified): the Range is ignored and the whole representation is sent (RFC 9110 13.1.5, 14.2).
"""

from __future__ import annotations

from dataclasses import dataclass

_MAX_RANGES = 100


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes [start, stop) of a representation of `complete` bytes."""

    start: int
    stop: int
    complete: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{self.complete}"

    @property
    def length(self) -> int:
        return self.stop - self.start


class Unsatisfiable(Exception):
    """No range of the request overlaps the representation (416)."""

    def __init__(self, complete: int) -> None:
        super().__init__(f"no requested range overlaps the {complete} bytes of the representation")
        self.complete = complete

    @property
    def content_range(self) -> str:
        return f"bytes */{self.complete}"


def parse_range(header: str | None, complete: int) -> ByteRange | None:
    """The one range to send for `Range: header` of a `complete`-byte representation, or None to send it whole
    (no header, malformed, another unit, several disjoint ranges). Raises `Unsatisfiable` (416)."""
    if not header:
        return None
    unit, eq, spec = header.strip().partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    items = [item.strip() for item in spec.split(",")]
    if not items or len(items) > _MAX_RANGES:
        return None
    spans: list[tuple[int, int]] = []
    for item in items:
        try:
            parsed = _span(item, complete)
        except ValueError:
            return None  # syntactically invalid: ignore the header
        if parsed is not None:
            spans.append(parsed)
    if not spans:
        raise Unsatisfiable(complete)
    merged = _merge(spans)
    if len(merged) > 1:
        return None
    start, stop = merged[0]
    return ByteRange(start, stop, complete)


def _span(item: str, complete: int) -> tuple[int, int] | None:
    """[start, stop) for one range-spec; None when unsatisfiable; ValueError when malformed."""
    first, dash, last = item.partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        raise ValueError(item)
    if first == "":
        if last == "":
            raise ValueError(item)
        suffix = int(last)  # the last N bytes
        return (max(0, complete - suffix), complete) if suffix > 0 and complete > 0 else None
    start = int(first)
    if last != "" and int(last) < start:
        raise ValueError(item)
    if start >= complete:
        return None
    stop = complete if last == "" else min(int(last) + 1, complete)
    return start, stop


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, stop in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def if_range_allows(header: str | None, etag: str) -> bool:
    """RFC 9110 13.1.5: a Range applies when there is no If-Range, or when it names the current entity tag by
    strong comparison (a weak tag or a date never matches here)."""
    if header is None:
        return True
    value = header.strip()
    return not value.startswith("W/") and value == etag
