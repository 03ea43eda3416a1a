"""What every benchmark needs to drive a Hounsfield server it started: a free loopback port, waiting until the
server answers /readyz, and an admin token signed with the server's data-folder key (the embedded issuer)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, proc: subprocess.Popen[bytes] | None = None, seconds: float = 90) -> None:
    """Poll `base`/readyz until 200; exit (stopping the process) when it died or the time is up."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(base.rstrip("/") + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            if proc is not None and proc.poll() is None:
                proc.terminate()
            raise SystemExit(f"server at {base} did not start")
        time.sleep(0.2)


def admin_token(env: Mapping[str, str], sub: str = "bench") -> str:
    """`hounsfield token --role admin` with the server's environment (its HOUNSFIELD_DATA holds the key)."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "token", "--sub", sub, "--role", "admin"],
        cwd=ROOT,
        env=dict(env),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def stop_started(procs: list[subprocess.Popen[bytes]], embedded: Any = None, folder: Path | None = None) -> None:
    """A benchmark's teardown: the processes it started, newest first (SIGTERM, then wait), its embedded
    PostgreSQL, its temporary folder."""
    for proc in reversed(procs):
        proc.terminate()
        proc.wait(30)
    if embedded is not None:
        embedded.cleanup()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
