"""The multipart/related codec, fed the way a socket delivers bytes: in arbitrary chunks."""

from __future__ import annotations

import random

import pytest

from dicomweb.codecs.mediatypes import accept_from_request, parse_accept, parse_media_type
from dicomweb.codecs.multipart import MultipartParser, PartData, PartEnd, PartStart
from dicomweb.errors import BadRequest, PayloadTooLarge


def body(parts: list[bytes], boundary: str = "b0und", preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for p in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\n".encode() + epilogue


def parse(data: bytes, boundary: bytes = b"b0und", chunk: int | None = None) -> list[tuple[dict[str, str], bytes]]:
    parser = MultipartParser(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    current = b""
    headers: dict[str, str] = {}
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        for ev in parser.feed(data[i : i + step]):
            if isinstance(ev, PartStart):
                headers, current = ev.headers, b""
            elif isinstance(ev, PartData):
                current += ev.data
            elif isinstance(ev, PartEnd):
                parts.append((headers, current))
    parser.close()
    return parts


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, None])
def test_parts_survive_any_chunking(chunk: int | None) -> None:
    payloads = [b"abc", b"", b"\r\n--b0un not a boundary \r\n--b0un", bytes(range(256)) * 10]
    parsed = parse(body(payloads), chunk=chunk)
    assert [p for _h, p in parsed] == payloads
    assert parsed[0][0]["content-type"] == "application/dicom"


def test_random_binary_payloads() -> None:
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.randint(0, 5000)) for _ in range(20)]
    for chunk in (13, 4096):
        assert [p for _h, p in parse(body(payloads), chunk=chunk)] == payloads


def test_preamble_epilogue_and_padding() -> None:
    data = body([b"x"], preamble=b"ignored preamble\r\n", epilogue=b"trailing junk")
    assert [p for _h, p in parse(data)] == [b"x"]
    padded = b"--b0und  \t\r\nContent-Type: application/dicom\r\n\r\nx\r\n--b0und--"
    assert [p for _h, p in parse(padded)] == [b"x"]


def test_truncated_body_is_an_error() -> None:
    data = body([b"abcdef"])[:-20]
    with pytest.raises(BadRequest, match="ended before"):
        parse(data)


def test_wrong_boundary_is_an_error() -> None:
    with pytest.raises(BadRequest):
        parse(body([b"abc"], boundary="other"))


def test_huge_part_headers_are_refused() -> None:
    data = b"--b0und\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\nx\r\n--b0und--"
    with pytest.raises(PayloadTooLarge):
        parse(data)


def test_headers_are_case_insensitive_and_folded() -> None:
    data = b"--b0und\r\nCONTENT-TYPE: application/dicom;\r\n transfer-syntax=1.2\r\n\r\nx\r\n--b0und--"
    ((headers, payload),) = parse(data)
    assert headers["content-type"] == "application/dicom; transfer-syntax=1.2"
    assert payload == b"x"


def test_no_parts_is_an_error() -> None:
    with pytest.raises(BadRequest):
        parse(b"--b0und--\r\n")


def test_media_type_parameters_quoted_or_not() -> None:
    a = parse_media_type('multipart/related; type="application/dicom"; boundary="a b"')
    b = parse_media_type("Multipart/Related;type=application/dicom;boundary=xyz")
    assert a.essence == b.essence == "multipart/related"
    assert a.param("type") == b.param("type") == "application/dicom"
    assert a.param("boundary") == "a b"
    with pytest.raises(BadRequest):
        parse_media_type("not-a-type")


def test_accept_lists_qvalues_and_query_override() -> None:
    ranges = parse_accept(['application/json;q=0.5, multipart/related; type="application/dicom", */*;q=0.1'])
    assert [r.essence for r in ranges] == ["multipart/related", "application/json", "*/*"]
    chosen = accept_from_request(["image/jhc"], ["multipart/related; type=application/octet-stream"])
    assert [r.essence for r in chosen] == ["image/jhc"]
    assert accept_from_request([], [])[0].essence == "*/*"
