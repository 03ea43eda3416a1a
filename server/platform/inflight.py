"""HTTP requests still being handled when the application shuts down.

uvicorn's graceful shutdown waits for requests in flight, then cancels those still running and starts the
lifespan's shutdown at once, which closes the pool, the audit trail and the blob store. A request may answer
its cancellation rather than die of it: a STOW-RS request cut off by shutdown finishes the parts it was storing
and answers what it stored (dicomweb/routes/stow.py). The lifespan waits for such requests (`wait_idle`) before
closing what they still use, so their answer and its audit record go out before the process ends.
"""

from __future__ import annotations

import asyncio

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send


class InFlight:
    """Counts the HTTP requests inside the wrapped application."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            self._count += 1
            self._idle.clear()
            try:
                await app(scope, receive, send)
            finally:
                self._count -= 1
                if self._count == 0:
                    self._idle.set()

        return counted

    @property
    def count(self) -> int:
        return self._count

    async def wait_idle(self) -> None:
        """Return once no request is in flight (bound it with `asyncio.timeout`)."""
        await self._idle.wait()
