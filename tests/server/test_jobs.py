"""The PostgreSQL job queue and the orphan-blob collector, on the real database."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path

import asyncpg
import pytest

from dicomweb.blobs.fs import FileSystemBlobStore
from dicomweb.ingest.activity import IngestActivity
from dicomweb.ingest.gc import gc_handler
from server.platform import db, jobs


async def _pool(dsn: str) -> asyncpg.Pool:
    return await db.create_pool(dsn, 1, 4)


def test_enqueue_is_transactional_and_deduplicated(dsn: str) -> None:
    async def run() -> None:
        pool = await _pool(dsn)
        try:
            async with pool.acquire() as conn:
                with pytest.raises(RuntimeError):
                    async with conn.transaction():
                        await jobs.enqueue(conn, "x", {"a": 1})
                        raise RuntimeError("rollback")
                assert await conn.fetchval("SELECT count(*) FROM jobs") == 0
                first = await jobs.enqueue(conn, "x", {"n": 1}, dedupe_key="series-1")
                second = await jobs.enqueue(conn, "x", {"n": 2}, dedupe_key="series-1")
                assert first is not None and second is None
                assert await conn.fetchval("SELECT count(*) FROM jobs") == 1
        finally:
            await pool.close()

    asyncio.run(run())


def test_enqueue_many_deduplicates_as_enqueue_does(dsn: str) -> None:
    """One statement for a batch: a queued job with the same (kind, key) absorbs a new one, the first of the batch
    absorbs its later duplicates (its payload is kept), jobs without a key are all queued, and the delay holds."""

    async def run() -> None:
        pool = await _pool(dsn)
        try:
            async with pool.acquire() as conn:
                assert await jobs.enqueue(conn, "x", {"n": 0}, dedupe_key="queued") is not None
                new = [
                    jobs.NewJob("x", {"n": 1}, "queued"),
                    jobs.NewJob("x", {"n": 2}, "a", delay_seconds=60),
                    jobs.NewJob("x", {"n": 3}, "a"),
                    jobs.NewJob("y", {"n": 4}, "a"),
                    jobs.NewJob("x", {"n": 5}),
                    jobs.NewJob("x", {"n": 6}),
                    jobs.NewJob("x", {"n": 7}, "1"),  # a key that reads like a position: its own job
                ]
                assert await jobs.enqueue_many(conn, new) == 5
                assert await jobs.enqueue_many(conn, []) == 0
                rows = await conn.fetch(
                    "SELECT kind, payload->>'n' AS n, dedupe_key, run_at > now() + interval '50 s' AS later"
                    " FROM jobs ORDER BY id"
                )
                assert [(r["kind"], r["n"], r["dedupe_key"], r["later"]) for r in rows] == [
                    ("x", "0", "queued", False),
                    ("x", "2", "a", True),
                    ("y", "4", "a", False),
                    ("x", "5", None, False),
                    ("x", "6", None, False),
                    ("x", "7", "1", False),
                ]
        finally:
            await pool.close()

    asyncio.run(run())


def test_worker_runs_retries_and_fails(dsn: str) -> None:
    async def run() -> None:
        pool = await _pool(dsn)
        seen: list[tuple[str, int]] = []

        async def ok(job: jobs.Job) -> None:
            seen.append(("ok", job.payload["n"]))

        async def flaky(job: jobs.Job) -> None:
            seen.append(("flaky", job.attempts))
            if job.attempts < 2:
                raise RuntimeError("transient")

        async def broken(job: jobs.Job) -> None:
            raise jobs.PermanentJobError("cannot ever work")

        try:
            async with pool.acquire() as conn:
                a = await jobs.enqueue(conn, "ok", {"n": 1})
                b = await jobs.enqueue(conn, "flaky", {})
                c = await jobs.enqueue(conn, "broken", {})
                d = await jobs.enqueue(conn, "unknown", {})
            worker = jobs.Worker(pool, {"ok": ok, "flaky": flaky, "broken": broken}, poll_seconds=0.05)
            assert await worker.run_once() == 3
            async with pool.acquire() as conn:
                states = {r["id"]: r["state"] for r in await conn.fetch("SELECT id, state FROM jobs")}
                assert states == {a: "done", b: "queued", c: "failed", d: "queued"}
                row = await conn.fetchrow("SELECT last_error, run_at > now() AS later FROM jobs WHERE id=$1", b)
                assert "transient" in row["last_error"] and row["later"]
                await conn.execute("UPDATE jobs SET run_at = now() WHERE id = $1", b)  # skip the backoff
            assert await worker.run_once() == 1
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT state FROM jobs WHERE id=$1", b) == "done"
            assert seen == [("ok", 1), ("flaky", 1), ("flaky", 2)]
        finally:
            await pool.close()

    asyncio.run(run())


def test_deferred_kinds_wait_while_busy_unless_overdue(dsn: str) -> None:
    """`jobs.Deferral`: while busy, deferred kinds stay queued (others run) until they are max_seconds overdue;
    once idle they run, and the worker wakes for them when the busy time ends without a NOTIFY."""

    async def run() -> None:
        pool = await _pool(dsn)
        ran: list[str] = []
        fresh_ran = asyncio.Event()
        idle_at = [asyncio.get_running_loop().time() + 3600.0]

        def busy() -> float:
            return max(0.0, idle_at[0] - asyncio.get_running_loop().time())

        async def handler(job: jobs.Job) -> None:
            ran.append(job.payload["name"])
            if job.payload["name"] == "fresh":
                fresh_ran.set()

        deferral = jobs.Deferral(frozenset({"later"}), busy, max_seconds=60)
        worker = jobs.Worker(pool, {"later": handler, "now": handler}, poll_seconds=60, deferral=deferral)
        try:
            async with pool.acquire() as conn:
                await jobs.enqueue(conn, "later", {"name": "fresh"})
                overdue = await jobs.enqueue(conn, "later", {"name": "overdue"})
                await conn.execute("UPDATE jobs SET run_at = now() - interval '61 s' WHERE id = $1", overdue)
                await jobs.enqueue(conn, "now", {"name": "urgent"})
            assert await worker.run_once() == 2
            assert sorted(ran) == ["overdue", "urgent"]
            assert await worker.run_once() == 0  # still busy: the fresh one waits
            idle_at[0] = asyncio.get_running_loop().time() + 0.5  # ingest stops; idle in half a second
            task = asyncio.create_task(worker.run())  # polling alone would take a minute
            try:
                await asyncio.wait_for(fresh_ran.wait(), timeout=10)
                assert busy() == 0
            finally:
                worker.stop()
                await asyncio.wait_for(task, 5)
        finally:
            await pool.close()

    asyncio.run(run())


def test_ingest_activity_is_shared_through_the_data_folder(tmp_path: Path) -> None:
    """`IngestActivity`: a process that only runs the worker sees another process's ingest through the file."""
    ingesting, working = IngestActivity(tmp_path / "ingest.activity"), IngestActivity(tmp_path / "ingest.activity")
    alone = IngestActivity()
    assert working.busy_for(5.0) == 0 and alone.busy_for(5.0) == 0  # nothing stored yet
    ingesting.touch()
    assert 4.0 < working.busy_for(5.0) <= 5.0
    assert alone.busy_for(5.0) == 0
    os.utime(tmp_path / "ingest.activity", (time.time() - 10, time.time() - 10))  # ten seconds ago
    assert working.busy_for(5.0) == 0


def test_listen_notify_wakes_the_worker(dsn: str) -> None:
    async def run() -> None:
        pool = await _pool(dsn)
        done = asyncio.Event()

        async def handler(job: jobs.Job) -> None:
            done.set()

        worker = jobs.Worker(pool, {"wake": handler}, poll_seconds=60)  # polling alone would take a minute
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.sleep(0.3)
            async with pool.acquire() as conn:
                await jobs.enqueue(conn, "wake", {})
            await asyncio.wait_for(done.wait(), timeout=5)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 5)
            await pool.close()

    asyncio.run(run())


def test_a_delayed_job_runs_when_due_not_at_the_next_poll(dsn: str) -> None:
    """A job queued with a delay sends its NOTIFY when queued, not when it falls due: the idle worker waits for
    the earliest due job, not for the poll interval."""

    async def run() -> float:
        pool = await _pool(dsn)
        ran = asyncio.Event()

        async def handler(job: jobs.Job) -> None:
            ran.set()

        worker = jobs.Worker(pool, {"later": handler}, poll_seconds=60)
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.sleep(0.3)
            t0 = asyncio.get_running_loop().time()
            async with pool.acquire() as conn:
                await jobs.enqueue(conn, "later", {}, delay_seconds=1.0)
            await asyncio.wait_for(ran.wait(), timeout=10)
            return asyncio.get_running_loop().time() - t0
        finally:
            worker.stop()
            await asyncio.wait_for(task, 5)
            await pool.close()

    elapsed = asyncio.run(run())
    assert 0.9 <= elapsed < 3.0, elapsed


def test_expired_lease_is_reclaimed_and_illegal_transitions_refused(dsn: str) -> None:
    async def run() -> None:
        pool = await _pool(dsn)
        try:
            async with pool.acquire() as conn:
                job_id = await jobs.enqueue(conn, "k", {})
                await conn.execute(
                    "UPDATE jobs SET state='running', locked_at = now() - interval '1 hour' WHERE id=$1",
                    job_id,
                )
            ran: list[int] = []

            async def handler(job: jobs.Job) -> None:
                ran.append(job.id)

            worker = jobs.Worker(pool, {"k": handler}, lease_seconds=60)
            assert await worker.run_once() == 1
            assert ran == [job_id]
            async with pool.acquire() as conn:
                with pytest.raises(asyncpg.RaiseError, match="not allowed"):
                    await conn.execute("UPDATE jobs SET state='queued' WHERE id=$1", job_id)  # done -> queued
        finally:
            await pool.close()

    asyncio.run(run())


def test_orphan_collector_removes_only_unindexed_old_blobs(dsn: str, tmp_path: Path) -> None:
    async def run() -> None:
        pool = await _pool(dsn)
        store = FileSystemBlobStore(tmp_path / "blobs")
        try:
            for name in ("orphan-old", "orphan-new", "indexed-old"):
                src = tmp_path / name
                src.write_bytes(b"x" * 10)
                await store.put_file(f"a/{name}.dcm", src)
            old = (dt.datetime.now() - dt.timedelta(hours=2)).timestamp()
            for name in ("orphan-old", "indexed-old"):
                os.utime(store.root / f"a/{name}.dcm", (old, old))
            async with pool.acquire() as conn:
                study = await conn.fetchval(
                    "INSERT INTO studies(study_uid, attrs) VALUES ('1.2', '{}') RETURNING study_pk"
                )
                series = await conn.fetchval(
                    "INSERT INTO series(study_pk, series_uid, attrs) VALUES ($1, '1.3', '{}') RETURNING series_pk",
                    study,
                )
                await conn.execute(
                    "INSERT INTO instances(series_pk, study_pk, sop_instance_uid, sop_class_uid,"
                    " transfer_syntax_uid, blob_key, size_bytes, sha256, metadata)"
                    " VALUES ($1, $2, '1.4', '1.5', '1.2.840.10008.1.2.1', 'a/indexed-old.dcm', 10, 'x', '{}')",
                    series,
                    study,
                )
            handler = gc_handler(pool, store, grace_seconds=3600, interval_seconds=60)
            await handler(jobs.Job(1, "blob.gc", {"periodic": True}, 1, 8))
            remaining = sorted([info.key async for info in store.list()])
            assert remaining == ["a/indexed-old.dcm", "a/orphan-new.dcm"]
            async with pool.acquire() as conn:  # the periodic sweep scheduled its successor
                assert await conn.fetchval("SELECT count(*) FROM jobs WHERE kind='blob.gc' AND state='queued'") == 1
        finally:
            await pool.close()

    asyncio.run(run())


def test_concurrent_kinds_run_up_to_their_limit_at_once(dsn: str) -> None:
    """`concurrency`: jobs of a kind with a limit above one (model runs) overlap up to it within a batch; other
    kinds still run one at a time, in the order taken."""

    async def run() -> None:
        pool = await _pool(dsn)
        running = {"model": 0, "plain": 0}
        most = {"model": 0, "plain": 0}

        async def handler(job: jobs.Job) -> None:
            running[job.kind] += 1
            most[job.kind] = max(most[job.kind], running[job.kind])
            await asyncio.sleep(0.2)
            running[job.kind] -= 1

        worker = jobs.Worker(pool, {"model": handler, "plain": handler}, poll_seconds=60, concurrency={"model": 3})
        try:
            async with pool.acquire() as conn:
                for n in range(5):
                    await jobs.enqueue(conn, "model", {"n": n})
                    await jobs.enqueue(conn, "plain", {"n": n})
            started = asyncio.get_running_loop().time()
            ran = await worker.run_once() + await worker.run_once()
            assert ran == 10
            assert most == {"model": 3, "plain": 1}
            # 5 plain jobs in series (1 s) alongside 5 model jobs three at a time (0.4 s): about 1 s, not 2
            assert asyncio.get_running_loop().time() - started < 1.8
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT count(*) FROM jobs WHERE state = 'queued'") == 0
        finally:
            await pool.close()

    asyncio.run(run())
