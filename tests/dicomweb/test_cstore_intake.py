"""Early acknowledgement of C-STOREs (`HOUNSFIELD_DIMSE_EARLY_ACK`, dicomweb/dimse/indexer.py): an instance is
answered once every check has passed and it is durable in the intake, and indexed just after. What the store
would refuse is refused before the answer (also against instances acknowledged but not indexed yet); an
acknowledged instance is stored once a transient failure is over, is visible to C-FIND shortly after, and
survives kill -9 (the intake is replayed at start). A contradicting instance filed by someone else in between is
kept for an operator and counted.

The index store is held back, where a test needs it, by a real lock: `LOCK TABLE instances IN EXCLUSIVE MODE` in
another session (reads go on, so the checks before the answer still run; the store's insert waits)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicomweb.dimse.intake import Intake
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.spool import Spooled
from tests.conftest import free_port
from tests.support.dimse_util import TITLE, dimse_audit, dimse_port, indexed, require_dcmtk, start
from tests.support.factory import ct, part10
from tests.support.procs import serve
from tests.support.sql import poison

pytestmark = pytest.mark.timeout(180)

CONFLICT = 0xC000
MISMATCH = 0xA900
DUPLICATE = 0x0111
NOT_AUTHORIZED = 0x0124
VISIBLE_WITHIN_S = 3.0
"""The visibility bound asserted here: generous for a loaded test machine (the documented p99 is measured by
benchmarks/cstore.py --visibility)."""


def sql(dsn: str, statement: str, *args: Any) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(statement, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def stored_uids(dsn: str) -> set[str]:
    return {r["sop_instance_uid"] for r in sql(dsn, "SELECT sop_instance_uid FROM instances")}


@contextmanager
def index_held(dsn: str, *before_commit: tuple[str, tuple[Any, ...]]) -> Iterator[None]:
    """Hold the instances table against writes until the block ends; `before_commit` runs in the same transaction
    just before it commits (another writer filing something meanwhile)."""
    ready, release = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    async def hold() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE instances IN EXCLUSIVE MODE")
                ready.set()
                while not release.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                for statement, args in before_commit:
                    await conn.execute(statement, *args)
        finally:
            await conn.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as exc:  # reported to the test
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert ready.wait(10) and not failed, failed
    try:
        yield
    finally:
        release.set()
        thread.join(30)
    assert not failed, failed


def associate(port: int, calling: str = "CT1") -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    contexts = [
        build_context(CTImageStorage, ExplicitVRLittleEndian),
        build_context(StudyRootQueryRetrieveInformationModelFind),
    ]
    assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title=TITLE)
    assert assoc.is_established
    return assoc


def send(assoc: Any, ds: Dataset) -> tuple[int, str]:
    rsp = assoc.send_c_store(ds)
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def study_count(assoc: Any, study: str) -> int:
    """NumberOfStudyRelatedInstances by C-FIND (0 when the study is not found)."""
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID, query.NumberOfStudyRelatedInstances = "STUDY", study, ""
    count = 0
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
            count = int(identifier.get("NumberOfStudyRelatedInstances") or 0)
    return count


def intake_status(server: Any) -> dict[str, int]:
    result: dict[str, int] = httpx.get(f"{server.url}/dimse/intake", headers=server.headers, timeout=10).json()
    return result


def test_what_the_store_would_refuse_is_refused_before_the_answer(make_server: Any) -> None:
    node = start(make_server)
    study, series = generate_uid(), generate_uid()
    first = ct(study, series, PatientID="P1")
    other_patient = ct(study, generate_uid(), PatientID="P2")
    same_uid_other_bytes = ct(study, series, first.SOPInstanceUID, PatientID="P1", seed=7)
    series_of_another_study = ct(generate_uid(), series, PatientID="P1")
    refused = [
        (other_patient, CONFLICT, "another patient"),
        (same_uid_other_bytes, DUPLICATE, "different content"),
        (series_of_another_study, MISMATCH, "SeriesInstanceUID"),
    ]
    assoc = associate(dimse_port(node))
    try:
        with index_held(node.dsn):  # `first` is acknowledged and not indexed: the checks find it pending
            assert send(assoc, first) == (0, "")
            for ds, status, words in refused:
                got = send(assoc, ds)
                assert got[0] == status and words in got[1], got
            assert stored_uids(node.dsn) == set()
        indexed(node)
        for ds, status, words in refused:  # and against the index, as before
            got = send(assoc, ds)
            assert got[0] == status and words in got[1], got
    finally:
        assoc.release()
    denied = associate(dimse_port(node), "REF")  # the policy: a referring physician may not store
    try:
        assert send(denied, ct(PatientID="P3"))[0] == NOT_AUTHORIZED
    finally:
        denied.release()
    indexed(node)
    assert stored_uids(node.dsn) == {first.SOPInstanceUID}
    records = dimse_audit(node.dsn, "C-STORE")
    assert sorted(r["http"]["status"] for r in records if r["outcome"] != "0") == sorted(
        [CONFLICT, DUPLICATE, MISMATCH] * 2 + [NOT_AUTHORIZED]
    )
    conflicts = [r for r in records if r["http"]["status"] == CONFLICT]
    assert all("'P1'" in r["outcome_desc"] and "'P2'" in r["outcome_desc"] for r in conflicts)
    assert [r["entity"]["instance_uid"] for r in records if r["outcome"] == "0"] == [first.SOPInstanceUID]
    assert intake_status(node) == {"pending": 0, "retrying": 0, "refused": 0}


def test_a_burst_is_visible_to_cfind_within_the_bound(make_server: Any, tmp_path: Path) -> None:
    require_dcmtk()
    node = start(make_server)
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "burst"
    folder.mkdir()
    files = []
    for i in range(60):
        path = folder / f"{i:03d}.dcm"
        path.write_bytes(part10(ct(study, series, seed=i, InstanceNumber=i + 1, PatientID="B1")))
        files.append(str(path))
    finder = associate(dimse_port(node), "ADMIN")
    try:
        run = subprocess.run(
            ["storescu", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", str(dimse_port(node)), *files],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        answered = time.monotonic()
        assert run.returncode == 0, run.stdout + run.stderr
        while (found := study_count(finder, study)) < len(files):
            assert time.monotonic() - answered < VISIBLE_WITHIN_S, f"{found} of {len(files)} visible"
    finally:
        finder.release()
    print(f"all {len(files)} visible to C-FIND {1000 * (time.monotonic() - answered):.0f} ms after the last answer")


def test_an_acknowledged_instance_is_stored_once_a_transient_failure_is_over(make_server: Any) -> None:
    """The connections of the stores waiting on the index are cut (a database outage as the server sees it),
    then the audit trail refuses records: each acknowledged instance stays in the intake and is retried until it
    is stored, with one record."""
    node = start(make_server)
    study = generate_uid()
    datasets = [ct(study, seed=i, PatientID="T1") for i in range(5)]
    assoc = associate(dimse_port(node))
    try:
        with index_held(node.dsn):
            assert [send(assoc, ds)[0] for ds in datasets[:3]] == [0, 0, 0]
            deadline = time.monotonic() + 10
            while intake_status(node)["retrying"] < 3:
                sql(
                    node.dsn,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND pid <> pg_backend_pid()",
                )
                assert time.monotonic() < deadline, intake_status(node)
                time.sleep(0.1)
        sql(node.dsn, "REVOKE EXECUTE ON FUNCTION audit_defer(text[]) FROM hounsfield_app")
        try:
            assert [send(assoc, ds)[0] for ds in datasets[3:]] == [0, 0]
            time.sleep(1.0)
            assert intake_status(node)["retrying"] >= 2
            assert not stored_uids(node.dsn) & {ds.SOPInstanceUID for ds in datasets[3:]}
        finally:
            sql(node.dsn, "GRANT EXECUTE ON FUNCTION audit_defer(text[]) TO hounsfield_app")
        indexed(node, 30)
    finally:
        assoc.release()
    assert stored_uids(node.dsn) == {ds.SOPInstanceUID for ds in datasets}
    records = [r for r in dimse_audit(node.dsn, "C-STORE") if r.get("entity", {}).get("study_uid") == study]
    assert sorted(r["entity"]["instance_uid"] for r in records) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert all(r["outcome"] == "0" for r in records)


def test_an_instance_filed_otherwise_meanwhile_is_kept_for_an_operator(make_server: Any) -> None:
    """Another writer (another process, a STOW-RS) files the study under another patient between the answer and
    the index store: the instance is not lost, it is kept in intake/refused/ and counted."""
    node = start(make_server)
    ds = ct(PatientID="R1")
    assoc = associate(dimse_port(node))
    filed = ("INSERT INTO studies (study_uid, patient_id, attrs) VALUES ($1, 'R2', '{}')", (ds.StudyInstanceUID,))
    try:
        with index_held(node.dsn, filed):
            assert send(assoc, ds)[0] == 0
    finally:
        assoc.release()
    indexed(node)
    assert stored_uids(node.dsn) == set()
    assert intake_status(node)["refused"] == 1
    kept = list((node.settings.intake_dir / "refused").glob("*.dcm"))
    assert len(kept) == 1 and kept[0].read_bytes().endswith(bytes(ds.PixelData))
    [record] = [r for r in dimse_audit(node.dsn, "C-STORE") if r["entity"].get("instance_uid") == ds.SOPInstanceUID]
    assert record["http"]["status"] == CONFLICT and "acknowledged, then refused" in record["outcome_desc"]


def test_an_instance_the_index_keeps_failing_is_kept_for_an_operator(make_server: Any) -> None:
    """The index fails on one acknowledged instance's rows every time (0110, not an outage): it is tried a few
    times, then kept in intake/refused/, counted and recorded, and its place in the backlog is free again; the
    instances acknowledged with it are stored."""
    node = start(make_server)
    study = generate_uid()
    datasets = [ct(study, seed=i, PatientID="F1") for i in range(3)]
    bad = str(datasets[1].SOPInstanceUID)
    for statement in poison(bad):
        sql(node.dsn, statement)
    assoc = associate(dimse_port(node))
    try:
        assert [send(assoc, ds)[0] for ds in datasets] == [0, 0, 0]
    finally:
        assoc.release()
    indexed(node, 30)
    assert stored_uids(node.dsn) == {datasets[0].SOPInstanceUID, datasets[2].SOPInstanceUID}
    assert intake_status(node) == {"pending": 0, "retrying": 0, "refused": 1}
    kept = list((node.settings.intake_dir / "refused").glob("*.dcm"))
    assert len(kept) == 1 and kept[0].read_bytes().endswith(bytes(datasets[1].PixelData))
    [record] = [r for r in dimse_audit(node.dsn, "C-STORE") if r["entity"].get("instance_uid") == bad]
    assert record["http"]["status"] == 0x0110 and "acknowledged, then refused" in record["outcome_desc"]


def test_kill_9_after_the_answers_then_the_intake_is_replayed(dsn: str, tmp_path: Path) -> None:
    """storescu sends N images (fewer than the backlog), each answered Success, while the index store is held
    back; the server is killed (SIGKILL) right after the last answer, with nothing indexed. Restarted, it replays
    its intake before it accepts associations: all N are found by C-FIND and QIDO-RS, each with its record."""
    require_dcmtk()
    data, port = tmp_path / "data", free_port()
    env = {"HOUNSFIELD_DIMSE_PORT": str(port), "HOUNSFIELD_DIMSE_PEERS": "CT1=admin", "HOUNSFIELD_INFERENCE": "false"}
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "in"
    folder.mkdir()
    datasets = [ct(study, series, seed=i, InstanceNumber=i + 1, PatientID="K9") for i in range(12)]
    for i, ds in enumerate(datasets):
        (folder / f"{i:03d}.dcm").write_bytes(part10(ds))
    with serve(dsn, data, **env) as srv:
        with index_held(dsn):
            run = subprocess.run(
                ["storescu", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", str(port), *sorted(map(str, folder.iterdir()))],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            srv.kill()
        assert run.returncode == 0, run.stdout + run.stderr
    assert stored_uids(dsn) == set()  # acknowledged, not indexed: only the intake holds them
    assert len(list((data / "blobs" / ".spool" / "intake").glob("*.dcm"))) == len(datasets)
    with serve(dsn, data, **env) as srv:
        finder = associate(port, "CT1")
        try:
            assert study_count(finder, study) == len(datasets)
        finally:
            finder.release()
        found = httpx.get(f"{srv.url}/dicom-web/studies/{study}/instances", headers=srv.headers, timeout=30).json()
        assert {item["00080018"]["Value"][0] for item in found} == {ds.SOPInstanceUID for ds in datasets}
    assert not list((data / "blobs" / ".spool" / "intake").glob("*.dcm"))
    records = [r for r in dimse_audit(dsn, "C-STORE") if r.get("entity", {}).get("study_uid") == study]
    assert sorted(r["entity"]["instance_uid"] for r in records) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert all(r["outcome"] == "0" and r["agent"]["ae_title"] == "CT1" for r in records)


def _listeners(parent: psutil.Process, port: int) -> dict[int, psutil.Process]:
    """The server processes (children of `parent`) listening on `port`, by pid."""
    found = {}
    for child in parent.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")):
                found[child.pid] = child
    return found


def _two_processes(dsn: str, tmp_path: Path) -> tuple[Path, int, dict[str, str]]:
    """The data folder, DICOM port and environment of a server of two processes."""
    port = free_port()
    env = {
        "HOUNSFIELD_PROCESSES": "2",
        "HOUNSFIELD_DIMSE_PORT": str(port),
        "HOUNSFIELD_DIMSE_PEERS": "CT1=admin",
        "HOUNSFIELD_INFERENCE": "false",
    }
    return tmp_path / "data", port, env


def _by_process(srv: Any, port: int, associations: list[Any]) -> dict[int, list[Any]]:
    """Which server process took each association (both processes listening first), by pid."""
    parent = psutil.Process(srv.proc.pid)
    deadline = time.monotonic() + 60
    while len(listening := _listeners(parent, port)) < 2:
        assert time.monotonic() < deadline, f"{len(listening)} process(es) listening on the DICOM port"
        time.sleep(0.2)
    clients = {a.dul.socket.socket.getsockname()[1]: a for a in associations}
    taken: dict[int, list[Any]] = {}
    for pid, process in listening.items():
        for c in process.net_connections("tcp"):
            if c.laddr.port == port and c.raddr and c.raddr.port in clients:
                taken.setdefault(pid, []).append(clients[c.raddr.port])
    return taken


def test_with_two_processes_each_takes_associations_into_its_own_intake(dsn: str, tmp_path: Path) -> None:
    """HOUNSFIELD_PROCESSES=2: both server processes listen on the DICOM port and take associations (the kernel
    spreads them), each acknowledging into an intake slot of its own; every instance is indexed, and
    `GET /dimse/intake` counts the instances waiting in every slot, whichever process answers it."""
    data, port, env = _two_processes(dsn, tmp_path)
    study = generate_uid()
    datasets = [ct(study, seed=i, InstanceNumber=i + 1, PatientID="M2") for i in range(16)]
    with serve(dsn, data, **env) as srv:
        _by_process(srv, port, [])  # both listening before any association
        associations = [associate(port) for _ in datasets]  # all open at once: spread by the kernel
        try:
            taken = _by_process(srv, port, associations)
            assert len(taken) == 2 and sum(map(len, taken.values())) == len(datasets), taken
            with index_held(dsn):  # answered from the intakes, none indexed yet
                assert [send(a, ds)[0] for a, ds in zip(associations, datasets, strict=True)] == [0] * len(datasets)
                assert intake_status(srv)["pending"] == len(datasets)  # both slots, from either process
        finally:
            for a in associations:
                a.release()
        indexed(srv, 30)
        assert (srv.data / "blobs" / ".spool" / "intake" / "1" / ".lock").exists()  # the second process's slot
    assert {ds.SOPInstanceUID for ds in datasets} <= stored_uids(dsn)


def test_with_two_processes_each_checks_against_the_instances_the_other_acknowledged(dsn: str, tmp_path: Path) -> None:
    """HOUNSFIELD_PROCESSES=2: an instance one process acknowledged and has not indexed yet (the index held back)
    is seen by the other's checks before its answers: a contradicting instance (its study under another patient)
    and the same SOP Instance UID with other bytes are refused there before the answer (C000, 0111), not
    acknowledged and then refused; once indexed, nothing is left reserved."""
    data, port, env = _two_processes(dsn, tmp_path)
    study = generate_uid()
    first = ct(study, seed=1, PatientID="X1")
    other_patient = ct(study, seed=2, PatientID="X2")
    other_bytes = ct(study, seed=3, PatientID="X1")
    other_bytes.SOPInstanceUID = first.SOPInstanceUID
    with serve(dsn, data, **env) as srv:
        _by_process(srv, port, [])
        associations = [associate(port) for _ in range(16)]
        try:
            taken = _by_process(srv, port, associations)
            assert len(taken) == 2, taken
            here, there = (found[0] for found in taken.values())
            with index_held(dsn):
                assert send(here, first)[0] == 0
                status, comment = send(there, other_patient)
                assert status == CONFLICT and "another patient" in comment
                assert send(there, other_bytes)[0] == DUPLICATE
                assert send(here, other_patient)[0] == CONFLICT  # and in the process that acknowledged it
        finally:
            for a in associations:
                a.release()
        indexed(srv, 30)
        assert intake_status(srv) == {"pending": 0, "retrying": 0, "refused": 0}
    assert stored_uids(dsn) >= {first.SOPInstanceUID} and other_patient.SOPInstanceUID not in stored_uids(dsn)
    assert sql(dsn, "SELECT count(*) AS n FROM intake_reservations")[0]["n"] == 0


def test_the_primary_takes_over_the_intake_of_a_process_no_longer_running(dsn: str, tmp_path: Path) -> None:
    """An instance acknowledged by a process that is gone (its slot, `intake/3/`, held by no one: a crash, or
    fewer processes than before) is indexed when the server starts: the primary moves the slot's entries into its
    own intake and replays them."""
    data, port = tmp_path / "data", free_port()
    ds = ct(PatientID="O3")
    root = data / "blobs" / ".spool" / "intake"
    orphan = root / "3"
    orphan.mkdir(parents=True)
    spooled_path = tmp_path / "received.part"
    spooled_path.write_bytes(part10(ds))
    spooled = Spooled(spooled_path, spooled_path.stat().st_size, "")
    Intake(orphan, root).keep(spooled, Origin.dimse("CT1", TITLE, "admin", "127.0.0.1"))
    assert len(list(orphan.glob("*.dcm"))) == 1
    env = {"HOUNSFIELD_DIMSE_PORT": str(port), "HOUNSFIELD_DIMSE_PEERS": "CT1=admin", "HOUNSFIELD_INFERENCE": "false"}
    with serve(dsn, data, **env) as srv:
        indexed(srv, 30)
        assert not list(orphan.glob("*.dcm")) and not list(root.glob("*.dcm"))
    assert ds.SOPInstanceUID in stored_uids(dsn)
    [record] = [r for r in dimse_audit(dsn, "C-STORE") if r.get("entity", {}).get("instance_uid") == ds.SOPInstanceUID]
    assert record["outcome"] == "0" and record["agent"]["ae_title"] == "CT1"
