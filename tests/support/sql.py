"""One SQL query against a test database from synchronous test code (its own connection, closed after)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg


def query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def poison(uid: str) -> list[str]:
    """Statements that make the index refuse the rows of the instance `uid` (a trigger raising, as a constraint
    or a bug would), each to run on its own."""
    return [
        "CREATE FUNCTION test_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'this instance cannot be indexed (test)'; END $$",
        "CREATE TRIGGER test_poison BEFORE INSERT ON instances FOR EACH ROW "
        f"WHEN (NEW.sop_instance_uid = '{uid}') EXECUTE FUNCTION test_poison()",
    ]
