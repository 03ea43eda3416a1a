"""What the store tells its listeners: typed events, and the listener signature, bound when the store is made.

The listeners are given to `StoreService` at its construction, in the order they run (`server.resources` builds
the one store: FHIR sync, DIMSE routing, inference dispatch, renditions); nothing appends one later. The model is
pynetdicom's `events.py`: an event type carries the facts, handlers are bound at construction. Here one event
exists, `InstanceStored`, raised inside the ingest transaction (the listeners queue derived work in it, so a job
exists exactly when its instance committed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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


Listener = Callable[[Connection, InstanceStored], Awaitable[None]]
"""Runs inside the ingest transaction, while the instance's blob may still be being written (do not read it). A
listener may only run statements that leave no session state (plain DML and SELECTs; `SET LOCAL`,
`pg_advisory_xact_lock`), because the connection is released without asyncpg's reset query
(`server.platform.db.vouch_stateless`). An exception rolls the whole store back: the instance is not stored. The
caller's audit record (`StoreService.store`'s `audit`) has the same signature and runs after the listeners."""
