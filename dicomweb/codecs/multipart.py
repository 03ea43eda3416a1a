"""multipart/related (RFC 2387 over RFC 2046 5.1) as a pure incremental codec (house style 1).

`MultipartParser.feed` takes bytes as they arrive from the socket and returns events; it never holds more
than one header block plus a boundary's length of body, so a multi-gigabyte part streams through in constant
memory. `encode_part_head`/`closing_delimiter` build responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dicomweb.errors import BadRequest, PayloadTooLarge

CRLF = b"\r\n"

MAX_BOUNDARY = 256
"""The longest boundary read. RFC 2046 5.1.1 allows 70 characters, but real senders exceed it (Orthanc's
DICOMweb client joins two UUIDs: 73), and reading longer ones costs nothing; the bound keeps the bytes held
back between chunks, and the delimiter searched for, small. RFC 9110 2.5: be liberal in what is received."""


@dataclass(frozen=True, slots=True)
class PartStart:
    headers: dict[str, str]
    """Header names lower-cased; a repeated header keeps its last value."""


@dataclass(frozen=True, slots=True)
class PartData:
    data: bytes


@dataclass(frozen=True, slots=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd

_PREAMBLE, _HEADERS, _BODY, _AFTER_DELIMITER, _EPILOGUE = range(5)


@dataclass(slots=True)
class MultipartParser:
    boundary: bytes
    max_header_bytes: int = 16 * 1024
    max_preamble_bytes: int = 64 * 1024
    _state: int = _PREAMBLE
    _buf: bytearray = field(default_factory=bytearray)
    _parts: int = 0
    _dash_boundary: bytes = b""
    _delimiter: bytes = b""

    def __post_init__(self) -> None:
        check_boundary(self.boundary)
        self._dash_boundary = b"--" + self.boundary
        self._delimiter = CRLF + self._dash_boundary

    @property
    def finished(self) -> bool:
        return self._state == _EPILOGUE

    @property
    def parts(self) -> int:
        return self._parts

    def feed(self, data: bytes) -> list[Event]:
        if self._state == _EPILOGUE:
            return []  # the epilogue is ignored (RFC 2046 5.1.1)
        self._buf += data
        events: list[Event] = []
        while True:
            before = (self._state, len(self._buf))
            self._step(events)
            if (self._state, len(self._buf)) == before or self._state == _EPILOGUE:
                break
        return events

    def close(self) -> None:
        """The body ended: anything but a complete multipart body is an error."""
        if self._state == _EPILOGUE:
            return
        if self._state == _PREAMBLE:
            raise BadRequest("multipart body has no part with the declared boundary")
        raise BadRequest("multipart body ended before its closing boundary (truncated upload?)")

    def _step(self, events: list[Event]) -> None:
        buf = self._buf
        if self._state == _PREAMBLE:
            if buf.startswith(self._dash_boundary):
                del buf[: len(self._dash_boundary)]
                self._state = _AFTER_DELIMITER
                return
            at = buf.find(self._delimiter)
            if at >= 0:
                del buf[: at + len(self._delimiter)]
                self._state = _AFTER_DELIMITER
                return
            if len(buf) > self.max_preamble_bytes:
                raise BadRequest("multipart body does not start with the boundary given in Content-Type")
            return
        if self._state == _AFTER_DELIMITER:
            # After a delimiter: "--" closes the body; otherwise optional transport padding then CRLF.
            if len(buf) < 2:
                return
            if buf.startswith(b"--"):
                if self._parts == 0:
                    raise BadRequest("multipart body has no parts")
                self._state = _EPILOGUE
                buf.clear()
                return
            eol = buf.find(CRLF)
            if eol < 0:
                if len(buf) > 256:
                    raise BadRequest("malformed multipart boundary line")
                return
            if buf[:eol].strip(b" \t"):
                raise BadRequest("malformed multipart boundary line")
            del buf[: eol + 2]
            self._state = _HEADERS
            return
        if self._state == _HEADERS:
            if buf.startswith(CRLF):  # a part with no headers
                end, skip = 0, 2
            else:
                end = buf.find(b"\r\n\r\n")
                skip = 4
            if end < 0:
                if len(buf) > self.max_header_bytes:
                    raise PayloadTooLarge(f"multipart part headers exceed {self.max_header_bytes} bytes")
                return
            if end > self.max_header_bytes:
                raise PayloadTooLarge(f"multipart part headers exceed {self.max_header_bytes} bytes")
            headers = _parse_headers(bytes(buf[:end]))
            del buf[: end + skip]
            self._parts += 1
            self._state = _BODY
            events.append(PartStart(headers))
            return
        if self._state == _BODY:
            at = buf.find(self._delimiter)
            if at >= 0:
                if at:
                    events.append(PartData(_take(buf, at)))
                del buf[: at + len(self._delimiter)]
                events.append(PartEnd())
                self._state = _AFTER_DELIMITER
                return
            # Keep what could be the start of a delimiter split across chunks.
            safe = len(buf) - (len(self._delimiter) - 1)
            if safe > 0:
                events.append(PartData(_take(buf, safe)))
                del buf[:safe]
            return


def check_boundary(boundary: bytes) -> None:
    """A boundary this parser reads: 1 to `MAX_BOUNDARY` printable ASCII characters (RFC 2046 5.1.1 lists a
    narrower set; any printable character, the space included, delimits just as well)."""
    if not 1 <= len(boundary) <= MAX_BOUNDARY:
        raise BadRequest(f"multipart boundary must be 1 to {MAX_BOUNDARY} characters")
    if any(not 0x20 <= b < 0x7F for b in boundary):
        raise BadRequest("multipart boundary must be printable ASCII")


def _take(buf: bytearray, n: int) -> bytes:
    """The first n bytes as bytes, copied once (a bytearray slice would copy them twice: part bodies are the
    bulk of a STOW-RS request)."""
    with memoryview(buf) as view, view[:n] as head:
        return bytes(head)


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("multipart part headers are not ASCII") from None
    name = None
    for line in text.split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and name is not None:  # obsolete line folding
            headers[name] += " " + line.strip()
            continue
        if ":" not in line:
            raise BadRequest(f"malformed multipart part header line: {line[:80]!r}")
        raw_name, value = line.split(":", 1)
        name = raw_name.strip().lower()
        if not name:
            raise BadRequest("empty multipart part header name")
        headers[name] = value.strip()
    return headers


def encode_part_head(boundary: str, content_type: str, extra: dict[str, str] | None = None) -> bytes:
    """The delimiter and headers that precede one part's bytes in a response."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def part_separator() -> bytes:
    return CRLF


def closing_delimiter(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")
