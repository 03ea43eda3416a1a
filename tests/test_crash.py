"""Durability: a server killed (SIGKILL) in the middle of a STOW leaves no index row without bytes; its spooled
part is collected after the grace period; everything acknowledged before the kill is intact after restart."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import asyncpg
import httpx

from tests.factory import ct, multipart, part10, stow_headers
from tests.procs import serve


def slow_body(head: bytes, total: int, started: threading.Event):
    yield b"--b\r\nContent-Type: application/dicom\r\n\r\n" + head
    sent = 0
    while sent < total:
        yield b"\0" * 65536
        sent += 65536
        if sent > 8 * 65536:
            started.set()
            time.sleep(0.01)


def index_state(dsn: str) -> list[tuple[str, str]]:
    async def run() -> list[tuple[str, str]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT sop_instance_uid, blob_key FROM instances")
            return [(r["sop_instance_uid"], r["blob_key"]) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def test_kill_during_upload(dsn: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    acknowledged = ct()
    big = ct(rows=512, columns=512, frames=1)
    big.NumberOfFrames = 400
    del big.PixelData
    import io
    import struct

    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, big, enforce_file_format=True)
    total = 512 * 512 * 2 * 400
    head = buf.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, total)

    with serve(dsn, data) as srv:
        resp = httpx.post(
            srv.url + "/dicom-web/studies",
            content=multipart([part10(acknowledged)]),
            headers=stow_headers() | srv.headers,
        )
        assert resp.status_code == 200
        started = threading.Event()
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                httpx.post(
                    srv.url + "/dicom-web/studies",
                    content=slow_body(head, total, started),
                    headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'} | srv.headers,
                    timeout=60,
                )
            except BaseException as exc:  # the connection dies with the server
                errors.append(exc)

        thread = threading.Thread(target=upload)
        thread.start()
        assert started.wait(30)
        spool = data / "blobs" / ".spool"
        deadline = time.monotonic() + 30
        while not list(spool.glob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.01)  # kill only once the server is writing the part
        srv.kill()
        thread.join(60)
        assert errors, "the upload should have been cut off"

    assert list(spool.glob("*.part")), "the interrupted part should still be in the spool"
    rows = index_state(dsn)
    assert [uid for uid, _ in rows] == [acknowledged.SOPInstanceUID]
    for _uid, key in rows:
        assert (data / "blobs" / key).is_file(), "an index row names missing bytes"

    # After a restart the collector (grace 0 here) removes the stale spool file; acknowledged data is intact.
    with serve(dsn, data, HOUNSFIELD_GC_GRACE_SECONDS="0", HOUNSFIELD_GC_INTERVAL_SECONDS="1") as srv:
        deadline = time.monotonic() + 30
        while list(spool.glob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not list(spool.glob("*.part"))
        again = httpx.post(
            srv.url + "/dicom-web/studies",
            content=multipart([part10(acknowledged)]),
            headers=stow_headers() | srv.headers,
        )
        assert again.status_code == 200  # identical bytes: idempotent
    assert index_state(dsn) == rows
