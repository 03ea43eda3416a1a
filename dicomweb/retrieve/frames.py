"""Reading frames of one stored instance (PS3.18 10.4.1.1.4): stored bytes, native little endian, or encoded.

`FrameReader` reads only each frame's byte ranges from the blob (offsets the index recorded at ingest,
`dicomweb.pixels.layout`) and produces it as stored (the encapsulated syntax itself, or native little-endian data),
decoded to native little endian, byte-swapped from big endian, or cut out of bit-packed or deflated Pixel
Data. `native_for_encoding` gives the pixels an encoder starts from (`dicomweb.pixels.encode`).

No HTTP types; blocking codec work runs in worker threads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import anyio.to_thread
import asyncpg

from dicomweb.blobs import BlobStore
from dicomweb.codecs import negotiate
from dicomweb.errors import NotAcceptable, NotFound
from dicomweb.index.repository import RETRIEVE
from dicomweb.pixels import decode as transcode
from dicomweb.pixels import native as pixeldata
from dicomweb.pixels.layout import FrameLayout
from dicomweb.uids import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN
from server.platform.db import vouch_stateless


def load_json(value: Any) -> Any:
    if isinstance(value, str):
        return json.loads(value)
    return value


def frame_count(pixel: dict[str, Any]) -> int:
    if "bits" in pixel:
        return int(pixel["bits"][2])
    if "deflated" in pixel:
        return int(pixel["deflated"])
    return FrameLayout.count_from_json(pixel)


class FrameReader:
    """Produces frames of one instance in transfer syntax `target`, reading only their byte ranges. `target` is
    the stored syntax or a native little-endian one (encoding is `dicomweb.pixels.encode`'s, from `frame()` output)."""

    def __init__(
        self, pool: asyncpg.Pool, blobs: BlobStore, row: asyncpg.Record, pixel: dict[str, Any], target: str
    ) -> None:
        self.blobs = blobs
        self.pool = pool
        self.row = row
        self.pixel = pixel
        self.target = target
        self.key = str(row["blob_key"])
        self.stored = str(row["transfer_syntax_uid"])
        self.image: pixeldata.ImageInfo | None = None
        self.swap_width = 1
        self.whole: list[bytes] | None = None

    @property
    def as_stored(self) -> bool:
        """Stored bytes go out untouched: the encapsulated syntax itself, or native little endian data."""
        if "bits" in self.pixel or "deflated" in self.pixel:
            return False
        if self.target == self.stored:
            return True
        return not negotiate.is_encapsulated(self.stored) and self.stored != EXPLICIT_VR_BIG_ENDIAN

    @property
    def planar_configuration(self) -> int:
        """Planar Configuration of the frames `frame()` returns: decoded frames are interleaved (pydicom)."""
        if negotiate.is_encapsulated(self.stored) or self.image is None:
            return 0
        return self.image.planar_configuration

    async def prepare(
        self, *, image: bool = False, attributes: Mapping[str, Any] | asyncpg.Record | None = None
    ) -> None:
        """Fetch what decoding, encoding (`image`) or byte swapping needs (image attributes, Pixel Data VR), unless
        the caller read them with the row (`attributes`: the columns of retrieve.sql's instance_attributes)."""
        if self.as_stored and not image:
            return
        attrs: Mapping[str, Any] | asyncpg.Record | None = attributes
        if attrs is None:
            async with self.pool.acquire() as conn:
                attrs = await conn.fetchrow(RETRIEVE["instance_attributes"], self.row["sop_instance_uid"], "7FE00010")
                vouch_stateless(conn)  # one SELECT: the release needs no reset query (a round trip)
        bits = int(self.row["bits_allocated"] or 8)
        a: dict[str, Any] = dict(attrs.items()) if attrs is not None else {}
        self.image = pixeldata.ImageInfo(
            rows=int(self.row["rows"] or 0),
            columns=int(self.row["columns"] or 0),
            samples_per_pixel=int(a.get("samples_per_pixel") or 1),
            bits_allocated=bits,
            bits_stored=int(a.get("bits_stored") or bits),
            pixel_representation=int(a.get("pixel_representation") or 0),
            photometric_interpretation=str(a.get("photometric_interpretation") or "MONOCHROME2"),
            planar_configuration=int(a.get("planar_configuration") or 0),
        )
        if self.stored == EXPLICIT_VR_BIG_ENDIAN and self.target != EXPLICIT_VR_BIG_ENDIAN:
            self.swap_width = pixeldata.pixel_swap_width(bits, str(a.get("vr") or "OW"))

    def stored_length(self, number: int) -> int | None:
        ranges = FrameLayout.ranges_from_json(self.pixel, number)
        return sum(length for _off, length in ranges) if ranges is not None else None

    def length(self, number: int) -> int | None:
        """The frame's length when known without producing it (as stored, or native bytes swapped)."""
        length = self.stored_length(number) if self.as_stored else None
        if length is None and not negotiate.is_encapsulated(self.stored) and "native" in self.pixel:
            length = self.stored_length(number)  # byte swapping keeps the length
        return length

    async def frame(self, number: int) -> bytes:
        if "deflated" in self.pixel:
            return await self._from_whole_file(number)
        if "bits" in self.pixel:
            return await self._bits_frame(number)
        ranges = FrameLayout.ranges_from_json(self.pixel, number)
        if ranges is None:
            raise NotFound("frame", f"frame {number} does not exist")
        start = ranges[0][0]
        end = ranges[-1][0] + ranges[-1][1]
        if self.swap_width > 1:
            value_offset = int(self.pixel["native"][0])
            read_at, read_len = transcode.aligned_range(start, end - start, value_offset, self.swap_width)
            data = await self.blobs.read_range(self.key, read_at, read_len)
            return transcode.native_frame(data, start, read_at, end - start, self.swap_width)
        data = await self.blobs.read_range(self.key, start, end - start)
        encoded = data if len(ranges) == 1 else b"".join(data[o - start : o - start + n] for o, n in ranges)
        if self.as_stored or not negotiate.is_encapsulated(self.stored):
            return encoded
        assert self.image is not None
        try:
            return await anyio.to_thread.run_sync(transcode.decode_frame, encoded, self.stored, self.image)
        except pixeldata.TranscodeError as exc:
            raise NotAcceptable(str(exc), offered=(self.stored,)) from exc

    async def _bits_frame(self, number: int) -> bytes:
        offset, frame_bits, _count = (int(v) for v in self.pixel["bits"])
        first = (number - 1) * frame_bits
        start = offset + first // 8
        end = offset + (first + frame_bits + 7) // 8
        read_at, read_len = transcode.aligned_range(start, end - start, offset, self.swap_width)
        data = await self.blobs.read_range(self.key, read_at, read_len)
        if self.swap_width > 1:
            data = pixeldata.swap_bytes(data, self.swap_width)
        return transcode.extract_bits(data, (start - read_at) * 8 + first % 8, frame_bits)

    async def _from_whole_file(self, number: int) -> bytes:
        if self.whole is None:
            data = await self._read_all()
            count = int(self.pixel["deflated"])
            try:
                self.whole = await anyio.to_thread.run_sync(transcode.frames_of_file, data, list(range(1, count + 1)))
            except pixeldata.TranscodeError as exc:
                raise NotAcceptable(str(exc), offered=(self.stored,)) from exc
        return self.whole[number - 1]

    async def _read_all(self) -> bytes:
        return b"".join([chunk async for chunk in self.blobs.stream(self.key)])


def native_reader(pool: asyncpg.Pool, blobs: BlobStore, row: asyncpg.Record, pixel: dict[str, Any]) -> FrameReader:
    """A reader of native little-endian frames: what encoders start from."""
    return FrameReader(pool, blobs, row, pixel, EXPLICIT_VR_LITTLE_ENDIAN)
