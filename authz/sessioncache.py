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

from server.platform.notified import NotifiedCache

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


class SessionCache(NotifiedCache[Key, _Entry]):
    """Open sessions by subject. `get` answers from memory when it can; `lookup` asks the index and remembers.
    Any notification clears every subject's entry."""

    def __init__(self, dsn: str, *, ttl_seconds: float = 60.0, retry_seconds: float = 5.0) -> None:
        super().__init__(dsn, CHANNEL, max_entries=MAX_ENTRIES, retry_seconds=retry_seconds)
        self.ttl = ttl_seconds
        """A backstop: entries are refreshed at least this often even without notifications."""

    def get(self, key: Key, now: dt.datetime) -> tuple[bool, dict[str, Any] | None]:
        """(known, context): known is False when the index must be asked."""
        if not self.active:
            return False, None
        entry = self.entries.get(key)
        if entry is None or time.monotonic() - entry.stored > self.ttl:
            return False, None
        if entry.session is None or entry.session.expires_at <= now:
            return True, None
        return True, entry.session.context

    async def lookup(self, key: Key, fetch: Callable[[], Awaitable[OpenSession | None]]) -> dict[str, Any] | None:
        """Ask the index (`fetch`) and remember the answer unless a change was notified meanwhile."""
        generation = self.generation
        session = await fetch()
        self.fetched(key, _Entry(session, time.monotonic()), generation)
        return session.context if session is not None else None
