"""`hounsfield serve` with the Ray backend and a local Ray instance, as an operator runs it: while it runs, no
process of its tree listens beyond the loopback interface; after SIGTERM, no process of that tree (Ray's GCS,
raylet, agents, workers, replicas) and no embedded PostgreSQL is left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from server.settings import Settings
from tests.conftest import admin_token, bearer, free_port
from tests.inference.test_inference_e2e import LUNGS, result_of, stow_chest
from tests.server.test_cli import _postmasters, _stop_postgres

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
GONE_WITHIN_S = 30


def _tree(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def _listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    found = []
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return found


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {proc.name()}")
        except psutil.NoSuchProcess:
            continue
    return left


def test_sigterm_leaves_nothing_behind_and_nothing_listens_beyond_loopback() -> None:
    base = Path(tempfile.mkdtemp(prefix="hounsfield-test-ray-"))  # not tmp_path: the embedded PostgreSQL's user
    data = base / "data"
    pgdata = (data / "pg").resolve()
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HOUNSFIELD_") and k not in ("DATABASE_URL", "RAY_ADDRESS")
    }
    env.update(
        HOUNSFIELD_INFERENCE_BACKEND="ray",
        HOUNSFIELD_INFERENCE_QUIET_SECONDS="1",
        HOUNSFIELD_DIMSE="false",
        HOUNSFIELD_LOG_LEVEL="warning",
        RAY_USAGE_STATS_ENABLED="0",
    )
    log = base / "server.log"
    tracked: list[psutil.Process] = []
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data", str(data)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        headers = bearer(admin_token(Settings.from_env({}).with_overrides(data_dir=data)))
        lungs = {**LUNGS, "backend": {"adapter": "chest-xray-lung-fields", "backend": "ray", "num_cpus": 0.5}}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as api:
            assert api.post("/models", json=lungs).status_code == 201
            source = stow_chest(api)
            result = result_of(api, source.SeriesInstanceUID, "lungs", ("succeeded", "failed"))
        assert result["state"] == "succeeded", result  # so Ray and Serve run, in this process's tree

        tracked = _tree(psutil.Process(proc.pid))
        names = " ".join(p.name() for p in tracked)
        assert "raylet" in names and "gcs_server" in names, names
        beyond = [entry for entry in _listening(tracked) if entry[1] not in LOOPBACK]
        assert not beyond, f"listening beyond the loopback interface: {beyond}"

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert code >= 0, f"the server died of signal {-code}: {log.read_text()[-3000:]}"
        deadline = time.monotonic() + GONE_WITHIN_S
        while (_alive(tracked) or _postmasters(pgdata)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(tracked), f"outlived the server: {_alive(tracked)}"
        assert not _postmasters(pgdata), "the embedded PostgreSQL outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for left in tracked:  # test hygiene: only processes of this server's own tree
            try:
                left.kill()
            except psutil.NoSuchProcess:
                pass
        if _postmasters(pgdata):
            _stop_postgres(pgdata)
        shutil.rmtree(base, ignore_errors=True)
