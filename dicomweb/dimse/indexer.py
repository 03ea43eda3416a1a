"""The index store of acknowledged C-STOREs: `StoreService.store` run from a task on the event loop just after the
C-STORE-RSP, for each instance the intake made durable (`dicomweb.dimse.intake`), and replayed at start for the
entries a crash left.

Before an instance is acknowledged, `check` decides what the store would refuse: its study filed under another
patient, its series under another study, its SOP Instance UID stored (or acknowledged) with other bytes when
overwrite is off, against the index and against the instances acknowledged but not indexed yet (`Pending`; with
several server processes, also those of the others, which each reserves in the database: `intake_reserve`). So the
store after the answer succeeds unless a STOW-RS (or another server on the same database) of a contradicting
instance slipped in between; such an instance is logged, kept in `intake/refused/` and counted
(`GET /dimse/intake`).

A store that fails for want of a resource (the database unavailable, the blob store, the audit trail: A700) is
retried with a backoff, for as long as that lasts, while its entry stays in the intake. A store that fails otherwise
(the index refusing the instance's rows: 0110, or an error of the server's own) is tried `FAILED_ATTEMPTS` times in
all, then the entry is kept for an operator as a refused one: retried for ever, it would hold its place in the backlog
and come back every backoff period, and enough of them would stop every association. At most `backlog` instances are
acknowledged and not indexed at once: beyond that an association waits before its answer, which bounds how long
an acknowledged instance stays invisible to C-FIND and QIDO-RS."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from authz.decision import Resource
from authz.principal import Principal
from dicomweb.dimse.config import ISSUER, DimseConfig
from dicomweb.dimse.intake import (
    DUPLICATE,
    Conflict,
    Entry,
    Identity,
    Intake,
    Pending,
    adopt_orphans,
    patient_conflict,
    waiting,
)
from dicomweb.dimse.intake import series_conflict as _series_conflict
from dicomweb.dimse.store_operation import StoreOperation, audit_of, settle
from dicomweb.index import repository
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.outcome import Outcome
from dicomweb.ingest.parse import ParsedInstance, parse_instance
from dicomweb.ingest.reasons import OUT_OF_RESOURCES, PROCESSING_FAILURE, InstanceRejected
from dicomweb.ingest.spool import Spooled
from server.platform.db import unavailable, vouch_stateless

if TYPE_CHECKING:
    from authz.audit import AuditTrail
    from dicomweb.ingest.service import StoreService
    from dicomweb.settings import DicomwebSettings

log = logging.getLogger(__name__)

BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
FAILED_ATTEMPTS = 5
"""Stores of an entry that failed other than for want of a resource (0110, an error) before it is refused: a few
seconds of backoff (a deadlock or a restart of the database in between are retried so), not for ever."""


class _Result(enum.Enum):
    SETTLED = "settled"
    """Indexed, already stored, or refused."""
    WANTING = "wanting"
    """Out of resources (A700): retried until the resource is back."""
    FAILED = "failed"
    """Failed otherwise (0110, an error): retried up to `FAILED_ATTEMPTS` stores in all."""


def identity(parsed: ParsedInstance, sha256: str) -> Identity:
    return Identity(
        parsed.study_uid,
        parsed.series_uid,
        parsed.sop_instance_uid,
        parsed.study["patient_id"],
        parsed.study["issuer_of_patient_id"],
        sha256,
    )


class Indexer:
    """The acknowledged C-STOREs of this server between their answer and their index commit."""

    def __init__(
        self,
        store: StoreService,
        intake: Intake,
        trail: AuditTrail,
        operation_of: Callable[[Origin], StoreOperation],
        *,
        backlog: int = 16,
        concurrency: int = 4,
        slot: int | None = None,
    ) -> None:
        self.store = store
        self.intake = intake
        self.trail = trail
        self.operation_of = operation_of
        """The operation of a replayed entry, from its origin (the policy decided before the answer)."""
        self.pending = Pending(store.overwrite)
        self.backlog = backlog
        self._room = threading.BoundedSemaphore(backlog)
        self._tasks: set[asyncio.Task[None]] = set()
        self._last: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(concurrency)
        """Stores at once: fewer than the pool's connections, so that a store stuck on the database (a lock, an
        outage) leaves connections to the answers, queries and the audit trail."""
        self.retrying = 0
        """Entries whose last store failed for a transient reason."""
        self.slot = slot
        """The intake slot under which this process's acknowledged instances are reserved in the database, for the
        checks of the other server processes (`repository.intake_reserve`); None when this is the only process
        that answers C-STOREs."""
        self._reservations: dict[Identity, list[int]] = {}

    def room(self, timeout: float) -> bool:
        """Blocking (an association thread): wait until fewer than `backlog` instances wait for the index; False
        after `timeout` seconds. The caller gives the room back with `give_back` unless it acknowledged."""
        return self._room.acquire(timeout=timeout)

    def give_back(self) -> None:
        self._room.release()

    async def check(self, ident: Identity) -> Conflict | None:
        """Reserve `ident` among the pending instances and check it against the index (and, with other server
        processes, against theirs, reserving it for them to see); a conflict reserves nothing. Raises (nothing
        reserved) when the index cannot be read. The caller gives a reservation back with `release`."""
        conflict = self.pending.reserve(ident)
        if conflict is not None:
            return conflict
        try:
            async with self.store.pool.acquire() as conn:
                conflict = await self._reserve(conn, ident)
                vouch_stateless(conn)  # one statement, its own transaction
        except BaseException:
            self.pending.release(ident)
            raise
        if conflict is not None:
            self.pending.release(ident)
        return conflict

    async def _reserve(self, conn: Any, ident: Identity) -> Conflict | None:
        """`intake_reserve`: the checks, and with other server processes the reservation they see."""
        fields = (ident.study_uid, ident.series_uid, ident.sop_instance_uid, ident.patient_id, ident.issuer)
        row = await repository.intake_reserve(conn, self.slot, (*fields, ident.sha256), self.store.overwrite)
        if row["conflict"] == "patient":
            return patient_conflict((row["study_patient_id"], row["study_issuer"]))
        if row["conflict"] == "series":
            return _series_conflict(ident.series_uid)
        if row["conflict"] == "duplicate":
            return DUPLICATE
        if row["reservation"] is not None:
            self._reservations.setdefault(ident, []).append(int(row["reservation"]))
        return None

    async def release(self, ident: Identity) -> None:
        """Give back what `check` reserved for `ident` (its store ended, or it was not acknowledged after all)."""
        self.pending.release(ident)
        held = self._reservations.get(ident)
        if not held:
            return
        reservation = held.pop()
        if not held:
            del self._reservations[ident]
        try:
            async with self.store.pool.acquire() as conn:
                await repository.intake_unreserve(conn, [reservation])
                vouch_stateless(conn)
        except Exception as exc:  # removed with the slot's at this process's next start; meanwhile only stricter
            log.warning("intake reservation not removed: %s", type(exc).__name__)

    def submit(
        self,
        entry: Entry,
        ident: Identity | None,
        operation: StoreOperation,
        parsed: ParsedInstance | None = None,
        *,
        room: bool = True,
    ) -> None:
        """On the loop: index an acknowledged entry (reserved in `pending` as `ident`; `parsed` when the checks read
        it already) from a task; `room`: it holds a place in the backlog (`room`), given back once it is settled."""
        sop = ident.sop_instance_uid if ident is not None else entry.name
        before = self._last.get(sop)
        task = asyncio.get_running_loop().create_task(self._index(entry, ident, operation, parsed, before, room))
        self._last[sop] = task
        self._tasks.add(task)

        def forget(done: asyncio.Task[None]) -> None:
            self._tasks.discard(done)
            if self._last.get(sop) is done:
                del self._last[sop]

        task.add_done_callback(forget)

    async def _index(
        self,
        entry: Entry,
        ident: Identity | None,
        operation: StoreOperation,
        parsed: ParsedInstance | None,
        before: asyncio.Task[None] | None,
        room: bool,
    ) -> None:
        if before is not None:  # the same SOP Instance UID acknowledged earlier (overwrite): stored in order
            await asyncio.wait([before])
        attempt = failures = 0
        try:
            while True:
                result = await self._once(entry, ident, operation, parsed, last=failures + 1 >= FAILED_ATTEMPTS)
                if result is _Result.SETTLED:
                    break
                failures += result is _Result.FAILED
                delay = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)]
                attempt += 1
                if attempt == 1:
                    self.retrying += 1
                await asyncio.sleep(delay)
        finally:
            if attempt:
                self.retrying -= 1
        if ident is not None:
            await self.release(ident)
        if room:
            self._room.release()

    async def _once(
        self,
        entry: Entry,
        ident: Identity | None,
        operation: StoreOperation,
        parsed: ParsedInstance | None = None,
        *,
        last: bool = False,
    ) -> _Result:
        """One store of the entry. `last`: a failure other than for want of a resource refuses the entry."""
        async with self._slots:
            try:
                link = self.intake.link(entry, self.store.spool.folder)
                spooled = Spooled(link, entry.size, entry.sha256)
                audit = audit_of(operation)
                outcome = await self.store.store(spooled, entry.origin, audit=audit, parsed=parsed)
            except Exception as exc:  # `store` raises only when nothing was stored
                wanting = unavailable(exc)
                if wanting or not last:
                    log.warning("acknowledged C-STORE not indexed yet (%s); retrying", type(exc).__name__)
                    return _Result.WANTING if wanting else _Result.FAILED
                log.error("acknowledged C-STORE failed %d times", FAILED_ATTEMPTS, exc_info=exc)
                outcome = _failed(ident, parsed)
        if outcome.ok:
            await settle(self.trail, operation, outcome)
            self.intake.done(entry)
            return _Result.SETTLED
        if outcome.failure == OUT_OF_RESOURCES:
            log.warning("acknowledged C-STORE not indexed yet (status %04X); retrying", outcome.failure)
            return _Result.WANTING
        if outcome.failure == PROCESSING_FAILURE and not last:
            log.warning("acknowledged C-STORE not indexed yet (status %04X); retrying", outcome.failure)
            return _Result.FAILED
        await self._refused(entry, operation, outcome)
        return _Result.SETTLED

    async def _refused(self, entry: Entry, operation: StoreOperation, outcome: Outcome) -> None:
        """An acknowledged instance the store refused: kept for an operator, logged (status and file, no PHI),
        counted, and recorded."""
        try:
            kept: Path | str = await anyio.to_thread.run_sync(self.intake.refuse, entry)
        except OSError as exc:
            kept = f"{entry.path} (not moved: {exc.strerror})"
        log.error(
            "an acknowledged C-STORE was refused by the store (status %04X); kept for an operator in %s",
            outcome.failure or 0,
            kept,
        )
        await settle(self.trail, operation, outcome, note="acknowledged, then refused by the store: ")

    async def replay(self) -> int:
        """Store the entries a stop or crash left (before the AE accepts associations): each is tried once here;
        one that fails for a transient reason is retried from a task. Returns how many were found."""
        entries = await anyio.to_thread.run_sync(lambda: list(self.intake.entries()))
        if not entries:
            return 0
        log.warning("replaying %d acknowledged C-STORE instances left in the intake", len(entries))
        loaded = [await anyio.to_thread.run_sync(self._load, entry) for entry in entries]
        for _, ident in loaded:
            if ident is not None:
                self.pending.reserve(ident)  # contradictions among them are the store's to settle
                if self.slot is not None:  # for the other processes' checks, as far as nothing contradicts it
                    async with self.store.pool.acquire() as conn:
                        await self._reserve(conn, ident)
        operations = [self.operation_of(entry.origin) for entry, _ in loaded]
        results = await asyncio.gather(*(self._once(e, i, op) for (e, i), op in zip(loaded, operations, strict=True)))
        for (entry, ident), op, result in zip(loaded, operations, results, strict=True):
            if result is not _Result.SETTLED:
                self.submit(entry, ident, op, room=False)
            elif ident is not None:
                await self.release(ident)
        return len(entries)

    def _load(self, entry: Entry) -> tuple[Entry, Identity | None]:
        digest = hashlib.sha256()
        with open(entry.path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        sha256 = digest.hexdigest()
        entry = Entry(entry.path, entry.size, sha256, entry.origin, entry.received_ns)
        try:
            parsed = parse_instance(entry.path, bulk_threshold=self.store.bulk_threshold)
        except InstanceRejected:
            return entry, None
        return entry, identity(parsed, sha256)

    def status(self) -> dict[str, int]:
        """For `GET /dimse/intake`: acknowledged and not indexed (by any process of this server: the entries on
        disk), of which retrying (in this process), and refused after the answer (kept in `intake/refused/`)."""
        return {
            "pending": waiting(self.intake.root),
            "retrying": self.retrying,
            "refused": self.intake.refused_count(),
        }

    async def close(self, grace: float) -> None:
        """Let the stores in flight end (up to `grace` seconds); what is left stays in the intake for the next
        start."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)


def _failed(ident: Identity | None, parsed: ParsedInstance | None) -> Outcome:
    """The outcome of an entry whose store raised on its last attempt: a processing failure (0110)."""
    outcome = Outcome.of(parsed) if parsed is not None else Outcome(None, ident.sop_instance_uid if ident else None)
    outcome.failure, outcome.comment = PROCESSING_FAILURE, "the server could not store the instance"
    return outcome


def replayed_operation(config: DimseConfig, origin: Origin) -> StoreOperation:
    """The operation of an entry replayed at start: its peer's identity as the origin names it (the policy decided
    before the answer; the record names the instance once the store has parsed it)."""
    calling = origin.calling_ae or ""
    peer = config.peer(calling)
    roles = peer.roles if peer is not None else ()
    principal = Principal(sub=origin.subject or calling, issuer=ISSUER, roles=roles, client_id=calling)
    return StoreOperation(principal, origin.address, Resource(kind="instance"), origin)


async def open_indexer(
    stack: contextlib.AsyncExitStack, settings: DicomwebSettings, store: StoreService, trail: AuditTrail
) -> Indexer:
    """The C-STORE intake and its index store, with what a stop or crash left replayed before the AE accepts
    associations (only the process running the AE writes and replays the intake). Closed by `stack` after the AE
    stopped."""
    operation_of = functools.partial(replayed_operation, settings.dimse)
    concurrency = max(1, settings.db_pool_max // 2)
    intake = Intake(settings.intake_dir, settings.intake_root)
    slot = settings.dimse_intake_slot if settings.processes > 1 else None
    indexer = Indexer(store, intake, trail, operation_of, concurrency=concurrency, slot=slot)
    stack.push_async_callback(indexer.close, float(settings.dimse_timeout_seconds))
    gone = [settings.dimse_intake_slot]  # its reservations are a previous process's
    if settings.dimse_intake_slot == 0:
        adopted, slots = await anyio.to_thread.run_sync(adopt_orphans, settings.intake_root)
        gone += slots
        if adopted:
            log.warning("took over %d acknowledged C-STORE instances of server processes no longer running", adopted)
    if slot is not None:
        async with store.pool.acquire() as conn:
            await repository.intake_unreserve_slots(conn, gone)
    await indexer.replay()
    return indexer
