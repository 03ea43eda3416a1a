"""A PostgreSQL job queue for derived work (house style 4 and 8).

Jobs are enqueued with the connection of the transaction that needs them, so a job exists exactly when its
cause committed. Workers take them with `FOR UPDATE SKIP LOCKED`, wake on `LISTEN hounsfield_jobs` (a trigger
sends NOTIFY on insert) or after a poll interval, retry failures with exponential backoff, and re-queue jobs
whose worker died (lease expiry). Handlers must be idempotent: a job can run more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from server.platform.db import Connection, DatabaseUnavailable, Queries, unavailable, vouch_stateless

log = logging.getLogger(__name__)
SQL = Queries(Path(__file__).with_name("jobs.sql"))
CHANNEL = "hounsfield_jobs"
SETTLE_SECONDS = 0.05
"""After a NOTIFY, the worker waits this long before taking jobs, so that the jobs of a burst of ingest
transactions are taken (and marked done) as one batch rather than one round trip pair each."""
DUE_FLOOR_SECONDS = 0.05
"""The shortest wait for a job falling due: one that is due but was not taken (another worker holds it) is not
spun on."""
DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
"""What the worker outlives (logged, retried): the database refusing a statement or being out of reach."""
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0
"""While the database is unavailable the worker tries to listen again after a wait doubling between these."""


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int


Handler = Callable[[Job], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Deferral:
    """Job kinds that give way to ingest: while `busy()` says the process stored an instance too recently (it
    returns the seconds until it counts as idle; 0 when idle), the worker leaves them queued, unless they are
    `max_seconds` overdue, so that a continuous ingest delays them by at most that much. Derived work that no
    request waits for (renditions: a frame request encodes what it needs itself) then does not take CPU from
    the instances arriving."""

    kinds: frozenset[str]
    busy: Callable[[], float]
    max_seconds: float


@dataclass(frozen=True, slots=True)
class Pause:
    """Job kinds that wait, however overdue, while `active()` is true: derived work that writes blobs (renditions,
    AI runs) while free space is below the watermark (`server.platform.diskspace`), which would otherwise take the space
    left for ingest and the database. The worker does not take them; they run once `active()` is false again."""

    kinds: frozenset[str]
    active: Callable[[], bool]


class PermanentJobError(Exception):
    """Raised by a handler when retrying cannot help; the job fails at once."""


async def enqueue(
    conn: Connection,
    kind: str,
    payload: dict[str, Any],
    *,
    dedupe_key: str | None = None,
    delay_seconds: float = 0.0,
    max_attempts: int = 8,
) -> int | None:
    """Queue a job on `conn` (inside the caller's transaction). Returns its id, or None when a queued job
    with the same dedupe key already exists."""
    value = await conn.fetchval(
        SQL["enqueue"], kind, json.dumps(payload), dedupe_key, float(delay_seconds), max_attempts
    )
    return int(value) if value is not None else None


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to queue with `enqueue_many`: the arguments of `enqueue`."""

    kind: str
    payload: dict[str, Any]
    dedupe_key: str | None = None
    delay_seconds: float = 0.0
    max_attempts: int = 8


async def enqueue_many(conn: Connection, new: Sequence[NewJob]) -> int:
    """Queue jobs on `conn` (inside the caller's transaction) with one statement; returns how many were queued. As
    `enqueue`: a queued job with the same (kind, dedupe key) absorbs a new one, and within `new` the first of those
    with one key absorbs the others."""
    if not new:
        return 0
    status = await conn.execute(
        SQL["enqueue_many"],
        [job.kind for job in new],
        [json.dumps(job.payload) for job in new],
        [job.dedupe_key for job in new],
        [float(job.delay_seconds) for job in new],
        [job.max_attempts for job in new],
    )
    return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <rows>"


async def schedule(
    conn: Connection, kind: str, payload: dict[str, Any], *, dedupe_key: str, delay_seconds: float
) -> int:
    """Queue a keyed job to run after `delay_seconds`, or move the queued one with that key earlier."""
    value = await conn.fetchval(SQL["schedule"], kind, json.dumps(payload), dedupe_key, float(delay_seconds), 8)
    return int(value)


async def again(conn: Connection, job: Job, *, dedupe_key: str) -> int | None:
    """Queue the running `job` again, as it is (kind, payload) and as due as it was (its `run_at`): a handler that
    gives way part-way (to an ingest, `Deferral`) leaves the rest to a job that is taken under the same rule, and
    that is still overdue if `job` was. A queued job with that key takes the earlier of the two run times. None when
    `job` is not in the queue."""
    value = await conn.fetchval(SQL["again"], job.id, dedupe_key)
    return int(value) if value is not None else None


def backoff_seconds(attempt: int) -> float:
    """2, 4, 8 ... seconds, capped at 10 minutes."""
    return float(min(600, 2**attempt))


def _job(row: Any) -> Job:
    payload = row["payload"]
    return Job(
        id=row["id"],
        kind=row["kind"],
        payload=json.loads(payload) if isinstance(payload, str) else dict(payload),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
    )


class Worker:
    """Runs registered handlers for queued jobs until stopped."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        handlers: dict[str, Handler],
        *,
        poll_seconds: float = 5.0,
        lease_seconds: float = 600.0,
        batch: int = 8,
        name: str | None = None,
        deferral: Deferral | None = None,
        pause: Pause | None = None,
        concurrency: dict[str, int] | None = None,
    ) -> None:
        self.pool = pool
        self.concurrency = {kind: n for kind, n in (concurrency or {}).items() if n > 1}
        """Kinds whose jobs of one batch run up to this many at once (model runs that wait on a backend); the other
        kinds run one after another, in the order taken."""
        self.deferral = deferral
        self.pause = pause
        self.handlers = dict(handlers)
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.batch = batch
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._wake = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._held = False
        """The database went away while this worker may have held jobs (taken, not settled)."""
        self._reclaim_at = 0.0  # loop time of the next lease check; the first batch always checks
        self._due: float | None = None
        """Seconds until the earliest queued job falls due, read when a take found nothing (`_next_due`)."""

    def _notified(self, *_args: object) -> None:
        self._wake.set()

    async def run_once(self) -> int:
        """Take and run one batch of ready jobs; returns how many ran."""
        if not self.handlers:
            return 0
        now = asyncio.get_running_loop().time()
        async with self.pool.acquire() as conn:
            if now >= self._reclaim_at:  # a dead worker's lease is minutes long: no need to look on every batch
                await conn.execute(SQL["reclaim_expired"], float(self.lease_seconds))
                self._reclaim_at = now + min(self.poll_seconds, self.lease_seconds / 4)
            deferred, overdue = self._deferred()
            rows = await conn.fetch(SQL["take"], self.name, self.batch, self._kinds(), deferred, overdue)
            self._due = None if rows else await self._next_due(conn)
            vouch_stateless(conn)  # autocommitted DML only: no reset query (while ingest is busy, every NOTIFY)
        finished: list[int] = []
        taken = [_job(row) for row in rows]
        serial = [job for job in taken if job.kind not in self.concurrency]
        limits = {kind: asyncio.Semaphore(n) for kind, n in self.concurrency.items()}

        async def in_order() -> None:
            for job in serial:
                if await self._run(job):
                    finished.append(job.id)

        async def limited(job: Job) -> None:
            async with limits[job.kind]:
                if await self._run(job):
                    finished.append(job.id)

        await asyncio.gather(in_order(), *(limited(job) for job in taken if job.kind in self.concurrency))
        if finished:  # one statement for the batch (a job run again after a crash here is allowed: idempotent)
            async with self.pool.acquire() as conn:
                await conn.execute(SQL["finish_many"], finished)
                vouch_stateless(conn)
        return len(rows)

    def _kinds(self) -> list[str]:
        """The kinds to take now: every kind with a handler, less the paused ones."""
        if self.pause is None or not self.pause.active():
            return list(self.handlers)
        return [kind for kind in self.handlers if kind not in self.pause.kinds]

    def _deferred(self) -> tuple[list[str], float]:
        """The kinds to leave queued now, and how overdue they must be to run anyway."""
        d = self.deferral
        if d is None or d.busy() <= 0:
            return [], 0.0
        return sorted(d.kinds), d.max_seconds

    def _wait_seconds(self, due: float | None = None) -> float:
        """How long to wait for a NOTIFY: the poll interval, or less when deferred jobs may run once ingest has
        been quiet long enough, or when a queued job falls due sooner (`due` seconds from now: a delayed job
        queued earlier sends no NOTIFY when its time comes)."""
        busy = self.deferral.busy() if self.deferral is not None else 0.0
        wait = min(self.poll_seconds, busy + 0.01) if busy > 0 else self.poll_seconds
        return wait if due is None else min(wait, max(due, DUE_FLOOR_SECONDS))

    async def _next_due(self, conn: Connection) -> float | None:
        """Seconds until the earliest queued job of the kinds this worker takes now falls due (the deferred kinds
        are waited for by `_wait_seconds`' idle rule), None when there is none."""
        deferred, _overdue = self._deferred()
        kinds = [kind for kind in self._kinds() if kind not in deferred]
        value = await conn.fetchval(SQL["next_due"], kinds) if kinds else None
        return float(value) if value is not None else None

    async def _run(self, job: Job) -> bool:
        """Run one job; True when it succeeded (the caller marks it done), False when it was retried or failed."""
        handler = self.handlers[job.kind]
        try:
            await handler(job)
        except Exception as exc:  # a failing handler must not stop the worker
            message = f"{type(exc).__name__}: {exc}"[:2000]
            async with self.pool.acquire() as conn:
                if isinstance(exc, PermanentJobError) or job.attempts >= job.max_attempts:
                    log.warning("job %s (%s) failed for good: %s", job.id, job.kind, message)
                    await conn.execute(SQL["fail"], job.id, message)
                else:
                    delay = backoff_seconds(job.attempts)
                    log.info("job %s (%s) failed, retry in %.0fs: %s", job.id, job.kind, delay, message)
                    await conn.execute(SQL["retry"], job.id, message, delay)
            return False
        return True

    async def run(self) -> None:
        """Loop until `stop()`: drain ready jobs, then wait for a NOTIFY or the poll interval. When the database
        goes away the listening connection is lost: the worker keeps trying with backoff, listens again once the
        database is back, and catches up at once (a poll, and the jobs it held when the connection was lost
        queued again)."""
        backoff = RECONNECT_MIN_SECONDS
        while not self._done():
            try:
                await self._listen_and_work()
                backoff = RECONNECT_MIN_SECONDS
                continue
            except DATABASE_ERRORS as exc:
                what = "database unavailable" if unavailable(exc) else "database error"
                log.warning("job worker: %s (%s); retrying in %.1f s", what, type(exc).__name__, backoff)
            except Exception:  # the worker outlives its own bugs too: derived work must not stop for good
                log.exception("job worker failed; starting again in %.1f s", backoff)
            self._held = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_SECONDS)

    async def _listen_and_work(self) -> None:
        """Listen on one pool connection and run jobs until stopped (returns) or the connection is lost (raises
        `DatabaseUnavailable`)."""
        lost = False

        def on_lost(_conn: object) -> None:
            nonlocal lost
            lost = True
            self._wake.set()

        listener = await self.pool.acquire()
        try:
            listener.add_termination_listener(on_lost)
            await listener.add_listener(CHANNEL, self._notified)
            while not self._done() and not lost:
                self._wake.clear()
                try:
                    if self._held:  # jobs taken before the database went away: queued again, now
                        await self._requeue_held()
                    ran = await self.run_once()
                except DATABASE_ERRORS as exc:
                    log.warning("job worker: database error: %s", exc)
                    self._held = True  # a batch may have been taken and not settled
                    ran = 0
                if ran:
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self._wait_seconds(self._due))
                    await asyncio.sleep(SETTLE_SECONDS)  # let a burst of commits (an ingest) queue a batch
                except TimeoutError:
                    pass
        finally:
            with contextlib.suppress(*DATABASE_ERRORS):  # a lost connection's proxy refuses every call
                if not listener.is_closed():
                    listener.remove_termination_listener(on_lost)
                    await listener.remove_listener(CHANNEL, self._notified)
            await self.pool.release(listener)  # a lost connection was already handed back: a no-op
        if lost and not self._done():
            raise DatabaseUnavailable("the job worker's listening connection was lost")

    def _done(self) -> bool:
        """Stopped, or its pool is being closed (which waits for the listening connection)."""
        return self._stopping or self.pool.is_closing()

    async def _requeue_held(self) -> None:
        """Queue again the jobs this worker took and did not settle because the database went away (their
        handlers are idempotent); without this they would wait for their lease to expire."""
        async with self.pool.acquire() as conn:
            requeued = await conn.fetch(SQL["requeue_held"], self.name)
            vouch_stateless(conn)
        self._held = False
        if requeued:
            log.info("job worker: %d jobs taken before the database outage queued again", len(requeued))

    def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        self._wake.set()
