"""Slow and idle clients against `hounsfield serve` (`server.platform.connections`): headers that never end, bodies that
stall or announce more than they send, and more connections than the limit. Raw sockets, because every HTTP client
library finishes its requests; the server is a real child process (the header deadline and the connection limit
live in the HTTP protocol uvicorn runs)."""

from __future__ import annotations

import contextlib
import json
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.platform.connections import connection_budget
from server.settings import Settings, SettingsError
from tests.support.factory import ct, part10
from tests.support.procs import ServerProcess, serve

pytestmark = pytest.mark.timeout(180)

HEADER_TIMEOUT = 2
BODY_TIMEOUT = 2
MARGIN = 5.0
"""Seconds beyond a timeout within which the server must have answered or closed (a loaded test machine)."""
BOUNDARY = "stall"
LIMIT_HEADER_TIMEOUT = 6
"""The header deadline of the connection-limit test: long enough to tell refused connections from cut ones."""


def _address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(_address(server), timeout=10)
    sock.setblocking(False)
    return sock


def _read_until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection (True), or until `deadline` (False)."""
    data = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], min(0.2, max(0.0, deadline - time.monotonic())))
        if not readable:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _watch(socks: list[socket.socket], deadline: float) -> dict[socket.socket, bytes]:
    """The sockets the server closed before `deadline`, with what it sent on each."""
    data = {sock: b"" for sock in socks}
    closed: dict[socket.socket, bytes] = {}
    while len(closed) < len(socks) and time.monotonic() < deadline:
        open_ = [sock for sock in socks if sock not in closed]
        readable, _, _ = select.select(open_, [], [], min(0.2, max(0.0, deadline - time.monotonic())))
        for sock in readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                data[sock] += chunk
            else:
                closed[sock] = data[sock]
    return closed


def _response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@contextlib.contextmanager
def _server(dsn: str, tmp_path: Path, **env: str) -> Iterator[ServerProcess]:
    settings = {
        "HOUNSFIELD_HTTP_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
        "HOUNSFIELD_HTTP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
        "HOUNSFIELD_DIMSE": "false",
        "HOUNSFIELD_INFERENCE": "false",
        **env,
    }
    with serve(dsn, tmp_path / "data", **settings) as server:
        yield server


def _stow_head(server: ServerProcess, content_length: int) -> bytes:
    token = server.headers["Authorization"]
    return (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
        f"Accept: application/dicom+json\r\nContent-Length: {content_length}\r\n\r\n"
    ).encode()


def _part(data: bytes) -> bytes:
    return f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"


def _instance_status(server: ServerProcess, ds: Any) -> int:
    url = (
        f"{server.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/metadata"
    )
    return httpx.get(url, headers=server.headers, timeout=30).status_code


def test_headers_that_never_end_are_cut_after_the_header_timeout(dsn: str, tmp_path: Path) -> None:
    with _server(dsn, tmp_path) as server:
        silent = _connect(server)  # opens and sends nothing
        slow = _connect(server)  # a slowloris: a header byte every half second, never the blank line
        started = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        answer, closed = b"", False
        deadline = started + HEADER_TIMEOUT + MARGIN
        while not closed and time.monotonic() < deadline:
            try:
                slow.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                pass
            more, closed = _read_until_closed(slow, min(deadline, time.monotonic() + 0.5))
            answer += more
        assert closed, "a client dripping header bytes kept its connection past the header timeout"
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert time.monotonic() - started >= HEADER_TIMEOUT - 0.5
        quiet, closed = _read_until_closed(silent, started + HEADER_TIMEOUT + MARGIN)
        assert closed and quiet == b"", "a connection that sent nothing was kept open (or answered)"
        # Answered before its body was read (401: no token), then the body drips: cut at the header deadline too.
        dripping = _connect(server)
        dripping.sendall(
            b"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/related; "
            b"boundary=x\r\nContent-Length: 1000000\r\n\r\n"
        )
        started = time.monotonic()
        answer, closed = b"", False
        while not closed and time.monotonic() < started + HEADER_TIMEOUT + MARGIN:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                dripping.sendall(b"x")
            more, closed = _read_until_closed(dripping, min(started + HEADER_TIMEOUT + MARGIN, time.monotonic() + 0.5))
            answer += more
        assert answer.startswith(b"HTTP/1.1 401") and closed, "an answered request's dripping body held the connection"
        dripping.close()
        # A request sent at a normal pace, on a connection opened meanwhile, is answered.
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
        for sock in (silent, slow):
            sock.close()


def test_a_stalled_body_ends_the_request_and_parts_received_whole_stay_stored(dsn: str, tmp_path: Path) -> None:
    with _server(dsn, tmp_path) as server:
        # Content-Length announces 2 GiB; the body holds one whole part and its closing delimiter, then nothing.
        whole = ct()
        sock = _connect(server)
        sock.sendall(_stow_head(server, 2**31) + _part(part10(whole)) + f"--{BOUNDARY}--\r\n".encode())
        started = time.monotonic()
        data, closed = _read_until_closed(sock, started + BODY_TIMEOUT + MARGIN)
        assert data, "no response to a body that announced more than it sent"
        status, headers, _ = _response(data)
        assert status == 200 and headers.get("connection") == "close"
        assert closed
        assert _instance_status(server, whole) == 200
        sock.close()

        # One part whole, the next cut in its middle, then the client stalls: the first is stored and reported,
        # the second failed (0110), the connection closed.
        kept, cut = ct(), ct(seed=1)
        cut_bytes = part10(cut)
        body = _part(part10(kept)) + _part(cut_bytes)[: len(cut_bytes) // 2]
        sock = _connect(server)
        sock.sendall(_stow_head(server, len(body) + 10_000) + body)
        data, closed = _read_until_closed(sock, time.monotonic() + BODY_TIMEOUT + MARGIN)
        assert data, "no response to a stalled body"
        status, headers, payload = _response(data)
        assert status == 202 and headers.get("connection") == "close", data[:300]
        assert closed
        answer = json.loads(payload)
        assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [kept.SOPInstanceUID]
        assert [i["00081197"]["Value"][0] for i in answer["00081198"]["Value"]] == [0x0110]  # the cut part
        assert _instance_status(server, kept) == 200
        assert _instance_status(server, cut) == 404
        sock.close()

        # Nothing received whole: 408. The same deadline holds for every route's body (a FHIR create here).
        for head in (
            _stow_head(server, 100_000) + _part(part10(ct(seed=2)))[:500],
            (
                f"POST /fhir/Patient HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {server.headers['Authorization']}"
                "\r\nContent-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{"
            ).encode(),
        ):
            sock = _connect(server)
            sock.sendall(head)
            data, closed = _read_until_closed(sock, time.monotonic() + BODY_TIMEOUT + MARGIN)
            assert data and closed, "a stalled body held its connection"
            assert _response(data)[0] == 408, data[:200]
            sock.close()
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200


def test_connections_beyond_the_limit_are_refused_and_the_server_serves_afterwards(dsn: str, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 1024)
    if hard <= lowered:
        pytest.skip("the hard open file limit leaves nothing to raise")
    limit = 16
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))  # the server inherits a low soft limit
    try:
        started = _server(
            dsn,
            tmp_path,
            HOUNSFIELD_HTTP_MAX_CONNECTIONS=str(limit),
            HOUNSFIELD_HTTP_HEADER_TIMEOUT_SECONDS=str(LIMIT_HEADER_TIMEOUT),
        )
        server = started.__enter__()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
        [line] = [row for row in limits.splitlines() if row.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)], line  # raised to the hard limit at start

        opened = time.monotonic()
        idle = [_connect(server) for _ in range(limit * 2 + 8)]
        seen = _watch(idle, opened + LIMIT_HEADER_TIMEOUT - 2)  # before the header deadline cuts any of them
        kept = [sock for sock in idle if sock not in seen]
        assert len(kept) <= limit, f"{len(kept)} idle connections held open, the limit is {limit}"
        assert all(data.startswith(b"HTTP/1.1 503") or data == b"" for data in seen.values())
        assert sum(data.startswith(b"HTTP/1.1 503") for data in seen.values()) >= limit
        # The idle ones held are cut at the header deadline; then a request is served again.
        seen = _watch(kept, opened + LIMIT_HEADER_TIMEOUT + MARGIN)
        assert len(seen) == len(kept), "an idle connection outlived the header timeout"
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
        for sock in idle:
            sock.close()
    finally:
        started.__exit__(None, None, None)


def test_timeout_settings_and_the_connection_budget() -> None:
    settings = Settings.from_env({})
    assert (settings.http_header_timeout_seconds, settings.http_body_timeout_seconds) == (30, 60)
    assert (settings.http_keepalive_seconds, settings.http_max_connections) == (5, 1024)
    for name, bad in (("HOUNSFIELD_HTTP_HEADER_TIMEOUT_SECONDS", "0"), ("HOUNSFIELD_HTTP_MAX_CONNECTIONS", "0")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: bad})
    assert connection_budget(1024, 1_048_576) == 1024
    assert connection_budget(1024, 1024) == (1024 - 256) // 2  # a connection and the file it may hold
    assert connection_budget(1024, 100) == 1
