"""The tamper-evident audit trail: records (`authz.auditrecord`) appended to a hash chain in PostgreSQL, signed
at checkpoints (the chain hash and the checkpoints are `authz.auditchain`'s), verified end to end
(`authz.auditverify`).

Chain (migrations/0004_audit.sql): `hash(seq) = sha256(prev_hash || canonical JSON || seq as 8-byte big-endian)`,
prev_hash of seq 1 = 32 zero bytes. Canonical JSON = `json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=True)` of `AuditRecord.to_json()` (no floats, no NUL): a fixed point of a round trip through jsonb, so
anyone can re-hash a record read back from the database. The SQL function `audit_append` locks the one-row chain
head, hashes, inserts and moves the head in one statement: appends from any number of connections and processes
form one chain with gapless seq numbers. Within a process, concurrent appends are coalesced into one call (group
commit, `AuditTrail.append`): a record costs about one round trip and a share of one WAL flush, and `append`
returns only after the commit, so a response sent after it cannot lose its record on a crash.

A record that must commit or roll back with another change (a stored instance's, PS3.15 A.5.3.4) is written in
that change's transaction with `AuditTrail.append_in`: deferred (migrations/0016_audit_in_transaction.sql), it
takes no lock and no seq there, and the next append (`nudge` asks for one at once) or checkpoint chains it. Holding
the head's lock until an ingest commits would make every ingest and every request's record wait in one line.

Checkpoints: the periodic `audit.checkpoint` job checks the records since the last checkpoint, then signs the
head (`checkpoint_message`) with the server's EC P-256 key (`authz.keys`). A verifier holding the public key then
detects even a chain that was altered and consistently re-hashed up to the head.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from authz.auditchain import (
    GENESIS,
    SQL,
    Checkpoint,
    Signer,
    Verifier,
    chain_hash,
    checkpoint_message,
    key_signer,
    key_verifier,
)
from authz.auditrecord import (
    Agent,
    AuditRecord,
    Code,
    EventSubtype,
    EventType,
    break_glass_record,
    canonical_json,
    encode_query,
    outcome_for_status,
    request_record,
)
from authz.auditverify import VerifyResult, verify, verify_segment
from server.platform import jobs
from server.platform.db import Connection, vouch_stateless

__all__ = [
    "CHECKPOINT_JOB",
    "GENESIS",
    "SQL",
    "Agent",
    "AuditRecord",
    "AuditTrail",
    "Checkpoint",
    "Code",
    "EventSubtype",
    "EventType",
    "Signer",
    "Verifier",
    "break_glass_record",
    "canonical_json",
    "chain_hash",
    "checkpoint_handler",
    "checkpoint_message",
    "encode_query",
    "key_signer",
    "key_verifier",
    "make_checkpoint",
    "outcome_for_status",
    "records_of",
    "request_record",
]

if TYPE_CHECKING:
    from authz.auditanchor import AuditAnchors

log = logging.getLogger(__name__)


# --- appending -----------------------------------------------------------------------------------------------

Forwarder = Callable[[AuditRecord, int], None]
"""Called after a record committed, with its seq (e.g. syslog forwarding); must not block."""


LINGER_SECONDS = 0.5
"""How long the append writer keeps its connection after its last batch, waiting for more records."""


@dataclass(slots=True)
class _Batch:
    texts: list[str] = field(default_factory=list)
    records: list[AuditRecord] = field(default_factory=list)
    futures: list[asyncio.Future[int]] = field(default_factory=list)


class AuditTrail:
    """Appends records to the chain. `append` returns once the record is committed (so a response sent after it
    cannot lose its record on a crash). Concurrent appends of one process share a transaction (group commit):
    while one batch is being written the next one gathers, up to `max_batch` records.

    `writer` is the pool the appends use: the server gives them connections of their own, because a caller may
    hold a connection of the main pool while it waits for its record (a Bundle writes its entries' records so,
    a break-glass start its alert), and with every connection held that way the append would wait forever."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int = 256,
        forwarder: Forwarder | None = None,
        writer: asyncpg.Pool | None = None,
    ) -> None:
        self.pool = pool
        self.writer = writer if writer is not None else pool
        self.max_batch = max_batch
        self.forwarder = forwarder
        self._pending = _Batch()
        self._nudged = False
        """Deferred records were committed (`append_in`): chain them even if no record is pending."""
        self._accepting = False
        """True while a writer task will still take pending records."""
        self._writers: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        """Set when records are pending for a writer that lingers on its connection."""
        self._closing = False

    async def append(self, record: AuditRecord) -> int:
        """Write one record; returns its seq once committed. Raises what the database raised."""
        # shield: a caller that is cancelled (client gone) does not cancel the write its record is part of.
        return await asyncio.shield(self.submit(record))

    def submit(self, record: AuditRecord) -> asyncio.Future[int]:
        """Hand one record to the writer without waiting: the future gives its seq once committed, or what the
        database raised. For a caller with work to do meanwhile (`authz.recording`: the response's body)."""
        text = canonical_json(record.to_json())  # a bad record raises here, alone
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.texts.append(text)
        self._pending.records.append(record)
        self._pending.futures.append(future)
        self._start_writer()
        return future

    async def append_many(self, records: Sequence[AuditRecord]) -> list[int]:
        """Write records (consecutive in the chain when no other process appends meanwhile); their seqs."""
        if not records:
            return []
        texts = [canonical_json(record.to_json()) for record in records]  # a bad record raises here, alone
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[int]] = [loop.create_future() for _ in records]
        self._pending.texts.extend(texts)
        self._pending.records.extend(records)
        self._pending.futures.extend(futures)
        self._start_writer()
        # shield: a caller that is cancelled (client gone) does not cancel the write its record is part of.
        return list(await asyncio.shield(asyncio.gather(*futures)))

    @staticmethod
    async def append_in(conn: Connection, records: Sequence[AuditRecord]) -> None:
        """Write records as part of the transaction open on `conn`: they commit with it or not at all. They enter
        the chain after that commit, at the next append of any process or checkpoint (`nudge` after the commit
        asks for one at once); until then they are in `audit_pending`, which the app role cannot delete from."""
        if records:
            await conn.execute(SQL["defer"], [canonical_json(record.to_json()) for record in records])

    def nudge(self) -> None:
        """Chain the records that transactions committed with `append_in` soon, without waiting for it."""
        self._nudged = True
        self._start_writer()

    def _start_writer(self) -> None:
        if self._accepting:
            self._wake.set()  # a lingering writer takes them
        else:
            self._accepting = True
            writer = asyncio.create_task(self._write_pending(), name="hounsfield-audit-append")
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)

    async def close(self) -> None:
        """Wait for the writes in flight (call before closing the pool on shutdown)."""
        self._closing = True
        self._wake.set()
        while self._writers:
            await asyncio.gather(*self._writers, return_exceptions=True)

    async def _write_pending(self) -> None:
        """Write batches while any is pending, on one connection; each batch's callers are answered as soon as
        its statement committed. The writer then keeps its connection for `LINGER_SECONDS` and takes the next
        records at once (a busy server pays no task start and no pool checkout per request); once it has waited
        that long with nothing pending it stops accepting and hands the connection back (a later append starts a
        new writer). A failed batch raises in each of its callers (its records may or may not be committed when
        the connection broke mid-call)."""
        while self._pending.texts or self._nudged:
            batch: _Batch | None = None
            connected = False
            try:
                async with self.writer.acquire() as conn:
                    connected = True
                    while True:
                        while self._pending.texts or self._nudged:
                            batch = self._take()
                            row = await conn.fetchrow(SQL["append"], batch.texts)
                            assert row is not None  # audit_chain returns one row
                            pending_first, first = int(row["pending_first"]), int(row["first_seq"])
                            self._settle(batch, first)
                            batch = None
                            if self.forwarder is not None and pending_first < first:
                                await self._forward_chained(conn, pending_first, first)
                        if not await self._next():
                            break
                    self._accepting = False
                    vouch_stateless(conn)  # autocommitted appends only: no reset query on release
                return
            except BaseException as exc:
                failed = batch if connected else self._take()  # the batch in flight, or the next one
                if failed is not None:
                    self._settle(failed, exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                if not isinstance(exc, Exception):
                    self._accepting = False
                    raise
                log.warning("audit append failed: %s", exc)
                if not self._accepting:
                    return
        self._accepting = False

    async def _next(self) -> bool:
        """Wait up to `LINGER_SECONDS` for more records; False when none came (or the trail is closing)."""
        self._wake.clear()
        if self._closing:
            return False
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                await self._wake.wait()
        except TimeoutError:
            pass
        return bool(self._pending.texts or self._nudged)

    def _settle(self, batch: _Batch, outcome: int | Exception) -> None:
        for i, future in enumerate(batch.futures):
            if future.done():
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome + i)
        if self.forwarder is not None and not isinstance(outcome, Exception):
            for i, record in enumerate(batch.records):
                try:
                    self.forwarder(record, outcome + i)
                except Exception:  # forwarding is best effort; the database holds the record
                    log.exception("audit forwarding failed for seq %d", outcome + i)

    async def _forward_chained(self, conn: Connection, start: int, end: int) -> None:
        """Forward the deferred records just chained (seqs in [start, end)); best effort, as `_settle`."""
        assert self.forwarder is not None
        try:
            rows = await conn.fetch(SQL["chain_range"], start - 1, end - 1)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("deferred audit records %d..%d not forwarded: %s", start, end - 1, exc)
            return
        for seq, record in records_of(dict(row) for row in rows):
            try:
                self.forwarder(record, seq)
            except Exception:
                log.exception("audit forwarding failed for seq %d", seq)

    def _take(self) -> _Batch:
        self._nudged = False
        pending = self._pending
        if len(pending.texts) <= self.max_batch:
            self._pending = _Batch()
            return pending
        n = self.max_batch
        self._pending = _Batch(pending.texts[n:], pending.records[n:], pending.futures[n:])
        return _Batch(pending.texts[:n], pending.records[:n], pending.futures[:n])

    async def checkpoint(self, signer: Signer) -> Checkpoint | None:
        return await make_checkpoint(self.pool, signer)

    async def verify(self, verifier: Verifier) -> VerifyResult:
        return await verify(self.pool, verifier)


# --- checkpoints ---------------------------------------------------------------------------------------------


async def make_checkpoint(pool: asyncpg.Pool, signer: Signer, *, start: Checkpoint | None = None) -> Checkpoint | None:
    """Sign the chain head if records were added since the last checkpoint, after checking those records (a
    tampered segment is never signed: it is logged and left for `hounsfield audit verify`). `start`, the newest
    anchored checkpoint (`authz.auditanchor`), is where the check starts when the database holds none as new:
    a chain rewritten behind checkpoints deleted from the database does not chain on to it and is not signed."""
    async with pool.acquire() as conn:
        await conn.fetchrow(SQL["append"], [])  # chain the deferred records first: the checkpoint covers them
        last = await conn.fetchrow(SQL["last_checkpoint"])
        head = await conn.fetchrow(SQL["last_record"])
    start_seq, start_hash = (0, GENESIS) if last is None else (int(last["seq"]), bytes(last["hash"]))
    if start is not None and start.seq >= start_seq:
        start_seq, start_hash = start.seq, start.hash
    if head is not None and int(head["seq"]) < start_seq:
        log.error(
            "audit chain: the log ends at seq %d, before the checkpoint at seq %d: records were deleted",
            head["seq"],
            start_seq,
        )
        return None
    if head is None or start_seq >= head["seq"]:
        return None
    problems = await verify_segment(pool, start_seq, start_hash, int(head["seq"]))
    if problems:
        log.error("audit chain: not signing a checkpoint at seq %d: %s", head["seq"], "; ".join(map(str, problems[:5])))
        return None
    signed_at = dt.datetime.now(dt.UTC)
    signature, key_id = signer(checkpoint_message(int(head["seq"]), bytes(head["hash"]), signed_at))
    checkpoint = Checkpoint(int(head["seq"]), bytes(head["hash"]), signed_at, signature, key_id)
    async with pool.acquire() as conn:
        await conn.execute(SQL["insert_checkpoint"], checkpoint.seq, checkpoint.hash, signed_at, signature, key_id)
    return checkpoint


CHECKPOINT_JOB = "audit.checkpoint"


def checkpoint_handler(
    pool: asyncpg.Pool,
    signer: Signer,
    interval: int,
    *,
    anchors: AuditAnchors | None = None,
    verifier: Verifier | None = None,
) -> jobs.Handler:
    """The `audit.checkpoint` job (`server.platform.jobs`): sign the head, copy the checkpoints the anchor sinks miss to
    them (`AuditAnchors.flush`: after the database, see authz/auditanchor.py), then schedule the next run in
    `interval` seconds when the job is the periodic one. Start it with `jobs.schedule(conn, CHECKPOINT_JOB,
    {"periodic": True}, dedupe_key="periodic", delay_seconds=interval)`."""

    async def run(job: jobs.Job) -> None:
        try:
            start = None
            if anchors is not None and verifier is not None:
                start = await anchors.trusted_start(verifier)
            checkpoint = await make_checkpoint(pool, signer, start=start)
            if checkpoint is not None:
                log.info("audit checkpoint signed at seq %d (key %s)", checkpoint.seq, checkpoint.key_id)
            if anchors is not None:
                await anchors.flush(pool)
        finally:
            if job.payload.get("periodic"):
                async with pool.acquire() as conn:
                    await jobs.enqueue(
                        conn, CHECKPOINT_JOB, {"periodic": True}, dedupe_key="periodic", delay_seconds=interval
                    )

    return run


def records_of(rows: Iterable[Mapping[str, Any]]) -> Iterable[tuple[int, AuditRecord]]:
    """(seq, record) from rows with `seq` and `record` (jsonb text); malformed records are skipped and logged."""
    for row in rows:
        try:
            yield int(row["seq"]), AuditRecord.from_json(json.loads(row["record"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("audit record %s is malformed: %s", row["seq"], exc)
