"""How long a client may take and how many connections it may hold: what keeps slow or idle clients from using up
the server (RFC 9110 15.5.9 408 Request Timeout; RFC 9110 15.6.4 503 Service Unavailable).

uvicorn's HTTP/1.1 protocol closes an idle keep-alive connection, but waits forever for the headers of a request
(a connection that sends nothing, or a byte every few seconds, is held open), for the next piece of a body, and
accepts connections until the process runs out of file descriptors, after which every request that opens a file
fails. Here:

- `HttpProtocol` (uvicorn's httptools protocol, given to `uvicorn.run` as `http`): a connection's request headers
  must be complete `header_timeout` seconds after it opened or after its previous response (else 408, or a plain
  close when nothing came), so must the rest of a body the application answered without reading, the bytes
  before the headers are capped, and a connection beyond `max_connections` is answered 503 with Retry-After and
  closed at once, so its descriptor is free again;
- `body_deadline` (an ASGI layer at the edge of the app): the wait for each next piece of a request body is at most
  `idle_seconds`; then the request ends with `BodyTimeout` (408, connection closed). STOW-RS catches it and
  answers for the parts it received whole (dicomweb/routes/stow.py);
- `raise_fd_limit` and `connection_budget`: the process's descriptor limit is raised to the hard limit at start,
  and the connection limit kept below it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

FD_RESERVE = 256
"""Descriptors kept for everything but HTTP connections: the database pool, DICOM associations, logs, the blob and
spool files of requests in progress."""
FDS_PER_CONNECTION = 2
"""A connection's socket, and a file it may hold open while it is served (a spool file, a blob being streamed)."""
HEADER_BYTES_CAP = 1024 * 1024
"""The most bytes read from a connection before its request headers are complete (the 431 check of the headers'
own size, `server.limits.header_limit`, comes after they are parsed; this bounds what is buffered until then)."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    """Seconds from a connection's opening, or from its previous response, to the end of its request headers."""
    max_connections: int
    """Open connections of this process; one more is answered 503 and closed."""
    retry_after: int = 5
    """The Retry-After of that 503, in seconds."""


def _plain_response(status: bytes, text: str, extra: bytes = b"") -> bytes:
    body = text.encode("ascii")
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n" + extra + b"connection: close\r\n\r\n" + body
    )


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol with a header deadline, a cap on bytes before the headers, and a
    connection limit (see the module). uvicorn makes one per connection with `config`, `server_state`,
    `app_state`; `limits` is bound with `functools.partial` (which also pickles, for `HOUNSFIELD_PROCESSES`)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = True  # bytes read now belong to a request's head (or to nothing yet)
        self._request_begun = False  # a request line has started (a 408 is then worth sending)
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning(
                "connection refused: %d connections open (HOUNSFIELD_HTTP_MAX_CONNECTIONS)", len(self.connections)
            )
            retry = f"retry-after: {self.limits.retry_after}\r\n".encode("ascii")
            self._refuse(b"503 Service Unavailable", "too many connections; retry later", retry)
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._head_bytes > HEADER_BYTES_CAP and not self.transport.is_closing():
            self._refuse(b"431 Request Header Fields Too Large", "request headers too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._request_begun = True, True
        # The first request's deadline runs from the connection's opening; a later one's from its first byte (an
        # idle keep-alive connection is closed by uvicorn's keep-alive timer before that).
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_headers, self._request_begun, self._head_bytes = False, False, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_headers = True  # what comes next is the next request's head
        if self.cycle is not None and self.cycle.response_complete:
            self._arm()  # the rest of an answered request's body came: the next request has the header deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            # Answered before its body was read (401, 503 while the disk is low): uvicorn reads and drops the rest,
            # and each piece would put off its keep-alive timer; the rest must come within the header deadline.
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm()  # a pipelined request waits behind a response still being sent: not the client's delay
            return
        if self._request_begun:
            self._refuse(b"408 Request Timeout", "request headers not received in time")
        else:
            self.transport.close()  # nothing came: no request to answer

    def _refuse(self, status: bytes, text: str, extra: bytes = b"") -> None:
        self._disarm()
        self.transport.write(_plain_response(status, text, extra))
        self.transport.close()


class BodyTimeout(HTTPException):
    """The next piece of a request body did not come within `HOUNSFIELD_HTTP_BODY_TIMEOUT_SECONDS` (408)."""

    status_code = 408

    def __init__(self, idle_seconds: float) -> None:
        super().__init__(
            detail=f"request body stalled: nothing received for {idle_seconds:g} s",
            headers={"Connection": "close"},
        )
        self.idle_seconds = idle_seconds


def body_deadline(app: ASGIApp, idle_seconds: float) -> ASGIApp:
    """ASGI layer: each wait for the next piece of an HTTP request body lasts at most `idle_seconds` (the time the
    application spends between reads does not count), then `BodyTimeout` is raised to the reader. The response of
    such a request closes the connection (its body was not read to the end). Once the body is complete, a read
    (waiting for the client to disconnect) has no deadline."""

    async def layer(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        complete = False
        timed_out = False

        async def timed_receive() -> ReceiveMessage:
            nonlocal complete, timed_out
            if complete:
                return await receive()
            try:
                async with asyncio.timeout(idle_seconds):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                raise BodyTimeout(idle_seconds) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        async def closing_send(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await app(scope, timed_receive, closing_send)

    return layer


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (each connection is a descriptor); returns the
    soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # the kernel's usual nr_open
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open file limit from %d to %d: %s", soft, hard, exc)
    return int(soft)


def connection_budget(wanted: int, fd_limit: int) -> int:
    """The connection limit to use: `wanted`, or less so that connections and the files they hold fit in
    `fd_limit` descriptors beside `FD_RESERVE` (at least 1)."""
    fits = max(1, (fd_limit - FD_RESERVE) // FDS_PER_CONNECTION)
    return min(wanted, fits)
