"""The series' rendition job (dicomweb/retrieve/renditions.py): one job makes every image of a series, skips the
images the encoder cannot take, makes only what a cut-off run left missing, and the per-instance payload of the
frame requests (and of jobs an older server queued) still works. Real server, real database, filesystem blobs."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from dicomweb.blobs.fs import FileSystemBlobStore
from dicomweb.retrieve import renditions
from server.platform import jobs
from tests.dicomweb.test_ranges import HTJ2K_RPCL, frames_url, original, phantom, pylibjpeg_decode, store
from tests.dicomweb.test_renditions import blob_files, rows_of, wait_for
from tests.support import fsync
from tests.support.sql import query


def series_of(count: int, rows: int = 64) -> list[Any]:
    images = [phantom(rows, rows, seed=n) for n in range(count)]
    for n, ds in enumerate(images):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = images[0].StudyInstanceUID, images[0].SeriesInstanceUID
        ds.InstanceNumber = n + 1
    return images


def rendition_jobs(dsn: str) -> list[asyncpg.Record]:
    return query(dsn, "SELECT state, payload FROM jobs WHERE kind = 'rendition' ORDER BY id")


def assert_exact(http: httpx.Client, ds: Any) -> None:
    got = http.get(frames_url(ds), params={"accept": "image/jhc"})
    assert got.status_code == 200
    assert np.array_equal(pylibjpeg_decode(got.content, ds), original(ds))


def stored_series(http: httpx.Client, server: Any, images: list[Any]) -> int:
    """Store the images of one series (STOW-RS); the series' key in the index."""
    store(http, *images)
    sql = "SELECT series_pk FROM series WHERE series_uid = $1"
    [(series_pk,)] = query(server.dsn, sql, images[0].SeriesInstanceUID)
    return int(series_pk)


def run_series_job(server: Any, series_pk: int, monkeypatch: pytest.MonkeyPatch | None = None) -> list[str]:
    """Run the rendition job of a series in this process, two images at once; with `monkeypatch`, the paths it
    fsynced."""
    synced: list[str] = []

    async def run() -> None:
        pool = await asyncpg.create_pool(server.dsn, min_size=1, max_size=4)
        try:
            blobs = FileSystemBlobStore(server.settings.blob_dir)
            handler = renditions.job_handler(pool, blobs, [HTJ2K_RPCL], server.settings.spool_dir, workers=2)
            recorded = fsync.recorded(monkeypatch) if monkeypatch is not None else []
            await handler(jobs.Job(0, renditions.RENDITION_JOB, {"series_pk": series_pk}, 1, 8))
            synced.extend(recorded)
        finally:
            if monkeypatch is not None:
                monkeypatch.undo()
            await pool.close()

    asyncio.run(run())
    return synced


def test_one_job_makes_the_renditions_of_a_whole_series(make_server: Any) -> None:
    server = make_server(renditions_idle_seconds=1.0)
    images = series_of(8)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        store(http, *images)
        for ds in images:
            [row] = wait_for(functools.partial(rows_of, server.dsn, ds.SOPInstanceUID))
            assert row["transfer_syntax_uid"] == HTJ2K_RPCL and row["current"]
        [job] = rendition_jobs(server.dsn)  # not one per image
        assert set(json.loads(job["payload"])) == {"series_pk"}
        wait_for(lambda: rendition_jobs(server.dsn)[0]["state"] == "done")
        assert len(blob_files(server)) == len(images)
        for ds in images:
            assert_exact(http, ds)


def test_a_series_job_skips_the_images_it_cannot_encode_and_makes_the_others(make_server: Any) -> None:
    server = make_server(renditions_idle_seconds=1.0)
    good = series_of(3)
    wide = phantom(32, 32, seed=9)  # 32 bits allocated: no encoder takes it
    wide.BitsAllocated, wide.BitsStored, wide.HighBit = 32, 32, 31
    wide.PixelData = np.arange(32 * 32, dtype=np.int32).tobytes()
    broken = phantom(32, 32, seed=10)  # stored as JPEG 2000 whose codestream does not decode
    broken.file_meta.TransferSyntaxUID = JPEG2000Lossless
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    for ds in (wide, broken):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = good[0].StudyInstanceUID, good[0].SeriesInstanceUID
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        store(http, good[0], wide, good[1], broken, good[2])
        for ds in good:
            wait_for(functools.partial(rows_of, server.dsn, ds.SOPInstanceUID))
        wait_for(lambda: [j["state"] for j in rendition_jobs(server.dsn)] == ["done"])  # one job, not retried
        assert rows_of(server.dsn, wide.SOPInstanceUID) == rows_of(server.dsn, broken.SOPInstanceUID) == []
        for ds in good:
            assert_exact(http, ds)


def test_a_series_job_run_again_makes_only_the_missing_renditions(make_server: Any) -> None:
    """A run cut off leaves some rows written (their blobs durable), some blobs without a row, some neither; run
    again, the job makes the missing ones and leaves the others' blobs as they are."""
    server = make_server(renditions=())  # no job at ingest: this test runs the handler itself
    images = series_of(6)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        series_pk = stored_series(http, server, images)
        run_series_job(server, series_pk)
        assert all(len(rows_of(server.dsn, ds.SOPInstanceUID)) == 1 for ds in images)
        lost_row, lost_both = images[1], images[4]
        [orphan] = rows_of(server.dsn, lost_both.SOPInstanceUID)
        Path(server.settings.blob_dir, orphan["blob_key"]).unlink()
        query(
            server.dsn,
            "DELETE FROM renditions WHERE instance_pk IN "
            "(SELECT instance_pk FROM instances WHERE sop_instance_uid = ANY($1::text[]))",
            [lost_row.SOPInstanceUID, lost_both.SOPInstanceUID],
        )
        kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in blob_files(server)}
        assert len(kept) == 5  # the orphan blob of `lost_row` is still there
        run_series_job(server, series_pk)
        assert all(len(rows_of(server.dsn, ds.SOPInstanceUID)) == 1 for ds in images)
        for ds in images:
            if ds not in (lost_row, lost_both):
                [row] = rows_of(server.dsn, ds.SOPInstanceUID)
                path = Path(server.settings.blob_dir, row["blob_key"])
                assert (path.stat().st_ino, path.stat().st_mtime_ns) == kept[path]  # not made again
        assert len(blob_files(server)) == 6
        for ds in images:
            assert_exact(http, ds)


def test_a_series_job_makes_the_blobs_of_a_batch_durable_together(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoders do not wait for the disk one image at a time: each rendition file is fsynced before its
    rename, and the series folder once for the batch, not once per image; no spool file is left behind."""
    server = make_server(renditions=())  # no job at ingest: this test runs the handler itself
    images = series_of(6)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        series_pk = stored_series(http, server, images)
        synced = run_series_job(server, series_pk, monkeypatch)
        rows = [row for ds in images for row in rows_of(server.dsn, ds.SOPInstanceUID)]
        assert len(rows) == 6
        folders = {str(Path(server.settings.blob_dir, row["blob_key"]).resolve().parent) for row in rows}
        assert len(folders) == 1
        assert sum(path in folders for path in synced) == 1  # the series folder, once for the six
        assert sum(path.endswith(".rendition") for path in synced) == 6  # each file's bytes
        assert not list(Path(server.settings.spool_dir).glob("*.rendition"))
        for ds in images:
            assert_exact(http, ds)


def test_a_per_instance_job_of_an_older_server_still_runs(make_server: Any) -> None:
    server = make_server()
    ds = phantom(64, 64)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        store(http, ds)
        wait_for(lambda: rows_of(server.dsn, ds.SOPInstanceUID))
        wait_for(lambda: [j["state"] for j in rendition_jobs(server.dsn)] == ["done"])
        query(server.dsn, "DELETE FROM renditions")
        [(pk,)] = query(server.dsn, "SELECT instance_pk FROM instances WHERE sop_instance_uid = $1", ds.SOPInstanceUID)
        query(
            server.dsn,
            "INSERT INTO jobs (kind, payload, dedupe_key) VALUES ('rendition', $1::jsonb, $2)",
            json.dumps({"instance_pk": pk}),
            str(pk),
        )
        [row] = wait_for(lambda: rows_of(server.dsn, ds.SOPInstanceUID))
        assert row["transfer_syntax_uid"] == HTJ2K_RPCL and row["current"]
        assert_exact(http, ds)


def test_a_series_job_gives_way_to_an_ingest_that_starts_and_queues_the_rest_as_due_as_it_was(
    make_server: Any,
) -> None:
    """An ingest starting while a series job runs (the worker's `Deferral` says busy): no further image is started
    and the rest is queued again with the job's own run time (an overdue job stays overdue: it runs on even under a
    continuous ingest)."""
    server = make_server(renditions=(), worker_enabled=False)  # this test is the worker
    images = series_of(5)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        store(http, *images)
    [(series_pk,)] = query(
        server.dsn, "SELECT series_pk FROM series WHERE series_uid = $1", images[0].SeriesInstanceUID
    )
    payload = {"series_pk": series_pk}
    [taken] = query(
        server.dsn,
        "INSERT INTO jobs (kind, payload, state, attempts, run_at) "
        "VALUES ('rendition', $1::jsonb, 'running', 1, now() - interval '30 s') RETURNING id, run_at",
        json.dumps(payload),
    )
    checks = 0

    def busy() -> float:  # the ingest starts once the first image is under way
        nonlocal checks
        checks += 1
        return 0.0 if checks == 1 else 1.5

    async def run(job_id: int, busy: Any) -> None:
        pool = await asyncpg.create_pool(server.dsn, min_size=1, max_size=4)
        try:
            blobs = FileSystemBlobStore(server.settings.blob_dir)
            handler = renditions.job_handler(pool, blobs, [HTJ2K_RPCL], server.settings.spool_dir, workers=1, busy=busy)
            await handler(jobs.Job(job_id, renditions.RENDITION_JOB, payload, 1, 8))
        finally:
            await pool.close()

    def made() -> int:
        return int(query(server.dsn, "SELECT count(*) FROM renditions")[0][0])

    asyncio.run(run(taken["id"], busy))
    assert made() == 1
    [queued] = query(server.dsn, "SELECT id, payload, run_at FROM jobs WHERE kind = 'rendition' AND state = 'queued'")
    assert json.loads(queued["payload"]) == payload and queued["run_at"] == taken["run_at"]
    asyncio.run(run(queued["id"], None))  # once ingest is quiet: the rest
    assert made() == len(images)
