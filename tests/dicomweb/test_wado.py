"""WADO-RS retrieve (PS3.18 10.4) through dicomweb-client and raw HTTP: instances, metadata, frames, bulk data,
transfer syntax negotiation, entity tags, compression and CORS."""

from __future__ import annotations

import gzip
import io
from typing import Any

import httpx
import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import pack_bits
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomweb.codecs.multipart import MultipartParser, PartData, PartEnd, PartStart
from tests.support.data import sample

ELE = "1.2.840.10008.1.2.1"
ILE = "1.2.840.10008.1.2"
MPEG2 = "1.2.840.10008.1.2.4.100"  # no encoder: asking for it is 406 (JPEG-LS and HTJ2K now are encoded)
ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
OHIF_FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"

STORED = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",  # implicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "image_dfl.dcm",  # deflated explicit VR little endian
    "JPEG2000.dcm",  # JPEG 2000 (lossy)
    "emri_small_jpeg_2k_lossless.dcm",  # JPEG 2000 lossless, 10 frames
    "SC_rgb_rle_2frame.dcm",  # RLE, RGB, 2 frames
    "liver.dcm",  # 1-bit, 3 frames
]


def stow_files(http: httpx.Client, names: list[str]) -> list[Dataset]:
    """Store files byte for byte (dicomweb-client would re-encode them) and return their headers."""
    stow_bytes(http, [sample(name).read_bytes() for name in names])
    return [pydicom.dcmread(sample(name), stop_before_pixels=True) for name in names]


def stow_bytes(http: httpx.Client, files: list[bytes]) -> None:
    boundary = "hounsfield-test-boundary"
    body = b""
    for data in files:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    response = http.post(
        "/dicom-web/studies",
        content=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    assert response.status_code == 200, response.text
    assert "00081198" not in response.json(), response.text


def path(ds: Dataset, suffix: str = "") -> str:
    return (
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{suffix}"
    )


def parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related response with our own parser (a second, independent reading)."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
    parser = MultipartParser(boundary.encode())
    out: list[tuple[dict[str, str], bytes]] = []
    data = b""
    headers: dict[str, str] = {}
    for event in parser.feed(response.content):
        if isinstance(event, PartStart):
            headers, data = event.headers, b""
        elif isinstance(event, PartData):
            data += event.data
        elif isinstance(event, PartEnd):
            out.append((headers, data))
    parser.close()
    return out


def pixels(name: str) -> np.ndarray[Any, Any]:
    return pydicom.dcmread(sample(name)).pixel_array


def frame_bytes(name: str, index: int) -> bytes:
    ds = pydicom.dcmread(sample(name))
    arr = ds.pixel_array
    frame = arr[index] if int(ds.get("NumberOfFrames") or 1) > 1 else arr
    if ds.BitsAllocated == 1:
        return pack_bits(frame)
    return frame.astype(frame.dtype.newbyteorder("<")).tobytes()


# ---------------------------------------------------------------------------------------------- instances


@pytest.mark.parametrize("name", STORED)
def test_instances_as_stored_are_the_original_bytes(http: httpx.Client, name: str) -> None:
    [ds] = stow_files(http, [name])
    response = http.get(path(ds), headers={"Accept": ANY})
    assert response.status_code == 200, name
    assert response.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert int(response.headers["content-length"]) == len(response.content)
    [(part_headers, body)] = parts(response)
    assert part_headers["content-type"] == f"application/dicom; transfer-syntax={ds.file_meta.TransferSyntaxUID}"
    assert part_headers["content-location"].endswith(path(ds))
    assert body == sample(name).read_bytes(), name


@pytest.mark.parametrize("name", STORED)
def test_instances_default_to_explicit_vr_little_endian(http: httpx.Client, client: Any, name: str) -> None:
    [ds] = stow_files(http, [name])
    got = client.retrieve_instance(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, media_types=("application/dicom",)
    )
    assert got.file_meta.TransferSyntaxUID == ELE, name
    assert got.SOPInstanceUID == ds.SOPInstanceUID  # decoding does not make a new instance
    assert np.array_equal(got.pixel_array, pixels(name)), name


def test_explicit_transfer_syntax_and_not_acceptable(http: httpx.Client) -> None:
    [ct, j2k] = stow_files(http, ["CT_small.dcm", "JPEG2000.dcm"])
    # dicomweb-client refuses to ask for Implicit VR Little Endian; raw HTTP does.
    accept = f"multipart/related; type=application/dicom; transfer-syntax={ILE}"
    [(head, body)] = parts(http.get(path(ct), headers={"Accept": accept}))
    assert head["content-type"] == f"application/dicom; transfer-syntax={ILE}"
    got = pydicom.dcmread(io.BytesIO(body))
    assert got.file_meta.TransferSyntaxUID == ILE
    assert np.array_equal(got.pixel_array, pixels("CT_small.dcm"))
    response = http.get(
        path(j2k), headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={MPEG2}'}
    )
    assert response.status_code == 406
    assert "warning" in response.headers and MPEG2 in response.json()["error"]


def test_q_values_quoting_and_the_accept_query_parameter(http: httpx.Client) -> None:
    [j2k] = stow_files(http, ["JPEG2000.dcm"])
    stored = str(j2k.file_meta.TransferSyntaxUID)
    accept = (
        f"multipart/related; type=application/dicom; transfer-syntax={MPEG2}, "
        f'multipart/related; type="application/dicom"; transfer-syntax="*"; q=0.8, '
        "multipart/related; type=application/dicom; q=0.5"
    )
    [(head, _body)] = parts(http.get(path(j2k), headers={"Accept": accept}))
    assert head["content-type"] == f"application/dicom; transfer-syntax={stored}"
    [(head, _body)] = parts(http.get(path(j2k), headers={"Accept": "*/*"}))
    assert head["content-type"] == f"application/dicom; transfer-syntax={ELE}"
    # The accept query parameter replaces the header (PS3.18 8.3.3.1).
    response = http.get(path(j2k), params={"accept": ANY}, headers={"Accept": "application/dicom+json"})
    [(head, body)] = parts(response)
    assert head["content-type"] == f"application/dicom; transfer-syntax={stored}"
    assert body == sample("JPEG2000.dcm").read_bytes()
    assert http.get(path(j2k), params={"accept": "application/dicom+json"}).status_code == 406


def test_single_part_application_dicom_for_one_instance(http: httpx.Client) -> None:
    [ct] = stow_files(http, ["CT_small.dcm"])
    response = http.get(path(ct), headers={"Accept": "application/dicom"})
    assert response.status_code == 200
    assert response.headers["content-type"] == f"application/dicom; transfer-syntax={ELE}"
    assert response.content == sample("CT_small.dcm").read_bytes()


def _study(count_per_series: list[list[str]]) -> list[Dataset]:
    """One study of sample files; they are made one patient's (the archive refuses a study of two patients)."""
    study = generate_uid()
    out: list[Dataset] = []
    for number, names in enumerate(count_per_series, start=1):
        series = generate_uid()
        for i, name in enumerate(names, start=1):
            ds = pydicom.dcmread(sample(name))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber, ds.InstanceNumber = number, i
            ds.PatientID = "WADO-1"
            ds.pop("IssuerOfPatientID", None)
            out.append(ds)
    return out


def test_retrieve_study_and_series(client: Any) -> None:
    datasets = _study([["CT_small.dcm", "JPEG2000.dcm"], ["SC_rgb_rle_2frame.dcm"]])
    client.store_instances(datasets)
    study = datasets[0].StudyInstanceUID
    got = client.retrieve_study(study, media_types=("application/dicom",))
    assert [d.SOPInstanceUID for d in got] == [d.SOPInstanceUID for d in datasets]
    assert {d.file_meta.TransferSyntaxUID for d in got} == {ELE}
    for original, retrieved in zip(datasets, got, strict=True):
        assert np.array_equal(original.pixel_array, retrieved.pixel_array)
    as_stored = client.retrieve_study(study, media_types=(("application/dicom", "*"),))
    assert [d.file_meta.TransferSyntaxUID for d in as_stored] == [d.file_meta.TransferSyntaxUID for d in datasets]
    series = client.retrieve_series(study, datasets[2].SeriesInstanceUID)
    assert [d.SOPInstanceUID for d in series] == [datasets[2].SOPInstanceUID]


def test_study_with_an_instance_we_cannot_convert_is_not_acceptable(http: httpx.Client) -> None:
    [ct] = stow_files(http, ["CT_small.dcm"])
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={MPEG2}'
    response = http.get(f"/dicom-web/studies/{ct.StudyInstanceUID}", headers={"Accept": accept})
    assert response.status_code == 406


def test_undecodable_pixel_data_is_406_not_500(http: httpx.Client) -> None:
    # 12-bit JPEG Extended: pydicom's installed plugins cannot decode it.
    [ds] = stow_files(http, ["JPEG-lossy.dcm"])
    response = http.get(path(ds), headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert response.status_code == 406
    response = http.get(path(ds, "/frames/1"), headers={"Accept": "multipart/related; type=application/octet-stream"})
    assert response.status_code == 406
    stored = http.get(path(ds, "/frames/1"), headers={"Accept": OHIF_FRAMES})
    assert stored.status_code == 200


# ---------------------------------------------------------------------------------------------- metadata


def test_metadata_matches_the_data_set_and_bulk_data_uris_work(http: httpx.Client, client: Any) -> None:
    [ct] = stow_files(http, ["CT_small.dcm"])
    response = http.get(path(ct, "/metadata"), headers={"Accept": "application/dicom+json"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    [meta] = response.json()
    original = pydicom.dcmread(sample("CT_small.dcm"))
    expected = original.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _e: "x")
    for keyword in ("PatientName", "StudyInstanceUID", "ImageType", "Rows", "PixelSpacing", "SliceLocation"):
        element = original.data_element(keyword)
        assert element is not None
        tag = f"{element.tag:08X}"
        assert meta[tag] == expected[tag], keyword
    assert meta["00083002"]["Value"] == [ELE]  # Available Transfer Syntax UID: the stored syntax
    for tag in ("7FE00010", "00431029"):
        uri = meta[tag]["BulkDataURI"]
        assert uri.startswith(http.base_url.join("/dicom-web/studies/").__str__())
        [data] = client.retrieve_bulkdata(uri, media_types=("application/octet-stream",))
        assert data == original[int(tag, 16)].value, tag


def test_study_and_series_metadata(client: Any) -> None:
    datasets = _study([["CT_small.dcm", "MR_small.dcm"], ["JPEG2000.dcm"]])
    client.store_instances(datasets)
    study = datasets[0].StudyInstanceUID
    meta = client.retrieve_study_metadata(study)
    assert [m["00080018"]["Value"][0] for m in meta] == [d.SOPInstanceUID for d in datasets]
    series = client.retrieve_series_metadata(study, datasets[0].SeriesInstanceUID)
    assert len(series) == 2
    one = client.retrieve_instance_metadata(study, datasets[2].SeriesInstanceUID, datasets[2].SOPInstanceUID)
    assert one["00080018"]["Value"] == [datasets[2].SOPInstanceUID]


def test_metadata_is_gzipped_and_dicom_is_not(http: httpx.Client) -> None:
    [ct] = stow_files(http, ["CT_small.dcm"])
    meta = http.get(path(ct, "/metadata"), headers={"Accept": "application/dicom+json", "Accept-Encoding": "gzip"})
    assert meta.headers.get("content-encoding") == "gzip"
    assert meta.json()[0]["00080018"]["Value"] == [ct.SOPInstanceUID]  # httpx decoded it
    with http.stream("GET", path(ct, "/metadata"), headers={"Accept-Encoding": "gzip"}) as raw:
        assert gzip.decompress(b"".join(raw.iter_raw())).startswith(b"[{")
    for suffix, accept in (("", ANY), ("/frames/1", OHIF_FRAMES), ("/bulk/7FE00010", OHIF_FRAMES)):
        response = http.get(path(ct, suffix), headers={"Accept": accept, "Accept-Encoding": "gzip"})
        assert response.status_code == 200
        assert "content-encoding" not in response.headers, suffix


# ---------------------------------------------------------------------------------------------- caching


def test_entity_tags_and_not_modified(http: httpx.Client) -> None:
    [ds] = stow_files(http, ["emri_small_jpeg_2k_lossless.dcm"])
    for suffix, accept in (
        ("", ANY),
        ("/frames/1,2", OHIF_FRAMES),
        ("/metadata", "application/dicom+json"),
        ("/bulk/7FE00010", OHIF_FRAMES),
    ):
        first = http.get(path(ds, suffix), headers={"Accept": accept})
        etag = first.headers["etag"]
        assert first.headers["cache-control"].startswith("private, max-age=")
        again = http.get(path(ds, suffix), headers={"Accept": accept, "If-None-Match": etag})
        assert again.status_code == 304, suffix
        assert again.content == b""
        assert again.headers["etag"] == etag
        other = http.get(path(ds, suffix), headers={"Accept": accept, "If-None-Match": '"something-else"'})
        assert other.status_code == 200
    decoded = http.get(path(ds), headers={"Accept": 'multipart/related; type="application/dicom"'})
    stored = http.get(path(ds), headers={"Accept": ANY})
    assert decoded.headers["etag"] != stored.headers["etag"]
    assert not stored.headers["etag"].startswith("W/")
    frames_12 = http.get(path(ds, "/frames/1,2"), headers={"Accept": OHIF_FRAMES}).headers["etag"]
    frames_13 = http.get(path(ds, "/frames/1,3"), headers={"Accept": OHIF_FRAMES}).headers["etag"]
    assert frames_12 != frames_13
    study = http.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata")
    assert (
        http.get(
            f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata", headers={"If-None-Match": study.headers["etag"]}
        ).status_code
        == 304
    )


def test_study_etag_changes_when_an_instance_is_added(client: Any, http: httpx.Client) -> None:
    datasets = _study([["CT_small.dcm", "MR_small.dcm"]])
    client.store_instances(datasets[:1])
    url = f"/dicom-web/studies/{datasets[0].StudyInstanceUID}"
    before = http.get(url, headers={"Accept": ANY}).headers["etag"]
    client.store_instances(datasets[1:])
    after = http.get(url, headers={"Accept": ANY, "If-None-Match": before})
    assert after.status_code == 200
    assert after.headers["etag"] != before
    assert len(parts(after)) == 2


# ---------------------------------------------------------------------------------------------- errors


def test_not_found(http: httpx.Client) -> None:
    [ct] = stow_files(http, ["CT_small.dcm"])
    unknown = "1.2.3.4.5.6.7.8.9"
    base = f"/dicom-web/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
    for url in (
        f"/dicom-web/studies/{unknown}",
        f"/dicom-web/studies/{unknown}/metadata",
        f"/dicom-web/studies/{ct.StudyInstanceUID}/series/{unknown}",
        f"/dicom-web/studies/{ct.StudyInstanceUID}/series/{unknown}/metadata",
        f"/dicom-web/studies/{unknown}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}",
        f"{base}/instances/{unknown}",
        f"{base}/instances/{unknown}/metadata",
        f"{base}/instances/{unknown}/frames/1",
        f"{base}/instances/{ct.SOPInstanceUID}/frames/2",  # CT_small has one frame
        f"{base}/instances/{ct.SOPInstanceUID}/frames/1,9999999999",
        f"{base}/instances/{ct.SOPInstanceUID}/bulk/00100010",  # not a bulk data element
    ):
        response = http.get(url)
        assert response.status_code == 404, url
        assert response.json()["status"] == 404


@pytest.mark.parametrize(
    "suffix",
    [
        "/frames/0",
        "/frames/a",
        "/frames/1,,2",
        "/frames/1,1",
        "/frames/-1",
        "/frames/1.5",
        "/bulk/7FE0",
        "/bulk/GGGG0010",
    ],
)
def test_bad_frame_lists_and_tags_are_400(http: httpx.Client, suffix: str) -> None:
    [ct] = stow_files(http, ["CT_small.dcm"])
    response = http.get(path(ct, suffix), headers={"Accept": OHIF_FRAMES})
    assert response.status_code == 400, suffix


def test_invalid_uids_and_accept_headers_are_400(http: httpx.Client) -> None:
    for url in (
        "/dicom-web/studies/1.2.abc",
        "/dicom-web/studies/1.02.3/metadata",
        "/dicom-web/studies/1.2/series/x/instances/1.2",
        "/dicom-web/studies/1.2/series/1.2/instances/1..2",
        "/dicom-web/studies/" + "1" * 65,
    ):
        response = http.get(url)
        assert response.status_code == 400, url
    response = http.get("/dicom-web/studies/1.2.3", headers={"Accept": 'multipart/related; type="application/dicom'})
    assert response.status_code == 400


# ---------------------------------------------------------------------------------------------- frames


DECODED = [
    ("CT_small.dcm", [1]),
    ("MR_small_implicit.dcm", [1]),
    ("MR_small_bigendian.dcm", [1]),
    ("emri_small_big_endian.dcm", [2, 10]),
    ("OBXXXX1A_expb_2frame.dcm", [2, 1]),  # 8-bit data as OW, big endian
    ("SC_rgb_small_odd_big_endian.dcm", [1]),  # odd-length frame of OW big endian
    ("image_dfl.dcm", [1]),
    ("JPEG2000.dcm", [1]),
    ("emri_small_jpeg_2k_lossless.dcm", [1, 3, 5, 10]),
    ("US1_J2KR.dcm", [1]),  # one frame in three fragments
    ("SC_rgb_rle_2frame.dcm", [2, 1]),
    ("emri_small_jpeg_ls_lossless.dcm", [4]),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", [1]),
    ("liver.dcm", [1, 3]),  # 1-bit
]


@pytest.mark.parametrize(("name", "numbers"), DECODED)
def test_frames_decoded_to_native_little_endian(http: httpx.Client, client: Any, name: str, numbers: list[int]) -> None:
    [ds] = stow_files(http, [name])
    got = client.retrieve_instance_frames(
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        numbers,
        media_types=(("application/octet-stream", ELE),),
    )
    assert [len(f) for f in got] == [len(frame_bytes(name, n - 1)) for n in numbers], name
    for frame, number in zip(got, numbers, strict=True):
        assert frame == frame_bytes(name, number - 1), f"{name} frame {number}"
    # dicomweb-client's default (multipart/related; type="*/*") is the default representation too.
    default = client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, numbers)
    assert default == got


def test_ohif_frames_header_gets_stored_fragments(http: httpx.Client) -> None:
    [j2k, ct] = stow_files(http, ["emri_small_jpeg_2k_lossless.dcm", "CT_small.dcm"])
    original = pydicom.dcmread(sample("emri_small_jpeg_2k_lossless.dcm"))
    stored = list(generate_frames(original.PixelData, number_of_frames=10))
    response = http.get(path(j2k, "/frames/1,3,5"), headers={"Accept": OHIF_FRAMES})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    assert int(response.headers["content-length"]) == len(response.content)
    got = parts(response)
    assert [body for _h, body in got] == [stored[0], stored[2], stored[4]]
    assert {h["content-type"] for h, _b in got} == {
        f"application/octet-stream; transfer-syntax={original.file_meta.TransferSyntaxUID}"
    }
    assert got[1][0]["content-location"].endswith(path(j2k, "/frames/3"))
    [(head, body)] = parts(http.get(path(ct, "/frames/1"), headers={"Accept": OHIF_FRAMES}))
    assert head["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
    assert body == pydicom.dcmread(sample("CT_small.dcm")).PixelData


def test_one_frame_single_part_octet_stream(http: httpx.Client) -> None:
    [ds] = stow_files(http, ["emri_small_jpeg_2k_lossless.dcm"])
    response = http.get(path(ds, "/frames/7"), headers={"Accept": "application/octet-stream"})
    assert response.status_code == 200
    assert response.headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
    assert response.content == frame_bytes("emri_small_jpeg_2k_lossless.dcm", 6)
    several = http.get(path(ds, "/frames/1,2"), headers={"Accept": "application/octet-stream"})
    assert len(parts(several)) == 2  # more than one frame: multipart whatever was asked


def test_frames_in_their_compressed_media_type(http: httpx.Client) -> None:
    [j2k, rle, ct] = stow_files(http, ["emri_small_jpeg_2k_lossless.dcm", "SC_rgb_rle_2frame.dcm", "CT_small.dcm"])
    response = http.get(path(j2k, "/frames/2"), headers={"Accept": 'multipart/related; type="image/jp2"'})
    [(head, _body)] = parts(response)
    assert head["content-type"] == f"image/jp2; transfer-syntax={j2k.file_meta.TransferSyntaxUID}"
    [(head, _body), _second] = parts(
        http.get(path(rle, "/frames/1,2"), headers={"Accept": 'multipart/related; type="image/*"'})
    )
    assert head["content-type"].startswith("image/dicom-rle")
    # Stored natively: image/jp2 is now encoded (JPEG 2000 lossless, bit-exact; tests/dicomweb/test_ranges.py has more);
    # a wildcard still means the stored form only, and image/jpx has no encoder.
    [(head, body)] = parts(http.get(path(ct, "/frames/1"), headers={"Accept": 'multipart/related; type="image/jp2"'}))
    assert head["content-type"] == "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90"
    assert np.array_equal(imagecodecs.jpeg2k_decode(body), pixels("CT_small.dcm"))
    for accept in ('multipart/related; type="image/jpx"', 'multipart/related; type="image/*"'):
        assert http.get(path(ct, "/frames/1"), headers={"Accept": accept}).status_code == 406


def _one_bit_dataset() -> Dataset:
    """1-bit frames of 3 x 5 pixels: 15 bits each, so frames do not start on byte boundaries."""
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 2, size=(3, 3, 5), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.66.4")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SEG"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 3, 5, 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(frames)
    ds["PixelData"].VR = "OB"
    return ds


def test_one_bit_frames_not_on_byte_boundaries(http: httpx.Client) -> None:
    ds = _one_bit_dataset()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    stow_bytes(http, [buffer.getvalue()])
    expected = ds.pixel_array
    for accept in (OHIF_FRAMES, "multipart/related; type=application/octet-stream"):
        got = parts(http.get(path(ds, "/frames/3,1,2"), headers={"Accept": accept}))
        assert [body for _h, body in got] == [pack_bits(expected[2]), pack_bits(expected[0]), pack_bits(expected[1])]
        assert all(h["content-type"].endswith(ELE) for h, _b in got)


# ---------------------------------------------------------------------------------------------- bulk data


def test_bulk_pixel_data(http: httpx.Client, client: Any) -> None:
    [j2k, big] = stow_files(http, ["emri_small_jpeg_2k_lossless.dcm", "MR_small_bigendian.dcm"])
    [meta] = http.get(path(j2k, "/metadata")).json()
    uri = meta["7FE00010"]["BulkDataURI"]
    original = pydicom.dcmread(sample("emri_small_jpeg_2k_lossless.dcm"))
    stored = client.retrieve_bulkdata(uri, media_types=(("application/octet-stream", "*"),))
    assert stored == list(generate_frames(original.PixelData, number_of_frames=10))
    decoded = client.retrieve_bulkdata(uri)
    assert decoded == [original.pixel_array[i].tobytes() for i in range(10)]
    # Native big endian pixel data comes back little endian unless asked for as stored.
    [meta] = http.get(path(big, "/metadata")).json()
    [swapped] = client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert swapped == pixels("MR_small_bigendian.dcm").astype("<i2").tobytes()
    response = http.get(path(big, "/bulk/7FE00010"), headers={"Accept": "application/octet-stream"})
    assert response.headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
    assert response.content == swapped
    as_stored = http.get(
        path(big, "/bulk/7FE00010"),
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.2"},
    )
    [(_head, body)] = parts(as_stored)
    assert body == pydicom.dcmread(sample("MR_small_bigendian.dcm")).PixelData


# ---------------------------------------------------------------------------------------------- CORS


def test_cors_exposes_headers(make_server: Any) -> None:
    srv = make_server(cors_origins=("http://viewer.example",))
    with httpx.Client(base_url=srv.url, timeout=60, headers=srv.headers) as http:
        [ct] = stow_files(http, ["CT_small.dcm"])
        response = http.get(path(ct, "/metadata"), headers={"Origin": "http://viewer.example"})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://viewer.example"
        exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
        assert {"etag", "warning", "content-range"} <= exposed
        other = http.get(path(ct, "/metadata"), headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_transcoded_instance_is_a_valid_part10_file(http: httpx.Client) -> None:
    [ds] = stow_files(http, ["SC_rgb_rle_2frame.dcm"])
    [(_head, body)] = parts(http.get(path(ds), headers={"Accept": "multipart/related; type=application/dicom"}))
    got = pydicom.dcmread(io.BytesIO(body))
    assert got.preamble is not None and body[128:132] == b"DICM"
    assert got.file_meta.TransferSyntaxUID == ELE
    assert np.array_equal(got.pixel_array, pixels("SC_rgb_rle_2frame.dcm"))
