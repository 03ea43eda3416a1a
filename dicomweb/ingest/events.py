"""What the store tells its listeners: typed events, and the listener signature, bound when the store is made.

The listeners are given to `StoreService` at its construction, in the order they run (`server.app` fixes it:
FHIR sync, DIMSE routing, inference dispatch, renditions); nothing appends one later. The model is pynetdicom's
`events.py`: an event type carries the facts, handlers are bound at construction. Here one event exists,
`InstanceStored`, raised inside the ingest transaction (the listeners queue derived work in it, so a job exists
exactly when its instance committed). The store indexes the instances that are ready together, in one transaction
(group commit, `dicomweb.ingest.service`): a listener is told of all of them at once, and queues their work with
one statement (`server.platform.jobs.enqueue_many`), not one round trip per instance."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from authz.auditrecord import AuditRecord
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.parse import ParsedInstance
from server.platform.db import Connection


@dataclass(frozen=True, slots=True)
class InstanceStored:
    """An instance's rows were written (new or replaced) in the ingest transaction, which has not committed yet."""

    instance_pk: int
    study_pk: int
    series_pk: int
    parsed: ParsedInstance
    replaced: bool
    """True when an instance with this SOP Instance UID and other bytes was overwritten."""
    origin: Origin


Listener = Callable[[Connection, Sequence[InstanceStored]], Awaitable[None]]
"""Runs inside the ingest transaction, once per transaction, with every instance it stored, in the order they were
indexed (one SOP Instance UID may appear twice: stored, then overwritten by a later instance of the batch). The
instances' blobs may still be being written (do not read them). A listener may only run statements that leave no
session state (plain DML and SELECTs; `SET LOCAL`, `pg_advisory_xact_lock`), because the connection is released
without asyncpg's reset query (`server.platform.db.vouch_stateless`). An exception rolls the whole transaction
back: none of its instances is stored."""

AuditOf = Callable[[InstanceStored], Sequence[AuditRecord]]
"""The caller's audit of a stored instance (`StoreService.store`'s `audit`): the records that must commit with it
(PS3.15 A.5.3.4), made without I/O. The store writes the records of every instance of a transaction with one
`AuditTrail.append_in`, after the listeners; an exception fails the transaction's instances as an audit failure."""
