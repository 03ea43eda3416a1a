"""Helpers for the DIMSE tests: a server with its AE on a free port and known peers, dcmtk runs, audit reads."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from dicomweb.dimse.config import TlsConfig, dimse_config
from tests.conftest import free_port

TITLE = "HOUNSFIELD"
PEERS = "CT1=technologist,RAD=radiologist,REF=referring:dr-who,ADMIN=admin,AUD=auditor"


def require_dcmtk() -> None:
    """dcmtk is a test dependency (`make test` installs it): missing is an error, never a skip."""
    missing = [t for t in ("echoscu", "storescu", "findscu", "movescu", "getscu", "storescp") if not shutil.which(t)]
    if missing:
        pytest.fail(f"dcmtk tools missing: {', '.join(missing)} (apt-get install dcmtk, or `make test`)")


def start(
    make_server: Any,
    *,
    destinations: str = "",
    routes: str = "",
    peers: str = PEERS,
    tls: TlsConfig | None = None,
    **overrides: Any,
) -> Any:
    port = free_port()
    return make_server(
        dimse_enabled=True,
        dimse_port=port,
        dimse=dimse_config(peers, destinations, routes, tls),
        dimse_timeout_seconds=10,
        **overrides,
    )


def dimse_port(server: Any) -> int:
    return int(server.settings.dimse_port)


def dcmtk(
    tool: str, *args: str | Path, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def audit_records(dsn: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT record::text AS record FROM audit_log ORDER BY seq")
        finally:
            await conn.close()
        return [json.loads(r["record"]) for r in rows]

    return asyncio.run(read())


def dimse_audit(dsn: str, method: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in audit_records(dsn)
        if r.get("channel") == "dimse" and (method is None or r.get("http", {}).get("method") == method)
    ]


def send_raw(assoc: Any, sop_class: str, sop_instance: str, raw: bytes, message_id: int = 7) -> Any:
    """A C-STORE-RQ whose data set is exactly `raw`, sent on the association's context for `sop_class` (pynetdicom's
    send_c_store would decode and re-encode it). Returns the C-STORE-RSP primitive, or None when none came."""
    import io

    from pynetdicom.dimse_primitives import C_STORE

    req = C_STORE()
    req.MessageID, req.Priority = message_id, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_instance
    req.DataSet = io.BytesIO(raw)
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class)
    assoc._reactor_checkpoint.clear()  # as send_c_store does: the reactor leaves the response to us
    try:
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return rsp


def indexed(server: Any, seconds: float = 10) -> None:
    """Wait until every C-STORE the server acknowledged is indexed (`GET /dimse/intake`: nothing pending): with
    early acknowledgement, an instance becomes visible to C-FIND and QIDO-RS shortly after its answer."""
    deadline = time.monotonic() + seconds
    while True:
        status = httpx.get(f"{server.url}/dimse/intake", headers=server.headers, timeout=10).json()
        if status["pending"] == 0:
            return
        assert time.monotonic() < deadline, f"acknowledged instances still not indexed: {status}"
        time.sleep(0.02)
