"""Durability: a server killed (SIGKILL) in the middle of a STOW leaves no index row without bytes; its spooled
part is collected after the grace period; everything acknowledged before the kill is intact after restart, over
STOW-RS and C-STORE at once, and every stored instance has its audit record in a chain that verifies."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode

from tests.conftest import app_dsn, free_port
from tests.support.factory import ct, multipart, part10, stow_headers
from tests.support.procs import serve


def slow_body(head: bytes, total: int, started: threading.Event):
    yield b"--b\r\nContent-Type: application/dicom\r\n\r\n" + head
    sent = 0
    while sent < total:
        yield b"\0" * 65536
        sent += 65536
        if sent > 8 * 65536:
            started.set()
            time.sleep(0.01)


def index_state(dsn: str) -> list[tuple[str, str]]:
    async def run() -> list[tuple[str, str]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT sop_instance_uid, blob_key FROM instances")
            return [(r["sop_instance_uid"], r["blob_key"]) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def test_kill_during_upload(dsn: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    acknowledged = ct()
    big = ct(rows=512, columns=512, frames=1)
    big.NumberOfFrames = 400
    del big.PixelData
    import io
    import struct

    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, big, enforce_file_format=True)
    total = 512 * 512 * 2 * 400
    head = buf.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, total)

    with serve(dsn, data) as srv:
        resp = httpx.post(
            srv.url + "/dicom-web/studies",
            content=multipart([part10(acknowledged)]),
            headers=stow_headers() | srv.headers,
        )
        assert resp.status_code == 200
        started = threading.Event()
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                httpx.post(
                    srv.url + "/dicom-web/studies",
                    content=slow_body(head, total, started),
                    headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'} | srv.headers,
                    timeout=60,
                )
            except BaseException as exc:  # the connection dies with the server
                errors.append(exc)

        thread = threading.Thread(target=upload)
        thread.start()
        assert started.wait(30)
        spool = data / "blobs" / ".spool"
        deadline = time.monotonic() + 30
        while not list(spool.glob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.01)  # kill only once the server is writing the part
        srv.kill()
        thread.join(60)
        assert errors, "the upload should have been cut off"

    assert list(spool.glob("*.part")), "the interrupted part should still be in the spool"
    rows = index_state(dsn)
    assert [uid for uid, _ in rows] == [acknowledged.SOPInstanceUID]
    for _uid, key in rows:
        assert (data / "blobs" / key).is_file(), "an index row names missing bytes"

    # After a restart the collector (grace 0 here) removes the stale spool file; acknowledged data is intact.
    with serve(dsn, data, HOUNSFIELD_GC_GRACE_SECONDS="0", HOUNSFIELD_GC_INTERVAL_SECONDS="1") as srv:
        deadline = time.monotonic() + 30
        while list(spool.glob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not list(spool.glob("*.part"))
        again = httpx.post(
            srv.url + "/dicom-web/studies",
            content=multipart([part10(acknowledged)]),
            headers=stow_headers() | srv.headers,
        )
        assert again.status_code == 200  # identical bytes: idempotent
    assert index_state(dsn) == rows


# --- kill -9 during concurrent STOW-RS and C-STORE --------------------------------------------------------------

ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class Acknowledged:
    """What the server said it stored: SOP Instance UID -> (study, series, the bytes it must give back)."""

    stow: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    cstore: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return len(self.stow) + len(self.cstore)


def _stow_client(url: str, headers: dict[str, str], client: int, acked: Acknowledged, stop: threading.Event) -> None:
    """STOW-RS requests of four instances each until the server dies; the instances a 200/202 lists in its
    ReferencedSOPSequence are acknowledged."""
    with httpx.Client(timeout=30) as http:
        for request in itertools.count():
            if stop.is_set():
                return
            batch = [ct(seed=request * 4 + k, PatientID=f"K{client}") for k in range(4)]
            sent = {ds.SOPInstanceUID: (ds.StudyInstanceUID, ds.SeriesInstanceUID, part10(ds)) for ds in batch}
            try:
                response = http.post(url, content=multipart([b for _, _, b in sent.values()]), headers=headers)
            except httpx.TransportError:
                return  # the server died under this request: nothing of it was acknowledged
            if response.status_code not in (200, 202):
                continue
            for item in response.json().get("00081199", {}).get("Value", []):
                uid = item["00081155"]["Value"][0]
                with acked.lock:
                    acked.stow[uid] = sent[uid]


def _cstore_client(port: int, acked: Acknowledged, stop: threading.Event) -> None:
    """C-STOREs on one association until the server dies; status 0000 or Bxxx acknowledges the instance."""
    ae = AE(ae_title="CT1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    contexts = [build_context(CTImageStorage, ExplicitVRLittleEndian)]
    assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title="HOUNSFIELD")
    if not assoc.is_established:
        return
    # pynetdicom leaves its socket open when the peer is gone (its shutdown() raises before close()): closed here
    sock = assoc.dul.socket.socket
    try:
        for n in itertools.count():
            if stop.is_set() or not assoc.is_established:
                return
            ds = ct(seed=10_000 + n, PatientID="KD")
            raw = encode(ds, False, True)  # what goes over the wire, and what the stored file must end with
            assert raw is not None
            try:
                rsp = assoc.send_c_store(ds)
            except Exception:
                return
            status = int(getattr(rsp, "Status", -1)) if rsp else -1
            if status == 0 or 0xB000 <= status <= 0xBFFF:
                with acked.lock:
                    acked.cstore[ds.SOPInstanceUID] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, raw)
    finally:
        if assoc.is_established:
            assoc.abort()
        else:
            assoc.kill()
        sock.close()


def _audited_instances(dsn: str) -> dict[str, list[dict[str, Any]]]:
    """The Instances Transferred records of stored instances (outcome 0) in the chain, by SOP Instance UID."""

    async def run() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            return [r["record"] for r in await conn.fetch("SELECT record::text AS record FROM audit_log ORDER BY seq")]
        finally:
            await conn.close()

    out: dict[str, list[dict[str, Any]]] = {}
    for text in asyncio.run(run()):
        record = json.loads(text)
        uid = record.get("entity", {}).get("instance_uid")
        if uid and record["type"]["code"] == "110104" and record["outcome"] == "0":
            out.setdefault(uid, []).append(record)
    return out


def _audit_cli(dsn: str, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": app_dsn(dsn), "HOUNSFIELD_DATABASE_OWNER_URL": dsn}
    command = [sys.executable, "-m", "server.cli", "audit", *args, "--data", str(data)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_kill_during_concurrent_stow_and_cstore(dsn: str, tmp_path: Path) -> None:
    """kill -9 while three STOW-RS clients and a C-STORE association store: after a restart on the same data
    folder every acknowledged instance is retrievable byte for byte, no index row names missing bytes, every
    stored instance has its audit record (written in its ingest transaction), and the chain verifies."""
    data = tmp_path / "data"
    port = free_port()
    env = {"HOUNSFIELD_DIMSE_PORT": str(port), "HOUNSFIELD_DIMSE_PEERS": "CT1=admin", "HOUNSFIELD_INFERENCE": "false"}
    acked = Acknowledged()
    stop = threading.Event()
    with serve(dsn, data, **env) as srv:
        url = srv.url + "/dicom-web/studies"
        threads = [
            threading.Thread(target=_stow_client, args=(url, stow_headers() | srv.headers, n, acked, stop))
            for n in range(3)
        ]
        threads.append(threading.Thread(target=_cstore_client, args=(port, acked, stop)))
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while acked.count() < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.kill()  # in the middle of the load
        stop.set()
        for thread in threads:
            thread.join(60)
        counts = (len(acked.stow), len(acked.cstore))
        assert all(counts), f"both channels should have stored something before the kill: {counts}"

    rows = index_state(dsn)
    for _uid, key in rows:
        assert (data / "blobs" / key).is_file(), "an index row names missing bytes"
    assert set(acked.stow) <= {uid for uid, _ in rows}  # read-after-write; C-STOREs may wait in the intake
    print(f"kill -9 under load: {counts[0]} STOW-RS + {counts[1]} C-STORE acknowledged, {len(rows)} indexed")

    with serve(dsn, data, **env) as srv, httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http:
        rows = index_state(dsn)  # the intake was replayed before the server became ready
        for _uid, key in rows:
            assert (data / "blobs" / key).is_file(), "an index row names missing bytes"
        stored = {uid for uid, _ in rows}
        assert set(acked.stow) | set(acked.cstore) <= stored
        for uid, (study, series, sent) in [*acked.stow.items(), *acked.cstore.items()]:
            response = http.get(f"/dicom-web/studies/{study}/series/{series}/instances/{uid}", headers={"Accept": ANY})
            assert response.status_code == 200, uid
            boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
            body = response.content.split(f"\r\n--{boundary}".encode())[0].split(b"\r\n\r\n", 1)[1]
            if uid in acked.stow:
                assert body == sent, f"STOW-RS instance {uid} differs"
            else:
                assert body.endswith(sent), f"C-STORE instance {uid} differs"  # its data set, after our meta

    assert _audit_cli(dsn, data, "checkpoint").returncode == 0  # chains what the kill left deferred, signs it
    verified = _audit_cli(dsn, data, "verify", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"] is True and json.loads(verified.stdout)["pending"] == 0
    audited = _audited_instances(dsn)
    assert stored <= set(audited), f"{len(stored - set(audited))} stored instances have no audit record"
    assert all(len(audited[uid]) == 1 for uid in stored), "one record per stored instance"
