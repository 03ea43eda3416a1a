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
