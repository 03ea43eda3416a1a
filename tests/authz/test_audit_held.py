"""No byte of a response reaches the client before the request's audit record has committed, although the handler
produces the body meanwhile (`authz.recording._Recorder`); a record that cannot be written turns the response into
a 503 with none of the data. The audit chain's head is locked from another connection to hold every append."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import httpx

from tests.support.factory import ct, multipart, part10, stow_headers


def _stored(http: httpx.Client) -> tuple[str, bytes]:
    ds = ct(PatientID="HELD1")
    data = part10(ds)
    answer = http.post("/dicom-web/studies", content=multipart([data]), headers=stow_headers())
    assert answer.status_code == 200, answer.text
    path = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    return path, data


class _HeadLock:
    """A transaction holding the audit head's row lock (appends wait for it), on its own event loop thread."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conn: Any = self._run(asyncpg.connect(dsn))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def lock(self) -> None:
        self._run(self.conn.execute("BEGIN; SELECT seq FROM audit_head WHERE id FOR UPDATE"))

    def kill_waiting_appends(self) -> int:
        sql = (
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND wait_event_type = 'Lock' AND query ILIKE '%audit%'"
        )
        return int(self._run(self.conn.fetchval(sql)))

    def unlock(self) -> None:
        self._run(self.conn.execute("ROLLBACK"))

    def close(self) -> None:
        self._run(self.conn.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextmanager
def _head_locked(dsn: str) -> Iterator[_HeadLock]:
    lock = _HeadLock(dsn)
    try:
        lock.lock()
        yield lock
    finally:
        try:
            lock.unlock()
        finally:
            lock.close()


def _request(url: str, path: str, token: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: application/dicom\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode())
    return sock


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _nothing_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b"" and False
    except TimeoutError:
        return True


def test_nothing_is_sent_before_the_record_commits(server: Any, http: httpx.Client) -> None:
    path, data = _stored(http)
    with _head_locked(server.dsn) as head:
        sock = _request(server.url, path, server.token())
        try:
            assert _nothing_within(sock, 1.5), "response bytes went out before the audit record committed"
            head.unlock()
            answer = _read_all(sock)
        finally:
            sock.close()
        head.lock()  # the context manager's ROLLBACK needs an open transaction
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer.endswith(data)  # the whole instance, after the headers


def test_a_record_that_cannot_be_written_sends_none_of_the_data(server: Any, http: httpx.Client) -> None:
    path, data = _stored(http)
    with _head_locked(server.dsn) as head:
        sock = _request(server.url, path, server.token())
        try:
            assert _nothing_within(sock, 1.0)
            assert head.kill_waiting_appends() >= 1  # the append waiting for the head fails
            answer = _read_all(sock)
        finally:
            sock.close()
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert data[128:] not in answer and b"DICM" not in answer
    assert b"audit trail unavailable" in answer
    assert http.get(path, headers={"Accept": "application/dicom"}).status_code == 200  # the trail goes on
