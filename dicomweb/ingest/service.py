"""The one ingest entry (PS3.18 10.5, PS3.4 Annex B): `StoreService.store(spooled, origin)` validates a spooled
instance, makes it durable, indexes it and tells the listeners, for STOW-RS, C-STORE, `hounsfield import` and the
AI results of the inference runner alike.

Each instance is parsed, checked, admitted, compressed and written to the blob store on its own, concurrently with
the others; the instances ready to be indexed then share one index transaction (group commit,
`dicomweb.ingest.commit`): one round trip set and one WAL flush for a burst of instances, each keeping its own
outcome. A lone instance waits for no company.

Order of durability: the bytes are written to the blob store (fsync/rename or S3 PUT) while the index statements
run, and the index transaction commits only once they are durable, so an index row never points at missing bytes.
A crash between the two, or a failed index transaction, leaves a blob without a row; the orphan collector
(`blob.gc` job, `dicomweb.ingest.gc`) removes those after a grace period. An instance whose write failed fails
alone (A700); the others of its transaction are stored.

What follows a store (FHIR sync, DIMSE routing, inference dispatch, renditions) are the listeners bound at
construction (`dicomweb.ingest.events`), run in their order inside the index transaction: the work they queue
commits with the instances, or not at all.

An outcome is the truth: the store's audit record, when the caller gives one, is written in the index transaction
(stored and recorded, or neither); nothing that fails after the commit turns a stored instance into a failure; a
commit whose answer was lost is settled by reading the index again; and `store` raises only when nothing was
stored."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import anyio.to_thread
import asyncpg

from dicomweb.blobs import BlobStore
from dicomweb.index import repository
from dicomweb.ingest.activity import IngestActivity
from dicomweb.ingest.admission import Admission
from dicomweb.ingest.commit import MAX_BATCH, Entry, GroupCommit, Verdict, duplicate
from dicomweb.ingest.events import AuditOf, Listener
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.outcome import Outcome
from dicomweb.ingest.parse import ParsedInstance, parse_instance
from dicomweb.ingest.reasons import DATASET_MISMATCH, OUT_OF_RESOURCES, PROCESSING_FAILURE, InstanceRejected
from dicomweb.ingest.spool import Spooled, Spooler, out_of_resources
from dicomweb.pixels.compress import Compressor, original_sha256
from server.platform import telemetry
from server.platform.db import unavailable, vouch_stateless
from server.platform.diskspace import BelowWatermark

log = logging.getLogger(__name__)


def blob_key(p: ParsedInstance, sha256: str) -> str:
    """Content-addressed per instance: a replaced instance never overwrites bytes a committed row names. One folder
    per series, the instance in the file name: a new instance makes no folder, which would cost the filesystem
    store a `mkdir` and one more fsync (its parent's) on every store."""
    return f"{p.study_uid}/{p.series_uid}/{p.sop_instance_uid}.{sha256[:32]}.dcm"


class StoreService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        blobs: BlobStore,
        *,
        spool: Spooler,
        overwrite: bool,
        bulk_threshold: int,
        listeners: Sequence[Listener] = (),
        compression: str = "none",
        activity: IngestActivity | None = None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.spool = spool
        """Where every channel spools an instance before `store` (`dicomweb.ingest.spool`)."""
        self.space = spool.space
        """The free-space watermark (`server.platform.diskspace`): below it every instance is refused (A700)."""
        self.pool = pool
        self.blobs = blobs
        self.overwrite = overwrite
        self.bulk_threshold = bulk_threshold
        self.listeners: tuple[Listener, ...] = tuple(listeners)
        """Told of the stored instances, in this order, inside the index transaction (`dicomweb.ingest.events`)."""
        self.commits = GroupCommit(pool, self.listeners, overwrite=overwrite, max_batch=max_batch)
        """The instances ready to be indexed share a transaction (`dicomweb.ingest.commit`), at most `max_batch`."""
        self.compressor = Compressor.of_mode(compression, bulk_threshold)  # HOUNSFIELD_STORE_COMPRESSION
        self.activity = activity or IngestActivity()

    async def store(
        self,
        spooled: Spooled,
        origin: Origin,
        *,
        study: str | None = None,
        audit: AuditOf | None = None,
        admit: Admission | None = None,
        parsed: ParsedInstance | None = None,
    ) -> Outcome:
        """Ingest one spooled instance received through `origin`. The file is consumed (moved into the store or
        deleted). `study` is the Study Instance UID the request named (STOW-RS on /studies/{study}, an AI result filed
        under its source's study): an instance of another study is refused (A900). `audit` gives the store's audit
        records (`dicomweb.ingest.events.AuditOf`), written in the index transaction after the listeners
        (`AuditTrail.append_in`): when that fails, nothing is stored (out of resources). `admit` is the policy's
        decision on the parsed instance (`dicomweb.ingest.admission`): a denial stores nothing (0124H,
        `Outcome.denial`). `parsed`: the spooled file as `parse_instance` read it already (a C-STORE checked before
        its answer), not read again. Raises only when nothing was stored."""
        path = spooled.path
        self.activity.touch()
        try:
            return await self._store(spooled, origin, study, audit, admit, parsed)
        except OSError as exc:  # a write before the index (a compressed copy, a temporary file): nothing is stored
            log.error("ingest of an instance failed: %s", exc.strerror or type(exc).__name__)
            return Outcome(None, None, failure=OUT_OF_RESOURCES, comment=out_of_resources(exc))
        finally:
            self.activity.touch()
            try:
                os.unlink(path)  # still here when it was rejected before reaching the blob store
            except FileNotFoundError:
                pass
            except OSError as exc:  # the spool's trouble; the outcome stands (the collector sweeps the spool)
                log.warning("spool file not removed: %s", exc.strerror)

    async def _store(
        self,
        spooled: Spooled,
        origin: Origin,
        expected_study: str | None,
        audit: AuditOf | None,
        admit: Admission | None,
        given: ParsedInstance | None = None,
    ) -> Outcome:
        path, size, sha256 = spooled.path, spooled.size, spooled.sha256
        parsed, threshold = given, self.bulk_threshold
        try:
            if parsed is None:
                parsed = await anyio.to_thread.run_sync(lambda: parse_instance(path, bulk_threshold=threshold))
        except InstanceRejected as exc:
            return Outcome.rejected(exc)
        outcome = Outcome.of(parsed)
        if expected_study is not None and parsed.study_uid != expected_study:
            outcome.failure = DATASET_MISMATCH
            outcome.comment = (
                f"StudyInstanceUID {parsed.study_uid} differs from the study {expected_study} in the request URL"
            )
            return outcome
        if admit is not None:
            denial = await admit(parsed)
            if denial is not None:
                outcome.deny(denial)
                return outcome
        if self.space is not None:
            try:
                self.space.require()
            except BelowWatermark as exc:
                outcome.failure, outcome.comment = OUT_OF_RESOURCES, out_of_resources(exc)
                return outcome
        if self.compressor.wanted(parsed) or not self.blobs.local:
            # Compressing, or uploading to a remote store, costs far more than a lookup: an instance already
            # stored is settled first. Otherwise the index transaction settles it (`dicomweb.ingest.commit`), which
            # saves a round trip per new instance; a re-sent or refused duplicate's blob is then written and removed
            # again.
            async with self.pool.acquire() as conn:
                existing = await repository.find_instance(conn, parsed.sop_instance_uid)
                vouch_stateless(conn)  # one SELECT: its release needs no reset query
            if existing is not None and original_sha256(existing) == sha256:
                return outcome  # idempotent: the same bytes are already stored
            if existing is not None and not self.overwrite:
                return duplicate(outcome)
        stored = await self.compressor.apply(path, parsed, size, sha256)  # dicomweb/pixels/compress.py (off: as is)
        original, (parsed, size, sha256) = sha256, (stored.parsed, stored.size, stored.sha256)
        key = blob_key(parsed, sha256)
        # On a local store the bytes are written while the index statements run (they take about as long as the
        # fsyncs); the transaction commits only once the bytes are durable (`_index`), so a row still never names
        # missing bytes. An upload can take seconds: the transaction, its pool connection and its row locks are not
        # held open during one.
        put = asyncio.ensure_future(self._put(key, path))
        put.add_done_callback(_retrieve)
        try:
            if not self.blobs.local:
                await _ended(put)
            return await self._index(parsed, key, size, sha256, outcome, original, put, origin, audit)
        except BaseException:
            await _ended(put)  # what it wrote is left to the orphan collector (see the index failure below)
            raise

    async def _put(self, key: str, path: Path) -> None:
        with telemetry.blob_span("put", key):
            await self.blobs.put_file(key, path)

    async def _forget_blob(self, key: str) -> None:
        try:
            async with self.pool.acquire() as conn:
                if await repository.blob_keys_present(conn, [key]):
                    return
            await self.blobs.delete(key)
        except Exception:  # the orphan collector will get it
            log.warning("could not remove an unindexed blob; the collector will", exc_info=True)

    async def _index(
        self,
        parsed: ParsedInstance,
        key: str,
        size: int,
        sha256: str,
        outcome: Outcome,
        original: str,
        put: asyncio.Future[None],
        origin: Origin,
        audit: AuditOf | None,
    ) -> Outcome:
        """Index the instance with the others ready now, in one transaction (`dicomweb.ingest.commit`), and turn how
        it ended into the outcome."""
        entry = Entry(parsed, key, size, sha256, original, outcome, origin, audit, put)
        verdict, error = await self.commits.index(entry)
        if verdict is Verdict.COMMITTED:
            outcome.committed = True
            return outcome
        await _ended(put)
        if verdict is Verdict.REFUSED:
            await self._forget_blob(key)  # kept if a committed row names the same (identical) blob
            return outcome
        if verdict is Verdict.AUDIT_FAILED:  # the blob is left to the orphan collector, as after an index failure
            outcome.failure = OUT_OF_RESOURCES
            outcome.comment = "the audit trail could not record the instance; nothing was stored"
            return outcome
        if verdict is Verdict.BLOB_FAILED:
            # Not forgotten: a concurrent store of the same bytes may have written this key and not committed yet;
            # whatever a failed write left is the orphan collector's.
            log.error("blob store failed for an instance: %s", error)
            outcome.failure = OUT_OF_RESOURCES
            outcome.comment = "the blob store could not store the instance; nothing was stored"
            return outcome
        # The blob is not removed here: a concurrent store of the same bytes (the same key) may be about to commit a
        # row naming it. A blob no row names is removed by the orphan collector after its grace period.
        assert isinstance(error, Exception)
        if verdict is Verdict.UNCONFIRMED:
            return await self._confirm(parsed.sop_instance_uid, key, outcome, error)
        if not (isinstance(error, OSError | asyncpg.PostgresError | asyncpg.InterfaceError) or unavailable(error)):
            raise error  # rolled back: nothing was stored
        log.error("index transaction failed: %s", error)
        if unavailable(error):  # out of resources for now (PS3.4 B.2.3): the sender may retry later
            outcome.failure = OUT_OF_RESOURCES
            outcome.comment = "the database is unavailable; nothing was stored"
            return outcome
        outcome.failure = PROCESSING_FAILURE
        outcome.comment = "the index could not record the instance; nothing was stored"
        return outcome

    async def _confirm(self, sop_instance_uid: str, key: str, outcome: Outcome, exc: Exception) -> Outcome:
        """The COMMIT's answer was lost (the connection broke): the index, read again, says whether it took
        effect. The key names the content, so a row naming it holds these bytes (stored by this store or by a
        concurrent one of the same bytes). When the index cannot be read either, the outcome says it is unknown."""
        log.error("ingest commit unconfirmed: %s", exc)
        try:
            async with self.pool.acquire() as conn:
                row = await repository.find_instance(conn, sop_instance_uid)
        except Exception as again:  # the index cannot be read either
            log.error("ingest commit still unconfirmed: %s", again)
            outcome.failure = OUT_OF_RESOURCES if unavailable(again) else PROCESSING_FAILURE  # A700: retry later
            outcome.comment = "the index did not confirm the instance; it may be stored: send it again"
            return outcome
        if row is not None and row["blob_key"] == key:
            outcome.committed = True
            return outcome
        outcome.failure = PROCESSING_FAILURE
        outcome.comment = "the index could not record the instance; nothing was stored"
        return outcome


def _retrieve(task: asyncio.Future[None]) -> None:
    """Done callback: a blob write whose failure nobody awaited any more (the store failed first) is not logged
    by asyncio as an unretrieved exception."""
    if not task.cancelled():
        task.exception()


async def _ended(task: asyncio.Future[None]) -> None:
    """Wait until the blob write has ended, however it ended, before its blob is forgotten and its spool file
    removed."""
    if not task.done():
        await asyncio.wait([task])
