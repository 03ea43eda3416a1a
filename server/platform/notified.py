"""A connection of its own that LISTENs on one channel, for per-process caches that a trigger invalidates
(PostgreSQL NOTIFY, delivered after the writing transaction commits). A cache may only trust what it holds while
`active`: when the connection is lost it is off (every caller asks the database) until it is re-established, and
`reset` is called whenever listening starts or stops, since what was cached meanwhile may be stale."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import asyncpg

log = logging.getLogger(__name__)


class ChannelListener:
    def __init__(
        self,
        dsn: str,
        channel: str,
        notified: Callable[[str], None],
        reset: Callable[[], None],
        *,
        retry_seconds: float = 5.0,
    ) -> None:
        self.dsn = dsn
        """Its own connection, outside the pool: a listener held for the process's life would otherwise keep the
        pool from closing and take a pooled connection away from requests."""
        self.channel = channel
        self.notified = notified
        """Called with each notification's payload."""
        self.reset = reset
        self.retry_seconds = retry_seconds
        self.active = False
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name=f"hounsfield-listen-{self.channel}")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notified(payload)

    async def _listen(self) -> None:
        """Hold a connection listening on the channel; on loss, turn the cache off and reconnect."""
        while not self._stop.is_set():
            try:
                conn = await asyncpg.connect(self.dsn)
                try:
                    await self._listen_on(conn)
                finally:
                    await conn.close()
            except Exception as exc:  # the database went away (or anything else): the cache stays off until back
                log.warning("%s cache off (listener: %s: %s); retrying", self.channel, type(exc).__name__, exc)
            if not self._stop.is_set():
                await asyncio.sleep(self.retry_seconds)

    async def _listen_on(self, conn: Any) -> None:
        lost = asyncio.Event()

        def on_lost(_conn: object) -> None:
            lost.set()

        conn.add_termination_listener(on_lost)
        await conn.add_listener(self.channel, self._on_notification)
        self.reset()  # what was cached before listening may be stale
        self.active = True
        try:
            await self._wait_for(lost)
        finally:
            self.active = False
            self.reset()
            conn.remove_termination_listener(on_lost)
            if not conn.is_closed():
                await conn.remove_listener(self.channel, self._on_notification)

    async def _wait_for(self, lost: asyncio.Event) -> None:
        stop = asyncio.create_task(self._stop.wait())
        gone = asyncio.create_task(lost.wait())
        try:
            await asyncio.wait({stop, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            gone.cancel()


K = TypeVar("K")
V = TypeVar("V")


class NotifiedCache(Generic[K, V]):
    """Entries a trigger invalidates: trusted only while the listener is up (`active`); `fetched` remembers what
    was read unless a notification came in between (a generation counter), and the cache starts afresh beyond
    `max_entries` so that its memory stays bounded. A notification's payload names the key to drop (`key_of`), or
    nothing: then every entry goes."""

    def __init__(
        self,
        dsn: str,
        channel: str,
        *,
        key_of: Callable[[str], K | None] = lambda _payload: None,
        max_entries: int = 100_000,
        retry_seconds: float = 5.0,
    ) -> None:
        self.entries: dict[K, V] = {}
        self.max_entries = max_entries
        self.key_of = key_of
        self._generation = 0
        self._listener = ChannelListener(dsn, channel, self.forget, self.clear, retry_seconds=retry_seconds)

    @property
    def active(self) -> bool:
        return self._listener.active

    @property
    def generation(self) -> int:
        """Read before fetching; hand to `fetched` with what was read."""
        return self._generation

    def fetched(self, key: K, value: V, generation: int) -> None:
        if self.active and generation == self._generation:
            if len(self.entries) >= self.max_entries:
                self.entries.clear()
            self.entries[key] = value

    def forget(self, payload: str) -> None:
        self._generation += 1
        key = self.key_of(payload)
        if key is None:
            self.entries.clear()
        else:
            self.entries.pop(key, None)

    def clear(self) -> None:
        self._generation += 1
        self.entries.clear()

    async def start(self) -> None:
        await self._listener.start()

    async def close(self) -> None:
        await self._listener.close()
