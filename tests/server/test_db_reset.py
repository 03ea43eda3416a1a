"""The pool's reset (server/platform/db.py): a released connection loses its session state unless its checkout vouched
that it left none (`vouch_stateless`, used by the ingest path to save a round trip per checkout)."""

from __future__ import annotations

import asyncio

from server.platform import db


def test_release_resets_session_state_unless_vouched(dsn: str) -> None:
    async def run() -> None:
        pool = await db.create_pool(dsn, 1, 1)  # one connection: every checkout gets the same one
        try:
            async with pool.acquire() as conn:
                await conn.execute("SET application_name = 'left-behind'")
                await conn.execute("SELECT pg_advisory_lock(4242)")
                await conn.execute("LISTEN hounsfield_reset_test")
            async with pool.acquire() as conn:
                assert await conn.fetchval("SHOW application_name") != "left-behind"
                assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
                assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
                # A (false) vouch shows the reset query is really skipped, once.
                await conn.execute("SET application_name = 'vouched'")
                db.vouch_stateless(conn)
            async with pool.acquire() as conn:
                assert await conn.fetchval("SHOW application_name") == "vouched"
                await conn.execute("SET application_name = 'again'")
            async with pool.acquire() as conn:
                assert await conn.fetchval("SHOW application_name") != "again"
                # An open transaction is rolled back on release even after a vouch.
                tr = conn.transaction()
                await tr.start()
                await conn.execute("CREATE TABLE reset_probe (x int)")
                db.vouch_stateless(conn)
                asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)  # asyncpg reports it
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT to_regclass('reset_probe')") is None
        finally:
            await pool.close()

    asyncio.run(run())
