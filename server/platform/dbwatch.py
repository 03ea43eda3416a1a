"""Keeping the database within reach: reconnecting with backoff, and supervising the embedded PostgreSQL.

A database that goes away (the embedded postmaster killed, an external server restarted, a network cut) must not
need a restart of the server. Two parts:

- `DatabaseHealth`, one per process, makes the pool's new connections (`asyncpg.create_pool(connect=...)`).
  While connecting fails it waits a growing interval (`MIN_BACKOFF_SECONDS` doubling to `MAX_BACKOFF_SECONDS`)
  between attempts and answers the requests in between at once with `DatabaseUnavailable` (503 with
  Retry-After, DIMSE A700): no request waits on a database that is known to be down, and an external one is
  retried without being flooded. asyncpg closes a connection that broke and replaces it on the next acquire, so
  the pool needs nothing else once the database answers again. `status()` is what `/readyz` reports.
- `EmbeddedSupervisor`, in the process that owns the embedded PostgreSQL (`hounsfield serve` without
  DATABASE_URL; with `HOUNSFIELD_PROCESSES` > 1 the parent), watches the postmaster and starts it again when it
  died, with backoff while the start fails. PostgreSQL's crash recovery replays its write-ahead log, so nothing
  committed is lost. It runs in a thread: the parent of several processes has no event loop, and a start blocks.

The listening connections (LISTEN/NOTIFY) re-establish themselves and catch up on what they missed:
`server.platform.jobs.Worker`, `authz.sessioncache.SessionCache`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import asyncpg

from server.platform import db

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 10.0
"""A new connection that is not established within this (an unreachable host) fails as unavailable."""
MIN_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 2.0
"""Between connection attempts while the database is unavailable; short enough that a database that came back
is used within seconds."""
CHECK_SECONDS = 0.5
"""How often the supervisor looks whether the embedded postmaster still runs."""
MAX_RESTART_BACKOFF_SECONDS = 30.0
"""The longest wait between two failed starts of the embedded PostgreSQL."""


STARTUP_WAIT_SECONDS = 120.0
"""How long a starting server waits for a database that is unavailable before it gives up: a process that
replaces a dead one while the database restarts must not fail (with several processes, uvicorn then stops them
all)."""


async def when_reachable(attempt: Callable[[], Awaitable[T]], *, seconds: float = STARTUP_WAIT_SECONDS) -> T:
    """`attempt()`, again with backoff while it fails because the database is unavailable (refused, unreachable,
    starting up), for at most `seconds`; any other failure, or the last, is raised."""
    deadline = time.monotonic() + seconds
    delay = MIN_BACKOFF_SECONDS
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not (isinstance(exc, OSError) or db.unavailable(exc)) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable at start (%s: %s); retrying in %.1f s", type(exc).__name__, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_SECONDS)


class DatabaseHealth:
    """This process's view of its database, and the pool's connect function (see the module docstring)."""

    def __init__(self) -> None:
        self.restarting = False
        """Set by the supervisor while the embedded PostgreSQL is being started again."""
        self.down_since: float | None = None
        """`time.monotonic()` of the first failed connection attempt of the current outage; None when connecting
        works."""
        self._backoff = MIN_BACKOFF_SECONDS
        self._next_attempt = 0.0

    def status(self) -> str | None:
        """None while connecting works; `restarting` while the supervisor starts the embedded PostgreSQL again;
        `unreachable` while connecting fails and the server retries."""
        if self.restarting:
            return "restarting"
        return "unreachable" if self.down_since is not None else None

    def reset(self) -> None:
        """Try the next connection at once (the supervisor started the database again). Thread-safe: plain
        assignments."""
        self._backoff = MIN_BACKOFF_SECONDS
        self._next_attempt = 0.0

    def lost(self) -> None:
        """A connection reported the database gone (the supervisor saw its postmaster die)."""
        if self.down_since is None:
            self.down_since = time.monotonic()

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        """`asyncpg.connect` for the pool, with a connect timeout and backoff: raises `DatabaseUnavailable` at once
        while the last attempt failed less than the backoff ago."""
        if time.monotonic() < self._next_attempt:
            raise db.DatabaseUnavailable("the database is unavailable; the server is reconnecting")
        kwargs.setdefault("timeout", CONNECT_TIMEOUT_SECONDS)
        try:
            conn = await asyncpg.connect(*args, **kwargs)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not (isinstance(exc, OSError | TimeoutError) or db.unavailable(exc)):
                raise  # refused for another reason (authentication, a missing database): not an outage
            self._failed(exc)
            # Not chained: asyncpg logs each failed attempt to refill the pool with its traceback; the cause was
            # logged once when the outage began (`_failed`).
            raise db.DatabaseUnavailable(f"the database is unavailable ({type(exc).__name__})") from None
        if self.down_since is not None:
            log.warning("database reachable again after %.1f s", time.monotonic() - self.down_since)
        self.down_since = None
        self.reset()
        return conn

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.error("database unavailable (%s: %s); reconnecting with backoff", type(exc).__name__, exc)
        self._next_attempt = now + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_SECONDS)


class EmbeddedSupervisor:
    """Starts the embedded PostgreSQL in `pgdata` again whenever its postmaster is gone (see the module
    docstring). `on_down` and `on_up` are called from its thread when it finds the postmaster gone and once it
    runs again; they must be thread-safe."""

    def __init__(
        self,
        pgdata: Path,
        *,
        on_down: Callable[[], None] | None = None,
        on_up: Callable[[], None] | None = None,
        check_seconds: float = CHECK_SECONDS,
    ) -> None:
        self.pgdata = pgdata
        self.on_down = on_down
        self.on_up = on_up
        self.check_seconds = check_seconds
        self.restarts = 0
        """How many times the postmaster was started again."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_health(cls, pgdata: Path, health: DatabaseHealth) -> EmbeddedSupervisor:
        """A supervisor that keeps `health` informed: `restarting` while it starts the database again, and the
        pool's next connection attempted at once when it runs."""

        def down() -> None:
            health.restarting = True
            health.lost()

        def up() -> None:
            health.restarting = False
            health.reset()

        return cls(pgdata, on_down=down, on_up=up)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hounsfield-postgres-supervisor", daemon=True)
        self._thread.start()

    async def aclose(self) -> None:
        """`stop` from the event loop, without blocking it."""
        await anyio.to_thread.run_sync(self.stop)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching (a start under way finishes first, so that the exit handler that stops the embedded
        PostgreSQL sees the postmaster that runs)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        process = db.postmaster(self.pgdata)
        while not self._stop.wait(self.check_seconds):
            if process is not None and db.alive(process):
                continue
            log.error("the embedded PostgreSQL (pid %s) is gone; starting it again", getattr(process, "pid", "?"))
            self._notify(self.on_down)
            process = self._restart()
            if process is not None:
                self.restarts += 1
                log.warning("the embedded PostgreSQL runs again (pid %s)", process.pid)
                self._notify(self.on_up)

    def _restart(self) -> Any:
        """Start the postmaster, retrying with backoff until it runs or the supervisor stops; its process."""
        backoff = MIN_BACKOFF_SECONDS
        while not self._stop.is_set():
            try:
                db.restart_embedded(self.pgdata)
                process = db.postmaster(self.pgdata)
                if process is not None:
                    return process
                error = "no postmaster after the start"
            except Exception as exc:  # pg_ctl failed (orphaned backends still hold the shared memory), timed out
                error = f"{type(exc).__name__}: {exc}"
            log.warning("the embedded PostgreSQL did not start (%s); retrying in %.1f s", error[:500], backoff)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, MAX_RESTART_BACKOFF_SECONDS)
        return None

    @staticmethod
    def _notify(callback: Callable[[], None] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:
            log.exception("database supervisor callback failed")
