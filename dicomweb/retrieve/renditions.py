"""Renditions: an image's frames encoded ahead of requests in another transfer syntax, kept as derived blobs.

Why: a viewer asking for HTJ2K RPCL frames (progressive loading, PS3.18 8.7.3.5 / Cornerstone3D) must not wait
for an encoder. At ingest, the listener (`ingest_hook`, run inside the index transaction like the FHIR sync one)
queues one `rendition` job per series (absorbed by the series' queued one), which gives way to ingest
(`server.platform.jobs.Deferral`: taken once the server has stored nothing for `HOUNSFIELD_RENDITIONS_IDLE_MS`);
the job makes the series' missing renditions: every frame of an image in each configured syntax
(`HOUNSFIELD_RENDITIONS`, default 1.2.840.10008.1.2.4.202) into one blob per instance and syntax, frames end to
end, with each frame's [offset, length] recorded in the `renditions` table (migrations/0008_renditions.sql).
Several images are encoded at once, one per CPU: the encoders release the GIL, so a series is made in a
fraction of the time one image after another takes. A frame request for that syntax is then a byte-range read
of the blob. A missing rendition is made on demand by the frame request itself (`Renditions.encode` +
`Renditions.store`), which queues a job for that instance and syntax (`{"instance_pk": n, "syntaxes": [...]}`).

A rendition row is written only once its blob is durable (the blobs of a series are stored in batches, their
folder fsynced once per batch, and the batch's rows written after), so a job cut off leaves complete renditions
and, at worst, blobs no row names (removed by the orphan sweep); run again, it makes only the missing ones.

Blob keys are content addressed (`<study>/<series>/<instance>.<sha256[:32]>.<syntax>.frames`): two workers that
make the same rendition write the same key, and the row insert is `ON CONFLICT DO NOTHING`, so making one is
idempotent under concurrency. Rows name the instance bytes they were made from: an overwrite drops them and
queues the blobs' deletion (`blob.delete`, which keeps a blob some row still names), and the orphan sweep
(`blob.gc`) keeps blobs a rendition row names.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import anyio.to_thread
import asyncpg

from dicomweb.blobs import BlobStore
from dicomweb.codecs import negotiate
from dicomweb.errors import NotAcceptable
from dicomweb.ingest.events import InstanceStored, Listener
from dicomweb.pixels import encode
from dicomweb.pixels.native import ImageInfo, TranscodeError
from dicomweb.retrieve.frames import FrameReader, frame_count, load_json, native_reader
from server.platform import jobs, private
from server.platform.db import Connection, Queries
from server.platform.diskspace import BelowWatermark, FreeSpace

log = logging.getLogger(__name__)
SQL = Queries(Path(__file__).with_name("renditions.sql"))
RENDITION_JOB = "rendition"
SERIES_PAGE = 256
"""Images of a series read (and encoded) per query of the series' rendition job."""
RECORD_BATCH = 32
"""Renditions of a series stored and recorded together (their rows once their blobs are durable)."""
STORES_IN_FLIGHT = 2
"""Batches of a series job being stored while its encoders go on; an encoder that fills one more waits."""
Attributes = Mapping[str, Any] | asyncpg.Record
"""Image Pixel values read with an instance's row (see `FrameReader.prepare`)."""


def encoders() -> int:
    """Images encoded at once by a series' rendition job: one per CPU this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class Rendition:
    """One stored rendition: its blob and where each frame lies in it."""

    syntax: str
    blob_key: str
    frames: list[tuple[int, int]]
    codec: str

    @classmethod
    def from_row(cls, syntax: str, blob_key: str, frames: Any, codec: str) -> Rendition:
        return cls(syntax, blob_key, [(int(o), int(n)) for o, n in load_json(frames)], codec)


@dataclass(frozen=True, slots=True)
class Made:
    """A rendition whose blob is stored (durable) and whose row is not written yet."""

    instance_pk: int
    source_sha256: str
    blob_key: str
    frames: list[tuple[int, int]]
    sha256: str


@dataclass(slots=True)
class _Encoded:
    """A rendition written to its spool file, not durable yet and not stored: `made` once its blob is."""

    path: Path
    made: Made


class _Spill:
    """The spool file of a rendition being encoded, written frame by frame (a long multi-frame stays on disk): each
    frame is encoded and appended in one worker-thread hop, the file opened in the first and closed in the last."""

    def __init__(self, path: Path, syntax: str, image: ImageInfo, planar: int) -> None:
        self.path, self.syntax, self.image, self.planar = path, syntax, image, planar
        self.fh: IO[bytes] | None = None
        self.digest = hashlib.sha256()

    def append(self, native: bytes, last: bool) -> int:
        data = encode.encode_frame(native, self.syntax, self.image, planar=self.planar)
        if self.fh is None:
            self.fh = open(self.path, "wb", opener=private.opener)
        self.fh.write(data)
        self.digest.update(data)
        if last:
            self.close()
        return len(data)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def of_layout(value: Any) -> dict[str, Rendition]:
    """The renditions aggregated into an instance_layout row (`{syntax: {key, frames, codec}}`)."""
    data = load_json(value) or {}
    return {ts: Rendition.from_row(ts, str(r["key"]), r["frames"], str(r["codec"])) for ts, r in data.items()}


def rendition_key(study: str, series: str, instance: str, syntax: str, sha256: str) -> str:
    return f"{study}/{series}/{instance}.{sha256[:32]}.{syntax}.frames"


class Renditions:
    """Makes, stores and finds renditions. `spool_dir` holds a rendition while it is written (same file system as
    the blob folder for the filesystem store, so that storing it is a rename)."""

    def __init__(
        self, pool: asyncpg.Pool, blobs: BlobStore, spool_dir: Path | None = None, space: FreeSpace | None = None
    ) -> None:
        self.pool = pool
        self.blobs = blobs
        self.spool_dir = spool_dir or Path(tempfile.gettempdir())
        self.space = space
        """Below the free-space watermark (`server.platform.diskspace`) no rendition is written: `BelowWatermark`."""

    async def encode(self, reader: FrameReader, numbers: Sequence[int], syntax: str) -> list[bytes]:
        """Frames `numbers` encoded in `syntax` (decoded first when stored compressed). 406 when the image does not
        suit the encoder."""
        return [frame async for frame in self._encoded(reader, numbers, syntax)]

    async def _checked(self, reader: FrameReader, syntax: str, attributes: Attributes | None = None) -> None:
        """Prepare `reader` to encode in `syntax`; 406 when the image does not suit the encoder."""
        await reader.prepare(image=True, attributes=attributes)
        image = reader.image
        assert image is not None
        photometric = image.photometric_interpretation
        if negotiate.is_encapsulated(reader.stored) and photometric in ("YBR_RCT", "YBR_ICT"):
            # Decoded, these are RGB (the transform is the codestream's), which the metadata would misdescribe.
            # Decoded YBR_FULL frames stay YBR_FULL (`transcode.decode_frame`) and encode as such; YBR_FULL_422
            # ones have no encoder (`encode.unsupported`).
            raise NotAcceptable(f"{photometric} frames are only sent as stored or decoded")
        reason = encode.unsupported(syntax, image)
        if reason is not None:
            raise NotAcceptable(reason, offered=(reader.stored,))

    async def _encoded(self, reader: FrameReader, numbers: Sequence[int], syntax: str):  # type: ignore[no-untyped-def]
        await self._checked(reader, syntax)
        planar = reader.planar_configuration
        for number in numbers:
            native = await reader.frame(number)
            try:
                yield await anyio.to_thread.run_sync(
                    functools.partial(encode.encode_frame, planar=planar), native, syntax, reader.image
                )
            except TranscodeError as exc:
                raise NotAcceptable(str(exc), offered=(reader.stored,)) from exc

    async def current(self, instance_pk: int, syntax: str, sha256: str) -> Rendition | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(SQL["current"], instance_pk, syntax, sha256)
        return Rendition.from_row(syntax, row["blob_key"], row["frames"], row["codec"]) if row else None

    async def make(self, row: asyncpg.Record, syntax: str) -> Rendition | None:
        """The rendition of the instance in `row` (an instance_layout row) in `syntax`: the stored one, or every
        frame encoded and stored now. None when the instance has no frames."""
        existing = await self.current(int(row["instance_pk"]), syntax, str(row["sha256"]))
        if existing is not None:
            return existing
        made = await self._write(row, syntax)
        if made is None:
            return None
        await self._record(syntax, [made])
        winner = await self.current(int(row["instance_pk"]), syntax, str(row["sha256"]))
        return winner or Rendition(syntax, made.blob_key, made.frames, encode.CODEC_VERSION)

    async def make_all(
        self, rows: Sequence[asyncpg.Record], syntax: str, workers: int, stop: Callable[[], bool] | None = None
    ) -> int:
        """Make the renditions in `syntax` of the images in `rows` (`missing_in_series` rows), `workers` images at
        once, storing and recording them in batches; returns how many were made. An image the encoder cannot take
        (or whose stored frames do not decode) is skipped; any other failure of one image leaves the others to be
        made and is raised at the end (the job is retried and makes what is still missing). Below the free-space
        watermark, or once `stop()` is true, no further image is started.

        The encoders do not wait for the disk: the blobs of a batch are made durable together (`put_files`: one
        fsync of the series' folder for the batch) from a task of their own while the encoders go on, and their
        rows are written once they are."""
        encoded: list[_Encoded] = []
        failures: list[Exception] = []
        todo = iter(rows)
        made = 0

        storing: set[Path] = set()  # spool files of the batches being stored
        room = anyio.Semaphore(STORES_IN_FLIGHT)

        def take() -> list[_Encoded]:
            batch = encoded[:]
            encoded.clear()
            storing.update(item.path for item in batch)
            return batch

        async def store(batch: list[_Encoded]) -> None:
            nonlocal made
            try:
                errors = await self.blobs.put_files([(e.made.blob_key, e.path) for e in batch])
            finally:
                for item in batch:
                    storing.discard(item.path)
                    with contextlib.suppress(FileNotFoundError):
                        item.path.unlink()  # not moved: a store that failed (or copied across file systems)
            stored = [item.made for item, error in zip(batch, errors, strict=True) if error is None]
            failures.extend(error for error in errors if error is not None)
            if stored:
                await self._record(syntax, stored)
                made += len(stored)

        async def stored_in_background(batch: list[_Encoded]) -> None:
            try:
                await store(batch)
            finally:
                room.release()

        async def work(group: anyio.abc.TaskGroup) -> None:
            for row in todo:  # shared: each worker takes the next image
                if any(isinstance(exc, BelowWatermark) for exc in failures) or (stop is not None and stop()):
                    return
                try:
                    item = await self._encode(row, syntax, attributes=row)
                except NotAcceptable as exc:
                    log.info("no %s rendition for instance %s: %s", syntax, row["instance_pk"], exc)
                    continue
                except Exception as exc:  # one image's failure: the series' other images are still made
                    failures.append(exc)
                    continue
                if item is not None:
                    encoded.append(item)
                if len(encoded) >= RECORD_BATCH:
                    await room.acquire()  # a bounded number of batches waits for the disk
                    group.start_soon(stored_in_background, take())

        try:
            async with anyio.create_task_group() as group:
                for _ in range(max(1, min(workers, len(rows)))):
                    group.start_soon(work, group)
            if encoded:
                await store(take())
        finally:
            for path in [*(item.path for item in encoded), *storing]:  # cancelled before its batch was stored
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if failures:
            raise failures[0]
        return made

    async def _write(self, row: asyncpg.Record, syntax: str, attributes: Attributes | None = None) -> Made | None:
        """Encode every frame of the instance in `row` and store the blob (durable); the row is not written yet.
        None when the instance has no frames."""
        item = await self._encode(row, syntax, attributes)
        if item is None:
            return None
        try:
            await self.blobs.put_file(item.made.blob_key, item.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                item.path.unlink()
        return item.made

    async def _encode(self, row: asyncpg.Record, syntax: str, attributes: Attributes | None = None) -> _Encoded | None:
        """Encode every frame of the instance in `row` into a spool file (not durable, not stored yet). None when
        the instance has no frames."""
        pixel = load_json(row["pixel"])
        if not pixel:
            return None
        if self.space is not None:
            self.space.require()
        reader = native_reader(self.pool, self.blobs, row, pixel)
        await self._checked(reader, syntax, attributes)
        image, planar = reader.image, reader.planar_configuration
        assert image is not None
        path = self.spool_dir / f"{uuid.uuid4().hex}.rendition"
        private.make_dirs(self.spool_dir)
        spill = _Spill(path, syntax, image, planar)
        frames: list[tuple[int, int]] = []
        offset = 0
        count = frame_count(pixel)
        if count == 0:
            return None
        try:
            try:
                for number in range(1, count + 1):
                    native = await reader.frame(number)
                    try:
                        size = await anyio.to_thread.run_sync(spill.append, native, number == count)
                    except TranscodeError as exc:
                        raise NotAcceptable(str(exc), offered=(reader.stored,)) from exc
                    frames.append((offset, size))
                    offset += size
            finally:
                if spill.fh is not None and not spill.fh.closed:
                    await anyio.to_thread.run_sync(spill.close)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        sha256 = spill.digest.hexdigest()
        key = rendition_key(str(row["study_uid"]), str(row["series_uid"]), str(row["sop_instance_uid"]), syntax, sha256)
        return _Encoded(path, Made(int(row["instance_pk"]), str(row["sha256"]), key, frames, sha256))

    async def store(self, row: asyncpg.Record, syntax: str, encoded: list[bytes]) -> Rendition:
        """Keep frames encoded on demand (all the instance's frames, in order) as its rendition."""
        if self.space is not None:
            self.space.require()
        path = self.spool_dir / f"{uuid.uuid4().hex}.rendition"
        private.make_dirs(self.spool_dir)
        frames: list[tuple[int, int]] = []
        offset = 0
        for data in encoded:
            frames.append((offset, len(data)))
            offset += len(data)
        blob = b"".join(encoded)
        sha256 = hashlib.sha256(blob).hexdigest()
        key = rendition_key(str(row["study_uid"]), str(row["series_uid"]), str(row["sop_instance_uid"]), syntax, sha256)
        try:
            await anyio.to_thread.run_sync(private.write_bytes, path, blob)
            await self.blobs.put_file(key, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        made = Made(int(row["instance_pk"]), str(row["sha256"]), key, frames, sha256)
        await self._record(syntax, [made])
        winner = await self.current(made.instance_pk, syntax, made.source_sha256)
        return winner or Rendition(syntax, key, frames, encode.CODEC_VERSION)

    async def _record(self, syntax: str, made: Sequence[Made]) -> None:
        """Write the rows of renditions whose blobs are stored. One not recorded (another writer won with other
        bytes, or the instance changed since) has its blob deleted unless some row names it."""
        async with self.pool.acquire() as conn:
            recorded = await conn.fetch(
                SQL["insert_many"],
                syntax,
                encode.CODEC_VERSION,
                [m.instance_pk for m in made],
                [m.source_sha256 for m in made],
                [m.blob_key for m in made],
                [sum(n for _o, n in m.frames) for m in made],
                [m.sha256 for m in made],
                [json.dumps(m.frames) for m in made],
            )
            kept = {r["blob_key"] for r in recorded}
            lost = [m.blob_key for m in made if m.blob_key not in kept]
            named = {r["blob_key"] for r in await conn.fetch(SQL["key_present"], lost)} if lost else set()
        for key in lost:
            if key not in named:
                await self.blobs.delete(key)


async def drop(conn: Connection, instance_pk: int) -> None:
    """Forget an instance's renditions (inside an overwrite's transaction) and queue their blobs' deletion."""
    for record in await conn.fetch(SQL["drop_of_instance"], instance_pk):
        await jobs.enqueue(conn, "blob.delete", {"key": record["blob_key"]})


def ingest_hook(syntaxes: Sequence[str]) -> Listener:
    """The `StoreService` listener: drop the renditions of an overwritten instance; queue its series' `rendition`
    job for a stored image when renditions are configured (the jobs of the batch with one statement)."""

    async def hook(conn: Connection, stored: Sequence[InstanceStored]) -> None:
        new: list[jobs.NewJob] = []
        for event in stored:
            if event.replaced:
                await drop(conn, event.instance_pk)
            if not syntaxes or not event.parsed.pixel:
                continue
            if all(ts == event.parsed.transfer_syntax_uid for ts in syntaxes):
                continue
            payload, key = series_job(event.series_pk)
            new.append(jobs.NewJob(RENDITION_JOB, payload, dedupe_key=key))
        await jobs.enqueue_many(conn, new)

    return hook


def series_job(series_pk: int) -> tuple[dict[str, Any], str]:
    """The payload and dedupe key of a series' rendition job (one queued job per series absorbs the others)."""
    return {"series_pk": series_pk}, f"series:{series_pk}"


def job_handler(
    pool: asyncpg.Pool,
    blobs: BlobStore,
    syntaxes: Sequence[str],
    spool_dir: Path,
    space: FreeSpace | None = None,
    workers: int | None = None,
    busy: Callable[[], float] | None = None,
) -> jobs.Handler:
    """`rendition`: payload `{"series_pk": n}` makes the series' missing renditions in the configured syntaxes,
    `workers` images at once (default: one per CPU, `encoders`); `{"instance_pk": n}` (and `"syntaxes"` when a frame
    request asked for one not configured) makes one instance's. Images an encoder cannot take (1-bit, float, YBR
    from JPEG) are skipped: their frames are served by decoding instead. Below the free-space watermark the worker
    does not take these jobs (`server.platform.jobs.Pause`); one taken just before fails with `BelowWatermark` and
    is retried later.

    A series job gives way to an ingest that starts while it runs (`busy()`, the worker's `Deferral`, says so):
    it starts no further image and queues the rest again as due as it was (`jobs.again`), so that it waits for
    ingest to be quiet again, or runs on at once if it was already overdue."""
    service = Renditions(pool, blobs, spool_dir, space)
    parallel = workers or encoders()

    def ingesting() -> bool:
        return busy is not None and busy() > 0

    async def of_series(job: jobs.Job, series_pk: int) -> None:
        for syntax in syntaxes:
            if not encode.can_encode(syntax):
                continue
            after = 0
            while True:  # by pages, past the images skipped (the encoder cannot take them)
                async with pool.acquire() as conn:
                    rows = await conn.fetch(SQL["missing_in_series"], series_pk, syntax, after, SERIES_PAGE)
                if rows:
                    await service.make_all(rows, syntax, parallel, ingesting)
                if ingesting():
                    async with pool.acquire() as conn:
                        await jobs.again(conn, job, dedupe_key=series_job(series_pk)[1])
                    return
                if len(rows) < SERIES_PAGE:
                    break
                after = int(rows[-1]["instance_pk"])

    async def of_instance(instance_pk: int, wanted: Sequence[str]) -> None:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(SQL["layout_by_pk"], instance_pk)
        if row is None:
            return  # deleted since
        for syntax in wanted:
            if syntax == row["transfer_syntax_uid"] or not encode.can_encode(syntax):
                continue
            try:
                await service.make(row, syntax)
            except NotAcceptable as exc:
                log.info("no %s rendition for instance %s: %s", syntax, row["instance_pk"], exc)

    async def run(job: jobs.Job) -> None:
        if "series_pk" in job.payload:
            await of_series(job, int(job.payload["series_pk"]))
        else:  # a frame request's, or one queued per instance by an older server
            wanted = [str(ts) for ts in job.payload.get("syntaxes") or syntaxes]
            await of_instance(int(job.payload["instance_pk"]), wanted)

    return run
