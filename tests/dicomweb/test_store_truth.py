"""Every instance's outcome is the truth, over STOW-RS and C-STORE: a stored instance's audit record (DICOM
Instances Transferred) commits with it, so it is stored and recorded or neither; a response never reports as
failed an instance that was stored, whether the audit trail fails after the ingest, the client goes away
mid-upload, or the server shuts down before the body arrived."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context

from tests.support.dimse_util import TITLE, audit_records, dimse_port, start
from tests.support.factory import ct, multipart, part10, stow_headers
from tests.support.procs import serve

FAILED_SOP = "00081198"
REFERENCED_SOP = "00081199"
FAILURE_REASON = "00081197"
ERROR_COMMENT = "00000902"
SOP_INSTANCE = "00081155"
OUT_OF_RESOURCES = 0xA700


def sql(dsn: str, *statements: str) -> list[Any]:
    """Run statements as the database owner; the rows of the last."""

    async def run() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            rows: list[Any] = []
            for statement in statements:
                if statement.lstrip().startswith("SELECT"):
                    rows = await conn.fetch(statement)
                else:
                    await conn.execute(statement)  # several commands at once
            return rows
        finally:
            await conn.close()

    return asyncio.run(run())


def stored_uids(dsn: str) -> set[str]:
    return {r["sop_instance_uid"] for r in sql(dsn, "SELECT sop_instance_uid FROM instances")}


def instance_records(dsn: str, uid: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(dsn) if r.get("entity", {}).get("instance_uid") == uid]


def associate(node: Any) -> Any:
    ae = AE(ae_title="CT1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    contexts = [build_context(CTImageStorage, ExplicitVRLittleEndian)]
    assoc = ae.associate("127.0.0.1", dimse_port(node), contexts=contexts, ae_title=TITLE)
    assert assoc.is_established
    return assoc


def wait_for(check: Any, seconds: float = 10) -> Any:
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


def test_a_stored_instance_is_recorded_with_it(make_server: Any) -> None:
    node = start(make_server)
    over_http, over_dimse = ct(PatientID="P1"), ct(PatientID="P2")
    answer = httpx.post(
        node.url + "/dicom-web/studies", content=multipart([part10(over_http)]), headers=stow_headers() | node.headers
    )
    assert answer.status_code == 200
    assoc = associate(node)
    try:
        assert int(assoc.send_c_store(over_dimse).Status) == 0
    finally:
        assoc.release()

    [record] = instance_records(node.dsn, over_http.SOPInstanceUID)
    assert record["type"]["code"] == "110104" and record["action"] == "C" and record["outcome"] == "0"
    assert record["agent"]["sub"] == "test-admin" and record["entity"]["patient_id"] == "P1"
    assert record["http"]["method"] == "POST" and "status" not in record["http"]  # the request's record has it
    request = [r for r in audit_records(node.dsn) if r.get("http", {}).get("status") == 200 and r["action"] == "C"]
    assert len(request) == 1 and request[0]["type"]["code"] == "rest"
    [record] = wait_for(lambda: instance_records(node.dsn, over_dimse.SOPInstanceUID))
    assert record["type"]["code"] == "110104" and record["channel"] == "dimse" and record["outcome"] == "0"
    assert record["http"] == {"method": "C-STORE", "status": 0} and record["agent"]["ae_title"] == "CT1"
    assert sql(node.dsn, "SELECT count(*) AS n FROM audit_pending")[0]["n"] == 0  # all chained


def test_an_instance_whose_record_cannot_be_written_is_not_stored(make_server: Any) -> None:
    """With the store before the answer; acknowledged early, such a C-STORE is stored once the trail is back
    (test_cstore_intake.py)."""
    node = start(make_server, dimse_early_ack=False)
    assoc = associate(node)
    sql(node.dsn, "REVOKE EXECUTE ON FUNCTION audit_defer(text[]) FROM hounsfield_app")
    try:
        datasets = [ct(PatientID="P1"), ct(PatientID="P1")]
        answer = httpx.post(
            node.url + "/dicom-web/studies",
            content=multipart([part10(ds) for ds in datasets]),
            headers=stow_headers() | node.headers,
        )
        assert answer.status_code == 409, answer.text
        failed = answer.json()[FAILED_SOP]["Value"]
        assert [item[FAILURE_REASON]["Value"] for item in failed] == [[OUT_OF_RESOURCES]] * 2
        assert all("audit trail" in item[ERROR_COMMENT]["Value"][0] for item in failed)
        over_dimse = ct(PatientID="P2")
        rsp = assoc.send_c_store(over_dimse)
        assert int(rsp.Status) == OUT_OF_RESOURCES and "audit trail" in rsp.ErrorComment
    finally:
        assoc.release()
    assert stored_uids(node.dsn) == set()
    posts = [r for r in audit_records(node.dsn) if r.get("http", {}).get("method") == "POST"]
    assert [r["http"]["status"] for r in posts] == [409]
    [refused] = instance_records(node.dsn, over_dimse.SOPInstanceUID)
    assert refused["outcome"] == "8" and refused["http"]["status"] == OUT_OF_RESOURCES


FAIL_APPENDS = """
CREATE FUNCTION test_fail_append() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is unavailable (test)';
END $$;
CREATE TRIGGER test_fail_append BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION test_fail_append();
"""


def test_an_audit_trail_failing_after_the_ingest_does_not_hide_stored_instances(make_server: Any) -> None:
    """The records appended after the ingest (the request's own, the chain) cannot be written: the stored
    instances are reported stored (not 503, not A700); reads still fail closed; once the trail is back, the
    instances' records, committed with them, enter the chain."""
    node = start(make_server)
    assoc = associate(node)
    sql(node.dsn, FAIL_APPENDS)
    over_dimse = ct(PatientID="P2")
    try:
        assert int(assoc.send_c_store(over_dimse).Status) == 0
    finally:
        assoc.abort()
    datasets = [ct(PatientID="P1"), ct(PatientID="P1")]
    answer = httpx.post(
        node.url + "/dicom-web/studies",
        content=multipart([part10(ds) for ds in datasets]),
        headers=stow_headers() | node.headers,
    )
    assert answer.status_code == 200, answer.text
    listed = [item[SOP_INSTANCE]["Value"][0] for item in answer.json()[REFERENCED_SOP]["Value"]]
    assert listed == [ds.SOPInstanceUID for ds in datasets]
    assert stored_uids(node.dsn) == {ds.SOPInstanceUID for ds in [*datasets, over_dimse]}
    assert httpx.get(node.url + "/dicom-web/studies", headers=node.headers).status_code == 503  # fail closed

    sql(node.dsn, "DROP TRIGGER test_fail_append ON audit_log")
    assert httpx.get(node.url + "/dicom-web/studies", headers=node.headers).status_code == 200
    for ds in [*datasets, over_dimse]:
        [record] = instance_records(node.dsn, ds.SOPInstanceUID)
        assert record["type"]["code"] == "110104" and record["outcome"] == "0"


def _request_head(path: str, headers: dict[str, str], length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _open_upload(url: str, headers: dict[str, str], datasets: list[Dataset]) -> socket.socket:
    """A STOW-RS request whose Content-Length promises far more than is sent: the complete parts of `datasets`
    and the start of one more, then nothing."""
    body = multipart([part10(ds) for ds in datasets]).removesuffix(b"--hfboundary--\r\n")
    body += b"--hfboundary\r\nContent-Type: application/dicom\r\n\r\n" + part10(ct())[:300]
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(_request_head("/dicom-web/studies", stow_headers() | headers, len(body) + 1_000_000) + body)
    return sock


def test_a_client_gone_mid_upload_is_recorded_with_what_was_stored(make_server: Any) -> None:
    node = start(make_server)
    datasets = [ct(PatientID="P1"), ct(PatientID="P1")]
    sock = _open_upload(node.url, node.headers, datasets)
    wait_for(lambda: len(stored_uids(node.dsn)) == 2)
    sock.close()
    wait_for(lambda: [r for r in audit_records(node.dsn) if r.get("http", {}).get("method") == "POST"])
    [request] = [r for r in audit_records(node.dsn) if r.get("http", {}).get("status")]
    assert request["http"]["status"] == 202 and request["outcome"] == "0"  # not a 500 hiding two stored instances
    assert stored_uids(node.dsn) == {ds.SOPInstanceUID for ds in datasets}


def test_shutdown_mid_upload_answers_what_was_stored(dsn: str, tmp_path: Path) -> None:
    """SIGTERM while a STOW-RS body is still arriving: uvicorn's graceful shutdown waits for it (10 s), then the
    request is cut off and answers 202 with the instances it stored and an A700 failure for the rest."""
    datasets = [ct(PatientID="P1"), ct(PatientID="P1")]
    with serve(dsn, tmp_path / "data", HOUNSFIELD_INFERENCE="false") as srv:
        sock = _open_upload(srv.url, srv.headers, datasets)
        try:
            wait_for(lambda: len(stored_uids(dsn)) == 2)
            srv.proc.send_signal(signal.SIGTERM)
            sock.settimeout(60)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        finally:
            sock.close()
        srv.proc.wait(60)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202"), received[:300]
    answer = json.loads(body)
    assert [item[SOP_INSTANCE]["Value"][0] for item in answer[REFERENCED_SOP]["Value"]] == [
        ds.SOPInstanceUID for ds in datasets
    ]
    [cut] = answer[FAILED_SOP]["Value"]
    assert cut[FAILURE_REASON]["Value"] == [OUT_OF_RESOURCES] and "shutting down" in cut[ERROR_COMMENT]["Value"][0]
    assert stored_uids(dsn) == {ds.SOPInstanceUID for ds in datasets}
    [request] = [r for r in audit_records(dsn) if r.get("http", {}).get("method") == "POST" and r["http"].get("status")]
    assert request["http"]["status"] == 202
