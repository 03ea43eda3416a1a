"""STOW-RS requests framed as real senders frame them (RFC 9110 2.5: liberal in what is received).

Orthanc's DICOMweb client (1.7) sends `multipart/related; type="application/dicom"; boundary=<uuid>-<uuid>`
(73 characters, over RFC 2046's 70), unquoted, with a chunked body, a Content-Length header in each part and no
line break after the closing delimiter: `test_orthanc_peer.py` checks it with Orthanc itself; here the same bytes
and the other liberal cases (quoted boundaries with spaces, `type` missing or carrying parameters, transport
padding) go over HTTP. dicomweb-client's framing (a quoted 32-hex-digit boundary) is every other STOW test's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.dicomweb.test_stow_errors import counts
from tests.support.factory import ct, part10

REFERENCED = "00081199"


def orthanc_body(parts: list[bytes], boundary: str) -> bytes:
    """The body as Orthanc's DicomWebClient.cpp writes it: per-part Content-Length, no CRLF after the end."""
    out = b""
    for p in parts:
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(p)}\r\n\r\n"
        out += head.encode() + p + b"\r\n"
    return out + f"--{boundary}--".encode()


def chunked(data: bytes, size: int = 1000) -> Iterator[bytes]:
    """A generator body: httpx sends it with Transfer-Encoding: chunked, as Orthanc does."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def stored(resp: httpx.Response) -> int:
    return len(resp.json().get(REFERENCED, {}).get("Value", []))


def test_orthanc_framing_is_stored(http: httpx.Client, server) -> None:
    boundary = f"{uuid.uuid4()}-{uuid.uuid4()}"
    assert len(boundary) == 73
    body = orthanc_body([part10(ct()), part10(ct())], boundary)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    resp = http.post("/dicom-web/studies", content=chunked(body), headers=headers)
    assert resp.status_code == 200, resp.text
    assert stored(resp) == 2
    assert counts(server.dsn)[2] == 2


@pytest.mark.parametrize(
    ("boundary", "content_type"),
    [
        ("b" * 256, 'multipart/related; type="application/dicom"; boundary={b}'),  # the longest read
        ("with spaces: and=signs", 'multipart/related; type="application/dicom"; boundary="{b}"'),
        ("no-type-parameter", "multipart/related; boundary={b}"),
        ("type-with-params", 'multipart/related; type="application/dicom; transfer-syntax=*"; boundary={b}'),
        ("cased", 'Multipart/Related; Type="Application/DICOM"; Boundary="{b}"'),
    ],
)
def test_liberal_framings_are_stored(http: httpx.Client, boundary: str, content_type: str) -> None:
    body = orthanc_body([part10(ct())], boundary)
    headers = {"Content-Type": content_type.format(b=boundary), "Accept": "application/dicom+json"}
    resp = http.post("/dicom-web/studies", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    assert stored(resp) == 1


def test_transport_padding_and_preamble(http: httpx.Client) -> None:
    """RFC 2046 5.1.1: white space may follow a boundary on its line; a preamble before the first is ignored."""
    data = part10(ct())
    body = b"a preamble\r\n--pad \t \r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--pad--  \r\nepilogue"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=pad'}
    resp = http.post("/dicom-web/studies", content=body, headers=headers)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    ("boundary", "reason"),
    [("b" * 257, "1 to 256 characters"), ('"tab\there"', "printable ASCII")],
)
def test_unusable_boundaries_are_400_and_store_nothing(http: httpx.Client, server, boundary: str, reason: str) -> None:
    body = orthanc_body([part10(ct())], boundary.strip('"'))
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    resp = http.post("/dicom-web/studies", content=body, headers=headers)
    assert resp.status_code == 400, resp.text
    assert reason in resp.text
    assert counts(server.dsn) == (0, 0, 0)
