"""STOW-RS and every other ingest path (PS3.18 10.5): validate, make durable, index, queue derived work.

Order of durability: the bytes are written to the blob store (fsync/rename or S3 PUT) while the index statements
run, and the index transaction commits only once they are durable, so an index row never points at missing bytes.
A crash between the two, or a failed index transaction, leaves a blob without a row; the orphan collector
(`blob.gc` job) removes those after a grace period.

An outcome is the truth: the store's audit record, when the caller gives one, is written in the index transaction
(stored and recorded, or neither); nothing that fails after the commit turns a stored instance into a failure; a
commit whose answer was lost is settled by reading the index again; and `store_file` raises only when nothing was
stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread
import asyncpg

from dicomweb.blobs import BlobStore, BlobStoreError
from dicomweb.compress import Compressor, original_sha256
from dicomweb.index import repository
from dicomweb.ingest import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    DUPLICATE_REJECTED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    InstanceRejected,
    ParsedInstance,
    parse_instance,
)
from dicomweb.storeauth import NOT_AUTHORIZED, Admission, Denial
from server.platform import jobs, private, telemetry
from server.platform.db import Connection, unavailable, vouch_stateless
from server.platform.diskspace import BelowWatermark, FreeSpace

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StoredInstance:
    """What hooks see after an instance is indexed (inside the ingest transaction)."""

    instance_pk: int
    study_pk: int
    series_pk: int
    parsed: ParsedInstance
    replaced: bool


IngestHook = Callable[[Connection, StoredInstance], Awaitable[None]]
"""Runs inside the ingest transaction, while the instance's blob may still be being written (do not read it). A
hook may only run statements that leave no session state (plain DML and SELECTs; `SET LOCAL`,
`pg_advisory_xact_lock`), because the connection is released without asyncpg's reset query
(`server.platform.db.vouch_stateless`)."""


@dataclass(frozen=True, slots=True)
class PatientConflict:
    """An instance refused because its study is filed under another patient: both patients, for the audit record
    only (the sender may not be allowed to see the patient the study is filed under)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    patient_id: str | None
    issuer: str | None
    """The instance's Patient ID and Issuer of Patient ID."""
    study_patient_id: str | None
    study_issuer: str | None
    """Those the study is filed under."""

    def describe(self) -> str:
        """For the audit record (outcome description), never for the sender."""
        return (
            f"instance of patient {_patient(self.patient_id, self.issuer)} refused: study {self.study_uid} is filed "
            f"under patient {_patient(self.study_patient_id, self.study_issuer)}"
        )


def _patient(patient_id: str | None, issuer: str | None) -> str:
    text = repr(patient_id) if patient_id is not None else "(no Patient ID)"
    return f"{text} (issuer {issuer!r})" if issuer is not None else text


PATIENT_CONFLICT_COMMENT = "study is filed under another patient; instance not stored"
"""What the sender is told (STOW-RS Error Comment, C-STORE Error Comment): names no patient."""


@dataclass(slots=True)
class Outcome:
    """One instance's result, as the Store Instances Response Module reports it."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None = None
    series_uid: str | None = None
    failure: int | None = None
    warnings: list[tuple[int, str]] = field(default_factory=list)
    comment: str | None = None
    conflict: PatientConflict | None = None
    denial: Denial | None = None
    """Set when the policy refused to file the instance (the caller audits it with the decision's reasons)."""
    """Set when the failure is a study filed under another patient (the caller audits it)."""
    committed: bool = False
    """This store committed the instance's rows (new or replaced), with its audit record when one was given;
    false for a failure and for bytes that were already stored."""

    @property
    def ok(self) -> bool:
        return self.failure is None


class Spool:
    """A part being received: written to a local file while its SHA-256 and size are computed.

    A write the file system refuses (ENOSPC, EDQUOT, EIO), or free space below the watermark when the part starts
    (`server.platform.diskspace`), does not end the request: the part's file is removed at once, the rest of the part is
    read and dropped, and `error` says why (the part's outcome is Out of Resources, A700)."""

    def __init__(self, folder: Path, max_bytes: int, space: FreeSpace | None = None) -> None:
        self.path = folder / f"{uuid.uuid4().hex}.part"
        self._fh: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self.size = 0
        self.max_bytes = max_bytes
        self.too_large = False
        self.error: OSError | None = None
        try:
            if space is not None:
                space.require()
            private.make_dirs(folder)
            self._fh = open(self.path, "wb", opener=private.opener)
        except OSError as exc:
            self._fail(exc)

    def write(self, data: bytes) -> None:
        if self.too_large or self._fh is None:
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            self.too_large = True
            return
        self._hash.update(data)
        try:
            self._fh.write(data)
        except OSError as exc:
            self._fail(exc)

    def finish(self) -> str:
        if self._fh is not None:
            try:
                self._fh.close()  # flushes: a full disk may only show here
            except OSError as exc:
                self._fail(exc)
        return self._hash.hexdigest()

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self.discard()  # what was written is freed now, not when the request ends
        self._fh = None

    def discard(self) -> None:
        if self._fh is not None and not self._fh.closed:
            with contextlib.suppress(OSError):
                self._fh.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def out_of_resources(exc: OSError) -> str:
    """The Error Comment of an instance refused because a write failed or space is below the watermark."""
    if isinstance(exc, BelowWatermark):
        return str(exc.strerror)
    return f"out of resources: {exc.strerror or type(exc).__name__}; nothing was stored"


def blob_key(p: ParsedInstance, sha256: str) -> str:
    """Content-addressed per instance: a replaced instance never overwrites bytes a committed row names. One folder
    per series, the instance in the file name: a new instance makes no folder, which would cost the filesystem
    store a `mkdir` and one more fsync (its parent's) on every store."""
    return f"{p.study_uid}/{p.series_uid}/{p.sop_instance_uid}.{sha256[:32]}.dcm"


class IngestActivity:
    """When the server last started or finished ingesting an instance, for work that gives way to ingest
    (`server.platform.jobs.Deferral`). With a `path`, the processes of one server share it through that file's
    modification time (written at most every `WRITE_SECONDS`), so the process that runs the job worker also
    sees the ingest of the others; without, it is this process's alone."""

    WRITE_SECONDS = 0.2

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._last = -math.inf  # time.time() of the last ingest here
        self._written = -math.inf

    def touch(self) -> None:
        now = time.time()
        self._last = now
        if self.path is not None and now - self._written >= self.WRITE_SECONDS:
            self._written = now
            try:
                try:
                    os.utime(self.path, (now, now))
                except FileNotFoundError:
                    self.path.touch(mode=private.FILE_MODE)
            except OSError as exc:  # the data folder's trouble shows elsewhere; this is only a hint
                log.debug("ingest activity not recorded: %s", exc)

    def last(self) -> float:
        """`time.time()` of the latest ingest this process knows of (its own or, through the file, another's)."""
        if self.path is None:
            return self._last
        try:
            return max(self._last, self.path.stat().st_mtime)
        except OSError:
            return self._last

    def busy_for(self, quiet_seconds: float) -> float:
        """Seconds until ingest has been quiet for `quiet_seconds` (0: quiet now)."""
        return max(0.0, self.last() + quiet_seconds - time.time())


class _Rollback(Exception):
    """Ends the index transaction without storing; the outcome already says why (or that it is a no-op)."""


class _AuditFailed(Exception):
    """The store's audit record could not be written: the index transaction rolls back with it."""


class StoreService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        blobs: BlobStore,
        *,
        overwrite: bool,
        bulk_threshold: int,
        hooks: Sequence[IngestHook] = (),
        compression: str = "none",
        activity: IngestActivity | None = None,
        space: FreeSpace | None = None,
    ) -> None:
        self.space = space
        """The free-space watermark (`server.platform.diskspace`): below it every instance is refused (A700)."""
        self.pool = pool
        self.blobs = blobs
        self.overwrite = overwrite
        self.bulk_threshold = bulk_threshold
        self.hooks = list(hooks)
        self.compressor = Compressor.of_mode(compression, bulk_threshold)  # HOUNSFIELD_STORE_COMPRESSION
        self.activity = activity or IngestActivity()

    async def store_file(
        self,
        path: Path,
        size: int,
        sha256: str,
        expected_study: str | None = None,
        *,
        audit: IngestHook | None = None,
        admit: Admission | None = None,
    ) -> Outcome:
        """Ingest one spooled file. The file is consumed (moved into the store or deleted). `audit` writes the
        store's audit record (`AuditTrail.append_in`) in the index transaction, after the hooks: when it fails,
        nothing is stored (out of resources). `admit` is the policy's decision on the parsed instance
        (`dicomweb.storeauth`): a denial stores nothing (0124H, `Outcome.denial`). Raises only when nothing was
        stored."""
        self.activity.touch()
        try:
            return await self._store(path, size, sha256, expected_study, audit, admit)
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
        path: Path,
        size: int,
        sha256: str,
        expected_study: str | None,
        audit: IngestHook | None,
        admit: Admission | None,
    ) -> Outcome:
        try:
            parsed = await anyio.to_thread.run_sync(lambda: parse_instance(path, bulk_threshold=self.bulk_threshold))
        except InstanceRejected as exc:
            return Outcome(exc.sop_class, exc.sop_instance, failure=exc.reason, comment=exc.comment)
        outcome = Outcome(
            parsed.sop_class_uid,
            parsed.sop_instance_uid,
            parsed.study_uid,
            parsed.series_uid,
            warnings=list(parsed.warnings),
        )
        if expected_study is not None and parsed.study_uid != expected_study:
            outcome.failure = DATASET_MISMATCH
            outcome.comment = (
                f"StudyInstanceUID {parsed.study_uid} differs from the study {expected_study} in the request URL"
            )
            return outcome
        if admit is not None:
            denial = await admit(parsed)
            if denial is not None:
                outcome.failure, outcome.comment, outcome.denial = NOT_AUTHORIZED, denial.comment, denial
                return outcome
        if self.space is not None:
            try:
                self.space.require()
            except BelowWatermark as exc:
                outcome.failure, outcome.comment = OUT_OF_RESOURCES, out_of_resources(exc)
                return outcome
        if self.compressor.wanted(parsed) or not self.blobs.local:
            # Compressing, or uploading to a remote store, costs far more than a lookup: an instance already
            # stored is settled first. Otherwise the index transaction settles it (`_index_in`), which saves a
            # round trip per new instance; a re-sent or refused duplicate's blob is then written and removed again.
            async with self.pool.acquire() as conn:
                existing = await repository.find_instance(conn, parsed.sop_instance_uid)
                vouch_stateless(conn)  # one SELECT: its release needs no reset query
            if existing is not None and original_sha256(existing) == sha256:
                return outcome  # idempotent: the same bytes are already stored
            if existing is not None and not self.overwrite:
                return self._duplicate(outcome)
        stored = await self.compressor.apply(path, parsed, size, sha256)  # dicomweb/compress.py (off: as is)
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
            return await self._index(parsed, key, size, sha256, outcome, original, put, audit)
        except BaseException:
            await _ended(put)  # what it wrote is left to the orphan collector (see the index failure below)
            raise

    async def _put(self, key: str, path: Path) -> None:
        with telemetry.blob_span("put", key):
            await self.blobs.put_file(key, path)

    def _duplicate(self, outcome: Outcome) -> Outcome:
        outcome.failure = DUPLICATE_REJECTED
        outcome.comment = (
            "an instance with this SOPInstanceUID and different content is already stored "
            "(the server is configured not to overwrite)"
        )
        return outcome

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
        audit: IngestHook | None,
    ) -> Outcome:
        committing = False  # the statements ran and COMMIT was sent: an error now leaves the outcome unknown
        try:
            if put.done():
                put.result()  # a write that failed already fails the store before any statement
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    await self._index_in(conn, parsed, key, size, sha256, outcome, original, audit)
                    await put  # the blob is durable before the rows that name it commit
                    committing = True
                outcome.committed = True
                # Only DML ran, in a transaction that has ended (hooks keep to that too: see IngestHook).
                vouch_stateless(conn)
        except _Rollback:
            await _ended(put)
            await self._forget_blob(key)  # kept if a committed row names the same (identical) blob
            return outcome
        except _AuditFailed as exc:
            log.error("audit record of an instance not written, instance not stored: %s", exc.__cause__)
            await _ended(put)  # the blob is left to the orphan collector, as after an index failure
            outcome.failure = OUT_OF_RESOURCES
            outcome.comment = "the audit trail could not record the instance; nothing was stored"
            return outcome
        except BlobStoreError as exc:
            # Not forgotten: a concurrent store of the same bytes may have written this key and not committed yet;
            # whatever a failed write left is the orphan collector's.
            log.error("blob store failed for an instance: %s", exc)
            outcome.failure = OUT_OF_RESOURCES
            outcome.comment = "the blob store could not store the instance; nothing was stored"
            return outcome
        except Exception as exc:
            if outcome.committed:  # handing the connection back failed: the instance is stored all the same
                log.warning("connection not released after an ingest commit: %s", exc)
                return outcome
            # The blob is not removed here: a concurrent store of the same bytes (the same key) may be about to
            # commit a row naming it. A blob no row names is removed by the orphan collector after its grace period.
            await _ended(put)
            if committing:
                return await self._confirm(parsed.sop_instance_uid, key, outcome, exc)
            if not (isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError) or unavailable(exc)):
                raise  # rolled back: nothing was stored
            log.error("index transaction failed: %s", exc)
            if unavailable(exc):  # out of resources for now (PS3.4 B.2.3): the sender may retry later
                outcome.failure = OUT_OF_RESOURCES
                outcome.comment = "the database is unavailable; nothing was stored"
                return outcome
            outcome.failure = PROCESSING_FAILURE
            outcome.comment = "the index could not record the instance; nothing was stored"
            return outcome
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

    async def _index_in(
        self,
        conn: Connection,
        parsed: ParsedInstance,
        key: str,
        size: int,
        sha256: str,
        outcome: Outcome,
        original: str,
        audit: IngestHook | None,
    ) -> None:
        """The index transaction's statements: one for the study, series and instance rows, then the overwrite
        or duplicate handling when the instance exists, then the hooks and the audit record. Raises `_Rollback`
        to store nothing, `_AuditFailed` when the record could not be written."""
        try:
            study_pk, series_pk, instance_pk = await repository.index_instance(conn, parsed, key, size, sha256)
        except repository.StudyOfAnotherPatient as exc:
            # PS3.3 A.1.2: a study belongs to one patient. No coercion: the instance is refused (Cxxx, PS3.4 B.2.3:
            # the data set matches its SOP class, so A900 would send the sender looking for a broken header).
            outcome.failure = CANNOT_UNDERSTAND
            outcome.comment = PATIENT_CONFLICT_COMMENT
            outcome.conflict = PatientConflict(
                parsed.study_uid,
                parsed.series_uid,
                parsed.sop_instance_uid,
                parsed.study["patient_id"],
                parsed.study["issuer_of_patient_id"],
                exc.patient_id,
                exc.issuer,
            )
            raise _Rollback from None
        except repository.SeriesInOtherStudy:
            outcome.failure = DATASET_MISMATCH
            outcome.comment = f"SeriesInstanceUID {parsed.series_uid} already belongs to another study"
            raise _Rollback from None
        replaced = False
        if instance_pk is None:
            current = await repository.find_instance(conn, parsed.sop_instance_uid, lock=True)
            assert current is not None
            if original_sha256(current) == original:
                raise _Rollback  # idempotent: the same bytes are already stored (or a concurrent store won)
            if not self.overwrite:
                self._duplicate(outcome)
                raise _Rollback
            instance_pk = await repository.replace_instance(conn, parsed, study_pk, series_pk, key, size, sha256)
            replaced = True
            if current["blob_key"] != key:
                await jobs.enqueue(conn, "blob.delete", {"key": current["blob_key"]})
        stored = StoredInstance(instance_pk, study_pk, series_pk, parsed, replaced)
        for hook in self.hooks:
            await hook(conn, stored)
        if audit is not None:
            try:
                await audit(conn, stored)
            except Exception as exc:
                raise _AuditFailed from exc


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


def sweep_spool(folder: Path, grace_seconds: int) -> int:
    """Delete spool files older than the grace period: parts of uploads cut off by a crash."""
    removed = 0
    cutoff = time.time() - grace_seconds
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file() and entry.name.endswith(".part") and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def gc_handler(
    pool: asyncpg.Pool, blobs: BlobStore, grace_seconds: int, interval_seconds: int, spool_dir: Path | None = None
) -> jobs.Handler:
    """`blob.gc`: delete blobs that no index row names and that are older than the grace period (and stale spool
    files), then schedule the next sweep."""
    import datetime as dt

    async def run(job: jobs.Job) -> None:
        if spool_dir is not None:
            swept = await anyio.to_thread.run_sync(sweep_spool, spool_dir, grace_seconds)
            if swept:
                log.info("orphan collector removed %d stale spool files", swept)
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=grace_seconds)
        batch: list[str] = []
        removed = 0

        async def flush() -> int:
            async with pool.acquire() as conn:
                present = await repository.blob_keys_present(conn, batch)
            gone = [k for k in batch if k not in present]
            for k in gone:
                await blobs.delete(k)
            batch.clear()
            return len(gone)

        async for info in blobs.list():
            if info.modified < cutoff:
                batch.append(info.key)
                if len(batch) >= 500:
                    removed += await flush()
        if batch:
            removed += await flush()
        if removed:
            log.info("orphan collector removed %d blobs", removed)
        if job.payload.get("periodic"):
            async with pool.acquire() as conn:
                await jobs.enqueue(
                    conn, "blob.gc", {"periodic": True}, dedupe_key="periodic", delay_seconds=interval_seconds
                )

    return run


def blob_delete_handler(pool: asyncpg.Pool, blobs: BlobStore) -> jobs.Handler:
    """`blob.delete`: remove a blob replaced by an overwrite, unless a row names it again."""

    async def run(job: jobs.Job) -> None:
        key = str(job.payload["key"])
        async with pool.acquire() as conn:
            if await repository.blob_keys_present(conn, [key]):
                return
        await blobs.delete(key)

    return run
