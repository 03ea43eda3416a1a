"""Renditions: an image's frames encoded ahead of requests in another transfer syntax, kept as derived blobs.

Why: a viewer asking for HTJ2K RPCL frames (progressive loading, PS3.18 8.7.3.5 / Cornerstone3D) must not wait
for an encoder. At ingest, the listener (`ingest_hook`, run inside the index transaction like the FHIR sync one)
queues one `rendition` job per stored image, which gives way to ingest (`server.platform.jobs.Deferral`: taken once the
server has stored nothing for `HOUNSFIELD_RENDITIONS_IDLE_MS`); the job encodes every frame in each configured syntax
(`HOUNSFIELD_RENDITIONS`, default 1.2.840.10008.1.2.4.202) into one blob per instance and syntax, frames end to
end, and records each frame's [offset, length] in the `renditions` table (migrations/0008_renditions.sql). A
frame request for that syntax is then a byte-range read of the blob. A missing rendition is made on demand by
the frame request itself (`Renditions.encode` + `Renditions.store`).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import asyncpg

from dicomweb.blobs import BlobStore
from dicomweb.codecs import negotiate
from dicomweb.errors import NotAcceptable
from dicomweb.ingest.events import InstanceStored, Listener
from dicomweb.pixels import encode
from dicomweb.pixels.native import TranscodeError
from dicomweb.retrieve.frames import FrameReader, frame_count, load_json, native_reader
from server.platform import jobs, private
from server.platform.db import Connection, Queries
from server.platform.diskspace import FreeSpace

log = logging.getLogger(__name__)
SQL = Queries(Path(__file__).with_name("renditions.sql"))
RENDITION_JOB = "rendition"


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

    async def _encoded(self, reader: FrameReader, numbers: Sequence[int], syntax: str):  # type: ignore[no-untyped-def]
        await reader.prepare(image=True)
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
        planar = reader.planar_configuration
        for number in numbers:
            native = await reader.frame(number)
            try:
                yield await anyio.to_thread.run_sync(
                    functools.partial(encode.encode_frame, planar=planar), native, syntax, image
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
        pixel = load_json(row["pixel"])
        if not pixel:
            return None
        if self.space is not None:
            self.space.require()
        reader = native_reader(self.pool, self.blobs, row, pixel)
        numbers = range(1, frame_count(pixel) + 1)
        path = self.spool_dir / f"{uuid.uuid4().hex}.rendition"
        private.make_dirs(self.spool_dir)
        try:
            frames: list[tuple[int, int]] = []
            digest = hashlib.sha256()
            offset = 0
            # frame by frame: a long multi-frame stays on disk
            async with await anyio.open_file(path, "wb", opener=private.opener) as fh:
                async for data in self._encoded(reader, numbers, syntax):
                    frames.append((offset, len(data)))
                    offset += len(data)
                    digest.update(data)
                    await fh.write(data)
            return await self._record(row, syntax, path, frames, digest.hexdigest())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

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
        try:
            await anyio.to_thread.run_sync(private.write_bytes, path, blob)
            return await self._record(row, syntax, path, frames, hashlib.sha256(blob).hexdigest())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _record(
        self, row: asyncpg.Record, syntax: str, path: Path, frames: list[tuple[int, int]], sha256: str
    ) -> Rendition:
        key = rendition_key(str(row["study_uid"]), str(row["series_uid"]), str(row["sop_instance_uid"]), syntax, sha256)
        size = sum(n for _o, n in frames)
        await self.blobs.put_file(key, path)
        async with self.pool.acquire() as conn:
            inserted = await conn.fetchval(
                SQL["insert"],
                int(row["instance_pk"]),
                syntax,
                str(row["sha256"]),
                key,
                size,
                sha256,
                json.dumps(frames),
                encode.CODEC_VERSION,
            )
            if inserted is None and not await conn.fetch(SQL["key_present"], [key]):
                await self.blobs.delete(key)  # another writer won with other bytes, or the instance changed
        winner = await self.current(int(row["instance_pk"]), syntax, str(row["sha256"]))
        return winner or Rendition(syntax, key, frames, encode.CODEC_VERSION)


async def drop(conn: Connection, instance_pk: int) -> None:
    """Forget an instance's renditions (inside an overwrite's transaction) and queue their blobs' deletion."""
    for record in await conn.fetch(SQL["drop_of_instance"], instance_pk):
        await jobs.enqueue(conn, "blob.delete", {"key": record["blob_key"]})


def ingest_hook(syntaxes: Sequence[str]) -> Listener:
    """The `StoreService` listener: drop the renditions of an overwritten instance; queue a `rendition` job for
    each stored image when renditions are configured (the jobs of the batch with one statement)."""

    async def hook(conn: Connection, stored: Sequence[InstanceStored]) -> None:
        new: list[jobs.NewJob] = []
        for event in stored:
            if event.replaced:
                await drop(conn, event.instance_pk)
            if not syntaxes or not event.parsed.pixel:
                continue
            if all(ts == event.parsed.transfer_syntax_uid for ts in syntaxes):
                continue
            key = str(event.instance_pk)
            new.append(jobs.NewJob(RENDITION_JOB, {"instance_pk": event.instance_pk}, dedupe_key=key))
        await jobs.enqueue_many(conn, new)

    return hook


def job_handler(
    pool: asyncpg.Pool, blobs: BlobStore, syntaxes: Sequence[str], spool_dir: Path, space: FreeSpace | None = None
) -> jobs.Handler:
    """`rendition`: payload `{"instance_pk": n}` (and `"syntaxes"` when a frame request asked for one not
    configured); makes the instance's missing renditions. Images an encoder
    cannot take (1-bit, float, YBR from JPEG) are skipped: their frames are served by decoding instead. Below the
    free-space watermark the worker does not take these jobs (`server.platform.jobs.Pause`); one taken just before fails
    with `BelowWatermark` and is retried later."""
    service = Renditions(pool, blobs, spool_dir, space)

    async def run(job: jobs.Job) -> None:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(SQL["layout_by_pk"], int(job.payload["instance_pk"]))
        if row is None:
            return  # deleted since
        wanted = [str(ts) for ts in job.payload.get("syntaxes") or syntaxes]  # on-demand requests name theirs
        for syntax in wanted:
            if syntax == row["transfer_syntax_uid"] or not encode.can_encode(syntax):
                continue
            try:
                await service.make(row, syntax)
            except NotAcceptable as exc:
                log.info("no %s rendition for instance %s: %s", syntax, row["instance_pk"], exc)

    return run
