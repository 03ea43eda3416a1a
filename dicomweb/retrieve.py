"""WADO-RS retrieve (PS3.18 10.4) as a service: instances, metadata, frames and bulk data. No HTTP types.

Each retrieve is two steps so that a conditional request costs one index query: `plan_*` looks the target up
and computes its strong entity tag (which names the stored bytes and the representation chosen); the route
answers 304 when the client has it, and only otherwise calls `Plan.build()` for the parts.

Bytes come from the blob store: whole instances are streamed (`BlobStore.stream`, never a study in memory),
frames and bulk data are read by byte range from the offsets the index recorded at ingest (`dicomweb.layout`).
Decoding (compressed to native) runs in a worker thread (`dicomweb.transcode`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import asyncpg

from dicomweb import negotiate, transcode
from dicomweb.blobs import BlobStore
from dicomweb.errors import InvalidParameter, NotAcceptable, NotFound
from dicomweb.index.repository import RETRIEVE
from dicomweb.layout import FrameLayout
from dicomweb.mediatypes import DICOM
from dicomweb.multipart import closing_delimiter, encode_part_head, part_separator
from dicomweb.negotiate import Choice, Offer
from dicomweb.uids import EXPLICIT_VR_BIG_ENDIAN, UID

STUDY_MAX_AGE = 60
"""Study and series resources gain instances: clients revalidate them often (their ETag changes when they do)."""
INSTANCE_MAX_AGE = 3600
"""An instance's bytes never change under its ETag; an overwrite (when enabled) changes the ETag."""
_STREAM_THRESHOLD = 1024 * 1024
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_MAX_FRAMES_IN_LIST = 10_000

Chunks = Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True, slots=True)
class Part:
    """One body part: its Content-Type, length when known without producing it, and its bytes on demand."""

    content_type: str
    length: int | None
    chunks: Chunks
    location: str | None = None


@dataclass(frozen=True, slots=True)
class Body:
    parts: list[Part]
    multipart: bool
    part_type: str
    """The multipart/related `type` parameter (the media type of the parts)."""

    def content_type(self, boundary: str) -> str:
        if not self.multipart:
            return self.parts[0].content_type
        return f'multipart/related; type="{self.part_type}"; boundary={boundary}'

    def length(self, boundary: str) -> int | None:
        """The exact body length when every part's is known (so that Content-Length can be sent)."""
        if any(p.length is None for p in self.parts):
            return None
        if not self.multipart:
            return self.parts[0].length
        total = len(closing_delimiter(boundary))
        for part in self.parts:
            total += len(_head(boundary, part)) + int(part.length or 0) + len(part_separator())
        return total

    async def chunks(self, boundary: str) -> AsyncIterator[bytes]:
        if not self.multipart:
            async for chunk in self.parts[0].chunks():
                yield chunk
            return
        for part in self.parts:
            yield _head(boundary, part)
            async for chunk in part.chunks():
                yield chunk
            yield part_separator()
        yield closing_delimiter(boundary)


def _head(boundary: str, part: Part) -> bytes:
    extra = {"Content-Location": part.location} if part.location else None
    return encode_part_head(boundary, part.content_type, extra)


@dataclass(frozen=True, slots=True)
class Plan:
    etag: str
    max_age: int
    build: Callable[[], Awaitable[Body]] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Metadata:
    body: str
    etag: str
    max_age: int


def _etag(*pieces: object) -> str:
    digest = hashlib.sha256("\x1f".join(str(p) for p in pieces).encode("utf-8")).hexdigest()[:40]
    return f'"{digest}"'


def _one(data: bytes) -> Chunks:
    async def gen() -> AsyncIterator[bytes]:
        yield data

    return gen


def parse_frame_list(text: str) -> list[int]:
    """A frame list (PS3.18 10.4.1.1.4: one or more distinct 1-based frame numbers, comma separated).

    Anything else is 400: numbers that are not positive decimal integers (frame 0 included) and repeats.
    Frames past the instance's Number of Frames are 404 (the resource the URL names does not exist),
    decided later against the index."""
    items = text.split(",")
    if len(items) > _MAX_FRAMES_IN_LIST:
        raise InvalidParameter("frames", f"more than {_MAX_FRAMES_IN_LIST} frames in one request")
    numbers: list[int] = []
    for item in items:
        item = item.strip()
        if not item.isdigit() or not item.isascii() or int(item[:12]) < 1:
            raise InvalidParameter("frames", f"frame numbers are positive integers: {text[:80]!r}")
        if len(item) > 12:
            raise InvalidParameter("frames", f"frame number too large: {item[:20]!r}")
        numbers.append(int(item))
    if len(set(numbers)) != len(numbers):
        raise InvalidParameter("frames", f"a frame number is repeated: {text[:80]!r}")
    return numbers


def bulk_tag(text: str) -> str:
    if not _TAG.match(text):
        raise InvalidParameter("tag", f"a bulk data tag is 8 hexadecimal digits: {text[:20]!r}")
    return text.upper()


def absolute_bulk_uris(body: str, base: str) -> str:
    """BulkDataURIs are stored relative (`studies/...`); responses carry them absolute (PS3.18 10.4.1.2)."""
    return body.replace('"BulkDataURI":"studies/', f'"BulkDataURI":"{base}/studies/')


class RetrieveService:
    def __init__(self, pool: asyncpg.Pool, blobs: BlobStore) -> None:
        self.pool = pool
        self.blobs = blobs

    # ------------------------------------------------------------------------------------------ instances

    async def plan_instances(
        self,
        offers: list[Offer],
        base: str,
        study: UID,
        series: UID | None = None,
        instance: UID | None = None,
        *,
        single_part_ok: bool = False,
    ) -> Plan:
        """Study, series or instance as Part 10 files (PS3.18 10.4.1.1.1)."""
        async with self.pool.acquire() as conn:
            if instance is not None:
                row = await conn.fetchrow(RETRIEVE["instance"], study, series, instance)
                rows = [row] if row is not None else []
            elif series is not None:
                rows = await conn.fetch(RETRIEVE["instances_of_series"], study, series)
            else:
                rows = await conn.fetch(RETRIEVE["instances_of_study"], study)
        if not rows:
            raise NotFound("instance" if instance else "series" if series else "study")
        choices = negotiate.choose_instances(
            offers, [r["transfer_syntax_uid"] for r in rows], transcode.can_transcode, single_part_ok=single_part_ok
        )
        etag = _etag(
            "instances",
            *(f"{r['sha256']}:{c.transfer_syntax}" for r, c in zip(rows, choices, strict=True)),
            choices[0].multipart,
            base,
        )

        async def build() -> Body:
            parts = [self._instance_part(r, c, base) for r, c in zip(rows, choices, strict=True)]
            if len(parts) == 1 and parts[0].length is None:
                # One instance to convert: do it now so that a failure is a 406, not a broken stream.
                data = b"".join([chunk async for chunk in parts[0].chunks()])
                parts[0] = Part(parts[0].content_type, len(data), _one(data), parts[0].location)
            return Body(parts, choices[0].multipart, DICOM)

        return Plan(etag, INSTANCE_MAX_AGE if instance else STUDY_MAX_AGE, build)

    def _instance_part(self, row: asyncpg.Record, choice: Choice, base: str) -> Part:
        location = _instance_url(base, row["study_uid"], row["series_uid"], row["sop_instance_uid"])
        key = str(row["blob_key"])
        if choice.transfer_syntax == row["transfer_syntax_uid"]:
            return Part(choice.content_type, int(row["size_bytes"]), lambda: self.blobs.stream(key), location)

        async def converted() -> AsyncIterator[bytes]:
            data = await self._read_all(key)
            try:
                yield await anyio.to_thread.run_sync(transcode.transcode_instance, data, choice.transfer_syntax)
            except transcode.TranscodeError as exc:
                raise NotAcceptable(str(exc), offered=(str(row["transfer_syntax_uid"]),)) from exc

        return Part(choice.content_type, None, converted, location)

    async def _read_all(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.blobs.stream(key)])

    # ------------------------------------------------------------------------------------------ metadata

    async def metadata(self, base: str, study: UID, series: UID | None = None, instance: UID | None = None) -> Metadata:
        """The DICOM JSON array of the target's instances (PS3.18 10.4.1.1.2), concatenated by the database."""
        async with self.pool.acquire() as conn:
            if instance is not None:
                row = await conn.fetchrow(RETRIEVE["metadata_of_instance"], study, series, instance)
            elif series is not None:
                row = await conn.fetchrow(RETRIEVE["metadata_of_series"], study, series)
            else:
                row = await conn.fetchrow(RETRIEVE["metadata_of_study"], study)
        if row is None or not row["n"]:
            raise NotFound("instance" if instance else "series" if series else "study")
        etag = _etag("metadata", row["etag"], base)
        return Metadata(absolute_bulk_uris(row["body"], base), etag, INSTANCE_MAX_AGE if instance else STUDY_MAX_AGE)

    # ------------------------------------------------------------------------------------------ frames, bulk

    async def _layout(self, study: UID, series: UID, instance: UID) -> asyncpg.Record:
        async with self.pool.acquire() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(RETRIEVE["instance_layout"], study, series, instance)
        if row is None:
            raise NotFound("instance")
        return row

    async def plan_frames(
        self, offers: list[Offer], base: str, study: UID, series: UID, instance: UID, frames: list[int]
    ) -> Plan:
        """Frames of an image (PS3.18 10.4.1.1.4): stored fragments, or decoded to native little endian."""
        row = await self._layout(study, series, instance)
        pixel = _json(row["pixel"])
        if not pixel:
            raise NotFound("frames", "the instance has no Pixel Data")
        count = _frame_count(pixel)
        missing = [n for n in frames if n > count]
        if missing:
            raise NotFound("frame", f"frame {missing[0]} does not exist: the instance has {count} frame(s)")
        stored = str(row["transfer_syntax_uid"])
        choice = negotiate.choose_pixels(offers, stored, transcode.can_decode, single_part_ok=len(frames) == 1)
        return self._frames_plan(row, pixel, choice, frames, _instance_url(base, study, series, instance))

    def _frames_plan(
        self, row: asyncpg.Record, pixel: dict[str, Any], choice: Choice, frames: list[int], url: str
    ) -> Plan:
        etag = _etag("frames", row["sha256"], choice.content_type, choice.multipart, ",".join(map(str, frames)), url)
        reader = _FrameReader(self, row, pixel, choice)

        async def build() -> Body:
            await reader.prepare()
            parts = [reader.part(n, f"{url}/frames/{n}") for n in frames]
            if parts and parts[0].length is None:  # decoding: the first frame now, so that failure is a 406
                data = await reader.frame(frames[0])
                parts[0] = Part(parts[0].content_type, len(data), _one(data), parts[0].location)
            return Body(parts, choice.multipart, choice.media_type)

        return Plan(etag, INSTANCE_MAX_AGE, build)

    async def plan_bulk(self, offers: list[Offer], base: str, study: UID, series: UID, instance: UID, tag: str) -> Plan:
        """One bulk data element by its BulkDataURI (PS3.18 10.4.1.1.5). Encapsulated Pixel Data is sent as its
        frames, one part each, like the frames resource."""
        row = await self._layout(study, series, instance)
        bulk = _json(row["bulk"]) or {}
        where = bulk.get(tag)
        if not isinstance(where, list) or len(where) != 2:
            raise NotFound("bulk data", f"the instance has no bulk data element {tag}")
        stored = str(row["transfer_syntax_uid"])
        pixel = _json(row["pixel"])
        if tag == "7FE00010" and pixel and negotiate.is_encapsulated(stored):
            choice = negotiate.choose_pixels(offers, stored, transcode.can_decode, single_part_ok=False)
            frames = list(range(1, _frame_count(pixel) + 1))
            return self._frames_plan(row, pixel, choice, frames, _instance_url(base, study, series, instance))
        choice = negotiate.choose_bulk(offers, stored)
        offset, length = int(where[0]), int(where[1])
        etag = _etag("bulk", row["sha256"], tag, choice.content_type, choice.multipart)
        key = str(row["blob_key"])
        swap = stored == EXPLICIT_VR_BIG_ENDIAN and choice.transfer_syntax != EXPLICIT_VR_BIG_ENDIAN

        async def build() -> Body:
            width = 1
            if swap:
                async with self.pool.acquire() as conn:
                    attrs = await conn.fetchrow(RETRIEVE["instance_attributes"], row["sop_instance_uid"], tag)
                vr = str(attrs["vr"] or "") if attrs else ""
                if tag in ("7FE00010", "7FE00008", "7FE00009"):
                    width = transcode.pixel_swap_width(int(row["bits_allocated"] or 8), vr)
                else:
                    width = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}.get(vr, 1)
            if width > 1:
                data = transcode.swap_bytes(await self.blobs.read_range(key, offset, length), width)
                part = Part(choice.content_type, length, _one(data))
            elif length > _STREAM_THRESHOLD:
                part = Part(choice.content_type, length, lambda: self.blobs.stream(key, offset, length))
            else:
                part = Part(choice.content_type, length, _one(await self.blobs.read_range(key, offset, length)))
            return Body([part], choice.multipart, choice.media_type)

        return Plan(etag, INSTANCE_MAX_AGE, build)


def _instance_url(base: str, study: str, series: str, instance: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{instance}"


def _json(value: Any) -> Any:
    if isinstance(value, str):
        return json.loads(value)
    return value


def _frame_count(pixel: dict[str, Any]) -> int:
    if "bits" in pixel:
        return int(pixel["bits"][2])
    if "deflated" in pixel:
        return int(pixel["deflated"])
    return FrameLayout.count_from_json(pixel)


class _FrameReader:
    """Produces frames of one instance in the chosen representation, reading only their byte ranges."""

    def __init__(self, service: RetrieveService, row: asyncpg.Record, pixel: dict[str, Any], choice: Choice):
        self.blobs = service.blobs
        self.pool = service.pool
        self.row = row
        self.pixel = pixel
        self.choice = choice
        self.key = str(row["blob_key"])
        self.stored = str(row["transfer_syntax_uid"])
        self.image: transcode.ImageInfo | None = None
        self.swap_width = 1
        self.whole: list[bytes] | None = None

    @property
    def as_stored(self) -> bool:
        """Stored bytes go out untouched: the encapsulated syntax itself, or native little endian data."""
        if "bits" in self.pixel or "deflated" in self.pixel:
            return False
        if self.choice.transfer_syntax == self.stored:
            return True
        return not negotiate.is_encapsulated(self.stored) and self.stored != EXPLICIT_VR_BIG_ENDIAN

    async def prepare(self) -> None:
        """Fetch what decoding or byte swapping needs (image attributes, the Pixel Data VR)."""
        if self.as_stored:
            return
        async with self.pool.acquire() as conn:
            attrs = await conn.fetchrow(RETRIEVE["instance_attributes"], self.row["sop_instance_uid"], "7FE00010")
        bits = int(self.row["bits_allocated"] or 8)
        a: dict[str, Any] = dict(attrs.items()) if attrs is not None else {}
        self.image = transcode.ImageInfo(
            rows=int(self.row["rows"] or 0),
            columns=int(self.row["columns"] or 0),
            samples_per_pixel=int(a.get("samples_per_pixel") or 1),
            bits_allocated=bits,
            bits_stored=int(a.get("bits_stored") or bits),
            pixel_representation=int(a.get("pixel_representation") or 0),
            photometric_interpretation=str(a.get("photometric_interpretation") or "MONOCHROME2"),
            planar_configuration=int(a.get("planar_configuration") or 0),
        )
        if self.stored == EXPLICIT_VR_BIG_ENDIAN and self.choice.transfer_syntax != EXPLICIT_VR_BIG_ENDIAN:
            self.swap_width = transcode.pixel_swap_width(bits, str(a.get("vr") or "OW"))

    def _stored_length(self, number: int) -> int | None:
        ranges = FrameLayout.ranges_from_json(self.pixel, number)
        return sum(length for _off, length in ranges) if ranges is not None else None

    def part(self, number: int, location: str) -> Part:
        length = self._stored_length(number) if self.as_stored else None
        if length is None and not negotiate.is_encapsulated(self.stored) and "native" in self.pixel:
            length = self._stored_length(number)  # byte swapping keeps the length

        async def gen() -> AsyncIterator[bytes]:
            yield await self.frame(number)

        return Part(self.choice.content_type, length, gen, location)

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
        except transcode.TranscodeError as exc:
            raise NotAcceptable(str(exc), offered=(self.stored,)) from exc

    async def _bits_frame(self, number: int) -> bytes:
        offset, frame_bits, _count = (int(v) for v in self.pixel["bits"])
        first = (number - 1) * frame_bits
        start = offset + first // 8
        end = offset + (first + frame_bits + 7) // 8
        read_at, read_len = transcode.aligned_range(start, end - start, offset, self.swap_width)
        data = await self.blobs.read_range(self.key, read_at, read_len)
        if self.swap_width > 1:
            data = transcode.swap_bytes(data, self.swap_width)
        return transcode.extract_bits(data, (start - read_at) * 8 + first % 8, frame_bits)

    async def _from_whole_file(self, number: int) -> bytes:
        if self.whole is None:
            data = await self._read_all()
            count = int(self.pixel["deflated"])
            try:
                self.whole = await anyio.to_thread.run_sync(transcode.frames_of_file, data, list(range(1, count + 1)))
            except transcode.TranscodeError as exc:
                raise NotAcceptable(str(exc), offered=(self.stored,)) from exc
        return self.whole[number - 1]

    async def _read_all(self) -> bytes:
        return b"".join([chunk async for chunk in self.blobs.stream(self.key)])
