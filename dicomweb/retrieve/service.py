"""WADO-RS retrieve (PS3.18 10.4) as a service: instances, metadata, frames and bulk data. No HTTP types.

Each retrieve is two steps so that a conditional request costs one index query: `plan_*` looks the target up
and computes its strong entity tag (which names the stored bytes and the representation chosen); the route
answers 304 when the client has it, and only otherwise calls `Plan.build()` for the parts.

Bytes come from the blob store: whole instances are streamed (`BlobStore.stream`, never a study in memory),
frames and bulk data are read by byte range from the offsets the index recorded at ingest (`dicomweb.pixels.layout`).
Decoding (compressed to native) runs in a worker thread (`dicomweb.pixels.decode`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import asyncpg

from dicomweb.blobs import BlobStore, BlobStoreError
from dicomweb.codecs import negotiate
from dicomweb.codecs.mediatypes import DICOM
from dicomweb.codecs.negotiate import Choice, Offer
from dicomweb.errors import InvalidParameter, NotAcceptable, NotFound
from dicomweb.index.repository import RETRIEVE
from dicomweb.pixels import decode as transcode
from dicomweb.pixels import encode
from dicomweb.pixels import native as pixeldata
from dicomweb.retrieve import renditions
from dicomweb.retrieve.bodies import Body, Part, in_memory, one
from dicomweb.retrieve.frames import FrameReader, frame_count, load_json, native_reader
from dicomweb.retrieve.renditions import Renditions
from dicomweb.uids import EXPLICIT_VR_BIG_ENDIAN, UID
from server.platform import jobs
from server.platform.db import vouch_stateless
from server.platform.diskspace import BelowWatermark

__all__ = ["Body", "Metadata", "Part", "Plan", "RetrieveService"]

log = logging.getLogger(__name__)
STUDY_MAX_AGE = 60
"""Study and series resources gain instances: clients revalidate them often (their ETag changes when they do)."""
INSTANCE_MAX_AGE = 3600
"""An instance's bytes never change under its ETag; an overwrite (when enabled) changes the ETag."""
_STREAM_THRESHOLD = 1024 * 1024
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_MAX_FRAMES_IN_LIST = 10_000


@dataclass(frozen=True, slots=True)
class Plan:
    etag: str
    max_age: int
    build: Callable[[], Awaitable[Body]] = field(repr=False)
    rangeable: bool = True
    """A Range may be answered even when the body's length is only known once produced (one instance, frames,
    bulk data: small enough to produce in memory); studies and series answer a Range only when it is known."""


@dataclass(frozen=True, slots=True)
class Metadata:
    body: str
    etag: str
    max_age: int


def _etag(*pieces: object) -> str:
    digest = hashlib.sha256("\x1f".join(str(p) for p in pieces).encode("utf-8")).hexdigest()[:40]
    return f'"{digest}"'


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
    def __init__(self, pool: asyncpg.Pool, blobs: BlobStore, renditions: Renditions | None = None) -> None:
        self.pool = pool
        self.blobs = blobs
        self.renditions = renditions or Renditions(pool, blobs)

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
            vouch_stateless(conn)  # SELECTs only: the release needs no reset query (a round trip)
        if not rows:
            raise NotFound("instance" if instance else "series" if series else "study")
        choices = negotiate.choose_instances(
            offers,
            [r["transfer_syntax_uid"] for r in rows],
            transcode.can_transcode,
            single_part_ok=single_part_ok,
            per_instance=[_can_transcode(r["bits_allocated"]) for r in rows],
        )
        etag = _etag(
            "instances",
            *(f"{r['sha256']}:{c.transfer_syntax}" for r, c in zip(rows, choices, strict=True)),
            choices[0].multipart,
            base,
            *({encode.CODEC_VERSION} if any(encode.is_lossy(c.transfer_syntax) for c in choices) else ()),
        )

        async def build() -> Body:
            parts = [self._instance_part(r, c, base) for r, c in zip(rows, choices, strict=True)]
            if len(parts) == 1 and parts[0].length is None:
                # One instance to convert: do it now so that a failure is a 406, not a broken stream.
                parts[0] = in_memory(parts[0], b"".join([chunk async for chunk in parts[0].chunks()]))
            return Body(parts, choices[0].multipart, DICOM)

        return Plan(etag, INSTANCE_MAX_AGE if instance else STUDY_MAX_AGE, build, rangeable=instance is not None)

    def _instance_part(self, row: asyncpg.Record, choice: Choice, base: str) -> Part:
        location = _instance_url(base, row["study_uid"], row["series_uid"], row["sop_instance_uid"])
        key = str(row["blob_key"])
        if choice.transfer_syntax == row["transfer_syntax_uid"]:
            return Part(choice.content_type, int(row["size_bytes"]), lambda: self.blobs.stream(key), location)

        async def converted() -> AsyncIterator[bytes]:
            data = await self._read_all(key)
            try:
                yield await anyio.to_thread.run_sync(transcode.transcode_instance, data, choice.transfer_syntax)
            except pixeldata.TranscodeError as exc:
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
            vouch_stateless(conn)
        if row is None or not row["n"]:
            raise NotFound("instance" if instance else "series" if series else "study")
        etag = _etag("metadata", row["etag"], base)
        return Metadata(absolute_bulk_uris(row["body"], base), etag, INSTANCE_MAX_AGE if instance else STUDY_MAX_AGE)

    # ------------------------------------------------------------------------------------------ frames, bulk

    async def _layout(self, study: UID, series: UID, instance: UID) -> asyncpg.Record:
        async with self.pool.acquire() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(RETRIEVE["instance_layout"], study, series, instance)
            vouch_stateless(conn)
        if row is None:
            raise NotFound("instance")
        return row

    async def plan_frames(
        self, offers: list[Offer], base: str, study: UID, series: UID, instance: UID, frames: list[int]
    ) -> Plan:
        """Frames of an image (PS3.18 10.4.1.1.4): stored fragments, or decoded to native little endian."""
        row = await self._layout(study, series, instance)
        pixel = load_json(row["pixel"])
        if not pixel:
            raise NotFound("frames", "the instance has no Pixel Data")
        count = frame_count(pixel)
        missing = [n for n in frames if n > count]
        if missing:
            raise NotFound("frame", f"frame {missing[0]} does not exist: the instance has {count} frame(s)")
        stored = str(row["transfer_syntax_uid"])
        bits = row["bits_allocated"]
        choice = negotiate.choose_pixels(
            offers,
            stored,
            pixeldata.can_decode,
            single_part_ok=len(frames) == 1,
            can_encode=lambda ts: encode.fits(ts, bits),
        )
        return self._frames_plan(row, pixel, choice, frames, _instance_url(base, study, series, instance))

    def _frames_plan(
        self, row: asyncpg.Record, pixel: dict[str, Any], choice: Choice, frames: list[int], url: str
    ) -> Plan:
        stored = str(row["transfer_syntax_uid"])
        if negotiate.is_encapsulated(choice.transfer_syntax) and choice.transfer_syntax != stored:
            return self._encoded_plan(row, pixel, choice, frames, url)
        etag = _etag("frames", row["sha256"], choice.content_type, choice.multipart, ",".join(map(str, frames)), url)
        reader = FrameReader(self.pool, self.blobs, row, pixel, choice.transfer_syntax)

        def part(number: int) -> Part:
            async def gen() -> AsyncIterator[bytes]:
                yield await reader.frame(number)

            return Part(choice.content_type, reader.length(number), gen, f"{url}/frames/{number}")

        async def build() -> Body:
            await reader.prepare()
            parts = [part(n) for n in frames]
            if parts and parts[0].length is None:  # decoding: the first frame now, so that failure is a 406
                parts[0] = in_memory(parts[0], await reader.frame(frames[0]))
            return Body(parts, choice.multipart, choice.media_type)

        return Plan(etag, INSTANCE_MAX_AGE, build)

    def _encoded_plan(
        self, row: asyncpg.Record, pixel: dict[str, Any], choice: Choice, frames: list[int], url: str
    ) -> Plan:
        """Frames in a compressed syntax other than the stored one: from the stored rendition by byte range, or
        encoded now (and kept as the rendition when the request covers every frame; otherwise a `rendition`
        job makes it). The ETag names the encoder builds, so it is the same before and after a rendition is
        kept (encoding is deterministic)."""
        syntax = choice.transfer_syntax
        rendition = renditions.of_layout(row["renditions"]).get(syntax)
        codec = rendition.codec if rendition is not None else encode.CODEC_VERSION
        etag = _etag("frames", row["sha256"], choice.content_type, choice.multipart, ",".join(map(str, frames)), url)
        etag = _etag(etag, codec)

        async def build() -> Body:
            if rendition is not None:
                return Body(
                    [self._rendition_part(rendition, n, choice, url) for n in frames],
                    choice.multipart,
                    choice.media_type,
                )
            everything = sorted(frames) == list(range(1, frame_count(pixel) + 1))
            numbers = sorted(frames) if everything else frames
            encoded = await self.renditions.encode(native_reader(self.pool, self.blobs, row, pixel), numbers, syntax)
            if everything:
                await self._keep(row, syntax, encoded)
            else:
                await self._queue_rendition(row, syntax)
            by_number = dict(zip(numbers, encoded, strict=True))
            parts = [
                Part(choice.content_type, len(by_number[n]), one(by_number[n]), f"{url}/frames/{n}") for n in frames
            ]
            return Body(parts, choice.multipart, choice.media_type)

        return Plan(etag, INSTANCE_MAX_AGE, build)

    def _rendition_part(self, rendition: renditions.Rendition, number: int, choice: Choice, url: str) -> Part:
        offset, length = rendition.frames[number - 1]
        key = rendition.blob_key

        async def gen() -> AsyncIterator[bytes]:
            yield await self.blobs.read_range(key, offset, length)

        async def read(start: int, size: int) -> bytes:
            return await self.blobs.read_range(key, offset + start, size)

        return Part(choice.content_type, length, gen, f"{url}/frames/{number}", read)

    async def _keep(self, row: asyncpg.Record, syntax: str, encoded: list[bytes]) -> None:
        try:
            await self.renditions.store(row, syntax, encoded)
        except BelowWatermark:
            return  # free space is kept for ingest and the database; the frames are answered all the same
        except (BlobStoreError, OSError, asyncpg.PostgresError) as exc:  # the answer does not depend on keeping it
            log.warning("could not keep a %s rendition: %s", syntax, exc)

    async def _queue_rendition(self, row: asyncpg.Record, syntax: str) -> None:
        async with self.pool.acquire() as conn:
            await jobs.enqueue(
                conn,
                renditions.RENDITION_JOB,
                {"instance_pk": int(row["instance_pk"]), "syntaxes": [syntax]},
                dedupe_key=f"{row['instance_pk']}:{syntax}",
            )

    async def plan_bulk(self, offers: list[Offer], base: str, study: UID, series: UID, instance: UID, tag: str) -> Plan:
        """One bulk data element by its BulkDataURI (PS3.18 10.4.1.1.5). Encapsulated Pixel Data is sent as its
        frames, one part each, like the frames resource."""
        row = await self._layout(study, series, instance)
        bulk = load_json(row["bulk"]) or {}
        where = bulk.get(tag)
        if not isinstance(where, list) or len(where) != 2:
            raise NotFound("bulk data", f"the instance has no bulk data element {tag}")
        stored = str(row["transfer_syntax_uid"])
        pixel = load_json(row["pixel"])
        if tag == "7FE00010" and pixel and negotiate.is_encapsulated(stored):
            choice = negotiate.choose_pixels(offers, stored, pixeldata.can_decode, single_part_ok=False)
            frames = list(range(1, frame_count(pixel) + 1))
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
                    vouch_stateless(conn)
                vr = str(attrs["vr"] or "") if attrs else ""
                if tag in ("7FE00010", "7FE00008", "7FE00009"):
                    width = pixeldata.pixel_swap_width(int(row["bits_allocated"] or 8), vr)
                else:
                    width = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}.get(vr, 1)
            if width > 1:
                data = pixeldata.swap_bytes(await self.blobs.read_range(key, offset, length), width)
                part = Part(choice.content_type, length, one(data))
            elif length > _STREAM_THRESHOLD:
                part = Part(choice.content_type, length, lambda: self.blobs.stream(key, offset, length))
            else:
                part = Part(choice.content_type, length, one(await self.blobs.read_range(key, offset, length)))
            return Body([part], choice.multipart, choice.media_type)

        return Plan(etag, INSTANCE_MAX_AGE, build)


def _can_transcode(bits_allocated: int | None) -> Callable[[str, str], bool]:
    """`transcode.can_transcode`, and for compressed targets an encoder that takes the image's bit depth."""
    return lambda stored, target: (
        transcode.can_transcode(stored, target) and (stored == target or encode.fits(target, bits_allocated))
    )


def _instance_url(base: str, study: str, series: str, instance: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{instance}"
