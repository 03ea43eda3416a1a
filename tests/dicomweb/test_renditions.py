"""Renditions (dicomweb/retrieve/renditions.py): made at ingest by the `rendition` job, or on first demand and kept;
frame requests served from them by byte range with a stable ETag; dropped on overwrite; kept by the orphan
sweep while a row names them. Real server, real database, filesystem blob store."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np

from dicomweb.blobs.fs import FileSystemBlobStore
from dicomweb.ingest.gc import gc_handler
from server.platform import jobs
from tests.dicomweb.test_ranges import HTJ2K_RPCL, frames_url, original, phantom, pylibjpeg_decode, store
from tests.support.sql import query

J2K = "1.2.840.10008.1.2.4.90"


def wait_for(check: Callable[[], Any], seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def rows_of(dsn: str, sop: str) -> list[asyncpg.Record]:
    return query(
        dsn,
        "SELECT r.transfer_syntax_uid, r.blob_key, r.frames, r.source_sha256 = i.sha256 AS current "
        "FROM renditions r JOIN instances i USING (instance_pk) WHERE i.sop_instance_uid = $1",
        sop,
    )


def blob_files(server: Any) -> list[Path]:
    return sorted(Path(server.settings.blob_dir).rglob("*.frames"))


def test_ingest_makes_the_configured_rendition_and_frames_come_from_it(make_server: Any) -> None:
    server = make_server()
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        ds = phantom(128, 128, frames=3)
        store(http, ds)
        [row] = wait_for(lambda: rows_of(server.dsn, ds.SOPInstanceUID))
        assert row["transfer_syntax_uid"] == HTJ2K_RPCL and row["current"]
        [path] = blob_files(server)
        blob = path.read_bytes()
        offsets = [tuple(x) for x in json.loads(row["frames"])]
        assert len(offsets) == 3
        expected = original(ds)
        for number, (offset, length) in enumerate(offsets, start=1):
            response = http.get(frames_url(ds, str(number)), params={"accept": "image/jhc"})
            assert response.status_code == 200
            assert response.content == blob[offset : offset + length]  # the stored rendition's bytes
            assert np.array_equal(pylibjpeg_decode(response.content, ds), expected[number - 1])
        partial = http.get(frames_url(ds, "2"), params={"accept": "image/jhc"}, headers={"Range": "bytes=5-104"})
        offset, _length = offsets[1]
        assert (partial.status_code, partial.content) == (206, blob[offset + 5 : offset + 105])


def test_renditions_wait_until_ingest_is_quiet(make_server: Any) -> None:
    """`HOUNSFIELD_RENDITIONS_IDLE_MS`: the rendition job waits while instances keep arriving, and runs once
    the server has stored nothing for that long; a frame request meanwhile is served (encoded on demand)."""
    server = make_server(renditions_idle_seconds=2.0)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        first, second = phantom(64, 64, seed=1), phantom(64, 64, seed=2)
        store(http, first)
        time.sleep(1.0)
        store(http, second)  # restarts the quiet period
        quiet_from = time.monotonic()
        time.sleep(1.0)
        assert rows_of(server.dsn, first.SOPInstanceUID) == [] or time.monotonic() - quiet_from >= 2.0
        got = http.get(frames_url(first), params={"accept": "image/jhc"})  # not stored: encoded now
        assert got.status_code == 200 and np.array_equal(pylibjpeg_decode(got.content, first), original(first))
        wait_for(lambda: rows_of(server.dsn, second.SOPInstanceUID))
        assert time.monotonic() - quiet_from >= 2.0
        [row] = rows_of(server.dsn, first.SOPInstanceUID)
        assert row["current"]


def test_on_demand_rendition_is_kept_once_with_a_stable_etag(make_server: Any) -> None:
    server = make_server(renditions=())  # nothing ahead of time
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        ds = phantom(256, 256)
        store(http, ds)
        time.sleep(0.5)
        assert rows_of(server.dsn, ds.SOPInstanceUID) == []

        def fetch(_: int) -> httpx.Response:
            return http.get(frames_url(ds), params={"accept": "image/jhc"})

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(fetch, range(4)))  # concurrent first requests
        assert {r.status_code for r in answers} == {200}
        assert len({r.content for r in answers}) == 1 and len({r.headers["etag"] for r in answers}) == 1
        [row] = rows_of(server.dsn, ds.SOPInstanceUID)
        assert len(blob_files(server)) == 1
        again = fetch(0)
        assert again.content == answers[0].content and again.headers["etag"] == answers[0].headers["etag"]
        revalidated = http.get(
            frames_url(ds), params={"accept": "image/jhc"}, headers={"If-None-Match": answers[0].headers["etag"]}
        )
        assert revalidated.status_code == 304
        assert row["transfer_syntax_uid"] == HTJ2K_RPCL


def test_partial_on_demand_request_queues_the_whole_rendition(make_server: Any) -> None:
    server = make_server(renditions=())
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        ds = phantom(64, 64, frames=4)
        store(http, ds)
        response = http.get(frames_url(ds, "3"), headers={"Accept": f"image/jp2; transfer-syntax={J2K}"})
        assert response.status_code == 200
        assert np.array_equal(pylibjpeg_decode(response.content, ds, J2K), original(ds)[2])
        [row] = wait_for(lambda: rows_of(server.dsn, ds.SOPInstanceUID))
        assert row["transfer_syntax_uid"] == J2K
        assert http.get(frames_url(ds, "3"), headers={"Accept": "image/jp2"}).content == response.content


def test_overwrite_drops_renditions_and_their_blobs(make_server: Any) -> None:
    server = make_server(overwrite=True)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        ds = phantom(64, 64, seed=1)
        store(http, ds)
        [first] = wait_for(lambda: rows_of(server.dsn, ds.SOPInstanceUID))
        replacement = phantom(64, 64, seed=2)
        replacement.StudyInstanceUID, replacement.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
        replacement.SOPInstanceUID = ds.SOPInstanceUID
        replacement.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        store(http, replacement)
        [second] = wait_for(
            lambda: [r for r in rows_of(server.dsn, ds.SOPInstanceUID) if r["blob_key"] != first["blob_key"]]
        )
        assert second["current"]
        wait_for(lambda: [p.name for p in blob_files(server)] == [Path(second["blob_key"]).name])
        got = http.get(frames_url(ds), params={"accept": "image/jhc"})
        assert np.array_equal(pylibjpeg_decode(got.content, replacement), original(replacement))


def test_orphan_sweep_keeps_rendition_blobs_until_their_instance_goes(make_server: Any) -> None:
    server = make_server()
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        ds = phantom(64, 64)
        store(http, ds)
        wait_for(lambda: rows_of(server.dsn, ds.SOPInstanceUID))

    async def sweep() -> None:
        pool = await asyncpg.create_pool(server.dsn, min_size=1, max_size=2)
        try:
            blobs = FileSystemBlobStore(server.settings.blob_dir)
            await gc_handler(pool, blobs, 0, 3600)(jobs.Job(0, "blob.gc", {}, 1, 1))
        finally:
            await pool.close()

    asyncio.run(sweep())
    assert len(blob_files(server)) == 1  # named by a rendition row: kept
    query(server.dsn, "DELETE FROM studies WHERE study_uid = $1", ds.StudyInstanceUID)
    assert rows_of(server.dsn, ds.SOPInstanceUID) == []  # ON DELETE CASCADE
    asyncio.run(sweep())
    assert blob_files(server) == []


def test_compressed_stored_images_get_lossless_renditions(http: httpx.Client, server: Any) -> None:
    from tests.dicomweb.test_wado import pixels, stow_files

    [ds] = stow_files(http, ["emri_small_jpeg_2k_lossless.dcm"])  # stored J2K, 10 frames
    wait_for(lambda: rows_of(server.dsn, ds.SOPInstanceUID))
    expected = pixels("emri_small_jpeg_2k_lossless.dcm")
    for number in (1, 10):
        got = http.get(frames_url(ds, str(number)), params={"accept": "image/jhc"})
        arr = pylibjpeg_decode(got.content, ds)
        assert np.array_equal(arr, expected[number - 1])
