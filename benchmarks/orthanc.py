"""A reusable Orthanc harness for benchmarks: Debian's `orthanc` with the `orthanc-dicomweb` plugin, started on
free ports with its storage in a temporary folder, and a loopback-only network namespace to run it in.

Orthanc binds every interface (there is no bind-address option), so a benchmark that starts it re-executes
itself first with `in_loopback_namespace()`: under `unshare -n`, with only `lo` up, whatever it starts there
(Hounsfield, its embedded PostgreSQL, dcmtk, Orthanc) and every client share a network nobody else reaches.

    from benchmarks.orthanc import Orthanc, in_loopback_namespace
    in_loopback_namespace()              # first thing in main(): re-execs under unshare -n when needed
    with Orthanc(folder, peers={"BENCH": ("127.0.0.1", 0)}) as orthanc:
        orthanc.dicom_port, orthanc.url  # DIMSE port, http://127.0.0.1:PORT (DICOMweb under /dicom-web/)

Configuration (PS3.7-level behaviour only where it matters to a benchmark): storage and index in the folder,
no compression, `SyncStorageArea` on (Orthanc's default, like Hounsfield's fsync of each blob), the calling
AE titles given as `peers` registered as DICOM modalities (C-FIND/C-MOVE/C-GET are allowed only to those;
C-ECHO and C-STORE to anyone), no called-AE check, HTTP local-only with authentication when `users` is given,
and the DICOMweb servers Orthanc's own DICOMweb client may call (`dicomweb_servers`: name -> {"Url": ...,
"HttpHeaders": {...}}, the plugin's `DicomWeb.Servers`; tests/e2e/test_orthanc_peer.py uses them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.harness import free_port

BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
NETNS_MARK = "HOUNSFIELD_BENCH_NETNS"


def in_loopback_namespace(argv: list[str] | None = None) -> None:
    """Re-execute this Python program in a new network namespace with only loopback up (root needed: `unshare
    -n`). Returns at once when already inside one (the environment carries a mark)."""
    if os.environ.get(NETNS_MARK):
        return
    if not shutil.which("unshare") or not shutil.which("ip"):
        raise SystemExit("unshare and ip are needed (util-linux, iproute2)")
    args = [sys.executable, *(sys.argv if argv is None else argv)]
    env = dict(os.environ, **{NETNS_MARK: "1"})
    script = 'ip link set lo up && exec "$@"'
    os.execvpe("unshare", ["unshare", "-n", "sh", "-c", script, "sh", *args], env)


def ensure_installed() -> None:
    """apt-get install orthanc and orthanc-dicomweb when missing (as root; Debian's policy-rc.d keeps the
    packaged service from starting in a container, and it is never used here)."""
    if Path(BINARY).exists() and Path(DICOMWEB_PLUGIN).exists():
        return
    if os.geteuid() != 0:
        raise SystemExit("Orthanc is missing: apt-get install orthanc orthanc-dicomweb (as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", "orthanc", "orthanc-dicomweb"], check=True, env=env)


def config(
    folder: Path,
    *,
    aet: str,
    dicom_port: int,
    http_port: int,
    peers: dict[str, tuple[str, int]],
    users: dict[str, str] | None,
    dicomweb_servers: dict[str, dict[str, Any]] | None = None,
    http_compression: bool = True,
) -> dict[str, Any]:
    """The Orthanc configuration (one JSON file; the Debian defaults apply to everything not set).
    `http_compression`: Orthanc's `HttpCompressionEnabled` (its default, on: it gzips any answer a client accepts
    gzip for, 512 KB frames included; off suits binary payloads)."""
    return {
        "Name": "bench",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "StorageCompression": False,
        "SyncStorageArea": True,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "Host": f"127.0.0.1:{http_port}",
            "Servers": dicomweb_servers or {},
        },
        "ConcurrentJobs": 2,
        "SaveJobs": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {title.lower(): [title, host, port] for title, (host, port) in peers.items()},
        "DicomThreadsCount": max(4, os.cpu_count() or 4),
        "UnknownSopClassAccepted": False,
        "OverwriteInstances": False,
        "StableAge": 60,
        "HttpTimeout": 60,
        "HttpCompressionEnabled": http_compression,
        "TcpNoDelay": True,
        "KeepAlive": True,
    }


class Orthanc:
    """One Orthanc process: `start()` waits until both its HTTP API and its DICOM port answer; `stop()` ends it
    by PID. Its log is `folder/orthanc.log`."""

    def __init__(
        self,
        folder: Path,
        *,
        aet: str = "ORTHANC",
        peers: dict[str, tuple[str, int]] | None = None,
        users: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        dicomweb_servers: dict[str, dict[str, Any]] | None = None,
        http_compression: bool = True,
    ) -> None:
        self.folder = folder
        self.http_compression = http_compression
        self.aet = aet
        self.peers = peers or {}
        self.users = users
        self.env = env
        self.dicomweb_servers = dicomweb_servers
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> Orthanc:
        ensure_installed()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        cfg = config(
            self.folder,
            aet=self.aet,
            dicom_port=self.dicom_port,
            http_port=self.http_port,
            peers=self.peers,
            users=self.users,
            dicomweb_servers=self.dicomweb_servers,
            http_compression=self.http_compression,
        )
        path.write_text(json.dumps(cfg, indent=2))
        with open(self.folder / "orthanc.log", "wb") as log:
            self.proc = subprocess.Popen(
                [BINARY, str(path)], stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.folder
            )
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"Orthanc exited ({self.proc.returncode}); see {self.folder / 'orthanc.log'}")
            if self._http_ready() and self._port_open(self.dicom_port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"Orthanc did not start within {timeout:.0f} s")
            time.sleep(0.1)

    def _http_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.request("/system"), timeout=2) as rsp:
                return bool(rsp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    @staticmethod
    def _port_open(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def request(self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        """A urllib request to the REST API, with basic authentication when users are configured."""
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        return req

    def statistics(self) -> dict[str, Any]:
        """GET /statistics (counts of patients, studies, instances, disk size)."""
        with urllib.request.urlopen(self.request("/statistics"), timeout=10) as rsp:
            return dict(json.load(rsp))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
