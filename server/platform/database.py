"""The database every package uses, as a plugin: the serving pool (migrated at start, its role checked), the
embedded PostgreSQL's supervisor when this process started it, and the health that /readyz reports. A database
that is down at start or restarts later is waited for (`server.platform.dbwatch`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

from server.platform import db, dbroles, dbwatch, private
from server.platform.plugin import ServicePlugin, opened
from server.platform.settings import PlatformSettings

log = logging.getLogger(__name__)


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close gracefully; connections the database dropped (it is down at shutdown) are terminated instead."""
    try:
        await asyncio.wait_for(pool.close(), timeout=10)
    except Exception as exc:  # asyncpg terminated the pool already; shutting down goes on
        log.warning("database pool closed by termination: %s: %s", type(exc).__name__, exc)
        pool.terminate()


class DatabasePlugin(ServicePlugin):
    """Dependencies: `pool` (asyncpg.Pool), `database` (`dbwatch.DatabaseHealth`)."""

    def __init__(self, settings: PlatformSettings, *, dsn: str | None = None) -> None:
        self.settings = settings
        self.dsn = dsn
        """A database to use as is (tests); None: `DATABASE_URL`, else the embedded PostgreSQL."""
        self.health = dbwatch.DatabaseHealth()
        self._pool: asyncpg.Pool | None = None
        self._url: str | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        return opened(self._pool, "the database pool")

    @property
    def url(self) -> str:
        """The serving role's URL (for connections of their own: the audit writer, LISTEN sessions)."""
        return opened(self._url, "the database URL")

    def dependencies(self) -> Mapping[str, Callable[[], Any]]:
        return {"pool": lambda: self.pool, "database": lambda: self.health}

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        private.make_dirs(settings.data_dir)
        owned = self.dsn is None and not settings.database_url  # this process starts the embedded PostgreSQL

        async def connect() -> tuple[str, asyncpg.Pool]:
            url = self.dsn or await dbroles.database_url(settings)
            self.health.reset()
            pool = await db.create_pool(url, settings.db_pool_min, settings.db_pool_max, connect=self.health.connect)
            try:
                async with pool.acquire() as conn:
                    await db.migrate(conn)
                    await dbroles.check_serving_role(conn, allow_privileged=settings.database_allow_privileged)
            except BaseException:
                pool.terminate()
                raise
            return url, pool

        self._url, pool = await dbwatch.when_reachable(connect)  # a database that restarts is waited for
        self._pool = pool
        if owned:  # started again when its postmaster dies; stopped watching last, after everything closed
            supervisor = dbwatch.EmbeddedSupervisor.for_health(settings.data_dir / "pg", self.health)
            supervisor.start()
            stack.push_async_callback(supervisor.aclose)
        stack.push_async_callback(close_pool, pool)
        stack.callback(self._forget)

    async def own_pool(self, stack: contextlib.AsyncExitStack, min_size: int, max_size: int) -> asyncpg.Pool:
        """A pool of connections of its own (a writer that must never wait behind the callers' checkouts), closed
        on `stack`; it reports to the same health."""
        pool = await db.create_pool(self.url, min_size, max_size, connect=self.health.connect)
        stack.push_async_callback(close_pool, pool)
        return pool

    def _forget(self) -> None:
        self._pool = None
