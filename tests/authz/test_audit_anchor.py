"""Anchor sinks of the signed audit checkpoints (authz/auditanchor.py), each against a real part: the append-only
file, moto's S3 server with Object Lock, a local HTTP witness, a local syslog collector over TCP; a failed write
is retried by the next checkpoint run and shows in /readyz meanwhile."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import botocore.exceptions
import httpx
import pytest

from authz import keys
from authz.audit import AuditTrail, checkpoint_handler, checkpoint_message, key_signer, key_verifier
from authz.auditanchor import AuditAnchors, FileAnchor, S3Anchor, open_anchors, parse_entry
from authz.auditsyslog import SyslogForwarder
from server.platform import db, jobs
from server.settings import Settings
from tests.authz.test_audit_tamper import as_owner, record, rewrite, verify_cli
from tests.conftest import LiveServer, app_dsn, free_port
from tests.support.s3util import ACCESS_KEY, SECRET_KEY, Moto, s3_settings

JOB = jobs.Job(id=0, kind="audit.checkpoint", payload={}, attempts=1, max_attempts=1)


async def _run_checkpoints(dsn: str, data: Path, anchors: AuditAnchors, batches: list[int]) -> None:
    """Append each batch of records (as the app role), then run the checkpoint job once."""
    key = keys.load_or_create(data)
    pool = await db.create_pool(app_dsn(dsn), 1, 2)
    try:
        handler = checkpoint_handler(
            pool,
            key_signer(key.private_pem, key.kid),
            300,
            anchors=anchors,
            verifier=key_verifier({key.kid: key.public_jwk}),
        )
        trail = AuditTrail(pool)
        done = 0
        for size in batches:
            if size:
                await trail.append_many([record(n) for n in range(done + 1, done + size + 1)])
                done += size
            await handler(JOB)
    finally:
        await anchors.close()  # clients belong to this event loop; the failing state stays
        await pool.close()


def _verifies(data: Path, checkpoint: Any) -> bool:
    key = keys.load_or_create(data)
    message = checkpoint_message(checkpoint.seq, checkpoint.hash, checkpoint.signed_at)
    return key_verifier({key.kid: key.public_jwk})(message, checkpoint.signature, checkpoint.key_id)


# --- the file ------------------------------------------------------------------------------------------------


def test_file_anchor_is_private_appended_and_survives_a_torn_line(dsn: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings.from_env({}).with_overrides(data_dir=data)
    path = settings.audit_anchor_path
    assert path == data / "audit" / "anchors.jsonl"
    asyncio.run(_run_checkpoints(dsn, data, open_anchors(settings), [5, 0, 3]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    entries = [parse_entry(line) for line in path.read_text().splitlines()]
    assert [e.seq for e in entries] == [5, 8] and all(_verifies(data, e) for e in entries)

    with open(path, "ab") as fh:  # a crash mid-write leaves half a line
        fh.write(b'{"format":"hounsfield-audit-checkpoint/1","seq":9')
    asyncio.run(_run_checkpoints(dsn, data, open_anchors(settings), [0, 2]))
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and parse_entry(lines[3]).seq == 10  # the new entry on a line of its own
    done = verify_cli(dsn, data)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "anchors: 3 checkpoints (newest at seq 10)" in done.stdout and "WARNING: ignored" in done.stdout

    async def bookkeeping() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [
                (r["sink"], r["seq"]) for r in await conn.fetch("SELECT sink, seq FROM audit_anchored ORDER BY seq")
            ]
        finally:
            await conn.close()

    assert asyncio.run(bookkeeping()) == [(f"file:{path.resolve()}", s) for s in (5, 8, 10)]


def test_an_anchor_file_that_cannot_be_written_fails_visibly_and_is_retried(dsn: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (tmp_path / "mnt").write_text("not a folder")  # e.g. the remote mount is not there
    anchors = AuditAnchors([FileAnchor(tmp_path / "mnt" / "anchors.jsonl")])
    asyncio.run(_run_checkpoints(dsn, data, anchors, [3]))
    assert anchors.status() == "failing: file" and "exists" in next(iter(anchors.failing.values()))
    (tmp_path / "mnt").unlink()
    asyncio.run(_run_checkpoints(dsn, data, anchors, [0]))
    assert anchors.status() is None and len((tmp_path / "mnt" / "anchors.jsonl").read_text().splitlines()) == 1


# --- S3 Object Lock ------------------------------------------------------------------------------------------


def _locked_bucket(moto: Moto) -> str:
    name = f"hounsfield-anchors-{uuid.uuid4().hex[:8]}"
    moto.client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def test_s3_anchor_writes_compliance_locked_objects_that_verify_reads_in_every_version(
    dsn: str, tmp_path: Path, moto: Moto
) -> None:
    data = tmp_path / "data"
    bucket = _locked_bucket(moto)
    anchors = AuditAnchors([S3Anchor(s3_settings(moto, bucket, "trail/anchors"), retention_days=30)])
    asyncio.run(_run_checkpoints(dsn, data, anchors, [4, 3]))
    asyncio.run(anchors.close())
    assert not anchors.failing
    listed = moto.client.list_objects_v2(Bucket=bucket, Prefix="trail/anchors/")["Contents"]
    assert [o["Key"] for o in listed] == [f"trail/anchors/{seq:020d}.json" for seq in (4, 7)]
    head = moto.client.head_object(Bucket=bucket, Key=listed[1]["Key"])
    assert head["ObjectLockMode"] == "COMPLIANCE"
    until = head["ObjectLockRetainUntilDate"]
    assert dt.timedelta(days=29) < until - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)

    # The database's owner, also holding S3 credentials: a locked version cannot be deleted (moto enforces
    # COMPLIANCE on DeleteObject with a VersionId); a plain delete only adds a delete marker, an overwrite a version.
    # moto does not enforce that COMPLIANCE retention can be neither shortened nor turned into GOVERNANCE
    # (PutObjectRetention is accepted): that part of the guarantee is S3's and is not exercised here.
    version = head["VersionId"]
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        moto.client.delete_object(Bucket=bucket, Key=listed[1]["Key"], VersionId=version)
    moto.client.delete_object(Bucket=bucket, Key=listed[1]["Key"])
    moto.client.put_object(Bucket=bucket, Key=listed[0]["Key"], Body=b"{}")
    asyncio.run(rewrite(dsn, lambda rows: rows[1:]))  # drop the first record, re-hash, delete the checkpoints
    env = dict(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        HOUNSFIELD_AUDIT_ANCHOR_S3_ENDPOINT=moto.endpoint,
        HOUNSFIELD_AUDIT_ANCHOR_FILE="off",
    )
    done = verify_cli(dsn, data, "--json", "--anchors", f"s3://{bucket}/trail/anchors", **env)
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert {(p["seq"], p["kind"]) for p in result["problems"]} == {
        (4, "anchor_mismatch"),
        (4, "missing_checkpoint"),
        (7, "deleted"),
    }
    assert result["anchored"] == 2 and len(result["unreadable_anchors"]) == 1  # the overwrite: not a checkpoint


def test_s3_anchor_failures_are_visible_and_retried(dsn: str, tmp_path: Path, moto: Moto) -> None:
    data = tmp_path / "data"
    unlocked = moto.new_bucket()
    missing = f"hounsfield-later-{os.getpid()}-{time.monotonic_ns()}"
    sinks = [S3Anchor(s3_settings(moto, unlocked)), S3Anchor(s3_settings(moto, missing, "a"))]
    anchors = AuditAnchors(sinks)
    asyncio.run(_run_checkpoints(dsn, data, anchors, [2]))
    assert anchors.status() == "failing: s3"
    assert (
        "missing ObjectLockConfiguration" in anchors.failing[f"s3://{unlocked}/"]
    )  # no Object Lock on the bucket: refused
    assert "NoSuchBucket" in anchors.failing[f"s3://{missing}/a/"]
    assert "testing-secret" not in json.dumps(anchors.failing)
    moto.client.create_bucket(Bucket=missing, ObjectLockEnabledForBucket=True)
    asyncio.run(_run_checkpoints(dsn, data, anchors, [3]))  # the next run writes what the first missed, in order
    asyncio.run(anchors.close())
    assert list(anchors.failing) == [f"s3://{unlocked}/"]
    keys_written = [o["Key"] for o in moto.client.list_objects_v2(Bucket=missing)["Contents"]]
    assert keys_written == [f"a/{seq:020d}.json" for seq in (2, 5)]


# --- syslog and a witness ------------------------------------------------------------------------------------


class _Witness(BaseHTTPRequestHandler):
    received: list[bytes] = []
    fail_first = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if _Witness.fail_first > 0:
            _Witness.fail_first -= 1
            self.send_response(503)
        else:
            _Witness.received.append(body)
            self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def witness() -> Iterator[str]:
    _Witness.received, _Witness.fail_first = [], 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Witness)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/witness/hounsfield"
    server.shutdown()
    server.server_close()


def test_witness_and_syslog_receive_each_checkpoint(dsn: str, tmp_path: Path, witness: str) -> None:
    data = tmp_path / "data"
    collector = socket.socket()
    collector.bind(("127.0.0.1", 0))
    collector.listen(1)
    syslog_url = f"tcp://127.0.0.1:{collector.getsockname()[1]}"
    settings = Settings.from_env({}).with_overrides(
        data_dir=data, audit_anchor_file="off", audit_anchor_witness=(witness,), audit_syslog=syslog_url
    )

    async def main() -> None:
        forwarder = SyslogForwarder(syslog_url)
        anchors = open_anchors(settings, forwarder)
        assert [s.name.partition(":")[0] for s in anchors.sinks] == ["syslog", "witness"]
        await _run_checkpoints(dsn, data, anchors, [3])
        assert anchors.status() == "failing: witness"  # the witness answered 503
        assert witness not in json.dumps(anchors.failing)  # its URL may hold a secret: not logged
        await _run_checkpoints(dsn, data, anchors, [2])
        assert anchors.status() is None
        await forwarder.close()
        await anchors.close()

    asyncio.run(main())
    assert [parse_entry(body).seq for body in _Witness.received] == [3, 5]
    conn, _ = collector.accept()
    conn.settimeout(10)
    received = b""
    while received.count(b"HF-CHECKPOINT") < 2:
        chunk = conn.recv(65536)
        assert chunk, received
        received += chunk
    conn.close()
    collector.close()
    frames = received.split(b"\xef\xbb\xbf")[1:]
    seqs = [json.loads(frame[: frame.rindex(b"}") + 1])["seq"] for frame in frames]
    assert seqs == [3, 5] and b"<85>1 " in received  # security/authorization, notice


# --- the live server -----------------------------------------------------------------------------------------


def test_server_anchors_its_checkpoints_and_readyz_names_a_failing_sink(make_server: Any) -> None:
    closed = f"http://127.0.0.1:{free_port()}/witness"
    server: LiveServer = make_server(audit_checkpoint_seconds=1, audit_anchor_witness=(closed,))
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    httpx.get(server.dicomweb + "/studies", headers=server.headers)  # audited: something to checkpoint
    deadline = time.monotonic() + 30
    while True:
        ready = httpx.get(server.url + "/readyz")
        if "audit_anchors" in ready.json():
            break
        assert time.monotonic() < deadline, "the failing witness never showed in /readyz"
        time.sleep(0.2)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "audit_anchors": "failing: witness"}
    anchor_file = server.settings.data_dir / "audit" / "anchors.jsonl"
    assert anchor_file.is_file()  # the file sink took the checkpoint the witness missed
    verified = httpx.get(server.url + "/fhir/AuditEvent/$verify", headers=server.headers, timeout=30).json()
    assert verified["ok"] and verified["anchored"] >= 1, verified
    asyncio.run(as_owner(server.dsn, "DELETE FROM audit_checkpoints"))
    verified = httpx.get(server.url + "/fhir/AuditEvent/$verify", headers=server.headers, timeout=30).json()
    assert not verified["ok"] and {p["kind"] for p in verified["problems"]} == {"missing_checkpoint"}


# --- settings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"HOUNSFIELD_AUDIT_ANCHOR_S3": "https://bucket/prefix"}, "HOUNSFIELD_AUDIT_ANCHOR_S3"),
        ({"HOUNSFIELD_AUDIT_ANCHOR_WITNESS": "ftp://witness.example/x"}, "HOUNSFIELD_AUDIT_ANCHOR_WITNESS"),
        ({"HOUNSFIELD_AUDIT_ANCHOR_RETENTION_DAYS": "0"}, "HOUNSFIELD_AUDIT_ANCHOR_RETENTION_DAYS"),
        ({"HOUNSFIELD_DATABASE_OWNER_URL": "postgresql://owner@db/hf"}, "HOUNSFIELD_DATABASE_OWNER_URL"),
        (
            {"DATABASE_URL": "postgresql://app@db/hf", "HOUNSFIELD_DATABASE_OWNER_URL": "mysql://db/hf"},
            "HOUNSFIELD_DATABASE_OWNER_URL",
        ),
        ({"HOUNSFIELD_DATABASE_ALLOW_PRIVILEGED": "maybe"}, "HOUNSFIELD_DATABASE_ALLOW_PRIVILEGED"),
    ],
)
def test_bad_anchor_and_database_settings_name_their_variable(env: dict[str, str], variable: str) -> None:
    from server.settings import SettingsError

    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_anchor_settings() -> None:
    default = Settings.from_env({"HOUNSFIELD_DATA": "/srv/hf"})
    assert default.audit_anchor_path == Path("/srv/hf/audit/anchors.jsonl") and default.audit_anchor_s3 is None
    assert default.with_overrides(data_dir=Path("/x")).audit_anchor_path == Path("/x/audit/anchors.jsonl")
    assert Settings.from_env({"HOUNSFIELD_AUDIT_ANCHOR_FILE": "OFF"}).audit_anchor_path is None
    s = Settings.from_env(
        {
            "HOUNSFIELD_AUDIT_ANCHOR_FILE": "/mnt/worm/hf.jsonl",
            "HOUNSFIELD_AUDIT_ANCHOR_S3": "s3://trail/hf/anchors/",
            "HOUNSFIELD_S3_ENDPOINT": "https://minio.example",
            "HOUNSFIELD_AUDIT_ANCHOR_S3_ENDPOINT": "https://s3.other.example",
            "HOUNSFIELD_AUDIT_ANCHOR_WITNESS": "https://a.example/w,https://b.example/w",
            "DATABASE_URL": "postgresql://web@db/hf",
            "HOUNSFIELD_DATABASE_OWNER_URL": "postgresql://owner@db/hf",
        }
    )
    assert s.audit_anchor_path == Path("/mnt/worm/hf.jsonl")
    assert s.audit_anchor_s3 is not None and (s.audit_anchor_s3.bucket, s.audit_anchor_s3.prefix) == (
        "trail",
        "hf/anchors",
    )
    assert s.audit_anchor_s3.endpoint_url == "https://s3.other.example"
    assert len(s.audit_anchor_witness) == 2 and s.database_owner_url == "postgresql://owner@db/hf"
    names = [sink.name for sink in open_anchors(s).sinks]
    assert names[:2] == ["file:/mnt/worm/hf.jsonl", "s3://trail/hf/anchors/"]
    assert names[2].startswith("witness:a.example#") and "/w" not in names[2]
