"""Rendered and thumbnail resources of WADO-RS (PS3.18 10.4, 8.3.5) as a service. No HTTP types.

Like `dicomweb.retrieve.service`, each request is planned first (one index query and a strong entity tag naming the
stored bytes and every rendering choice) so that a conditional request never reads a blob; `Plan.build()` then
reads the stored file through the blob store and renders in a worker thread (`dicomweb.pixels.render`).

What each resource returns (the conformance statement says the same):
- instance: its image; a multi-frame instance gives its first frame, or all frames as one animated GIF when
  image/gif is asked for (PS3.18 Table 8.7.4-1 lists image/gif for multi-frame images);
- frames: one frame as a single image, several as `multipart/related` with one image per frame;
- study, series: `multipart/related`, one part per image instance (rendered as the instance resource), in
  series and instance number order; instances of SOP classes without pixel data (SR, presentation states,
  encapsulated documents, waveforms, RT plans and structure sets, registrations) are left out;
- thumbnail: one small image of a representative frame: for a frame list its first frame; for an instance its
  middle frame; for a series its middle image instance by Instance Number; for a study the series with the most
  image instances (the first by Series Number on a tie), then as for that series.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio.to_thread
import asyncpg

from dicomweb.blobs import BlobStore
from dicomweb.errors import NotAcceptable, NotFound
from dicomweb.index.repository import RETRIEVE
from dicomweb.pixels import render
from dicomweb.pixels.render import GIF, Options
from dicomweb.retrieve.service import INSTANCE_MAX_AGE, STUDY_MAX_AGE, Body, Part, Plan
from dicomweb.uids import UID
from server.platform.db import vouch_stateless

RENDER_VERSION = "1"
"""Part of every rendered entity tag: bump it when the pipeline's output changes."""

_NO_PIXEL_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects (RT Image and RT Dose are kept below)
    "1.2.840.10008.5.1.4.1.1.68.",  # surfaces
)
_NO_PIXEL_CLASSES = frozenset(
    "1.2.840.10008.5.1.4.1.1." + suffix for suffix in ("66", "66.1", "66.2", "66.3", "66.5", "66.6", "67")
)
_IMAGE_RT = frozenset({"1.2.840.10008.5.1.4.1.1.481.1", "1.2.840.10008.5.1.4.1.1.481.2"})


def is_image_class(sop_class: str) -> bool:
    """False for the SOP classes that never carry pixel data (what study/series rendering leaves out)."""
    if sop_class in _IMAGE_RT:
        return True
    return sop_class not in _NO_PIXEL_CLASSES and not sop_class.startswith(_NO_PIXEL_PREFIXES)


@dataclass(frozen=True, slots=True)
class Target:
    """What to render from one stored instance: a 1-based frame, its middle frame (None), or, for `animate`,
    all frames of a multi-frame instance as a GIF."""

    frame: int | None = 1
    animate: bool = False


def render_stored(data: bytes, options: Options, target: Target) -> bytes:
    """Blocking: a stored Part 10 file rendered (run it in a worker thread)."""
    ds = render.read_dataset(data)
    if target.animate and render.frame_count(ds) > 1:
        return render.render_animation(ds, options)
    index = render.middle_frame(ds) if target.frame is None else target.frame - 1
    return render.render_frame(ds, index, options)


def _etag(*pieces: object) -> str:
    digest = hashlib.sha256("\x1f".join(str(p) for p in pieces).encode("utf-8")).hexdigest()[:40]
    return f'"{digest}"'


def _instance_url(base: str, row: asyncpg.Record) -> str:
    return f"{base}/studies/{row['study_uid']}/series/{row['series_uid']}/instances/{row['sop_instance_uid']}"


def pick_thumbnail(rows: list[asyncpg.Record], by_series: bool) -> asyncpg.Record:
    """The representative instance: the middle image of the series (rows come in instance number order); for a
    study (`by_series`), of the series with the most images (rows come in series number order)."""
    images = [r for r in rows if is_image_class(str(r["sop_class_uid"]))]
    if not images:
        raise NotAcceptable("there is no image to render a thumbnail of")
    if by_series:
        groups: dict[str, list[asyncpg.Record]] = {}
        for row in images:
            groups.setdefault(str(row["series_uid"]), []).append(row)
        images = max(groups.values(), key=len)  # max keeps the first of equals: the lowest Series Number
    return images[(len(images) - 1) // 2]


class RenderService:
    def __init__(self, pool: asyncpg.Pool, blobs: BlobStore) -> None:
        self.pool = pool
        self.blobs = blobs

    async def _read(self, row: asyncpg.Record) -> bytes:
        """The stored file in one read (its size is in the index: one thread hop, not a stream's several)."""
        return await self.blobs.read_range(str(row["blob_key"]), 0, int(row["size_bytes"]))

    async def _render(self, row: asyncpg.Record, options: Options, target: Target) -> bytes:
        data = await self._read(row)
        return await anyio.to_thread.run_sync(render_stored, data, options, target)

    def _single(self, row: asyncpg.Record, options: Options, target: Target, etag: str, max_age: int) -> Plan:
        """A plan whose body is one image, rendered before the response starts (so failures get a status)."""

        async def build() -> Body:
            data = await self._render(row, options, target)
            return Body([Part(options.media_type, len(data), _one(data))], False, options.media_type)

        return Plan(etag, max_age, build)

    async def _layout(self, study: UID, series: UID, instance: UID) -> asyncpg.Record:
        async with self.pool.acquire() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(RETRIEVE["instance_layout"], study, series, instance)
            vouch_stateless(conn)  # SELECTs only: the release needs no reset query (a round trip)
        if row is None:
            raise NotFound("instance")
        if not row["pixel"]:
            raise NotAcceptable("the instance has no pixel data to render")
        return row

    async def _rows(self, study: UID, series: UID | None) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            if series is not None:
                rows = await conn.fetch(RETRIEVE["instances_of_series"], study, series)
            else:
                rows = await conn.fetch(RETRIEVE["instances_of_study"], study)
            vouch_stateless(conn)
        if not rows:
            raise NotFound("series" if series else "study")
        return list(rows)

    # ------------------------------------------------------------------------------------------ rendered

    async def plan_instance(self, study: UID, series: UID, instance: UID, options: Options) -> Plan:
        """Instance rendered (PS3.18 10.4): its (first) frame, or an animated GIF of all frames."""
        row = await self._layout(study, series, instance)
        target = Target(1, animate=options.media_type == GIF)
        etag = _etag("rendered", RENDER_VERSION, row["sha256"], target, options.key())
        return self._single(row, options, target, etag, INSTANCE_MAX_AGE)

    async def plan_frames(
        self, base: str, study: UID, series: UID, instance: UID, frames: list[int], options: Options
    ) -> Plan:
        """Frames rendered: one image, or `multipart/related` of one image per frame in the order asked."""
        row = await self._layout(study, series, instance)
        count = int(row["number_of_frames"] or 1)
        missing = [n for n in frames if n > count]
        if missing:
            raise NotFound("frame", f"frame {missing[0]} does not exist: the instance has {count} frame(s)")
        etag = _etag("rendered-frames", RENDER_VERSION, row["sha256"], frames, options.key())
        if len(frames) == 1:
            return self._single(row, options, Target(frames[0]), etag, INSTANCE_MAX_AGE)
        url = f"{base}/studies/{study}/series/{series}/instances/{instance}"

        async def build() -> Body:
            data = await self._read(row)
            ds = await anyio.to_thread.run_sync(render.read_dataset, data)

            def part(n: int) -> Part:
                async def gen() -> AsyncIterator[bytes]:
                    yield await anyio.to_thread.run_sync(render.render_frame, ds, n - 1, options)

                return Part(options.media_type, None, gen, f"{url}/frames/{n}/rendered")

            parts = [part(n) for n in frames]
            first = await anyio.to_thread.run_sync(render.render_frame, ds, frames[0] - 1, options)
            parts[0] = Part(options.media_type, len(first), _one(first), parts[0].location)
            return Body(parts, True, options.media_type)

        return Plan(etag, INSTANCE_MAX_AGE, build)

    async def plan_many(self, base: str, study: UID, series: UID | None, options: Options) -> Plan:
        """Study or series rendered: `multipart/related`, one rendered image per image instance."""
        rows = [r for r in await self._rows(study, series) if is_image_class(str(r["sop_class_uid"]))]
        if not rows:
            raise NotAcceptable(f"the {'series' if series else 'study'} has no images to render")
        target = Target(1, animate=options.media_type == GIF)
        etag = _etag("rendered-many", RENDER_VERSION, *(r["sha256"] for r in rows), target, options.key())

        def part(row: asyncpg.Record) -> Part:
            async def gen() -> AsyncIterator[bytes]:
                yield await self._render(row, options, target)

            return Part(options.media_type, None, gen, _instance_url(base, row) + "/rendered")

        async def build() -> Body:
            parts = [part(r) for r in rows]
            first = await self._render(rows[0], options, target)
            parts[0] = Part(options.media_type, len(first), _one(first), parts[0].location)
            return Body(parts, True, options.media_type)

        return Plan(etag, STUDY_MAX_AGE, build)

    # ------------------------------------------------------------------------------------------ thumbnails

    async def plan_thumbnail(
        self,
        study: UID,
        series: UID | None,
        instance: UID | None,
        options: Options,
        frames: list[int] | None = None,
    ) -> Plan:
        """A thumbnail (PS3.18 10.4): one small image of a representative frame."""
        if instance is not None and series is not None:
            row = await self._layout(study, series, instance)
            if frames:
                count = int(row["number_of_frames"] or 1)
                if frames[0] > count:
                    raise NotFound("frame", f"frame {frames[0]} does not exist: the instance has {count} frame(s)")
            target = Target(frames[0] if frames else None)
            max_age = INSTANCE_MAX_AGE
        else:
            row = pick_thumbnail(await self._rows(study, series), by_series=series is None)
            target = Target(None)
            max_age = STUDY_MAX_AGE
        etag = _etag("thumbnail", RENDER_VERSION, row["sha256"], target, options.key())
        return self._single(row, options, target, etag, max_age)


def _one(data: bytes) -> Callable[[], AsyncIterator[bytes]]:
    async def gen() -> AsyncIterator[bytes]:
        yield data

    return gen
