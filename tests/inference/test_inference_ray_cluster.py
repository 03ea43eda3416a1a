"""A real multi-node Ray cluster on this machine: a head and worker nodes started as separate `ray start` processes
on 127.0.0.1 with Ray's token authentication, each node with a custom resource of its own so that where a replica
runs is decided by resources and observable.

- `hounsfield models deploy` and the server join it by address with the token as Ray documents it
  (`RAY_AUTH_TOKEN_PATH`; `RAY_AUTH_MODE` unset here: a token at hand means token mode, as for `ray start`);
  a wrong token is refused with the settings to check, and the token is never printed.
- A model asking for `hf_model` is placed on the one worker node that has it; that node is killed while the run
  is in flight: the attempt fails, the run is retried and succeeds on the other node that has `hf_model`.
Every Ray process the test started is stopped by its own session (never `ray stop`, which stops every Ray on the
machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.conftest import free_port
from tests.inference.test_inference_e2e import LUNGS, result_of, stow_chest, wait_for
from tests.server.test_cli import hounsfield
from tests.support.procs import serve

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
PLUGINS = "tests.support.inference_plugins"
REMOTE = {
    **LUNGS,
    "name": "remote",
    "status": "shadow",
    "backend": {
        "adapter": "test-sleeps",
        "backend": "ray",
        "seconds": 10,
        "num_cpus": 0.5,
        "resources": {"hf_model": 1},
        "max_batch_size": 1,
    },
}
FAST_FAILURE_DETECTION = {  # Ray's own settings: the GCS declares a silent node dead within about 2 s
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    pids: set[int] = field(default_factory=set)

    def processes(self) -> list[psutil.Process]:
        """The node's processes: its `ray start --block` and everything in the session it leads."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid == self.proc.pid or os.getsid(proc.pid) == self.proc.pid or proc.pid in self.pids:
                    found.append(proc)
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                continue
        self.pids.update(p.pid for p in found)
        return found

    def alive(self) -> list[int]:
        """The node's processes seen so far that still run."""
        left = []
        for pid in self.pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                continue
        return left

    def kill(self) -> None:
        for proc in self.processes():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@dataclass
class Cluster:
    base: Path
    address: str
    token_path: Path
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    def start(self, name: str, *args: str) -> Node:
        log = self.base / f"{name}.log"
        ports = [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    RAY,
                    "start",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    f"--temp-dir={self.base / name}",
                    *ports,
                    *args,
                ],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        node = Node(name, proc, log)
        self.nodes.append(node)
        wait_for(lambda: b"Ray runtime started" in log.read_bytes() or proc.poll() is not None, 90)
        assert proc.poll() is None, log.read_text()[-3000:]
        node.processes()
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.processes()
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        for node in self.nodes:
            try:
                node.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
            node.kill()
        deadline = time.monotonic() + 20
        while any(node.alive() for node in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for node in self.nodes for pid in node.alive()]
        assert not left, f"Ray processes of this test outlived it: {left}"


def _ray_env(token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOUNSFIELD_", "RAY_")) and k != "DATABASE_URL"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(ROOT),
        **FAST_FAILURE_DETECTION,
    )
    return env


@contextmanager
def cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="hf-ray-"))  # short: Ray's socket paths live under it
    token_path = base / "token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    port = free_port()
    running = Cluster(base, f"127.0.0.1:{port}", token_path, _ray_env(token_path))
    try:
        running.start(
            "head",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--resources=" + json.dumps({"hf_head": 1}),
        )
        yield running
    finally:
        running.stop()
        shutil.rmtree(base, ignore_errors=True)


def _client_env(running: Cluster, dsn: str, **extra: str) -> dict[str, str]:
    """The CLI's environment: the token file as Ray documents it, `RAY_AUTH_MODE` left unset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOUNSFIELD_", "RAY_")) and k != "DATABASE_URL"}
    env.update(
        RAY_ADDRESS=running.address,
        RAY_AUTH_TOKEN_PATH=str(running.token_path),
        RAY_USAGE_STATS_ENABLED="0",
        DATABASE_URL=dsn,
        HOUNSFIELD_INFERENCE_PLUGINS=PLUGINS,
        **extra,
    )
    return env


def _replica(node: Node) -> list[int]:
    found = []
    for proc in node.processes():
        try:
            if "ServeReplica:hounsfield:remote@" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _pid_of(result: dict[str, Any]) -> int:
    return int(result["stats"]["pid"])


def test_worker_node_killed_mid_run_the_run_succeeds_on_another(dsn: str, tmp_path: Path) -> None:
    with cluster() as running:
        first = running.start(
            "node-a", f"--address={running.address}", "--num-cpus=1", "--resources=" + json.dumps({"hf_model": 1})
        )
        server_env = {
            "HOUNSFIELD_INFERENCE_BACKEND": "ray",
            "HOUNSFIELD_RAY_ADDRESS": running.address,
            "HOUNSFIELD_INFERENCE_PLUGINS": PLUGINS,
            "HOUNSFIELD_INFERENCE_QUIET_SECONDS": "1",
            "HOUNSFIELD_INFERENCE_MAX_ATTEMPTS": "3",
            "HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S": "60",
            "HOUNSFIELD_DIMSE": "false",
            "RAY_AUTH_TOKEN_PATH": str(running.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        with ExitStack() as stack, serve(dsn, tmp_path / "data", **server_env) as server:
            api = stack.enter_context(httpx.Client(base_url=server.url, headers=server.headers, timeout=60))
            assert api.post("/models", json=REMOTE).status_code == 201

            wrong = hounsfield(
                "models", "deploy", env=_client_env(running, dsn, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
            )
            assert wrong.returncode == 1, wrong.stdout + wrong.stderr
            assert "RAY_AUTH_MODE=token" in wrong.stderr and "RAY_AUTH_TOKEN_PATH" in wrong.stderr, wrong.stderr
            assert "0" * 64 not in wrong.stdout + wrong.stderr
            assert running.token_path.read_text() not in wrong.stdout + wrong.stderr

            done = hounsfield("models", "deploy", env=_client_env(running, dsn))
            assert done.returncode == 0, done.stdout + done.stderr
            assert "deployed remote@1.0.0 in hounsfield" in done.stdout
            assert running.token_path.read_text() not in done.stdout + done.stderr

            second = running.start(  # the other place for the model, started once it is placed on the first
                "node-b", f"--address={running.address}", "--num-cpus=1", "--resources=" + json.dumps({"hf_model": 1})
            )
            source = stow_chest(api)
            series = source.SeriesInstanceUID
            result_of(api, series, "remote", ("running",))
            time.sleep(2)  # the replica on node-a is inside its 10 s answer (a margin for a loaded machine)
            assert wait_for(lambda: _replica(first), 30), "the model's replica runs on node-a, the node with hf_model"
            first.kill()

            result = result_of(api, series, "remote", ("succeeded", "failed"))
            assert result["state"] == "succeeded" and result["attempts"] >= 2, result
            assert _pid_of(result) in {p.pid for p in second.processes()}, "it ran on node-b"
        for node in running.nodes:
            assert node is first or node.proc.poll() is None, f"{node.name} stopped: {node.log.read_text()[-2000:]}"
