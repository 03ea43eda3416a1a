"""Response bodies of the retrieve services: parts produced on demand, single part or multipart/related
(PS3.18 8.6.1.2), whole or a byte range of the whole (RFC 9110 14).

A body knows its exact length when every part's length is known without producing it, so that Content-Length
can be sent and a Range answered by producing only the bytes asked for: a part that can read a slice of itself
(`Part.read`, e.g. a frame in a blob) is read from there; other parts are produced and cut.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from dicomweb.codecs.multipart import closing_delimiter, encode_part_head, part_separator

Chunks = Callable[[], AsyncIterator[bytes]]
Reader = Callable[[int, int], Awaitable[bytes]]
"""(offset, length) -> bytes of a part, for byte-range requests."""


@dataclass(frozen=True, slots=True)
class Part:
    """One body part: its Content-Type, length when known without producing it, and its bytes on demand."""

    content_type: str
    length: int | None
    chunks: Chunks
    location: str | None = None
    read: Reader | None = None


def one(data: bytes) -> Chunks:
    async def gen() -> AsyncIterator[bytes]:
        yield data

    return gen


def in_memory(part: Part, data: bytes) -> Part:
    """The part with its bytes already produced (its length known)."""
    return Part(part.content_type, len(data), one(data), part.location)


@dataclass(frozen=True, slots=True)
class Body:
    parts: list[Part]
    multipart: bool
    part_type: str
    """The multipart/related `type` parameter (the media type of the parts)."""

    def content_type(self, boundary: str) -> str:
        if not self.multipart:
            return self.parts[0].content_type
        return f'multipart/related; type="{self.part_type}"; boundary={boundary}'

    def length(self, boundary: str) -> int | None:
        """The exact body length when every part's is known (so that Content-Length can be sent)."""
        if any(p.length is None for p in self.parts):
            return None
        if not self.multipart:
            return self.parts[0].length
        total = len(closing_delimiter(boundary))
        for part in self.parts:
            total += len(_head(boundary, part)) + int(part.length or 0) + len(part_separator())
        return total

    async def chunks(self, boundary: str) -> AsyncIterator[bytes]:
        if not self.multipart:
            async for chunk in self.parts[0].chunks():
                yield chunk
            return
        for part in self.parts:
            yield _head(boundary, part)
            async for chunk in part.chunks():
                yield chunk
            yield part_separator()
        yield closing_delimiter(boundary)

    async def materialized(self) -> Body:
        """The same body with every part produced in memory (to answer a Range when lengths were unknown)."""
        parts = [in_memory(p, b"".join([c async for c in p.chunks()])) if p.length is None else p for p in self.parts]
        return Body(parts, self.multipart, self.part_type)

    async def range_chunks(self, boundary: str, start: int, stop: int) -> AsyncIterator[bytes]:
        """Bytes [start, stop) of the body; every part's length must be known."""
        position = 0
        for length, produce in self._segments(boundary):
            lo, hi = max(start, position), min(stop, position + length)
            if lo < hi:
                async for chunk in produce(lo - position, hi - lo):
                    yield chunk
            position += length
            if position >= stop:
                return

    def _segments(self, boundary: str) -> list[tuple[int, Callable[[int, int], AsyncIterator[bytes]]]]:
        if not self.multipart:
            return [(int(self.parts[0].length or 0), _slicer(self.parts[0]))]
        out: list[tuple[int, Callable[[int, int], AsyncIterator[bytes]]]] = []
        for part in self.parts:
            head = _head(boundary, part)
            out.append((len(head), _static(head)))
            out.append((int(part.length or 0), _slicer(part)))
            out.append((len(part_separator()), _static(part_separator())))
        tail = closing_delimiter(boundary)
        out.append((len(tail), _static(tail)))
        return out


def _static(data: bytes) -> Callable[[int, int], AsyncIterator[bytes]]:
    async def produce(offset: int, length: int) -> AsyncIterator[bytes]:
        yield data[offset : offset + length]

    return produce


def _slicer(part: Part) -> Callable[[int, int], AsyncIterator[bytes]]:
    async def produce(offset: int, length: int) -> AsyncIterator[bytes]:
        if part.read is not None:
            yield await part.read(offset, length)
            return
        position = 0
        async for chunk in part.chunks():
            lo, hi = max(offset, position), min(offset + length, position + len(chunk))
            if lo < hi:
                yield chunk[lo - position : hi - position]
            position += len(chunk)
            if position >= offset + length:
                return

    return produce


def _head(boundary: str, part: Part) -> bytes:
    extra = {"Content-Location": part.location} if part.location else None
    return encode_part_head(boundary, part.content_type, extra)
