"""The one ingest entry at service level (`dicomweb.ingest.service.StoreService.store`): a real embedded
PostgreSQL (the `dsn` fixture), a filesystem blob store and the spool, no server. What every channel relies on:
one instance from two origins, the listeners bound at construction and run in their order inside the ingest
transaction, their work rolled back with a store that fails, and the origin they are told of."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from authz.auditrecord import AuditRecord
from dicomweb.dimse import routing
from dicomweb.dimse.config import Destination, DimseConfig, RoutingRule
from dicomweb.ingest.events import InstanceStored, Listener
from dicomweb.ingest.origin import Channel, Origin
from dicomweb.ingest.reasons import OUT_OF_RESOURCES
from fhir import sync as fhir_sync
from server.platform.db import Connection
from tests.support.factory import ct, part10
from tests.support.ingest import store_service

STOW = Origin.stow("alice", "127.0.0.1")
IMPORT = Origin.imported("cd/IMG0001")
MODALITY = Origin.dimse("MODALITY", "HOUNSFIELD", "modality-1", "127.0.0.1")


def _recorder(seen: list[tuple[str, InstanceStored]], name: str) -> Listener:
    async def listener(_conn: Connection, events: Sequence[InstanceStored]) -> None:
        seen.extend((name, event) for event in events)

    return listener


async def _count(pool: asyncpg.Pool, sql: str, *args: Any) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval(sql, *args))


def test_one_instance_from_two_origins_is_stored_once(dsn: str, tmp_path: Path) -> None:
    """The same bytes over STOW-RS and then from an import: the second is an idempotent success that commits
    nothing and tells no listener; different bytes over C-STORE (overwrite on) replace the instance, and the
    listeners are told which origin did it."""
    ds = ct(seed=1)
    data = part10(ds)
    seen: list[tuple[str, InstanceStored]] = []

    async def main() -> None:
        async with store_service(dsn, tmp_path, [_recorder(seen, "one")], overwrite=True) as store:
            first = await store.store(store.spool.write(data), STOW)
            again = await store.store(store.spool.write(data), IMPORT)
            assert (first.ok, first.committed) == (True, True)
            assert (again.ok, again.committed) == (True, False)
            assert [e.origin for _, e in seen] == [STOW]
            assert seen[0][1].replaced is False

            changed = part10(ct(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, seed=2))
            replaced = await store.store(store.spool.write(changed), MODALITY)
            assert (replaced.ok, replaced.committed) == (True, True)
            assert [e.origin.channel for _, e in seen] == [Channel.STOW, Channel.DIMSE]
            assert seen[1][1].replaced is True and seen[1][1].origin.calling_ae == "MODALITY"
            uid = str(ds.SOPInstanceUID)
            assert await _count(store.pool, "SELECT count(*) FROM instances WHERE sop_instance_uid = $1", uid) == 1
            assert not list((tmp_path / "spool").iterdir())  # every spool file consumed

    asyncio.run(main())


def test_listeners_run_in_the_order_they_were_bound(dsn: str, tmp_path: Path) -> None:
    """The order given at construction is the order they run in, inside the transaction (they see the rows)."""
    order: list[str] = []

    def listener(name: str) -> Listener:
        async def run(conn: Connection, events: Sequence[InstanceStored]) -> None:
            for event in events:
                found = await conn.fetchval("SELECT count(*) FROM instances WHERE instance_pk = $1", event.instance_pk)
                order.append(f"{name}:{found}")

        return run

    async def main() -> None:
        async with store_service(dsn, tmp_path, [listener("b"), listener("a"), listener("c")]) as store:
            assert isinstance(store.listeners, tuple)  # bound at construction: nothing appends one later
            outcome = await store.store(store.spool.write(part10(ct())), STOW)
            assert outcome.committed

    asyncio.run(main())
    assert order == ["b:1", "a:1", "c:1"]


def test_a_failed_store_rolls_back_the_listeners_work(dsn: str, tmp_path: Path) -> None:
    """The FHIR sync listener queues its job in the ingest transaction; when the store's audit record cannot be
    written the store fails (A700), and neither the instance nor the queued job exists."""
    seen: list[tuple[str, InstanceStored]] = []

    def broken_audit(_event: InstanceStored) -> list[AuditRecord]:
        raise RuntimeError("the audit trail is unavailable")

    async def main() -> None:
        listeners = [fhir_sync.ingest_hook(0), _recorder(seen, "after")]
        async with store_service(dsn, tmp_path, listeners) as store:
            ds = ct()
            outcome = await store.store(store.spool.write(part10(ds)), STOW, audit=broken_audit)
            assert outcome.failure == OUT_OF_RESOURCES and not outcome.committed
            assert [name for name, _ in seen] == ["after"]  # the listeners ran, in the rolled-back transaction
            assert await _count(store.pool, "SELECT count(*) FROM instances") == 0
            assert await _count(store.pool, "SELECT count(*) FROM jobs WHERE kind = $1", fhir_sync.SYNC_JOB) == 0

            stored = await store.store(store.spool.write(part10(ds)), STOW)  # the same store, audited: it all commits
            assert stored.committed
            assert await _count(store.pool, "SELECT count(*) FROM jobs WHERE kind = $1", fhir_sync.SYNC_JOB) == 1

    asyncio.run(main())


def test_routing_matches_the_calling_ae_of_the_origin(dsn: str, tmp_path: Path) -> None:
    """A rule on the calling AE title forwards what that modality sent over C-STORE, and nothing that came over
    STOW-RS or from another AE: the router reads the AE title from the event's origin."""
    config = DimseConfig(
        destinations=(Destination("PACS", "127.0.0.1", 11112),),
        routes=(RoutingRule("PACS", name="from-modality", calling_ae=("MODALITY",)),),
    )
    other = Origin.dimse("OTHER", "HOUNSFIELD", "other-1", "127.0.0.1")

    async def main() -> list[dict[str, Any]]:
        async with store_service(dsn, tmp_path, [routing.routing_hook(config)]) as store:
            stored = [await store.store(store.spool.write(part10(ct())), o) for o in (STOW, MODALITY, other)]
            assert all(o.committed for o in stored)
            async with store.pool.acquire() as conn:
                rows = await conn.fetch("SELECT payload FROM jobs WHERE kind = $1", routing.ROUTE_JOB)
            payloads = [json.loads(r["payload"]) if isinstance(r["payload"], str) else r["payload"] for r in rows]
            assert [p["instance"] for p in payloads] == [stored[1].sop_instance_uid]
            return payloads

    assert asyncio.run(main())[0]["destination"] == "PACS"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Origin(Channel.STOW, calling_ae="MODALITY"), "AE titles"),
        (lambda: Origin(Channel.IMPORT, called_ae="HOUNSFIELD"), "AE titles"),
    ],
)
def test_an_origin_names_ae_titles_only_for_dimse(make: Callable[[], Origin], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
