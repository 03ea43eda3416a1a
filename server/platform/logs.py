"""The process log: one line per record, no PHI, no tokens.

A log line is read by people and tools that have no business with patient data, and anything a client sends
can end up in one. So:

- every record is one line: control characters in a message (a path with `%0A`, an exception text that echoes
  input) are escaped, and the lines of a traceback are indented, so no value can forge a record of its own;
- the access log names the route template (`GET /dicom-web/studies/{study}/series`), never the concrete path or
  the query string: QIDO-RS, WADO-URI and FHIR searches carry Patient IDs and names there
  (`PatientID=`, `patient.identifier=`), and some clients send `access_token=` (RFC 6750 2.3). A request that
  matched no route is logged with a fixed placeholder. uvicorn's own access log, which writes the raw request
  line, is off (`uvicorn_options`).

Each access line carries a request id (the client's `X-Request-ID` when it is a short plain token, else a new
one), returned in the `X-Request-ID` response header, so a support case can be matched to its line.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `hounsfield serve` configures logging before it imports the web framework
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "hounsfield.access"
UNROUTED = "<unrouted>"
"""The access log's route for a request answered before or without routing (unknown path, wrong method,
malformed target): the raw path may be anything the client sent."""
REQUEST_ID_HEADER = b"x-request-id"
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PARAM_TYPE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*):[^}]*\}")

access_log = logging.getLogger(ACCESS_LOGGER)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every control character (C0, DEL, C1, the Unicode line and paragraph separators) written as
    a Python escape (`\\x0a`), so that it stays on its line."""
    return _CONTROL.sub(_escaped, text)


class OneLineFormatter(logging.Formatter):
    """A formatter whose records cannot break lines: the message is escaped, and a traceback (which may quote
    input in its exception text) has each of its lines escaped and indented under the record."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        extra: list[str] = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        elif record.exc_text:
            extra.append(record.exc_text)
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        lines = [line for block in extra for line in block.splitlines()]
        return "\n".join([text, *("    " + escape(line) for line in lines)])


def configure(level: str) -> None:
    """The root logger of a served process: `level`, one handler on stderr with `OneLineFormatter`. Every other
    logger (uvicorn's, Litestar's, ours) propagates to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def uvicorn_options() -> dict[str, Any]:
    """uvicorn leaves logging to `configure` (no handlers of its own: its records propagate to the root) and
    writes no access log (`AccessLog` does)."""
    return {"log_config": None, "access_log": False}


def route_template(path_template: str) -> str:
    """`/studies/{study:str}` -> `/studies/{study}` (the http.route form)."""
    return _PARAM_TYPE.sub(r"{\1}", path_template)


def route_of(scope: Any) -> str:
    """What the log may say of a request's path: its route template once routed, else `UNROUTED`."""
    template = scope.get("path_template")
    return route_template(str(template)) if template and scope.get("route_handler") else UNROUTED


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER and _CLIENT_REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


class AccessLog:
    """ASGI layer around the whole application (outside routing, so 404s and 405s are logged too): one INFO
    line per HTTP response when it is complete, `method route status duration client rid=...`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind: str = scope["type"]  # ScopeType is a str enum; not imported, to keep this module light
        if kind != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        status = 0
        logged = False

        def log() -> None:
            nonlocal logged
            if logged or not access_log.isEnabledFor(logging.INFO):
                return
            logged = True
            client = scope.get("client")
            access_log.info(
                "%s %s %d %.1fms %s rid=%s",
                scope.get("method", ""),
                route_of(scope),
                status or 500,
                (time.perf_counter() - started) * 1000,
                client[0] if client else "-",
                request_id,
            )

        async def logging_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, request_id.encode("ascii"))]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log()

        try:
            await self.app(scope, receive, logging_send)
        finally:
            log()
