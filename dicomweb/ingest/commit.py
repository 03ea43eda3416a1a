"""Group commit of the ingest's index transaction: the instances that are ready to be indexed share one transaction.

Why: an index transaction is a handful of round trips (the index statement, one statement per listener, the audit
records) and a WAL flush at COMMIT, whatever the number of instances in it. `StoreService.store` parses, checks,
admits and writes each instance's blob on its own, concurrently; an instance ready to be indexed joins the pending
batch (`GroupCommit.index`), and one committer task per store takes the whole pending batch (at most `max_batch`)
and indexes it in one transaction while the next batch gathers, as the audit trail's appends do
(`authz.audit.AuditTrail`). There is no timer: a lone instance is committed at once, the batch is whatever arrived
while the previous one was being committed.

Each instance keeps its own outcome, as if the instances were indexed one after another in arrival order:

- The statement (`repository.index_instances`) tells each row what it would be told indexed after the rows before
  it. A refused instance (a study of another patient, a series of another study, a duplicate the server does not
  overwrite, the same bytes sent again) must not be stored, nor leave a trace the others saw: the transaction is
  rolled back and run again without the refused instances. Refusals are rare (a sender that re-sends a whole
  request makes one retry, not one per instance), so this costs less than a savepoint per instance, which would
  add a round trip to every instance. A refusal is final when its instance inserted no study or series row; the
  first refused instance that did makes the verdicts of the instances after it provisional: they are decided
  again in the retry, so the outcome stays that of one instance after another.
- The blob of every instance is durable before the transaction commits (each put is awaited before COMMIT); an
  instance whose write failed is left out (retry without it) and fails alone.
- An audit failure rolls the whole batch back: every instance in it fails (A700), nothing is stored.
- Any other error of the transaction (a statement or a listener failing on one instance's rows) rolls it back, and
  each instance of the batch is then indexed alone, so that only the instance that causes the error fails (0110,
  as it would have alone). A lost connection is not retried so: it fails every instance of the batch alike.
- A COMMIT whose answer was lost is settled per instance by the store (`StoreService._confirm`).
- A refused instance is answered only once the batch's last transaction ended: the store then forgets its blob
  unless a committed row names it (an identical re-send within the batch shares the first one's blob key).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from authz.audit import AuditTrail
from dicomweb.index import repository
from dicomweb.ingest.events import AuditOf, InstanceStored, Listener
from dicomweb.ingest.gc import DELETE_JOB
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.outcome import PATIENT_CONFLICT_COMMENT, Outcome, PatientConflict
from dicomweb.ingest.parse import ParsedInstance
from dicomweb.ingest.reasons import CANNOT_UNDERSTAND, DATASET_MISMATCH, DUPLICATE_REJECTED
from dicomweb.pixels.compress import original_sha256
from server.platform import jobs
from server.platform.db import Connection, unavailable, vouch_stateless

log = logging.getLogger(__name__)

MAX_BATCH = 64
"""Instances in one index transaction at most: enough to take a burst of requests in a few commits, few enough that
the statement's arrays and the transaction's row locks stay small."""
DEADLOCK_RETRIES = 3
"""Times a batch that PostgreSQL chose as a deadlock's victim is run again (the rows are inserted in UID order, so
two batches seldom meet so)."""


class Verdict(enum.Enum):
    """How an instance's index transaction ended, for the store to turn into its outcome."""

    COMMITTED = "committed"
    REFUSED = "refused"
    """Not stored; the outcome says why (nothing, for the same bytes already stored)."""
    AUDIT_FAILED = "audit failed"
    BLOB_FAILED = "blob failed"
    UNCONFIRMED = "unconfirmed"
    """COMMIT was sent and its answer lost: the index, read again, tells."""
    FAILED = "failed"
    """Rolled back by the error given with it."""


@dataclass(slots=True, eq=False)
class Entry:
    """One instance waiting to be indexed, with its blob write (`put`) in flight or done."""

    parsed: ParsedInstance
    key: str
    size: int
    sha256: str
    original: str
    """The sha256 of the bytes as received (before storage compression): what a re-send is compared by."""
    outcome: Outcome
    origin: Origin
    audit: AuditOf | None
    put: asyncio.Future[None]
    done: asyncio.Future[tuple[Verdict, BaseException | None]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    verdict: tuple[Verdict, BaseException | None] | None = None


def duplicate(outcome: Outcome) -> Outcome:
    outcome.failure = DUPLICATE_REJECTED
    outcome.comment = (
        "an instance with this SOPInstanceUID and different content is already stored "
        "(the server is configured not to overwrite)"
    )
    return outcome


class _Retry(Exception):
    """Ends the transaction to run it again without the instances just given their verdict."""


class _AuditFailed(Exception):
    """The audit records could not be written: the transaction rolls back with them."""


class _Isolate(Exception):
    """The transaction of several instances failed (rolled back, nothing decided): index each of them alone."""


class GroupCommit:
    """The pending batch and its one committer task (see the module docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        listeners: Sequence[Listener],
        *,
        overwrite: bool,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.pool = pool
        self.listeners = tuple(listeners)
        self.overwrite = overwrite
        self.max_batch = max_batch
        self._pending: list[Entry] = []
        self._committer: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Instances pending, not yet taken by the committer."""
        return len(self._pending)

    async def index(self, entry: Entry) -> tuple[Verdict, BaseException | None]:
        """Index the instance with the others pending; its verdict once its transaction ended. A caller that is
        cancelled while its instance is still pending withdraws it; once taken, it ends with its batch."""
        self._pending.append(entry)
        if self._committer is None:
            self._committer = asyncio.create_task(self._run(), name="hounsfield-ingest-commit")
        try:
            return await asyncio.shield(entry.done)
        except asyncio.CancelledError:
            if entry in self._pending:
                self._pending.remove(entry)
            else:
                await asyncio.wait([entry.done])
            raise

    async def _run(self) -> None:
        """Commit batches until none is pending."""
        batch: list[Entry] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    await self._commit(batch)
                except Exception as exc:  # a bug: this batch fails, the next ones are still committed
                    log.exception("ingest batch failed")
                    for entry in batch:
                        _settle(entry, Verdict.FAILED, exc)
        except BaseException as exc:  # stopped (the loop ends): nobody may wait for ever
            stopped = RuntimeError("the ingest committer stopped")
            stopped.__cause__ = exc
            for entry in batch + self._pending:
                _settle(entry, Verdict.FAILED, stopped)
            self._pending = []
            raise
        finally:
            self._committer = None

    async def _commit(self, batch: list[Entry]) -> None:
        """One batch: transactions until every instance has its verdict; answered together at the end."""
        live: list[Entry] = []
        for entry in batch:
            failed = _put_failure(entry)
            if failed is not None:
                entry.verdict = (Verdict.BLOB_FAILED, failed)
            else:
                live.append(entry)
        await self._until_decided(live)
        for entry in batch:
            assert entry.verdict is not None
            _settle(entry, *entry.verdict)

    async def _until_decided(self, live: list[Entry]) -> None:
        """Transactions until each of `live` has its verdict: again without those decided (refused, blob failed),
        again after a deadlock, and one instance at a time after an error of the whole batch."""
        deadlocks = 0
        while live:
            try:
                live = await self._transaction(live)
            except asyncpg.DeadlockDetectedError as exc:
                deadlocks += 1
                live = [entry for entry in live if entry.verdict is None]
                if deadlocks > DEADLOCK_RETRIES:
                    _decide(live, Verdict.FAILED, exc)
                    break
                log.warning("ingest batch chosen as a deadlock's victim; running it again")
            except _Isolate as exc:
                live = [entry for entry in live if entry.verdict is None]
                log.warning("ingest batch of %d failed (%s); indexing each alone", len(live), exc.__cause__)
                for entry in live:
                    await self._until_decided([entry])
                break

    async def _transaction(self, entries: list[Entry]) -> list[Entry]:
        """Index `entries` in one transaction; the ones left to run again (without those given a verdict)."""
        committing = False
        try:
            async with self.pool.acquire() as conn:
                try:
                    async with conn.transaction():
                        stored = await self._index(conn, entries)
                        events = [event for _entry, event in stored]
                        for listener in self.listeners:
                            await listener(conn, events)
                        await self._audit(conn, stored)
                        writing = [entry.put for entry in entries if not entry.put.done()]
                        if writing:
                            await asyncio.wait(writing)  # durable before the rows commit
                        if any(_put_failure(entry) is not None for entry in entries):
                            raise _Retry
                        committing = True
                except (_Retry, _AuditFailed):
                    vouch_stateless(conn)  # rolled back: only DML ran (listeners keep to that too: see Listener)
                    raise
                _decide(entries, Verdict.COMMITTED)
                vouch_stateless(conn)
            return []
        except _Retry:
            for entry in entries:
                failed = _put_failure(entry)
                if failed is not None:
                    entry.verdict = (Verdict.BLOB_FAILED, failed)
            return [entry for entry in entries if entry.verdict is None]
        except _AuditFailed as exc:
            log.error("audit records of %d instances not written, none stored: %s", len(entries), exc.__cause__)
            _decide(entries, Verdict.AUDIT_FAILED)
            return []
        except Exception as exc:
            if _all_decided(entries, Verdict.COMMITTED):  # handing the connection back failed: stored all the same
                log.warning("connection not released after an ingest commit: %s", exc)
                return []
            if isinstance(exc, asyncpg.DeadlockDetectedError) and not committing:
                raise  # rolled back: the batch runs again
            if len(entries) > 1 and not committing and not unavailable(exc):
                raise _Isolate from exc  # rolled back: which instance caused it is found by indexing each alone
            _decide(entries, Verdict.UNCONFIRMED if committing else Verdict.FAILED, exc)
            return []

    async def _index(self, conn: Connection, entries: list[Entry]) -> list[tuple[Entry, InstanceStored]]:
        """The batch's rows; raises `_Retry` after giving refused instances their verdict."""
        indexed = await repository.index_instances(conn, [(e.parsed, e.key, e.size, e.sha256) for e in entries])
        stored: list[tuple[Entry, InstanceStored]] = []
        refused = False
        for entry, row in zip(entries, indexed, strict=True):
            event = await self._judge(conn, entry, row)
            if event is not None:
                stored.append((entry, event))
                continue
            entry.verdict = (Verdict.REFUSED, None)
            refused = True
            if row.created:  # what the later instances were told may change without it: decided in the retry
                break
        if refused:
            raise _Retry
        return stored

    async def _judge(self, conn: Connection, entry: Entry, row: repository.Indexed) -> InstanceStored | None:
        """The instance's event, or None when it is refused (its outcome says why, or nothing for a re-send of the
        same bytes). An instance already indexed is overwritten here when the server is configured to."""
        p, outcome = entry.parsed, entry.outcome
        if isinstance(row.conflict, repository.StudyOfAnotherPatient):
            # PS3.3 A.1.2: a study belongs to one patient. No coercion: the instance is refused (Cxxx, PS3.4 B.2.3:
            # the data set matches its SOP class, so A900 would send the sender looking for a broken header).
            outcome.failure, outcome.comment = CANNOT_UNDERSTAND, PATIENT_CONFLICT_COMMENT
            outcome.conflict = PatientConflict(
                p.study_uid,
                p.series_uid,
                p.sop_instance_uid,
                p.study["patient_id"],
                p.study["issuer_of_patient_id"],
                row.conflict.patient_id,
                row.conflict.issuer,
            )
            return None
        if isinstance(row.conflict, repository.SeriesInOtherStudy):
            outcome.failure = DATASET_MISMATCH
            outcome.comment = f"SeriesInstanceUID {p.series_uid} already belongs to another study"
            return None
        instance_pk, replaced = row.instance_pk, False
        if instance_pk is None:
            current = await repository.find_instance(conn, p.sop_instance_uid, lock=True)
            assert current is not None  # indexed before, or by an earlier instance of the batch
            if original_sha256(current) == entry.original:
                return None  # idempotent: the same bytes are already stored (or a concurrent store won)
            if not self.overwrite:
                duplicate(outcome)
                return None
            instance_pk = await repository.replace_instance(
                conn, p, row.study_pk, row.series_pk, entry.key, entry.size, entry.sha256
            )
            replaced = True
            if current["blob_key"] != entry.key:
                await jobs.enqueue(conn, DELETE_JOB, {"key": current["blob_key"]})
        return InstanceStored(instance_pk, row.study_pk, row.series_pk, p, replaced, entry.origin)

    @staticmethod
    async def _audit(conn: Connection, stored: list[tuple[Entry, InstanceStored]]) -> None:
        """Every record of the batch with one statement (stored and recorded, or neither)."""
        try:
            records = [record for entry, event in stored if entry.audit is not None for record in entry.audit(event)]
            await AuditTrail.append_in(conn, records)
        except Exception as exc:
            raise _AuditFailed from exc


def _put_failure(entry: Entry) -> BaseException | None:
    put = entry.put
    if not put.done():
        return None
    if put.cancelled():
        return asyncio.CancelledError("the blob write was cancelled")
    return put.exception()


def _decide(entries: list[Entry], verdict: Verdict, error: BaseException | None = None) -> None:
    for entry in entries:
        if entry.verdict is None:
            entry.verdict = (verdict, error)


def _all_decided(entries: list[Entry], verdict: Verdict) -> bool:
    return all(entry.verdict is not None and entry.verdict[0] is verdict for entry in entries)


def _settle(entry: Entry, verdict: Verdict, error: BaseException | None = None) -> None:
    if not entry.done.done():
        entry.done.set_result((verdict, error))
