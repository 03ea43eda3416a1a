"""The guard's per-process cache of open break-glass sessions, so that an ordinary request costs no database
round trip for the break-glass probe.

Every request passes the subject's open session to the policy (`context.break_glass`), but sessions change
rarely (started, closed by a reviewer, expired). The cache keeps, per subject (issuer, sub), what the index said:
a session or none. It is only trusted while this process listens on `hounsfield_break_glass`, which a trigger
on `break_glass_sessions` notifies on every write (migrations/0010_break_glass_notify.sql): any change, in any
server process, clears every process's cache. When the listening connection is lost the cache is off (every
request asks the index again) until it is re-established. A cached session is used only before its expiry; a
generation counter keeps a read that raced with a notification from being cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

log = logging.getLogger(__name__)
CHANNEL = "hounsfield_break_glass"
MAX_ENTRIES = 100_000
"""Subjects remembered at most; beyond that the cache starts afresh (memory stays bounded)."""

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class OpenSession:
    context: dict[str, Any]
    """What the policy sees as `context.break_glass` ({"id", "reason", "expires"})."""
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class _Entry:
    session: OpenSession | None
    stored: float


class SessionCache:
    """Open sessions by subject. `get` answers from memory when it can; `lookup` asks the index and remembers."""

    def __init__(self, dsn: str, *, ttl_seconds: float = 60.0, retry_seconds: float = 5.0) -> None:
        self.dsn = dsn
        """Its own connection, outside the pool: a listener held for the process's life would otherwise keep
        the pool from closing and take a pooled connection away from requests."""
        self.ttl = ttl_seconds
        """A backstop: entries are refreshed at least this often even without notifications."""
        self.retry_seconds = retry_seconds
        self._entries: dict[Key, _Entry] = {}
        self._generation = 0
        self._listening = False
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def active(self) -> bool:
        return self._listening

    def get(self, key: Key, now: dt.datetime) -> tuple[bool, dict[str, Any] | None]:
        """(known, context): known is False when the index must be asked."""
        if not self._listening:
            return False, None
        entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry.stored > self.ttl:
            return False, None
        if entry.session is None or entry.session.expires_at <= now:
            return True, None
        return True, entry.session.context

    async def lookup(self, key: Key, fetch: Callable[[], Awaitable[OpenSession | None]]) -> dict[str, Any] | None:
        """Ask the index (`fetch`) and remember the answer unless a change was notified meanwhile."""
        generation = self._generation
        session = await fetch()
        if self._listening and generation == self._generation:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = _Entry(session, time.monotonic())
        return session.context if session is not None else None

    def clear(self, *_args: object) -> None:
        self._generation += 1
        self._entries.clear()

    # --- the listening connection --------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="hounsfield-break-glass-listener")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

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
                log.warning("break-glass session cache off (listener: %s: %s); retrying", type(exc).__name__, exc)
            if not self._stop.is_set():
                await asyncio.sleep(self.retry_seconds)

    async def _listen_on(self, conn: Any) -> None:
        lost = asyncio.Event()

        def on_lost(_conn: object) -> None:
            lost.set()

        conn.add_termination_listener(on_lost)
        await conn.add_listener(CHANNEL, self.clear)
        self.clear()  # what was cached before listening may be stale
        self._listening = True
        try:
            await self._wait_for(lost)
        finally:
            self._listening = False
            self.clear()
            conn.remove_termination_listener(on_lost)
            if not conn.is_closed():
                await conn.remove_listener(CHANNEL, self.clear)

    async def _wait_for(self, lost: asyncio.Event) -> None:
        stop = asyncio.create_task(self._stop.wait())
        gone = asyncio.create_task(lost.wait())
        try:
            await asyncio.wait({stop, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            gone.cancel()
