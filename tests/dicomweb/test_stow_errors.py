"""STOW-RS with bad input: a 4xx with a reason, never a 5xx, and nothing half-stored."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pydicom
import pytest

from tests.support.data import sample
from tests.support.factory import ct, multipart, part10, stow_headers

FAILED = "00081198"
REFERENCED = "00081199"
FAILURE_REASON = "00081197"


def counts(dsn: str) -> tuple[int, int, int]:
    async def run() -> tuple[int, int, int]:
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM studies) s, (SELECT count(*) FROM series) se,"
                " (SELECT count(*) FROM instances) i"
            )
            assert row is not None
            return int(row["s"]), int(row["se"]), int(row["i"])
        finally:
            await conn.close()

    return asyncio.run(run())


def blob_files(server) -> list[Path]:
    root = server.settings.blob_dir
    return [p for p in root.rglob("*.dcm") if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def post(http: httpx.Client, body: bytes, headers: dict[str, str] | None = None, path: str = "/dicom-web/studies"):
    return http.post(path, content=body, headers=headers if headers is not None else stow_headers())


def reasons(resp: httpx.Response) -> list[int]:
    failed = resp.json().get(FAILED, {}).get("Value", [])
    return [item[FAILURE_REASON]["Value"][0] for item in failed]


def test_one_bad_part_fails_alone(http, server) -> None:
    good = part10(ct())
    truncated = part10(ct())[:-100]
    resp = post(http, multipart([good, b"this is not DICOM at all", truncated]))
    assert resp.status_code == 202
    assert len(resp.json()[REFERENCED]["Value"]) == 1
    assert reasons(resp) == [0xC000, 0xC000]  # not Part 10; truncated inside Pixel Data
    assert "Warning" in resp.headers
    assert counts(server.dsn) == (1, 1, 1)
    assert len(blob_files(server)) == 1


def test_all_failed_is_409_and_nothing_stored(http, server) -> None:
    resp = post(http, multipart([b"junk", b"\x00" * 200]))
    assert resp.status_code == 409
    assert resp.headers["content-type"].startswith("application/dicom+json")
    assert counts(server.dsn) == (0, 0, 0)
    assert blob_files(server) == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 415),  # missing Content-Type
        ({"Content-Type": "application/json"}, 415),
        ({"Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=hfboundary'}, 415),
        ({"Content-Type": 'multipart/related; type="application/dicom"'}, 400),  # no boundary
        ({"Content-Type": 'multipart/related; type="application/dicom"; boundary=wrong'}, 400),
        (
            {"Content-Type": 'multipart/related; type="application/dicom; boundary=hfboundary'},
            400,
        ),  # bad quotes
    ],
)
def test_request_level_errors(http, server, headers: dict[str, str], status: int) -> None:
    resp = post(http, multipart([part10(ct())]), headers=headers)
    assert resp.status_code == status, resp.text
    assert "Warning" in resp.headers
    assert counts(server.dsn) == (0, 0, 0)


def test_truncated_request_body(http, server) -> None:
    body = multipart([part10(ct())])
    resp = post(http, body[: len(body) // 2])
    assert resp.status_code == 400
    assert counts(server.dsn) == (0, 0, 0)
    assert blob_files(server) == []


def test_huge_part_headers(http, server) -> None:
    body = b"--hfboundary\r\nX-Junk: " + b"x" * 100_000 + b"\r\n\r\n" + part10(ct()) + b"\r\n--hfboundary--\r\n"
    resp = post(http, body)
    assert resp.status_code == 413
    assert counts(server.dsn) == (0, 0, 0)


def test_non_dicom_part_type_fails(http, server) -> None:
    resp = post(http, multipart([part10(ct())], content_type="application/octet-stream"))
    assert resp.status_code == 409
    assert reasons(resp) == [0xC000]


def test_malformed_uids(http, server) -> None:
    bad_study = ct()
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        bad_study.StudyInstanceUID = "1.2.03.abc"
    resp = post(http, multipart([part10(bad_study)]))
    assert resp.status_code == 409
    assert reasons(resp) == [0xA900]
    resp = post(http, multipart([part10(ct())]), path="/dicom-web/studies/not-a-uid")
    assert resp.status_code == 400
    assert counts(server.dsn) == (0, 0, 0)


def test_missing_meta_and_inconsistent_uids(http, server) -> None:
    no_meta = Path(sample("no_meta.dcm")).read_bytes()
    mismatch = ct()
    mismatch.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    resp = post(http, multipart([no_meta, part10(mismatch, enforce=False)]))
    assert resp.status_code == 409
    assert reasons(resp) == [0xC000, 0xA900]


def test_study_targeted_store_rejects_other_study(http, server) -> None:
    mine, other = ct(study="1.2.826.0.1.3680043.8.498.1"), ct(study="1.2.826.0.1.3680043.8.498.2")
    resp = post(http, multipart([part10(mine), part10(other)]), path="/dicom-web/studies/1.2.826.0.1.3680043.8.498.1")
    assert resp.status_code == 202
    assert reasons(resp) == [0xA900]
    body = resp.json()
    assert body["00081190"]["Value"][0].endswith("/studies/1.2.826.0.1.3680043.8.498.1")
    assert counts(server.dsn) == (1, 1, 1)


def test_series_uid_reused_in_another_study_is_rejected(http, server) -> None:
    first = ct(series="1.2.826.0.1.3680043.8.498.77")
    second = ct(series="1.2.826.0.1.3680043.8.498.77")  # same series UID, new study UID
    assert post(http, multipart([part10(first)])).status_code == 200
    resp = post(http, multipart([part10(second)]))
    assert resp.status_code == 409
    assert reasons(resp) == [0xA900]
    assert counts(server.dsn) == (1, 1, 1)
    assert len(blob_files(server)) == 1


def test_unknown_vr_is_rejected_not_a_server_error(http, server) -> None:
    data = bytearray(part10(ct()))
    at = data.find(b"\x10\x00\x10\x00PN")  # PatientName, explicit VR
    data[at + 4 : at + 6] = b"ZZ"
    response = http.post("/dicom-web/studies", content=multipart([bytes(data)]), headers=stow_headers())
    assert response.status_code == 409, response.text
    assert "Unknown Value Representation" in response.text
    assert http.get("/dicom-web/studies").json() == []


def test_short_pixel_data_is_rejected(http, server) -> None:
    ds = ct()
    ds.PixelData = ds.PixelData[:-2]
    resp = post(http, multipart([part10(ds)]))
    assert resp.status_code == 409
    assert reasons(resp) == [0xA900]


def test_duplicate_with_different_content_keeps_the_first(http, server) -> None:
    ds = ct(seed=1)
    assert post(http, multipart([part10(ds)])).status_code == 200
    changed = ct(study=ds.StudyInstanceUID, series=ds.SeriesInstanceUID, sop=ds.SOPInstanceUID, seed=2)
    resp = post(http, multipart([part10(changed)]))
    assert resp.status_code == 409
    assert reasons(resp) == [0x0111]
    assert len(blob_files(server)) == 1
    stored = pydicom.dcmread(blob_files(server)[0])
    assert stored.PixelData == ds.PixelData


def test_identical_resend_keeps_one_blob_with_the_bytes(http, server) -> None:
    """Without compression a re-sent instance is settled in the index transaction after its blob was written:
    the write lands on the committed blob's own key, which must survive the rollback."""
    data = part10(ct(seed=3))
    for _ in range(2):
        assert post(http, multipart([data])).status_code == 200
    files = blob_files(server)
    assert len(files) == 1
    assert files[0].read_bytes() == data
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert files[0].relative_to(server.settings.blob_dir).parts[:2] == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert files[0].name.startswith(f"{ds.SOPInstanceUID}.")  # no folder per instance


def test_blob_store_failure_stores_nothing(http, server) -> None:
    """The blob is written while the index statements run: when the write fails, the transaction that already
    inserted the rows rolls back. (A file where the study's folder belongs makes the filesystem store fail.)"""
    ds = ct(seed=4)
    blocker = server.settings.blob_dir / ds.StudyInstanceUID
    blocker.write_bytes(b"")
    try:
        resp = post(http, multipart([part10(ds)]))
        assert resp.status_code == 409, resp.text
        assert reasons(resp) == [0xA700]
        assert counts(server.dsn) == (0, 0, 0)
    finally:
        blocker.unlink()
    assert blob_files(server) == []
    assert post(http, multipart([part10(ds)])).status_code == 200
    assert counts(server.dsn) == (1, 1, 1)


def test_overwrite_replaces_and_old_blob_is_collected(make_server) -> None:
    srv = make_server(overwrite=True)
    with httpx.Client(base_url=srv.url, headers=srv.headers) as http:
        ds = ct(seed=1)
        assert post(http, multipart([part10(ds)])).status_code == 200
        changed = ct(study=ds.StudyInstanceUID, series=ds.SeriesInstanceUID, sop=ds.SOPInstanceUID, seed=2)
        assert post(http, multipart([part10(changed)])).status_code == 200
    assert counts(srv.dsn) == (1, 1, 1)
    # The old blob is deleted by the blob.delete job the overwrite queued in its transaction.
    import time

    deadline = time.monotonic() + 20
    while len(blob_files(srv)) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    files = blob_files(srv)
    assert len(files) == 1
    assert pydicom.dcmread(files[0]).PixelData == changed.PixelData


def test_concurrent_stores_into_one_new_study(server) -> None:
    study = "1.2.826.0.1.3680043.8.498.500"
    series = "1.2.826.0.1.3680043.8.498.501"

    async def run(datasets: list[Any]) -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=server.headers) as client:
            bodies = [multipart([part10(ds)]) for ds in datasets]
            responses = await asyncio.gather(
                *(client.post("/dicom-web/studies", content=b, headers=stow_headers()) for b in bodies)
            )
            return [r.status_code for r in responses]

    assert asyncio.run(run([ct(study=study, series=series, seed=i) for i in range(8)])) == [200] * 8
    assert counts(server.dsn) == (1, 1, 8)
    # then two new series of the now existing study, and more of the first, all at once: each new series is made
    # once, whichever of its instances comes first
    later = [ct(study=study, series=f"{series}.{i % 3}" if i % 3 else series, seed=100 + i) for i in range(12)]
    assert asyncio.run(run(later)) == [200] * 12
    assert counts(server.dsn) == (1, 3, 20)


def test_huge_request_headers_get_431(http, server) -> None:
    resp = http.get("/dicom-web/studies", headers={"X-Big": "a" * 200_000})
    assert resp.status_code == 431
    assert "Warning" in resp.headers
    resp = post(http, multipart([part10(ct())]), headers={**stow_headers(), "X-Big": "a" * 200_000})
    assert resp.status_code == 431
    assert counts(server.dsn) == (0, 0, 0)
