"""Group commit of the ingest (`dicomweb.ingest.commit`): the instances ready to be indexed share one transaction,
and each keeps the outcome it would have had indexed alone after the ones before it. A real embedded PostgreSQL, a
filesystem blob store and the spool; the batches are made deterministic by holding the committer in a listener
while the instances of the next batch arrive, in a known order."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from authz.auditrecord import Agent, AuditRecord, EventType
from dicomweb.dimse import routing
from dicomweb.dimse.config import Destination, DimseConfig, RoutingRule
from dicomweb.ingest.events import InstanceStored
from dicomweb.ingest.gc import DELETE_JOB
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.reasons import CANNOT_UNDERSTAND, DUPLICATE_REJECTED, OUT_OF_RESOURCES, PROCESSING_FAILURE
from dicomweb.ingest.service import StoreService
from dicomweb.retrieve import renditions
from fhir import sync as fhir_sync
from inference import dispatch
from server.platform.db import Connection
from tests.support.factory import ct, multipart, part10, stow_headers
from tests.support.ingest import store_service
from tests.support.sql import poison, query

pytestmark = pytest.mark.timeout(120)

STOW = Origin.stow("alice", "127.0.0.1")


class Batches:
    """A listener that records each transaction's instances (and its txid) and, once armed, holds the next
    transaction open until released, so that the instances sent meanwhile are pending together."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str]]] = []
        self.armed = False
        self.holding = asyncio.Event()
        self.released = asyncio.Event()

    async def listener(self, conn: Connection, events: Sequence[InstanceStored]) -> None:
        txid = int(await conn.fetchval("SELECT txid_current()"))
        self.calls.append((txid, [e.parsed.sop_instance_uid for e in events]))
        if self.armed:
            self.armed = False
            self.holding.set()
            await self.released.wait()


async def _one_batch(store: StoreService, batches: Batches, datas: Sequence[bytes], **kw: Any) -> list[Any]:
    """Store `datas` as one batch, in this order: a first instance holds the committer in its transaction while
    they arrive one after another."""
    batches.armed = True
    holder = asyncio.create_task(store.store(store.spool.write(part10(ct())), STOW))
    await asyncio.wait_for(batches.holding.wait(), 30)
    tasks = []
    for n, data in enumerate(datas, 1):
        tasks.append(asyncio.create_task(store.store(store.spool.write(data), STOW, **kw)))
        while store.commits.waiting < n:
            assert not tasks[-1].done(), tasks[-1].result()
            await asyncio.sleep(0.01)
    batches.released.set()
    assert (await holder).committed
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def _fetch(store: StoreService, sql: str, *args: Any) -> list[Any]:
    async with store.pool.acquire() as conn:
        return list(await conn.fetch(sql, *args))


def test_concurrent_stores_share_one_transaction(dsn: str, tmp_path: Path) -> None:
    """Eight instances pending while a transaction runs are indexed by the next one, together: one txid, and the
    listener told of all of them at once, each once."""
    batches = Batches()
    datas = [part10(ct()) for _ in range(8)]

    async def main() -> None:
        async with store_service(dsn, tmp_path, [batches.listener]) as store:
            outcomes = await _one_batch(store, batches, datas)
            assert all(o.committed for o in outcomes)
            assert len(batches.calls) == 2
            _txid, uids = batches.calls[1]
            assert uids == [o.sop_instance_uid for o in outcomes]
            rows = await _fetch(
                store, "SELECT count(DISTINCT xmin::text) AS n FROM instances WHERE sop_instance_uid = ANY($1)", uids
            )
            assert rows[0]["n"] == 1

    asyncio.run(main())


def test_listeners_queue_the_work_of_a_batch_with_one_statement_each(dsn: str, tmp_path: Path) -> None:
    """The real listeners (FHIR sync, routing, inference dispatch, renditions) over a batch of two studies: one job
    per study, per routed instance, per series (quiet period, renditions); the jobs of each kind inserted by one
    statement (one command id within the transaction)."""
    batches = Batches()
    config = DimseConfig(destinations=(Destination("PACS", "127.0.0.1", 11112),), routes=(RoutingRule("PACS"),))
    listeners = [
        batches.listener,
        fhir_sync.ingest_hook(60),
        routing.routing_hook(config),
        dispatch.ingest_hook(60),
        renditions.ingest_hook(["1.2.840.10008.1.2.4.202"]),
    ]
    first, second = ct(), ct()
    datas = [part10(first), part10(second)]
    datas += [part10(ct(first.StudyInstanceUID, first.SeriesInstanceUID)) for _ in range(3)]
    datas += [part10(ct(second.StudyInstanceUID)) for _ in range(2)]

    async def main() -> None:
        async with store_service(dsn, tmp_path, listeners) as store:
            outcomes = await _one_batch(store, batches, datas)
            assert all(o.committed for o in outcomes)
            uids = batches.calls[1][1]
            rows = await _fetch(
                store,
                "SELECT j.kind, count(*) AS n, count(DISTINCT j.cmin::text) AS statements FROM jobs j"
                " WHERE j.xmin = (SELECT xmin FROM instances WHERE sop_instance_uid = $1) GROUP BY j.kind",
                uids[0],
            )
            found = {r["kind"]: (r["n"], r["statements"]) for r in rows}
            assert found == {
                fhir_sync.SYNC_JOB: (2, 1),
                routing.ROUTE_JOB: (7, 1),
                dispatch.QUIET_JOB: (4, 1),  # two series of the first study, two of the second
                renditions.RENDITION_JOB: (4, 1),  # one per series
            }
            routed = await _fetch(store, "SELECT payload FROM jobs WHERE kind = $1", routing.ROUTE_JOB)
            assert sorted(json.loads(r["payload"])["instance"] for r in routed) == sorted(
                [*uids, batches.calls[0][1][0]]
            )

    asyncio.run(main())


def test_an_instance_of_another_patient_is_refused_alone(dsn: str, tmp_path: Path) -> None:
    """A study already filed under P1; a batch of five of its instances, the third of P5: that one is refused
    (C000, with both patients for the audit), the four others are stored, in one transaction."""
    batches = Batches()
    study = generate_uid()

    async def main() -> None:
        async with store_service(dsn, tmp_path, [batches.listener]) as store:
            assert (await store.store(store.spool.write(part10(ct(study, PatientID="P1"))), STOW)).committed
            batches.calls.clear()
            datasets = [ct(study, PatientID="P5" if n == 2 else "P1") for n in range(5)]
            outcomes = await _one_batch(store, batches, [part10(d) for d in datasets])
            assert [o.committed for o in outcomes] == [True, True, False, True, True]
            refused = outcomes[2]
            assert refused.failure == CANNOT_UNDERSTAND and refused.conflict is not None
            assert (refused.conflict.patient_id, refused.conflict.study_patient_id) == ("P5", "P1")
            uids = [str(d.SOPInstanceUID) for n, d in enumerate(datasets) if n != 2]
            rows = await _fetch(
                store, "SELECT count(DISTINCT xmin::text) FROM instances WHERE sop_instance_uid = ANY($1)", uids
            )
            assert rows[0][0] == 1  # the four in one transaction (a retry without the refused one)
            stored = await _fetch(
                store,
                "SELECT i.sop_instance_uid FROM instances i JOIN studies s USING (study_pk) WHERE s.study_uid = $1",
                study,
            )
            assert len(stored) == 5 and datasets[2].SOPInstanceUID not in {r[0] for r in stored}
            series = await _fetch(
                store, "SELECT count(*) FROM series WHERE series_uid = $1", datasets[2].SeriesInstanceUID
            )
            assert series[0][0] == 0  # the series it brought was rolled back with it
            assert not list((tmp_path / "blobs").rglob(f"{datasets[2].SOPInstanceUID}.*"))

    asyncio.run(main())


def test_two_first_instances_of_a_new_study_file_the_first_patient(dsn: str, tmp_path: Path) -> None:
    """Two patients' first instances of one new study in one batch: as one after the other, the first is filed
    and the second refused, naming the first's patient."""
    batches = Batches()
    study = generate_uid()

    async def main() -> None:
        async with store_service(dsn, tmp_path, [batches.listener]) as store:
            datasets = [ct(study, PatientID="P1"), ct(study, PatientID="P5"), ct(study, PatientID="P1")]
            outcomes = await _one_batch(store, batches, [part10(d) for d in datasets])
            assert [o.committed for o in outcomes] == [True, False, True]
            assert outcomes[1].conflict is not None and outcomes[1].conflict.study_patient_id == "P1"
            rows = await _fetch(store, "SELECT patient_id FROM studies WHERE study_uid = $1", study)
            assert [r[0] for r in rows] == ["P1"]

    asyncio.run(main())


@pytest.mark.parametrize("overwrite", [False, True])
def test_one_sop_instance_uid_twice_in_a_batch(dsn: str, tmp_path: Path, overwrite: bool) -> None:
    """The same bytes twice: the first stored, the second a success that stored nothing. Other bytes with the
    same SOP Instance UID after them: refused as a duplicate, or (overwrite on) replacing the first, with the first
    blob's deletion queued, as when they are stored one after another."""
    batches = Batches()
    ds = ct(seed=1)
    changed = ct(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, seed=2)
    seen: list[InstanceStored] = []

    async def record(_conn: Connection, events: Sequence[InstanceStored]) -> None:
        seen.extend(events)

    async def main() -> None:
        async with store_service(dsn, tmp_path, [batches.listener, record], overwrite=overwrite) as store:
            outcomes = await _one_batch(store, batches, [part10(ds), part10(ds), part10(changed)])
            assert [(o.ok, o.committed) for o in outcomes[:2]] == [(True, True), (True, False)]
            uid = str(ds.SOPInstanceUID)
            rows = await _fetch(store, "SELECT sha256, blob_key FROM instances WHERE sop_instance_uid = $1", uid)
            assert len(rows) == 1
            mine = [e for e in seen if e.parsed.sop_instance_uid == uid]
            deletes = await _fetch(store, "SELECT payload FROM jobs WHERE kind = $1", DELETE_JOB)
            if overwrite:
                assert outcomes[2].committed
                assert [e.replaced for e in mine] == [False, True]
                assert [json.loads(r[0])["key"] for r in deletes] != [rows[0]["blob_key"]] and len(deletes) == 1
                assert (tmp_path / "blobs" / rows[0]["blob_key"]).exists()
            else:
                assert outcomes[2].failure == DUPLICATE_REJECTED and not outcomes[2].committed
                assert [e.replaced for e in mine] == [False] and deletes == []
            blobs = list((tmp_path / "blobs").rglob(f"{uid}.*"))
            assert (tmp_path / "blobs" / rows[0]["blob_key"]) in blobs

    asyncio.run(main())


def test_a_failed_blob_write_fails_only_its_instance(dsn: str, tmp_path: Path) -> None:
    """The blob store cannot write one instance (a file where its series folder should be): that instance fails
    (A700), the others of its batch are stored."""
    batches = Batches()
    study, series = generate_uid(), generate_uid()
    blocked = tmp_path / "blobs" / study / series
    blocked.parent.mkdir(parents=True)
    blocked.write_bytes(b"not a folder")
    datasets = [ct(), ct(study, series), ct()]

    async def main() -> None:
        async with store_service(dsn, tmp_path, [batches.listener]) as store:
            outcomes = await _one_batch(store, batches, [part10(d) for d in datasets])
            assert [o.committed for o in outcomes] == [True, False, True]
            assert outcomes[1].failure == OUT_OF_RESOURCES and "blob store" in (outcomes[1].comment or "")
            rows = await _fetch(store, "SELECT sop_instance_uid FROM instances")
            assert datasets[1].SOPInstanceUID not in {r[0] for r in rows} and len(rows) == 3

    asyncio.run(main())


def test_an_audit_failure_fails_the_whole_batch(dsn: str, tmp_path: Path) -> None:
    """The database refuses the record of one instance: the batch's transaction rolls back, every instance in it
    fails (A700, the audit's reason) and nothing of it is stored, its listeners' jobs neither."""
    batches = Batches()
    datasets = [ct(), ct(), ct()]
    bad = str(datasets[1].SOPInstanceUID)
    assert bad.replace(".", "").isdigit()

    def audit(stored: InstanceStored) -> list[AuditRecord]:
        record = AuditRecord(
            time=dt.datetime.now(dt.UTC),
            type=EventType.INSTANCES_TRANSFERRED,
            action="C",
            outcome="0",
            agent=Agent(sub="alice"),
            instance_uid=stored.parsed.sop_instance_uid,
        )
        return [record]

    async def main() -> None:
        async with store_service(dsn, tmp_path, [batches.listener, fhir_sync.ingest_hook(0)]) as store:
            async with store.pool.acquire() as conn:
                await conn.execute(
                    f"ALTER TABLE audit_pending ADD CONSTRAINT refused CHECK (position('{bad}' in record) = 0)"
                )
            outcomes = await _one_batch(store, batches, [part10(d) for d in datasets], audit=audit)
            for outcome in outcomes:
                assert (outcome.failure, outcome.committed) == (OUT_OF_RESOURCES, False)
                assert outcome.comment == "the audit trail could not record the instance; nothing was stored"
            rows = await _fetch(store, "SELECT count(*) FROM instances")
            assert rows[0][0] == 1  # the instance that held the committer
            jobs = await _fetch(store, "SELECT count(*) FROM jobs WHERE kind = $1", fhir_sync.SYNC_JOB)
            assert jobs[0][0] == 1
            pending = await _fetch(store, "SELECT count(*) FROM audit_pending")
            assert pending[0][0] == 0

    asyncio.run(main())


def test_an_index_error_of_one_instance_fails_only_it(dsn: str, tmp_path: Path) -> None:
    """The index statement fails on one instance's row (a trigger raising, as a constraint or a bug would): the
    batch rolls back and each instance is indexed alone, so that instance fails (0110) and the others of its batch
    are stored, once each."""
    batches = Batches()
    datasets = [ct(), ct(), ct()]
    bad = str(datasets[1].SOPInstanceUID)

    async def main() -> None:
        async with store_service(dsn, tmp_path, [batches.listener]) as store:
            async with store.pool.acquire() as conn:
                for statement in poison(bad):
                    await conn.execute(statement)
            outcomes = await _one_batch(store, batches, [part10(d) for d in datasets])
            assert [o.committed for o in outcomes] == [True, False, True]
            assert outcomes[1].failure == PROCESSING_FAILURE
            assert outcomes[1].comment == "the index could not record the instance; nothing was stored"
            rows = await _fetch(store, "SELECT sop_instance_uid FROM instances")
            assert bad not in {r[0] for r in rows} and len(rows) == 3
            committed = [uids for _txid, uids in batches.calls[1:]]
            assert committed == [[datasets[0].SOPInstanceUID], [datasets[2].SOPInstanceUID]]  # each alone

    asyncio.run(main())


def test_a_listener_failing_on_one_instance_fails_only_it(dsn: str, tmp_path: Path) -> None:
    """A listener raises for one instance of a batch (a bug in a hook): only that instance fails (its store raises
    the error, nothing of it stored), the others are stored with their listeners' work."""
    batches = Batches()
    datasets = [ct(), ct(), ct(), ct()]
    bad = str(datasets[2].SOPInstanceUID)

    async def failing(conn: Connection, events: Sequence[InstanceStored]) -> None:
        if any(e.parsed.sop_instance_uid == bad for e in events):
            raise ValueError("a hook that fails on this instance (test)")

    async def main() -> None:
        async with store_service(dsn, tmp_path, [batches.listener, failing, fhir_sync.ingest_hook(0)]) as store:
            outcomes = await _one_batch(store, batches, [part10(d) for d in datasets])
            assert isinstance(outcomes[2], ValueError)
            assert [o.committed for n, o in enumerate(outcomes) if n != 2] == [True, True, True]
            rows = await _fetch(store, "SELECT sop_instance_uid FROM instances")
            assert bad not in {r[0] for r in rows} and len(rows) == 4
            jobs = await _fetch(store, "SELECT count(*) FROM jobs WHERE kind = $1", fhir_sync.SYNC_JOB)
            assert jobs[0][0] == 4  # one per stored instance (each of its own study): the holder and three

    asyncio.run(main())


def test_stow_request_with_one_conflicting_part_stores_the_nine_others(server: Any, http: httpx.Client) -> None:
    """Ten parts in one request, the fifth of another patient than its study's: 202, nine stored, the fifth
    refused with C000, and each stored instance audited."""
    study = generate_uid()
    first = ct(study, PatientID="P1")
    assert (
        http.post("/dicom-web/studies", content=multipart([part10(first)]), headers=stow_headers()).status_code == 200
    )
    datasets: list[pydicom.Dataset] = [ct(study, PatientID="P5" if n == 4 else "P1") for n in range(10)]
    rsp = http.post("/dicom-web/studies", content=multipart([part10(d) for d in datasets]), headers=stow_headers())
    assert rsp.status_code == 202, rsp.text
    body = rsp.json()
    (failed,) = body["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [datasets[4].SOPInstanceUID]
    assert failed["00081197"]["Value"] == [CANNOT_UNDERSTAND]
    referenced = {item["00081155"]["Value"][0] for item in body["00081199"]["Value"]}
    assert referenced == {d.SOPInstanceUID for n, d in enumerate(datasets) if n != 4}
    found = http.get("/dicom-web/instances", params={"StudyInstanceUID": study}).json()
    assert len(found) == 10  # the first and the nine


def test_stow_request_with_one_unindexable_part_stores_the_nine_others(server: Any, http: httpx.Client) -> None:
    """Ten parts in one request, the index failing on the sixth's row: 202, nine stored, the sixth failed with 0110
    (Processing failure), whichever batches the parts shared."""
    study = generate_uid()
    datasets = [ct(study, PatientID="P1") for _ in range(10)]
    bad = str(datasets[5].SOPInstanceUID)

    for statement in poison(bad):
        query(server.dsn, statement)
    rsp = http.post("/dicom-web/studies", content=multipart([part10(d) for d in datasets]), headers=stow_headers())
    assert rsp.status_code == 202, rsp.text
    body = rsp.json()
    (failed,) = body["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [bad]
    assert failed["00081197"]["Value"] == [PROCESSING_FAILURE]
    found = http.get("/dicom-web/instances", params={"StudyInstanceUID": study}).json()
    assert len(found) == 9
