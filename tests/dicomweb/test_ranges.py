"""Frames and instances encoded on retrieve, and HTTP byte ranges (RFC 9110 14) the way OHIF/Cornerstone3D use
them for progressive HTJ2K loading: a real server, httpx, and decoders a client would use (pydicom with the
pylibjpeg plugins, imagecodecs/OpenJPH for truncated streams)."""

from __future__ import annotations

import io
from typing import Any

import httpx
import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from dicomweb.codecs import ranges
from tests.support.factory import ct, multipart, part10, stow_headers

HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
OHIF_HEADER = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def phantom(rows: int = 512, columns: int = 512, frames: int = 1, seed: int = 7) -> Dataset:
    """A 16-bit signed CT-like image: smooth body and organs plus noise (what lossless coders see in CT)."""
    y, x = np.mgrid[0:rows, 0:columns]
    body = 1000.0 * (((x - columns / 2) ** 2 / (0.42 * columns) ** 2 + (y - rows / 2) ** 2 / (0.35 * rows) ** 2) < 1)
    organ = 300.0 * np.exp(-((x - 0.6 * columns) ** 2 + (y - 0.45 * rows) ** 2) / (0.01 * rows * columns))
    rng = np.random.default_rng(seed)
    stack = np.stack([body + organ + rng.normal(0, 12, (rows, columns)) - 1000 + 40 * f for f in range(frames)])
    ds = ct(rows=rows, columns=columns, frames=frames)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = np.clip(stack, -1024, 3071).astype(np.int16).tobytes()
    return ds


def store(http: httpx.Client, *datasets: Dataset) -> None:
    response = http.post(
        "/dicom-web/studies", content=multipart([part10(ds) for ds in datasets]), headers=stow_headers()
    )
    assert response.status_code == 200, response.text


def frames_url(ds: Dataset, frames: str = "1") -> str:
    return (
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/{frames}"
    )


def original(ds: Dataset) -> np.ndarray[Any, Any]:
    return pydicom.dcmread(io.BytesIO(part10(ds))).pixel_array


def pylibjpeg_decode(stream: bytes, ds: Dataset, syntax: str = HTJ2K_RPCL) -> np.ndarray[Any, Any]:
    options: dict[str, Any] = {  # pydicom's stubs type these keywords as DecodeOptions
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "samples_per_pixel": 1,
        "bits_allocated": 16,
        "bits_stored": int(ds.BitsStored),
        "pixel_representation": int(ds.PixelRepresentation),
        "photometric_interpretation": "MONOCHROME2",
        "number_of_frames": 1,
    }
    arr, _ = get_decoder(UID(syntax)).as_array(encapsulate([stream]), **options)
    return arr


def test_ohif_progressive_htj2k_by_byte_range(http: httpx.Client) -> None:
    """Exactly OHIF 3.13's progressive request: `?accept=image/jhc` wins over its Accept header, the first 64 KiB
    are a 206 that decodes to a recognizable image, the rest completes a stream that decodes bit-exactly."""
    ds = phantom()
    store(http, ds)
    expected = original(ds)
    url = frames_url(ds)
    first = http.get(url, params={"accept": "image/jhc"}, headers={"Accept": OHIF_HEADER, "Range": "bytes=0-65535"})
    assert first.status_code == 206, first.text
    assert first.headers["content-type"] == f"image/jhc; transfer-syntax={HTJ2K_RPCL}"
    assert first.headers["accept-ranges"] == "bytes"
    total = int(first.headers["content-range"].split("/")[1])
    assert first.headers["content-range"] == f"bytes 0-65535/{total}"
    assert len(first.content) == 65536 < total

    preview = imagecodecs.htj2k_decode(first.content, resilient=True).astype(float)  # what OpenJPH makes of it
    assert preview.shape == expected.shape
    assert np.corrcoef(preview.ravel(), expected.astype(float).ravel())[0, 1] > 0.95
    low = imagecodecs.htj2k_decode(first.content, resilient=True, skipres=3).astype(float)  # 64 x 64
    reference = expected.astype(float).reshape(64, 8, 64, 8).mean(axis=(1, 3))
    assert np.corrcoef(low.ravel(), reference.ravel())[0, 1] > 0.95

    rest = http.get(url, params={"accept": "image/jhc"}, headers={"Accept": OHIF_HEADER, "Range": "bytes=65536-"})
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes 65536-{total - 1}/{total}"
    assert rest.headers["etag"] == first.headers["etag"]
    whole = http.get(url, params={"accept": "image/jhc"}, headers={"Accept": OHIF_HEADER})
    assert whole.status_code == 200 and whole.headers["etag"] == first.headers["etag"]
    assert whole.content == first.content + rest.content
    assert np.array_equal(pylibjpeg_decode(whole.content, ds), expected)
    assert np.array_equal(imagecodecs.htj2k_decode(whole.content), expected)


def test_range_edge_cases_on_a_single_part_frame(http: httpx.Client) -> None:
    ds = phantom(64, 64)
    store(http, ds)
    url = frames_url(ds)
    accept = {"Accept": "application/octet-stream"}  # native bytes: 64 * 64 * 2
    full = http.get(url, headers=accept)
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
    data, etag = full.content, full.headers["etag"]
    assert len(data) == 8192

    def get(**headers: str) -> httpx.Response:
        return http.get(url, headers={**accept, **headers})

    suffix = get(Range="bytes=-100")
    assert (suffix.status_code, suffix.content) == (206, data[-100:])
    assert suffix.headers["content-range"] == "bytes 8092-8191/8192"
    assert get(Range="bytes=0-0").content == data[:1]
    assert get(Range="bytes=8000-99999").headers["content-range"] == "bytes 8000-8191/8192"
    merged = get(Range="bytes=0-10, 5-20")
    assert (merged.status_code, merged.content) == (206, data[:21])
    unsatisfiable = get(Range="bytes=8192-")
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == "bytes */8192"
    for ignored in ("bytes=abc", "items=0-5", "bytes=5-1", "bytes=0-1, 100-200"):
        response = get(Range=ignored)
        assert (response.status_code, response.content) == (200, data), ignored
    assert get(Range="bytes=10-19", **{"If-Range": etag}).status_code == 206
    assert get(Range="bytes=10-19", **{"If-Range": '"stale"'}).status_code == 200
    assert get(Range="bytes=10-19", **{"If-Range": "W/" + etag}).status_code == 200


def test_range_of_a_multipart_body_is_consistent(http: httpx.Client) -> None:
    """A Range on multipart/related counts bytes of the whole body, whose boundary is the same every time."""
    ds = phantom(64, 64, frames=3)
    store(http, ds)
    url = frames_url(ds, "1,2,3")
    headers = {"Accept": f'multipart/related; type="image/jphc"; transfer-syntax={HTJ2K_RPCL}'}
    whole = http.get(url, headers=headers)
    assert whole.status_code == 200
    assert http.get(url, headers=headers).content == whole.content  # deterministic boundary
    size = len(whole.content)
    pieces = [(0, 99), (100, size // 2), (size // 2 + 1, size - 1)]
    got = b""
    for start, end in pieces:
        response = http.get(url, headers={**headers, "Range": f"bytes={start}-{end}"})
        assert response.status_code == 206
        assert response.headers["content-type"] == whole.headers["content-type"]
        got += response.content
    assert got == whole.content
    # Decoding path (unknown lengths until produced): still answered.
    native = {"Accept": "multipart/related; type=application/octet-stream"}
    whole_native = http.get(url, headers=native).content
    part = http.get(url, headers={**native, "Range": "bytes=10-49"})
    assert (part.status_code, part.content) == (206, whole_native[10:50])


def test_frames_in_every_encoded_media_type(http: httpx.Client) -> None:
    ds = phantom(64, 64, frames=2)
    store(http, ds)
    expected = original(ds)
    lossless = {
        "image/jp2": "1.2.840.10008.1.2.4.90",
        "image/jphc": HTJ2K_RPCL,
        "image/jphc; transfer-syntax=1.2.840.10008.1.2.4.201": "1.2.840.10008.1.2.4.201",
        "image/dicom-rle": "1.2.840.10008.1.2.5",
        f"application/octet-stream; transfer-syntax={HTJ2K_RPCL}": HTJ2K_RPCL,
    }
    for accept, syntax in lossless.items():
        response = http.get(frames_url(ds, "2"), headers={"Accept": accept})
        assert response.status_code == 200, (accept, response.text)
        assert response.headers["content-type"].endswith(f"transfer-syntax={syntax}")
        assert np.array_equal(pylibjpeg_decode(response.content, ds, syntax), expected[1]), accept
    lossy = http.get(frames_url(ds, "1"), headers={"Accept": "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.91"})
    assert lossy.status_code == 200
    error = pylibjpeg_decode(lossy.content, ds, "1.2.840.10008.1.2.4.91").astype(float) - expected[0]
    assert 0 < np.abs(error).mean() < 20
    refused = http.get(frames_url(ds, "1"), headers={"Accept": "image/jpeg"})  # 16-bit data: no JPEG baseline
    assert refused.status_code == 406
    assert "image/jphc" in refused.json()["error"]  # what can be sent instead


@pytest.mark.parametrize(
    ("syntax", "lossy"),
    [(HTJ2K_RPCL, False), ("1.2.840.10008.1.2.4.90", False), ("1.2.840.10008.1.2.4.203", True)],
)
def test_instances_in_compressed_syntaxes(http: httpx.Client, syntax: str, lossy: bool) -> None:
    ds = phantom(64, 64, frames=2)
    store(http, ds)
    url = frames_url(ds).rsplit("/frames/", 1)[0]
    response = http.get(
        url, headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'}
    )
    assert response.status_code == 200, response.text
    body = response.content
    start = body.index(b"\r\n\r\n") + 4
    got = pydicom.dcmread(io.BytesIO(body[start:]))
    assert got.file_meta.TransferSyntaxUID == syntax
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    if lossy:
        assert got.LossyImageCompression == "01"
        assert np.abs(got.pixel_array.astype(float) - original(ds)).mean() < 20
    else:
        assert np.array_equal(got.pixel_array, original(ds))
    single = http.get(url, headers={"Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert single.status_code == 406  # JPEG baseline: 8-bit only


def test_cors_lets_a_viewer_send_range_and_read_content_range(make_server: Any) -> None:
    origin = "http://viewer.example"
    server = make_server(cors_origins=(origin,))
    with httpx.Client(base_url=server.url, headers=server.headers) as http:
        ds = phantom(64, 64)
        store(http, ds)
        preflight = http.options(
            frames_url(ds),
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "range, authorization",
            },
        )
        assert preflight.status_code in (200, 204)
        allowed = preflight.headers.get("access-control-allow-headers", "").lower()
        assert "range" in allowed or allowed == "*"
        got = http.get(frames_url(ds), headers={"Origin": origin, "Range": "bytes=0-9", "Accept": "image/jphc"})
        assert got.status_code == 206
        exposed = got.headers["access-control-expose-headers"].lower()
        assert "content-range" in exposed and "accept-ranges" in exposed


def test_range_parser() -> None:
    assert ranges.parse_range(None, 10) is None
    assert ranges.parse_range("bytes=2-4", 10) == ranges.ByteRange(2, 5, 10)
    assert ranges.parse_range("bytes=-3", 10) == ranges.ByteRange(7, 10, 10)
    assert ranges.parse_range("bytes=-30", 10) == ranges.ByteRange(0, 10, 10)
    assert ranges.parse_range("bytes=0-1,2-3", 10) == ranges.ByteRange(0, 4, 10)  # touching: merged
    assert ranges.parse_range("bytes=0-1,3-4", 10) is None  # disjoint: the whole representation
    assert ranges.parse_range("bytes=20-30, 5-", 10) == ranges.ByteRange(5, 10, 10)  # unsatisfiable one skipped
    with pytest.raises(ranges.Unsatisfiable):
        ranges.parse_range("bytes=10-", 10)
    with pytest.raises(ranges.Unsatisfiable):
        ranges.parse_range("bytes=-0", 10)
    assert ranges.if_range_allows(None, '"a"')
    assert ranges.if_range_allows('"a"', '"a"')
    assert not ranges.if_range_allows("Tue, 01 Jan 2030 00:00:00 GMT", '"a"')
