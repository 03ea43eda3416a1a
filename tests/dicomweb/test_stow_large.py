"""A multi-frame instance far larger than the memory a STOW may use streams through: the server's peak RSS
(VmHWM, read from /proc) grows by a small fraction of the upload."""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom

from tests.support.factory import ct
from tests.support.procs import serve

FRAMES = 800
ROWS = COLS = 512
FRAME_BYTES = ROWS * COLS * 2  # 512 KiB: 400 MiB in all


def header_bytes() -> tuple[bytes, pydicom.Dataset]:
    ds = ct(rows=ROWS, columns=COLS, frames=1)
    del ds.PixelData
    ds.NumberOfFrames = FRAMES
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    # Pixel Data comes last: append its explicit VR OW header and stream the value.
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, FRAME_BYTES * FRAMES)
    return buf.getvalue() + element, ds


def frame(i: int) -> bytes:
    return bytes([i % 251]) * FRAME_BYTES


def body(head: bytes, boundary: str, digest: hashlib._Hash) -> Iterator[bytes]:
    start = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head
    digest.update(head)
    yield start
    for i in range(FRAMES):
        data = frame(i)
        digest.update(data)
        yield data
    yield f"\r\n--{boundary}--\r\n".encode()


def test_large_upload_streams_in_constant_memory(dsn: str, tmp_path: Path) -> None:
    with serve(dsn, tmp_path / "data") as srv:
        url = srv.url
        # Warm up the code paths (imports, pool) with a small store before taking the baseline.
        small = io.BytesIO()
        pydicom.dcmwrite(small, ct(), enforce_file_format=True)
        warm = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + small.getvalue() + b"\r\n--b--\r\n"
        headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'} | srv.headers
        assert httpx.post(url + "/dicom-web/studies", content=warm, headers=headers).status_code == 200
        baseline = srv.peak_rss_kib()

        head, ds = header_bytes()
        digest = hashlib.sha256()
        resp = httpx.post(
            url + "/dicom-web/studies",
            content=body(head, "big", digest),
            timeout=600,
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=big'} | srv.headers,
        )
        assert resp.status_code == 200, resp.text
        upload_mib = (len(head) + FRAMES * FRAME_BYTES) / 2**20
        growth_mib = (srv.peak_rss_kib() - baseline) / 1024
        print(f"uploaded {upload_mib:.0f} MiB; server peak RSS grew {growth_mib:.1f} MiB")
        assert growth_mib < 64, f"peak RSS grew {growth_mib:.0f} MiB during a {upload_mib:.0f} MiB upload"

        # The stored bytes are the uploaded bytes, and frames are where the index says.
        blobs = [p for p in (tmp_path / "data" / "blobs").rglob("*.dcm") if ds.SOPInstanceUID in str(p)]
        assert len(blobs) == 1
        h = hashlib.sha256()
        with open(blobs[0], "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        assert h.hexdigest() == digest.hexdigest()
