"""Forward audit records to a syslog collector as IHE ATNA does (ITI-20 Record Audit Event): RFC 5424 messages
whose MSG is the FHIR R4 AuditEvent as JSON (UTF-8 with a BOM, RFC 5424 6.4), facility 10 (security/authorization)
and severity notice for successes, warning for minor and error for serious failures.

Transports: `udp://host:port` (RFC 5426: one message per datagram, sent without blocking; a datagram that cannot be
sent now is dropped and counted) or `tcp://host:port` (RFC 6587 3.4.1 octet counting, "LEN SP MSG"; a background
task writes a bounded queue and reconnects). Forwarding is best effort: the database is the record of truth, and
`hounsfield audit export` can replay any period.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
from urllib.parse import urlparse

from authz.auditevent import to_fhir
from authz.auditrecord import AuditRecord

log = logging.getLogger(__name__)

FACILITY = 10
"""security/authorization messages (RFC 5424 6.2.1), as ATNA recommends."""
APP_NAME = "hounsfield"
MSGID = "IHE+FHIR"
"""ITI-20's MSGID for a FHIR AuditEvent message (DICOM XML messages use IHE+RFC-3881)."""
CLOSE_WAIT_SECONDS = 5.0
_SEVERITY = {"0": 5, "4": 4, "8": 3, "12": 3}
_BOM = b"\xef\xbb\xbf"


def format_message(record: AuditRecord, seq: int, *, hostname: str | None = None) -> bytes:
    """One RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM JSON`."""
    pri = FACILITY * 8 + _SEVERITY[record.outcome]
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    host = (hostname or socket.gethostname() or "-")[:255].replace(" ", "_")
    header = f"<{pri}>1 {stamp} {host} {APP_NAME} {os.getpid()} {MSGID} - ".encode("ascii", "replace")
    body = json.dumps(to_fhir(record, seq), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return header + _BOM + body


CHECKPOINT_MSGID = "HF-CHECKPOINT"
"""MSGID of a signed audit checkpoint (authz/auditanchor.py) sent on the same stream as the records."""


def format_checkpoint(entry: bytes, *, hostname: str | None = None) -> bytes:
    """One RFC 5424 message carrying a signed checkpoint (its anchor JSON), severity notice."""
    pri = FACILITY * 8 + 5
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    host = (hostname or socket.gethostname() or "-")[:255].replace(" ", "_")
    header = f"<{pri}>1 {stamp} {host} {APP_NAME} {os.getpid()} {CHECKPOINT_MSGID} - ".encode("ascii", "replace")
    return header + _BOM + entry


class SyslogForwarder:
    """An `AuditTrail` forwarder (`forwarder=SyslogForwarder(settings.audit_syslog)`): called with each committed
    record and its seq; never blocks the caller. `await close()` on shutdown sends what is queued (TCP)."""

    def __init__(self, url: str, *, queue_size: int = 10_000, hostname: str | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("udp", "tcp") or not parsed.hostname or not parsed.port:
            raise ValueError(f"audit syslog: expected udp://host:port or tcp://host:port, got {url!r}")
        self.scheme = parsed.scheme
        self.address = (parsed.hostname, parsed.port)
        self.hostname = hostname
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None

    def __call__(self, record: AuditRecord, seq: int) -> None:
        self.send(format_message(record, seq, hostname=self.hostname))

    def send(self, message: bytes) -> None:
        """Queue (TCP) or send (UDP) one formatted message; never blocks."""
        if self.scheme == "udp":
            self._send_datagram(message)
            return
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self._drop("queue full")
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._pump(), name="hounsfield-audit-syslog")

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("audit syslog: %s; %d messages dropped so far", why, self.dropped)

    def _send_datagram(self, message: bytes) -> None:
        if self._sock is None:
            family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        try:
            self._sock.sendto(message, self.address)
        except OSError as exc:
            self._drop(f"udp send failed: {exc}")

    async def _pump(self) -> None:
        """Write queued messages over one TCP connection, reconnecting (1 s, 2 s ... 30 s apart) when it breaks."""
        writer: asyncio.StreamWriter | None = None
        delay = 1.0
        try:
            while True:
                message = await self._queue.get()
                while True:
                    try:
                        if writer is None:
                            _, writer = await asyncio.open_connection(*self.address)
                            delay = 1.0
                        writer.write(str(len(message)).encode("ascii") + b" " + message)
                        await writer.drain()
                        break
                    except OSError as exc:
                        log.warning("audit syslog: %s:%s: %s; retrying in %.0f s", *self.address, exc, delay)
                        writer = None
                        await asyncio.sleep(delay)
                        delay = min(30.0, delay * 2)
                self._queue.task_done()
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def close(self) -> None:
        """Send what is queued (waiting up to `CLOSE_WAIT_SECONDS`), then stop."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), CLOSE_WAIT_SECONDS)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
