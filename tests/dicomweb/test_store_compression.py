"""Optional lossless storage compression (dicomweb/pixels/compress.py, `HOUNSFIELD_STORE_COMPRESSION`): uncompressed
images are stored as HTJ2K RPCL / JPEG 2000 lossless, every retrieve still gives bit-exact pixels, frames stay byte
ranges of the stored blob, re-storing the original bytes is idempotent and other bytes are still 0111H.
Real server, real database, filesystem blob store."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomweb.pixels.compress import MODES, NotCompressed, compress_bytes
from server.settings import Settings, SettingsError
from tests.dicomweb.test_ranges import frames_url, original, phantom, pylibjpeg_decode, store
from tests.dicomweb.test_renditions import query, rows_of
from tests.dicomweb.test_stow_errors import reasons
from tests.dicomweb.test_wado import parts as wado_parts
from tests.support.dimse_util import TITLE, dcmtk, dimse_port, indexed, require_dcmtk, start
from tests.support.factory import ct, multipart, part10, stow_headers

OCTET = "multipart/related; type=application/octet-stream"


def instance_url(ds: Dataset) -> str:
    return f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def index_row(server: Any, ds: Dataset) -> Any:
    [row] = query(
        server.dsn,
        "SELECT transfer_syntax_uid, size_bytes, sha256, blob_key, pixel, metadata FROM instances "
        "WHERE sop_instance_uid = $1",
        ds.SOPInstanceUID,
    )
    return row


def parts(response: httpx.Response) -> list[bytes]:
    return [body for _headers, body in wado_parts(response)]


def test_setting_is_validated() -> None:
    assert Settings.from_env({}).store_compression == "none"
    assert Settings.from_env({"HOUNSFIELD_STORE_COMPRESSION": "HTJ2K"}).store_compression == "htj2k"
    with pytest.raises(SettingsError):
        Settings.from_env({"HOUNSFIELD_STORE_COMPRESSION": "zip"})


@pytest.mark.parametrize("mode", ["htj2k", "j2k"])
def test_stored_compressed_and_every_retrieve_is_bit_exact(make_server: Any, mode: str) -> None:
    server = make_server(store_compression=mode, inference_enabled=False)
    target = MODES[mode]
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        ds = phantom(128, 128, frames=3)
        data = part10(ds)
        store(http, ds)
        row = index_row(server, ds)
        assert row["transfer_syntax_uid"] == target
        blob = (Path(server.settings.blob_dir) / row["blob_key"]).read_bytes()
        assert len(blob) == row["size_bytes"] < len(data)
        pixel = json.loads(row["pixel"])
        assert row["sha256"] == hashlib.sha256(blob).hexdigest()
        assert pixel["original_sha256"] == hashlib.sha256(data).hexdigest()
        expected = original(ds)

        native = http.get(instance_url(ds), headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert native.status_code == 200, native.text
        [body] = parts(native)
        got = pydicom.dcmread(io.BytesIO(body))
        assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert np.array_equal(got.pixel_array, expected)

        frames = http.get(frames_url(ds, "1,2,3"), headers={"Accept": OCTET})
        assert frames.status_code == 200, frames.text
        for number, frame in enumerate(parts(frames)):
            assert np.array_equal(np.frombuffer(frame, "<i2").reshape(128, 128), expected[number])

        stored = pydicom.dcmread(io.BytesIO(blob))  # the frames' offsets recorded by the layout walker
        ranges = pixel["frames"]
        for number in range(1, 4):
            jhc = http.get(frames_url(ds, str(number)), params={"accept": "image/jhc"})
            assert jhc.status_code == 200, jhc.text
            assert np.array_equal(pylibjpeg_decode(jhc.content, ds), expected[number - 1])
            if mode == "htj2k":  # the stored bytes are the progressive rendition: served by range, no second copy
                offset, length = ranges[number - 1]
                assert jhc.content == blob[offset : offset + length]
        if mode == "htj2k":
            partial = http.get(frames_url(ds, "2"), params={"accept": "image/jhc"}, headers={"Range": "bytes=0-99"})
            assert (partial.status_code, partial.content) == (206, blob[ranges[1][0] : ranges[1][0] + 100])
            assert rows_of(server.dsn, ds.SOPInstanceUID) == []
        assert str(stored.file_meta.TransferSyntaxUID) == target

        metadata = http.get(f"{instance_url(ds)}/metadata").json()[0]
        assert metadata["00083002"]["Value"] == [target]
        assert metadata["00100010"]["Value"] == [{"Alphabetic": "Test^Patient"}]
        bulk = http.get(metadata["7FE00010"]["BulkDataURI"], headers={"Accept": OCTET})  # decoded, frame by frame
        assert bulk.status_code == 200, bulk.text
        assert b"".join(parts(bulk)) == expected.astype("<i2").tobytes()

        uri = http.get(  # WADO-URI: Explicit VR Little Endian unless a transferSyntax is asked (PS3.18 9.4.2)
            "/wado",
            params={
                "requestType": "WADO",
                "studyUID": ds.StudyInstanceUID,
                "seriesUID": ds.SeriesInstanceUID,
                "objectUID": ds.SOPInstanceUID,
                "contentType": "application/dicom",
            },
        )
        assert uri.status_code == 200, uri.text
        assert np.array_equal(pydicom.dcmread(io.BytesIO(uri.content)).pixel_array, expected)


def test_restore_of_the_original_is_idempotent_and_other_bytes_are_duplicates(make_server: Any) -> None:
    server = make_server(store_compression="htj2k", inference_enabled=False)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        ds = ct(rows=64, columns=64)
        store(http, ds)
        before = index_row(server, ds)
        assert before["transfer_syntax_uid"] == MODES["htj2k"]
        store(http, ds)  # identical original bytes: success, nothing changes
        assert index_row(server, ds) == before
        ds.PatientName = "Other^Name"
        response = http.post("/dicom-web/studies", content=multipart([part10(ds)]), headers=stow_headers())
        assert response.status_code == 409, response.text
        assert reasons(response) == [0x0111]
        assert index_row(server, ds) == before


def test_images_the_encoder_cannot_take_are_stored_as_received(make_server: Any) -> None:
    server = make_server(store_compression="htj2k", inference_enabled=False)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        ds = ct(rows=8, columns=8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
        ds.PixelData = np.arange(64, dtype=np.uint32).tobytes()
        store(http, ds)
        row = index_row(server, ds)
        assert row["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
        assert "original_sha256" not in json.loads(row["pixel"])


def test_compress_bytes_refuses_what_it_cannot_encode() -> None:
    ds = ct(rows=8, columns=8)
    del ds.PixelData
    with pytest.raises(NotCompressed):
        compress_bytes(part10(ds), MODES["j2k"] or "")


def test_dimse_cstore_is_compressed_and_cget_returns_exact_pixels(make_server: Any, tmp_path: Path) -> None:
    require_dcmtk()
    server = start(make_server, store_compression="htj2k", inference_enabled=False)
    ds = phantom(64, 64)
    sent = tmp_path / "in.dcm"
    sent.write_bytes(part10(ds))
    run = dcmtk("storescu", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", str(dimse_port(server)), sent)
    assert run.returncode == 0, run.stdout + run.stderr
    indexed(server)
    assert index_row(server, ds)["transfer_syntax_uid"] == MODES["htj2k"]
    out = tmp_path / "got"
    out.mkdir()
    run = dcmtk(
        "getscu", "-S", "-aet", "REF", "-aec", TITLE, "-k", "QueryRetrieveLevel=SERIES",
        "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        "-od", out, "127.0.0.1", str(dimse_port(server)),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    [got] = [pydicom.dcmread(p) for p in out.iterdir()]
    assert np.array_equal(got.pixel_array, original(ds))
