"""WADO-URI (PS3.18 9): GET /wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..&contentType=.."""

from __future__ import annotations

import io

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.dicomweb.test_wado import stow_files
from tests.support.data import sample

ELE = "1.2.840.10008.1.2.1"
ILE = "1.2.840.10008.1.2"


def params(ds: Dataset, **extra: str) -> dict[str, str]:
    out = {
        "requestType": "WADO",
        "studyUID": str(ds.StudyInstanceUID),
        "seriesUID": str(ds.SeriesInstanceUID),
        "objectUID": str(ds.SOPInstanceUID),
        "contentType": "application/dicom",
    }
    out.update(extra)
    return {k: v for k, v in out.items() if v != ""}


def test_dicom_object_default_and_as_stored(http: httpx.Client) -> None:
    [ct, j2k] = stow_files(http, ["CT_small.dcm", "JPEG2000.dcm"])
    response = http.get("/wado", params=params(ct))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"  # no transfer-syntax parameter (PS3.18 8.7.3.5.2)
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.content == sample("CT_small.dcm").read_bytes()
    # Default for a compressed instance: Explicit VR Little Endian, decoded.
    decoded = pydicom.dcmread(io.BytesIO(http.get("/wado", params=params(j2k)).content))
    assert decoded.file_meta.TransferSyntaxUID == ELE
    original = pydicom.dcmread(sample("JPEG2000.dcm"))
    assert (decoded.pixel_array == original.pixel_array).all()
    stored = http.get("/wado", params=params(j2k, transferSyntax=str(j2k.file_meta.TransferSyntaxUID)))
    assert stored.content == sample("JPEG2000.dcm").read_bytes()
    implicit = http.get("/wado", params=params(ct, transferSyntax=ILE))
    assert pydicom.dcmread(io.BytesIO(implicit.content)).file_meta.TransferSyntaxUID == ILE


def test_content_type_list_with_dicom(http: httpx.Client) -> None:
    [ct] = stow_files(http, ["CT_small.dcm"])
    response = http.get("/wado", params=params(ct, contentType="image/jpeg; q=0.5, application/dicom"))
    assert response.status_code == 200
    assert response.content == sample("CT_small.dcm").read_bytes()


@pytest.mark.parametrize(
    "change",
    [
        {"requestType": ""},
        {"requestType": "WADO-RS"},
        {"studyUID": ""},
        {"seriesUID": ""},
        {"objectUID": ""},
        {"objectUID": "1.2.abc"},
        {"studyUID": "1" * 65},
        {"transferSyntax": "not-a-uid"},
        {"contentType": "image/jpeg", "transferSyntax": ELE},
        {"contentType": "image/jpeg; q=x"},
    ],
)
def test_bad_parameters_are_400(http: httpx.Client, change: dict[str, str]) -> None:
    [ct] = stow_files(http, ["CT_small.dcm"])
    response = http.get("/wado", params=params(ct, **change))
    assert response.status_code == 400, change
    assert "warning" in response.headers


def test_unknown_or_mismatched_objects_are_404(http: httpx.Client) -> None:
    [ct, mr] = stow_files(http, ["CT_small.dcm", "MR_small.dcm"])
    assert http.get("/wado", params=params(ct, objectUID="1.2.3.4")).status_code == 404
    # The object exists, but not in the named study / series.
    assert http.get("/wado", params=params(ct, studyUID=str(mr.StudyInstanceUID))).status_code == 404
    assert http.get("/wado", params=params(ct, seriesUID=str(mr.SeriesInstanceUID))).status_code == 404


def test_rendered_content_types(http: httpx.Client) -> None:
    """Rendered responses in detail: tests/dicomweb/test_rendered.py."""
    [ct] = stow_files(http, ["CT_small.dcm"])
    for content_type, expected in (("", "image/jpeg"), ("image/jpeg", "image/jpeg"), ("image/png", "image/png")):
        response = http.get("/wado", params=params(ct, contentType=content_type))
        assert response.status_code == 200, content_type
        assert response.headers["content-type"] == expected
    response = http.get("/wado", params=params(ct, contentType="text/html"))
    assert response.status_code == 406
    assert "rendered" in response.json()["error"]


def test_unsupported_transfer_syntax_or_anonymize_is_406(http: httpx.Client) -> None:
    [ct] = stow_files(http, ["CT_small.dcm"])
    assert http.get("/wado", params=params(ct, transferSyntax="1.2.840.10008.1.2.4.100")).status_code == 406
    assert http.get("/wado", params=params(ct, anonymize="yes")).status_code == 406


def test_etag_and_not_modified(http: httpx.Client) -> None:
    [ct] = stow_files(http, ["CT_small.dcm"])
    first = http.get("/wado", params=params(ct))
    etag = first.headers["etag"]
    again = http.get("/wado", params=params(ct), headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    other = http.get("/wado", params=params(ct, transferSyntax=ILE), headers={"If-None-Match": etag})
    assert other.status_code == 200
