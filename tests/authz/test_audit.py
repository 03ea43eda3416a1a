"""The tamper-evident audit trail on the real database: one gapless chain under concurrent appends, the append-only
triggers, signed checkpoints, and `verify` naming what an attacker with database access changed (modified,
deleted, reordered, inserted, re-hashed, forged checkpoints); the `hounsfield audit` command; AuditEvents that
validate as FHIR R4."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import itertools
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from authz import keys
from authz.audit import (
    CHECKPOINT_JOB,
    GENESIS,
    AuditRecord,
    AuditTrail,
    canonical_json,
    chain_hash,
    checkpoint_handler,
    key_signer,
    key_verifier,
    make_checkpoint,
)
from authz.auditevent import to_fhir
from authz.auditrecord import Agent, EventSubtype, EventType, break_glass_record, request_record
from authz.auditsyslog import SyslogForwarder
from authz.auditverify import VerifyResult, verify, verify_segment
from authz.decision import Decision, Resource
from authz.principal import Principal
from server.platform import db, jobs
from tests.conftest import app_dsn

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def run(dsn: str, body: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    async def main() -> T:
        pool = await db.create_pool(dsn, 1, 10)
        try:
            return await body(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


def record(n: int, **changes: Any) -> AuditRecord:
    base = AuditRecord(
        time=dt.datetime(2025, 1, 2, 3, 4, 5, n, tzinfo=dt.UTC),
        type=EventType.REST,
        subtype=(EventSubtype.READ,),
        action="R",
        outcome="0",
        agent=Agent(sub=f"user{n % 7}", issuer="hounsfield", roles=("radiologist",), address="127.0.0.1"),
        patient_id=f"P{n % 5}",
        study_uid=f"1.2.3.{n}",
        method="GET",
        path=f"/dicom-web/studies/1.2.3.{n}",
        status=200,
        decision_id=f"00000000-0000-0000-0000-{n:012d}",
        policy_revision="rev1",
    )
    return AuditRecord(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, **changes})


def signer_and_verifier(tmp_path: Path) -> tuple[Any, Any]:
    key = keys.load_or_create(tmp_path / "data")
    return key_signer(key.private_pem, key.kid), key_verifier({key.kid: key.private_pem})


async def fill(pool: asyncpg.Pool, n: int) -> AuditTrail:
    trail = AuditTrail(pool)
    assert await trail.append_many([record(i) for i in range(1, n + 1)]) == list(range(1, n + 1))
    return trail


async def tamper(pool: asyncpg.Pool, *statements: str) -> None:
    """An attacker with superuser access: triggers off for the session (session_replication_role = replica)."""
    async with pool.acquire() as conn:
        await conn.execute("SET session_replication_role = replica")
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.execute("RESET session_replication_role")


def kinds(result: VerifyResult) -> list[tuple[int, str]]:
    return [(p.seq, p.kind) for p in result.problems]


def no_checkpoints(message: bytes, signature: bytes, key_id: str) -> bool:
    raise AssertionError("no checkpoint expected")


# --- appending ---------------------------------------------------------------------------------------------


def test_sequential_and_concurrent_appends_make_one_gapless_chain(dsn: str) -> None:
    async def body(pool: asyncpg.Pool) -> None:
        trail = AuditTrail(pool)
        assert [await trail.append(record(i)) for i in range(1, 11)] == list(range(1, 11))

        # 8 appenders, each with its own trail (own group commit), all on their own connections, 50 records each.
        trails = [AuditTrail(pool) for _ in range(8)]

        async def appender(k: int) -> list[int]:
            return [await trails[k].append(record(1000 * k + i)) for i in range(50)]

        seqs = await asyncio.gather(*(appender(k) for k in range(8)))
        flat = sorted(s for part in seqs for s in part)
        assert flat == list(range(11, 411))
        for part in seqs:  # each appender's records are in its order in the chain
            assert part == sorted(part)

        # 8 tasks on one trail: coalesced into shared transactions, still one chain.
        more = await asyncio.gather(*(trail.append(record(5000 + i)) for i in range(200)))
        assert sorted(more) == list(range(411, 611))

        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT seq, prev_hash, hash FROM audit_log ORDER BY seq")
            head = await conn.fetchrow("SELECT seq, hash FROM audit_head")
        assert [r["seq"] for r in rows] == list(range(1, 611))
        assert bytes(rows[0]["prev_hash"]) == GENESIS
        assert all(bytes(rows[i]["prev_hash"]) == bytes(rows[i - 1]["hash"]) for i in range(1, len(rows)))
        assert head is not None and head["seq"] == 610 and bytes(head["hash"]) == bytes(rows[-1]["hash"])
        result = await verify(pool, no_checkpoints)
        assert result.ok and result.checked == 610 and result.problems == []
        await trail.close()

    run(dsn, body)


APPENDER = """
import asyncio, sys
from server.platform import db
from authz.audit import AuditTrail
from tests.authz.test_audit import record

async def main() -> None:
    pool = await db.create_pool(sys.argv[1], 1, 4)
    trail = AuditTrail(pool)
    await asyncio.gather(*(trail.append(record(int(sys.argv[2]) + i)) for i in range(100)))
    await pool.close()

asyncio.run(main())
"""


def test_appends_from_several_processes_make_one_chain(dsn: str) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, dsn, str(10_000 * k)], cwd=ROOT, stdin=subprocess.DEVNULL)
        for k in range(1, 4)
    ]

    async def body(pool: asyncpg.Pool) -> int:
        trail = AuditTrail(pool)
        mine = 0
        while any(p.poll() is None for p in procs):  # append all the while the other processes do
            await trail.append(record(mine))
            mine += 1
        return mine

    mine = run(dsn, body)
    assert [p.wait(120) for p in procs] == [0, 0, 0]

    async def check(pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM audit_log") == 300 + mine
            ids = await conn.fetch("SELECT record->'policy'->>'decision_id' AS d FROM audit_log ORDER BY seq")
        origin = [int(r["d"].rsplit("-", 1)[1]) // 10_000 for r in ids]  # 0: this process, k: subprocess k
        assert sorted(set(origin)) == [0, 1, 2, 3]
        assert sum(a != b for a, b in itertools.pairwise(origin)) >= 3  # interleaved
        result = await verify(pool, no_checkpoints)
        assert result.ok and result.head_seq == 300 + mine

    run(dsn, check)


def test_a_failed_append_raises_in_its_caller_and_the_trail_goes_on(dsn: str) -> None:
    async def body(pool: asyncpg.Pool) -> None:
        trail = AuditTrail(pool)
        await trail.append(record(1))
        async with pool.acquire() as conn:  # a database that refuses some records
            await conn.execute("ALTER TABLE audit_log ADD CONSTRAINT no_boom CHECK (record->>'channel' <> 'boom')")
        with pytest.raises(asyncpg.CheckViolationError):
            await trail.append(record(2, channel="boom"))
        assert await trail.append(record(3)) == 2  # the failed statement used no seq
        assert (await verify(pool, no_checkpoints)).ok

    run(dsn, body)


def test_records_in_a_transaction_commit_with_it_and_never_hold_up_appends(dsn: str) -> None:
    """`append_in` (a stored instance's record, in its ingest transaction): while that transaction is open, other
    appends go on without waiting for it; rolled back, its record leaves no gap; committed, its records are chained
    by the next append, before that append's own, and forwarded like any other. As the app role."""
    forwarded: list[int] = []

    async def body(pool: asyncpg.Pool) -> None:
        trail = AuditTrail(pool, forwarder=lambda _record, seq: forwarded.append(seq))
        async with pool.acquire() as ingest:
            transaction = ingest.transaction()
            await transaction.start()
            await trail.append_in(ingest, [record(1)])
            assert await asyncio.wait_for(trail.append(record(2)), 5) == 1  # no lock held, nothing uncommitted chained
            await transaction.rollback()
        async with pool.acquire() as ingest, ingest.transaction():
            await trail.append_in(ingest, [record(3), record(4)])
        assert await trail.append(record(5)) == 4
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT seq, record::text AS r FROM audit_log ORDER BY seq")
            assert await conn.fetchval("SELECT count(*) FROM audit_pending") == 0
        assert [r["seq"] for r in rows] == [1, 2, 3, 4]
        assert [json.loads(r["r"]) for r in rows] == [record(n).to_json() for n in (2, 3, 4, 5)]
        result = await verify(pool, no_checkpoints)
        assert result.ok and result.checked == 4
        await trail.close()

    run(app_dsn(dsn), body)
    assert sorted(forwarded) == [1, 2, 3, 4]


def test_stored_record_rehashes_in_python_and_holds_no_token(dsn: str) -> None:
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    odd = record(1, reason=f"Zürich \x00 \ud800 😀 Bearer {token}", path="/x?q=\u2028")

    async def body(pool: asyncpg.Pool) -> None:
        seq = await AuditTrail(pool).append(odd)
        async with pool.acquire() as conn:
            row = await conn.fetchrow("SELECT record::text AS r, prev_hash, hash FROM audit_log WHERE seq = $1", seq)
        assert row is not None and "eyJ" not in row["r"] and "[redacted]" in row["r"]
        stored = json.loads(row["r"])
        assert stored == odd.to_json()
        assert chain_hash(bytes(row["prev_hash"]), canonical_json(stored), seq) == bytes(row["hash"])
        back = AuditRecord.from_json(stored)
        assert back.time == odd.time and back.study_uid == odd.study_uid and back.agent == odd.agent

    run(dsn, body)
    with pytest.raises(TypeError, match="no floats"):
        record(1, status=1.5).to_json()


def test_append_only_triggers_refuse_update_delete_truncate(dsn: str) -> None:
    async def body(pool: asyncpg.Pool) -> None:
        await fill(pool, 3)
        async with pool.acquire() as conn:
            for sql in (
                "UPDATE audit_log SET record = '{}' WHERE seq = 2",
                "DELETE FROM audit_log WHERE seq = 3",
                "TRUNCATE audit_log",
                "DELETE FROM audit_checkpoints",
                "DELETE FROM audit_head",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                    await conn.execute(sql)
            assert await conn.fetchval("SELECT count(*) FROM audit_log") == 3
        assert (await verify(pool, no_checkpoints)).ok

    run(dsn, body)


# --- tampering -----------------------------------------------------------------------------------------------


def test_modified_record_is_named(dsn: str) -> None:
    async def body(pool: asyncpg.Pool) -> None:
        await fill(pool, 20)
        await tamper(
            pool, """UPDATE audit_log SET record = jsonb_set(record, '{agent,sub}', '"mallory"') WHERE seq = 7"""
        )
        result = await verify(pool, no_checkpoints)
        assert not result.ok and kinds(result) == [(7, "modified")]

    run(dsn, body)


def test_modified_and_rehashed_record_is_named(dsn: str) -> None:
    """The attacker also recomputes that row's hash: the next row still links to the old one."""

    async def body(pool: asyncpg.Pool) -> None:
        await fill(pool, 20)
        async with pool.acquire() as conn:
            prev = bytes(await conn.fetchval("SELECT prev_hash FROM audit_log WHERE seq = 9"))
        forged = record(9, patient_id="SOMEONE-ELSE")
        text = canonical_json(forged.to_json())
        new_hash = chain_hash(prev, text, 9)
        await tamper(pool, f"UPDATE audit_log SET record = '{text}'::jsonb, hash = '\\x{new_hash.hex()}' WHERE seq = 9")
        assert kinds(await verify(pool, no_checkpoints)) == [(9, "modified")]

    run(dsn, body)


def test_deleted_records_are_named(dsn: str) -> None:
    async def body(pool: asyncpg.Pool) -> None:
        await fill(pool, 20)
        await tamper(pool, "DELETE FROM audit_log WHERE seq = 5")
        result = await verify(pool, no_checkpoints)
        assert kinds(result) == [(5, "deleted")] and "seq 5 is missing" in result.problems[0].detail
        await tamper(pool, "DELETE FROM audit_log WHERE seq IN (1, 11, 12)")
        assert kinds(await verify(pool, no_checkpoints)) == [(1, "deleted"), (5, "deleted"), (11, "deleted")]
        await tamper(pool, "DELETE FROM audit_log WHERE seq >= 19")  # cut off the end: the head still says 20
        result = await verify(pool, no_checkpoints)
        assert kinds(result)[-1] == (19, "deleted") and "19..20" in result.problems[-1].detail

    run(dsn, body)


def test_deleted_and_renumbered_records_are_named(dsn: str) -> None:
    """Delete seq 6 and move every later record down by one (hashes kept): named at 6 as a deletion."""

    async def body(pool: asyncpg.Pool) -> None:
        await fill(pool, 12)
        await tamper(
            pool,
            "DELETE FROM audit_log WHERE seq = 6",
            "UPDATE audit_log SET seq = seq - 1000 WHERE seq > 6",
            "UPDATE audit_log SET seq = seq + 999 WHERE seq < 0",
            "UPDATE audit_head SET seq = 11, hash = (SELECT hash FROM audit_log WHERE seq = 11)",
        )
        result = await verify(pool, no_checkpoints)
        assert kinds(result) == [(6, "deleted")], result.problems
        assert "6..11 renumbered" in result.problems[0].detail

    run(dsn, body)


def test_reordered_records_are_named(dsn: str) -> None:
    async def body(pool: asyncpg.Pool) -> None:
        await fill(pool, 20)
        swap = """UPDATE audit_log a SET record = b.record, hash = b.hash
                  FROM audit_log b WHERE (a.seq, b.seq) IN (({i}, {j}), ({j}, {i}))"""
        await tamper(pool, swap.format(i=4, j=15))
        result = await verify(pool, no_checkpoints)
        assert kinds(result) == [(4, "reordered"), (15, "reordered")]
        assert "seq 15" in result.problems[0].detail and "seq 4" in result.problems[1].detail
        await tamper(pool, swap.format(i=4, j=15), swap.format(i=10, j=11))  # undo, then swap neighbours
        assert kinds(await verify(pool, no_checkpoints)) == [(10, "reordered"), (11, "reordered")]

    run(dsn, body)


def test_reordered_records_without_their_hashes_are_named(dsn: str) -> None:
    async def body(pool: asyncpg.Pool) -> None:
        await fill(pool, 20)
        await tamper(
            pool,
            "UPDATE audit_log a SET record = b.record FROM audit_log b WHERE (a.seq, b.seq) IN ((3, 17), (17, 3))",
        )
        assert kinds(await verify(pool, no_checkpoints)) == [(3, "reordered"), (17, "reordered")]

    run(dsn, body)


def test_inserted_records_are_named(dsn: str) -> None:
    async def body(pool: asyncpg.Pool) -> None:
        await fill(pool, 10)
        async with pool.acquire() as conn:
            last = bytes(await conn.fetchval("SELECT hash FROM audit_log WHERE seq = 10"))
        forged = canonical_json(record(99).to_json())
        # A well-formed row appended by hand, past the chain head.
        await tamper(
            pool,
            f"INSERT INTO audit_log (seq, record, prev_hash, hash) VALUES (11, '{forged}'::jsonb, "
            f"'\\x{last.hex()}', '\\x{chain_hash(last, forged, 11).hex()}')",
        )
        assert kinds(await verify(pool, no_checkpoints)) == [(11, "inserted")]

    run(dsn, body)


def test_rehashed_chain_is_caught_by_signed_checkpoint(dsn: str, tmp_path: Path) -> None:
    """Rewrite a record and re-hash every later record and the head: only the signed checkpoint shows it."""
    sign, check = signer_and_verifier(tmp_path)

    async def body(pool: asyncpg.Pool) -> None:
        trail = await fill(pool, 10)
        first = await trail.checkpoint(sign)
        assert first is not None and first.seq == 10
        await trail.append_many([record(i) for i in range(11, 16)])
        assert (await trail.checkpoint(sign)).seq == 15  # type: ignore[union-attr]
        assert await trail.checkpoint(sign) is None  # nothing new
        ok = await trail.verify(check)
        assert ok.ok and ok.checkpoints == 2 and ok.last_checkpoint == 15

        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT seq, record::text AS r, prev_hash FROM audit_log ORDER BY seq")
        prev = bytes(rows[11]["prev_hash"])  # seq 12's
        statements = []
        for row in rows[11:]:
            text = canonical_json(json.loads(row["r"]))
            if row["seq"] == 12:
                text = canonical_json(record(12, patient_id="HIDDEN").to_json())
            new = chain_hash(prev, text, row["seq"])
            statements.append(
                f"UPDATE audit_log SET record = '{text}'::jsonb, prev_hash = '\\x{prev.hex()}', "
                f"hash = '\\x{new.hex()}' WHERE seq = {row['seq']}"
            )
            prev = new
        statements.append(f"UPDATE audit_head SET hash = '\\x{prev.hex()}'")
        await tamper(pool, *statements)
        assert await verify_segment(pool, 0, GENESIS, 15) == []  # the chain alone looks intact
        result = await trail.verify(check)
        assert kinds(result) == [(15, "modified")]
        assert "11..15" in result.problems[0].detail

    run(dsn, body)


def test_forged_checkpoint_is_bad(dsn: str, tmp_path: Path) -> None:
    sign, check = signer_and_verifier(tmp_path)
    other_sign, _ = signer_and_verifier(tmp_path / "other")

    async def body(pool: asyncpg.Pool) -> None:
        trail = await fill(pool, 5)
        checkpoint = await trail.checkpoint(sign)
        assert checkpoint is not None
        await tamper(
            pool, "UPDATE audit_checkpoints SET signature = set_byte(signature, 10, get_byte(signature, 10) # 1)"
        )
        assert kinds(await trail.verify(check)) == [(5, "bad_checkpoint")]
        await tamper(pool, "DELETE FROM audit_checkpoints")
        await trail.append(record(6))
        await make_checkpoint(pool, other_sign)  # signed with a key the verifier does not trust
        result = await trail.verify(check)
        assert kinds(result) == [(6, "bad_checkpoint")] and "does not verify" in result.problems[0].detail

    run(dsn, body)


def test_checkpoint_job_signs_and_reschedules_and_refuses_a_tampered_segment(dsn: str, tmp_path: Path) -> None:
    sign, check = signer_and_verifier(tmp_path)

    async def body(pool: asyncpg.Pool) -> None:
        handler = checkpoint_handler(pool, sign, 300)
        await fill(pool, 4)
        await handler(jobs.Job(id=0, kind=CHECKPOINT_JOB, payload={"periodic": True}, attempts=1, max_attempts=8))
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT max(seq) FROM audit_checkpoints") == 4
            queued = await conn.fetchrow(
                "SELECT kind, dedupe_key, run_at > now() + interval '299 s' AS later FROM jobs"
            )
        assert (
            queued is not None
            and queued["kind"] == CHECKPOINT_JOB
            and queued["dedupe_key"] == "periodic"
            and queued["later"]
        )
        await AuditTrail(pool).append_many([record(i) for i in range(5, 9)])
        await tamper(pool, "UPDATE audit_log SET record = jsonb_set(record, '{action}', '\"D\"') WHERE seq = 6")
        assert await make_checkpoint(pool, sign) is None  # a tampered segment is never signed
        assert kinds(await verify(pool, check)) == [(6, "modified")]

    run(dsn, body)


# --- the command ---------------------------------------------------------------------------------------------


def hounsfield(*args: str, dsn: str, data: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOUNSFIELD_") and k != "DATABASE_URL"}
    env.update(DATABASE_URL=dsn, HOUNSFIELD_DATA=str(data))
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "audit", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_cli_verify_checkpoint_and_export(dsn: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    principal = Principal(sub="dr-who", issuer="hounsfield", roles=("clinician",), purpose_of_use=("TREAT",))
    search = request_record(
        principal,
        Decision(True, revision="r9"),
        action="search",
        resource=None,
        status=200,
        method="GET",
        path="/dicom-web/studies",
        query_string="PatientName=DOE^JOHN&limit=10",
        client_ip="10.0.0.1",
    )

    async def append(pool: asyncpg.Pool) -> None:
        await fill(pool, 5)
        await AuditTrail(pool).append(search)

    run(dsn, append)
    done = hounsfield("checkpoint", dsn=dsn, data=data)
    assert done.returncode == 0 and "seq 6" in done.stdout, done.stderr
    ok = hounsfield("verify", dsn=dsn, data=data)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "6 records, 1 valid checkpoints" in ok.stdout and "OK" in ok.stdout

    exported = hounsfield("export", "--since", "2000-01-01", dsn=dsn, data=data)
    assert exported.returncode == 0, exported.stderr
    lines = exported.stdout.splitlines()
    assert len(lines) == 6
    events = [AuditEvent.model_validate(json.loads(line)) for line in lines]
    assert [e.id for e in events] == ["1", "2", "3", "4", "5", "6"]
    assert "DOE" not in exported.stdout  # the query travels base64-encoded only
    query = [e["query"] for e in json.loads(lines[5])["entity"] if "query" in e]
    assert base64.b64decode(query[0]) == b"PatientName=DOE^JOHN&limit=10"
    later = hounsfield("export", "--since", "2999-01-01", dsn=dsn, data=data)
    assert later.returncode == 0 and later.stdout == ""

    run(dsn, lambda pool: tamper(pool, "DELETE FROM audit_log WHERE seq = 3"))
    bad = hounsfield("verify", dsn=dsn, data=data)
    assert bad.returncode == 1
    assert "TAMPERED" in bad.stdout and "seq 3: deleted: seq 3 is missing" in bad.stdout
    as_json = json.loads(hounsfield("verify", "--json", dsn=dsn, data=data).stdout)
    assert as_json["ok"] is False and as_json["problems"][0]["seq"] == 3


# --- FHIR AuditEvent -----------------------------------------------------------------------------------------


def test_records_render_as_valid_balp_audit_events() -> None:
    principal = Principal(
        sub="alice", issuer="https://idp.example", roles=("radiologist",), client_id="ohif", purpose_of_use=("TREAT",)
    )
    resource = Resource(kind="frames", patient_id="PAT-1", study_uid="1.2.3", series_uid="1.2.3.4", instance_uid="1.5")
    read = request_record(
        principal,
        Decision(True, revision="rev7", decision_id="3f1e0d9a-8c55-4a4e-9a0b-5b0c5e1d2f3a"),
        action="read",
        resource=resource,
        status=200,
        method="GET",
        path="/dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.5/frames/1",
        client_ip="192.0.2.7",
    )
    denied = request_record(
        principal,
        Decision(False, reasons=("not in care list",), revision="rev7"),
        action="search",
        resource=Resource(kind="study"),
        status=403,
        query_string="PatientID=PAT-2",
    )
    anonymous = request_record(None, None, action="read", resource=None, status=401, path="/dicom-web/studies")
    glass = break_glass_record(principal, "patient arrested in ER", client_ip="192.0.2.7", patient_id="PAT-1")
    dimse = request_record(principal, Decision(True), action="create", resource=resource, status=200, channel="dimse")
    events = [to_fhir(r, i) for i, r in enumerate((read, denied, anonymous, glass, dimse), start=1)]
    for event in events:
        AuditEvent.model_validate(event)
        json.dumps(event)

    first = events[0]
    assert first["type"]["code"] == "rest" and first["subtype"][0]["code"] == "read" and first["action"] == "R"
    user, client, server = first["agent"]
    assert user["who"]["identifier"]["value"] == "alice" and user["requestor"] is True
    assert user["network"] == {"address": "192.0.2.7", "type": "2"}
    assert user["policy"] == ["urn:uuid:3f1e0d9a-8c55-4a4e-9a0b-5b0c5e1d2f3a"]
    assert client["type"]["coding"][0]["code"] == "110153" and client["who"]["identifier"]["value"] == "ohif"
    assert server["type"]["coding"][0]["code"] == "110152"
    assert first["source"]["observer"]["display"] == "hounsfield"
    patient, study, request = first["entity"]
    assert patient["what"]["identifier"]["value"] == "PAT-1" and patient["role"]["code"] == "1"
    assert study["what"]["identifier"] == {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}
    assert {"type": "SOPInstanceUID", "valueString": "1.5"} in study["detail"]
    assert {"type": "policy-revision", "valueString": "rev7"} in request["detail"]
    assert first["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"

    assert events[1]["outcome"] == "4" and events[1]["outcomeDesc"] == "not in care list"
    assert events[1]["action"] == "E" and events[1]["entity"][0]["role"]["code"] == "24"
    assert base64.b64decode(events[1]["entity"][0]["query"]) == b"PatientID=PAT-2"
    assert events[2]["agent"][0]["who"]["display"] == "unauthenticated" and events[2]["outcome"] == "4"
    assert events[3]["type"]["code"] == "110113" and events[3]["subtype"][0]["code"] == "110127"
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "BTG"} in [
        c["coding"][0] for c in events[3]["purposeOfEvent"]
    ]
    assert events[4]["type"]["code"] == "110104" and events[4]["action"] == "C"
    assert to_fhir(read, 1) == to_fhir(AuditRecord.from_json(json.loads(canonical_json(read.to_json()))), 1)


# --- syslog forwarding ---------------------------------------------------------------------------------------

SYSLOG = re.compile(rb"^<(\d+)>1 (\S+) (\S+) hounsfield (\d+) IHE\+FHIR - \xef\xbb\xbf(.*)$", re.DOTALL)


def parse_syslog(message: bytes) -> tuple[int, dict[str, Any]]:
    match = SYSLOG.match(message)
    assert match, message[:120]
    dt.datetime.fromisoformat(match.group(2).decode().replace("Z", "+00:00"))
    return int(match.group(1)), json.loads(match.group(5))


def test_records_are_forwarded_to_syslog_over_udp_and_tcp(dsn: str) -> None:
    async def body(pool: asyncpg.Pool) -> None:
        loop = asyncio.get_running_loop()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        received: list[bytes] = []

        async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:  # RFC 6587 octet counting: "LEN SP MSG"
                try:
                    length = int((await reader.readuntil(b" "))[:-1])
                except asyncio.IncompleteReadError:
                    break
                received.append(await reader.readexactly(length))
            writer.close()

        tcp = await asyncio.start_server(collect, "127.0.0.1", 0)
        tcp_port = tcp.sockets[0].getsockname()[1]
        to_udp = SyslogForwarder(f"udp://127.0.0.1:{udp.getsockname()[1]}")
        to_tcp = SyslogForwarder(f"tcp://127.0.0.1:{tcp_port}")
        try:
            seq = await AuditTrail(pool, forwarder=to_udp).append(record(1, outcome="4", status=403))
            pri, event = parse_syslog(await asyncio.wait_for(loop.sock_recv(udp, 65536), 10))
            assert pri == 10 * 8 + 4 and event["id"] == str(seq) and event["outcome"] == "4"
            AuditEvent.model_validate(event)

            trail = AuditTrail(pool, forwarder=to_tcp)
            seqs = await asyncio.gather(*(trail.append(record(i)) for i in range(2, 12)))
            await to_tcp.close()
            for _ in range(100):
                if len(received) == 10:
                    break
                await asyncio.sleep(0.05)
            events = [parse_syslog(m) for m in received]
            assert sorted(int(e["id"]) for _, e in events) == sorted(seqs)
            assert all(p == 10 * 8 + 5 for p, _ in events)
            assert to_udp.dropped == 0 and to_tcp.dropped == 0
        finally:
            await to_udp.close()
            tcp.close()
            await tcp.wait_closed()
            udp.close()

    run(dsn, body)
    with pytest.raises(ValueError, match="udp://host:port"):
        SyslogForwarder("syslog.example:514")
