"""Request header size limit: 431 Request Header Fields Too Large (RFC 6585 5) instead of parsing megabytes of
headers. uvicorn's httptools parser sets no limit of its own."""

from __future__ import annotations

import json
from collections.abc import Callable

from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, Scope, Send


def header_limit(max_bytes: int) -> Callable[[ASGIApp], ASGIApp]:
    """A Litestar middleware factory: refuse requests whose header names and values exceed `max_bytes`."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == ScopeType.HTTP:
                total = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
                if total > max_bytes:
                    body = json.dumps({"error": f"request headers exceed {max_bytes} bytes", "status": 431}).encode()
                    start: HTTPResponseStartEvent = {
                        "type": "http.response.start",
                        "status": 431,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"warning", f'299 hounsfield "request headers exceed {max_bytes} bytes"'.encode()),
                        ],
                    }
                    await send(start)
                    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
                    await send(end)
                    return
            await app(scope, receive, send)

        return middleware

    return factory
