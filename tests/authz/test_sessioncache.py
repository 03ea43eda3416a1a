"""The guard's cache of open break-glass sessions (authz/sessioncache.py): trusted only while it listens for the
trigger's notifications, cleared by any change from any process, off while its connection is lost. End to end:
two server processes on one database, a session started and closed through one is honoured by the other."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from authz.sessioncache import OpenSession, SessionCache
from tests.authz.test_breakglass import REASON, store
from tests.conftest import LiveServer, bearer

KEY = ("https://issuer", "dr-who")


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def session(minutes: float) -> OpenSession:
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)
    return OpenSession({"id": "s1", "reason": REASON, "expires": expires.isoformat()}, expires)


def fetching(value: OpenSession | None, during: Callable[[], Awaitable[None]] | None = None) -> Any:
    async def fetch() -> OpenSession | None:
        if during is not None:
            await during()
        return value

    return fetch


async def test_cache_follows_notifications_and_listener_loss(dsn: str) -> None:
    cache = SessionCache(dsn, retry_seconds=0.05)
    other = await asyncpg.connect(dsn)
    try:
        now = dt.datetime.now(dt.UTC)
        assert cache.get(KEY, now) == (False, None)  # not listening yet: never trusted
        await cache.start()
        await until(lambda: cache.active)
        assert await cache.lookup(KEY, fetching(None)) is None
        assert cache.get(KEY, now) == (True, None)

        # A change anywhere (here: any write to the sessions table, from another connection) clears it.
        await other.execute("DELETE FROM break_glass_sessions WHERE false")
        await until(lambda: cache.get(KEY, now) == (False, None))

        # A cached session is used only before its expiry.
        open_session = session(minutes=10)
        assert await cache.lookup(KEY, fetching(open_session)) == open_session.context
        assert cache.get(KEY, now) == (True, open_session.context)
        assert cache.get(KEY, now + dt.timedelta(minutes=11)) == (True, None)

        # A read that raced with a notification is not cached.
        async def notify() -> None:
            await other.execute("NOTIFY hounsfield_break_glass")
            await asyncio.sleep(0.2)

        cache.clear()
        assert await cache.lookup(KEY, fetching(None, during=notify)) is None
        assert cache.get(KEY, now) == (False, None)

        # Losing the listening connection turns the cache off until it listens again.
        await cache.lookup(KEY, fetching(None))
        killed = await other.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
        )
        assert killed == 1
        await until(lambda: not cache.active)
        assert cache.get(KEY, now) == (False, None)
        await until(lambda: cache.active)
        assert cache.get(KEY, now) == (False, None)  # nothing from before the loss survives
    finally:
        await cache.close()
        await other.close()


@pytest.mark.timeout(120)
def test_a_session_started_and_closed_on_one_process_is_honoured_by_another(make_server: Any) -> None:
    a: LiveServer = make_server()
    b: LiveServer = make_server()  # same database, same signing key: a second process behind a load balancer
    studies = store(a)
    dr = bearer(a.token(sub="dr-who", roles=["referring"], scopes=[]))
    reviewer = bearer(a.token(sub="sec-1", roles=["auditor"], scopes=[]))
    p3_on_b = f"{b.dicomweb}/studies/{studies['P3']}/metadata"
    for _ in range(3):  # b has now cached "no open session" for dr-who
        assert httpx.get(p3_on_b, headers=dr).status_code == 403

    started = httpx.post(
        a.url + "/break-glass", json={"reason": REASON, "patient_id": "P3", "study_uid": studies["P3"]}, headers=dr
    )
    assert started.status_code == 201, started.text
    assert eventually(lambda: httpx.get(p3_on_b, headers=dr).status_code == 200)

    closed = httpx.post(
        f"{a.url}/break-glass/{started.json()['id']}/close", json={"comment": "reviewed: justified"}, headers=reviewer
    )
    assert closed.status_code == 200, closed.text
    assert eventually(lambda: httpx.get(p3_on_b, headers=dr).status_code == 403)


def eventually(check: Callable[[], bool], seconds: float = 2.0) -> bool:
    """Another process hears of a change within milliseconds; allow a little time, never a stale window."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
