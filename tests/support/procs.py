"""`hounsfield serve` as a real child process, for tests that measure it or kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.settings import Settings
from tests.conftest import admin_token, app_dsn, bearer, free_port


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    data: Path

    @property
    def headers(self) -> dict[str, str]:
        """`Authorization: Bearer <admin token>` signed with the server's data folder key."""
        return bearer(admin_token(Settings.from_env({}).with_overrides(data_dir=self.data)))

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc status")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


@contextmanager
def serve(dsn: str, data: Path, *, wrap: Sequence[str] = (), **env: str) -> Iterator[ServerProcess]:
    """`hounsfield serve` on a free port with `env`; `wrap` is a command that runs it (`unshare ... sh -c ...`)."""
    port = free_port()
    data.mkdir(parents=True, exist_ok=True)
    log_path = data.parent / f"server-{port}.log"
    environ = {
        **os.environ,
        "DATABASE_URL": app_dsn(dsn),  # serving as the app role; the schema's owner migrates
        "HOUNSFIELD_DATABASE_OWNER_URL": dsn,
        "HOUNSFIELD_DATA": str(data),
        "HOUNSFIELD_PORT": str(port),
        "HOUNSFIELD_LOG_LEVEL": "warning",
        **env,
    }
    with open(log_path, "wb") as log:
        command = [*wrap, sys.executable, "-m", "server.cli", "serve"]
        proc = subprocess.Popen(command, env=environ, stdout=log, stderr=log)
        server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path, data)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(server.url + "/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
            yield server
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
