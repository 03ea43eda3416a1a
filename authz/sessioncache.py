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

import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from server.platform.notified import ChannelListener

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
        self.ttl = ttl_seconds
        """A backstop: entries are refreshed at least this often even without notifications."""
        self._entries: dict[Key, _Entry] = {}
        self._generation = 0
        self._listener = ChannelListener(dsn, CHANNEL, self.clear, self.clear, retry_seconds=retry_seconds)

    @property
    def active(self) -> bool:
        return self._listener.active

    def get(self, key: Key, now: dt.datetime) -> tuple[bool, dict[str, Any] | None]:
        """(known, context): known is False when the index must be asked."""
        if not self.active:
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
        if self.active and generation == self._generation:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = _Entry(session, time.monotonic())
        return session.context if session is not None else None

    def clear(self, *_args: object) -> None:
        self._generation += 1
        self._entries.clear()

    async def start(self) -> None:
        await self._listener.start()

    async def close(self) -> None:
        await self._listener.close()
