"""Pixels through WADO-RS encoders, from the outside: big-endian sources encode the values they hold (not their
bytes swapped), images smaller than the JPEG 2000 defaults encode, and decoded YBR_FULL_422 JPEG frames are
described by the Photometric Interpretation the server says they have."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomweb.codecs import negotiate
from dicomweb.pixels import encode
from tests.dicomweb.test_wado import parts, path, stow_bytes, stow_files
from tests.support.data import sample
from tests.support.factory import ct, part10

BIG_ENDIAN = [
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "emri_small_big_endian.dcm",
    "gdcm-US-ALOKA-16_big.dcm",
]
LOSSLESS = [encode.HTJ2K_LOSSLESS, encode.HTJ2K_RPCL, encode.J2K_LOSSLESS, encode.RLE_LOSSLESS]


def instance_in(http: httpx.Client, ds: Dataset, syntax: str) -> Dataset:
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'
    response = http.get(path(ds), headers={"Accept": accept})
    assert response.status_code == 200, (syntax, response.text)
    [(head, body)] = parts(response)
    assert head["content-type"] == f"application/dicom; transfer-syntax={syntax}"
    got = pydicom.dcmread(io.BytesIO(body))
    assert got.file_meta.TransferSyntaxUID == syntax
    return got


def psnr(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], bits: int) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10((2**bits - 1) ** 2 / mse)


@pytest.mark.parametrize("name", BIG_ENDIAN)
def test_big_endian_instances_encode_their_values(http: httpx.Client, name: str) -> None:
    """Whole instances re-encoded from Explicit VR Big Endian: the same pixel values, not byte-swapped ones."""
    [ds] = stow_files(http, [name])
    original = pydicom.dcmread(sample(name)).pixel_array
    for syntax in LOSSLESS:
        got = instance_in(http, ds, syntax).pixel_array
        assert np.array_equal(got, original), (name, syntax)
    if ds.PhotometricInterpretation != "PALETTE COLOR":  # palette indices are only encoded losslessly
        lossy = instance_in(http, ds, encode.HTJ2K_LOSSY).pixel_array
        assert psnr(lossy, original, int(ds.BitsStored)) > 40, name


@pytest.mark.parametrize(("rows", "columns"), [(8, 8), (16, 16), (10, 50), (1, 7), (31, 64), (2, 3)])
def test_small_images_encode_in_every_jpeg_2000_syntax(http: httpx.Client, rows: int, columns: int) -> None:
    """Images with a side under 32 pixels (fewer resolution levels than the encoders' default) as whole
    instances and as frames in JPEG 2000, HTJ2K and JPEG-LS (whose codestream of a few noisy pixels is larger
    than the pixels): 200 and the same pixels (close ones for lossy syntaxes)."""
    ds = ct(rows=rows, columns=columns, frames=2, seed=rows * columns)
    ds.BitsStored, ds.HighBit = 12, 11
    stow_bytes(http, [part10(ds)])
    original = pydicom.dcmread(io.BytesIO(part10(ds))).pixel_array
    j2k = [encode.J2K_LOSSLESS, encode.J2K_LOSSY, encode.HTJ2K_LOSSLESS, encode.HTJ2K_RPCL, encode.HTJ2K_LOSSY]
    for syntax in [*j2k, encode.JPEG_LS_LOSSLESS, encode.JPEG_LS_NEAR_LOSSLESS]:
        got = instance_in(http, ds, syntax).pixel_array
        if encode.is_lossy(syntax):
            assert got.shape == original.shape
            assert psnr(got, original, 12) > 30, syntax
        else:
            assert np.array_equal(got, original), syntax
        media = negotiate.media_type_of_syntax(syntax)
        response = http.get(
            path(ds, "/frames/1,2"), headers={"Accept": f'multipart/related; type="{media}"; transfer-syntax={syntax}'}
        )
        assert response.status_code == 200, (syntax, response.text)
        frames = [body for _head, body in parts(response)]
        assert len(frames) == 2
        if not encode.is_lossy(syntax):
            for number, frame in enumerate(frames):
                decoded = _decode_frame(frame, syntax, ds)
                assert np.array_equal(decoded, original[number]), (syntax, number)


def _decode_frame(frame: bytes, syntax: str, ds: Dataset) -> np.ndarray[Any, Any]:
    from pydicom.encaps import encapsulate
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    arr, _props = get_decoder(UID(syntax)).as_array(
        encapsulate([frame]),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=int(ds.BitsStored),
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )
    return arr


@pytest.mark.parametrize(
    ("name", "photometric"),
    [
        ("examples_ybr_color.dcm", "YBR_FULL_422"),
        ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "YBR_FULL_422"),
        ("SC_rgb_jpeg_dcmtk.dcm", "YBR_FULL"),
    ],
)
def test_decoded_ybr_jpeg_frames_are_what_the_metadata_says(http: httpx.Client, name: str, photometric: str) -> None:
    """Native frames of a YBR JPEG image are read with the instance's metadata (all a client has): their bytes
    are in that Photometric Interpretation's native layout. A whole instance decoded to a native syntax says
    RGB, and is RGB."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import ExplicitVRLittleEndian

    [ds] = stow_files(http, [name])
    [meta] = http.get(path(ds, "/metadata")).json()
    described = Dataset.from_json(meta, bulk_data_uri_handler=lambda _tag, _vr, _uri: None)
    assert described.PhotometricInterpretation == photometric
    original = pydicom.dcmread(sample(name)).pixel_array  # pydicom's decode: RGB
    frames = int(described.get("NumberOfFrames") or 1)
    expected = original if frames > 1 else original[None]
    numbers = [1, frames] if frames > 1 else [1]
    response = http.get(
        path(ds, "/frames/" + ",".join(map(str, numbers))),
        headers={
            "Accept": f'multipart/related; type="application/octet-stream"; transfer-syntax={ExplicitVRLittleEndian}'
        },
    )
    assert response.status_code == 200, response.text
    rows, columns = int(described.Rows), int(described.Columns)
    per_pixel = 2 if photometric == "YBR_FULL_422" else 3
    for number, (_head, body) in zip(numbers, parts(response), strict=True):
        assert len(body) == rows * columns * per_pixel, (name, number)
        arr, _ = get_decoder(ExplicitVRLittleEndian).as_array(
            body,
            rows=rows,
            columns=columns,
            samples_per_pixel=3,
            bits_allocated=8,
            bits_stored=8,
            pixel_representation=0,
            photometric_interpretation=described.PhotometricInterpretation,
            planar_configuration=0,
            number_of_frames=1,
            pixel_keyword="PixelData",
            as_rgb=True,
        )
        if photometric == "YBR_FULL":
            assert np.array_equal(arr, expected[number - 1]), (name, number)
        else:  # the chroma of each pair of pixels is their mean
            assert psnr(arr, expected[number - 1], 8) > 45, (name, number)
    whole = instance_in(http, ds, ExplicitVRLittleEndian)
    assert whole.PhotometricInterpretation == "RGB"
    assert np.array_equal(whole.pixel_array, original)


def test_concurrent_jpeg_2000_encodes_leave_the_server_up(dsn: str, tmp_path: Any) -> None:
    """Whole instances encoded in JPEG 2000 for several clients at once (worker threads of one server process):
    every answer is right and the server is still up (an encoder that is not thread-safe ends it with a
    segmentation fault). The server is a child process, so that such a crash fails this test, not pytest."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.procs import serve

    datasets = [ct(rows=256, columns=256, seed=n) for n in range(6)]
    env = {"HOUNSFIELD_WORKER": "0", "HOUNSFIELD_RENDITIONS": "", "HOUNSFIELD_INFERENCE": "0"}
    with serve(dsn, tmp_path / "data", **env) as server:
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
            stow_bytes(http, [part10(ds) for ds in datasets])

            def fetch(n: int) -> bool:
                ds = datasets[n % len(datasets)]
                syntax = encode.J2K_LOSSLESS if n % 2 else encode.J2K_LOSSY
                got = instance_in(http, ds, syntax).pixel_array
                return not encode.is_lossy(syntax) or psnr(got, ds.pixel_array, 16) > 40

            with ThreadPoolExecutor(4) as pool:
                assert all(pool.map(fetch, range(48)))
        assert server.proc.poll() is None, server.log.read_text()[-2000:]


def test_small_lossy_jpeg_2000_of_an_image_using_few_values(http: httpx.Client) -> None:
    """A 16 x 16 CT whose values span 500 of 65536 (the pydicom DICOMDIR samples): lossy JPEG 2000 stays close
    to it (the quality asked of the encoder is relative to the image's range, not to 16 bits)."""
    ds = ct(rows=16, columns=16)
    ds.PixelRepresentation = 1
    rng = np.random.default_rng(3)
    values = 2000 + rng.integers(0, 500, size=(16, 16)) + np.add.outer(np.arange(16), np.arange(16)) * 10
    ds.PixelData = values.astype(np.int16).tobytes()
    stow_bytes(http, [part10(ds)])
    original = ds.pixel_array
    got = instance_in(http, ds, encode.J2K_LOSSY).pixel_array
    spread = float(original.max()) - float(original.min())
    assert psnr(got - original.min(), original - original.min(), int(np.log2(spread)) + 1) > 35


def test_jpeg_baseline_of_ybr_full_native_data(http: httpx.Client) -> None:
    """Native YBR_FULL pixels are already YCbCr: encoded as they are, not converted as if RGB."""
    [ds] = stow_files(http, ["SC_ybr_full_uncompressed.dcm"])
    original = pydicom.dcmread(sample("SC_ybr_full_uncompressed.dcm")).pixel_array  # RGB
    got = instance_in(http, ds, encode.JPEG_BASELINE)
    assert got.PhotometricInterpretation == "YBR_FULL"
    assert psnr(got.pixel_array, original, 8) > 40


def test_instance_with_implicit_vr_inside_an_explicit_vr_file_is_decoded(dsn: str, tmp_path: Any) -> None:
    """SC_rgb_jpeg.dcm encodes its data set in implicit VR under an explicit VR transfer syntax (stored with a
    warning): it is still decoded and re-encoded on request, in native and compressed syntaxes. The server runs
    as a child process, as in production: pydicom warns about such files, and pytest's warnings-as-errors
    would turn that into a failure no deployment sees."""
    from tests.support.factory import multipart, stow_headers
    from tests.support.procs import serve

    data = sample("SC_rgb_jpeg.dcm").read_bytes()
    with pytest.warns(UserWarning, match="implicit VR"):
        ds = pydicom.dcmread(sample("SC_rgb_jpeg.dcm"))
        original = ds.pixel_array
    env = {"HOUNSFIELD_WORKER": "0", "HOUNSFIELD_RENDITIONS": "", "HOUNSFIELD_INFERENCE": "0"}
    with serve(dsn, tmp_path / "data", **env) as server:
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
            response = http.post("/dicom-web/studies", content=multipart([data]), headers=stow_headers())
            assert response.status_code == 202
            for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", encode.HTJ2K_RPCL):
                got = instance_in(http, ds, syntax)
                assert got.ImageType == ["DERIVED", "SECONDARY", "OTHER"], syntax
                assert np.array_equal(got.pixel_array, original), syntax


@pytest.mark.parametrize(
    "target", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", encode.J2K_LOSSLESS, encode.RLE_LOSSLESS]
)
def test_dataset_in_a_transfer_syntax(target: str) -> None:
    """`transcode.dataset_in`: what a DIMSE sender hands pynetdicom for a presentation context's syntax."""
    from dicomweb.pixels import decode as transcode

    data = sample("emri_small_jpeg_2k_lossless.dcm").read_bytes()
    ds = transcode.dataset_in(data, target)
    assert ds.file_meta.TransferSyntaxUID == target
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(sample("emri_small_jpeg_2k_lossless.dcm")).pixel_array)


def test_frames_of_ybr_full_jpeg_encoded_in_other_syntaxes(http: httpx.Client) -> None:
    """Frames of a YBR_FULL JPEG image asked in HTJ2K or JPEG 2000: decoded without color conversion and encoded
    as YBR_FULL, which is what the metadata says; read with it they are pydicom's decode of the original."""
    [ds] = stow_files(http, ["SC_rgb_jpeg_dcmtk.dcm"])
    original = pydicom.dcmread(sample("SC_rgb_jpeg_dcmtk.dcm")).pixel_array
    for media, syntax in (("image/jphc", encode.HTJ2K_RPCL), ("image/jp2", encode.J2K_LOSSLESS)):
        accept = f'multipart/related; type="{media}"; transfer-syntax={syntax}'
        response = http.get(path(ds, "/frames/1"), headers={"Accept": accept})
        assert response.status_code == 200, response.text
        [(head, body)] = parts(response)
        assert head["content-type"] == f"{media}; transfer-syntax={syntax}"
        from pydicom.encaps import encapsulate
        from pydicom.pixels.decoders.base import get_decoder
        from pydicom.uid import UID

        arr, _ = get_decoder(UID(syntax)).as_array(
            encapsulate([body]),
            rows=100,
            columns=100,
            samples_per_pixel=3,
            bits_allocated=8,
            bits_stored=8,
            pixel_representation=0,
            photometric_interpretation="YBR_FULL",
            planar_configuration=0,
            number_of_frames=1,
        )
        assert np.array_equal(arr, original), syntax


def test_a_study_with_a_structured_report_in_jpeg_2000(http: httpx.Client) -> None:
    """A study of an image and an SR asked for in JPEG 2000: the SR, which has no Pixel Data, comes in that
    syntax too (its data set in Explicit VR Little Endian, as in any encapsulated syntax, PS3.5 A.4)."""
    from pydicom.uid import generate_uid

    image = ct()
    report = pydicom.dcmread(sample("test-SR.dcm"))
    report.StudyInstanceUID = image.StudyInstanceUID
    report.PatientID, report.PatientName = image.PatientID, image.PatientName
    report.SeriesInstanceUID = generate_uid()
    stow_bytes(http, [part10(image), part10(report)])
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={encode.J2K_LOSSLESS}'
    response = http.get(f"/dicom-web/studies/{image.StudyInstanceUID}", headers={"Accept": accept})
    assert response.status_code == 200, response.text
    got = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(io.BytesIO(body)) for _h, body in parts(response))}
    assert {ds.file_meta.TransferSyntaxUID for ds in got.values()} == {encode.J2K_LOSSLESS}
    assert np.array_equal(got[image.SOPInstanceUID].pixel_array, image.pixel_array)
    sr = got[report.SOPInstanceUID]
    assert "PixelData" not in sr
    assert sr.ContentSequence == report.ContentSequence
