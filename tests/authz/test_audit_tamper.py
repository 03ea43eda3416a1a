"""The audit-tamper suite: the database's owner is the attacker. A trail of three users' records is written by the
app role (`hounsfield_app`), checkpointed and anchored to the append-only file in the data folder by the
checkpoint job; then each attack of the table below rewrites the database as its owner (superuser, triggers
off), and `hounsfield audit verify`, run as a user would run it, must fail and name what it can (kind and seq).

The app role itself cannot UPDATE, DELETE or TRUNCATE the audit tables (permission denied, before any trigger),
and the server refuses to serve as a role that could."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from authz import keys
from authz.audit import GENESIS, AuditTrail, canonical_json, chain_hash, checkpoint_handler, key_signer, key_verifier
from authz.auditanchor import open_anchors
from authz.auditrecord import Agent, AuditRecord, EventSubtype, EventType
from server.platform import db, jobs
from server.platform.database import DatabasePlugin
from server.platform.dbroles import DatabaseRoleError
from server.settings import Settings
from tests.conftest import app_dsn

ROOT = Path(__file__).resolve().parents[2]
USERS = ("alice", "bob", "carol")
BOB = 1
"""Every third record is bob's: the user whose records the attacker wants gone."""
CHECKPOINTS = (20, 40, 60)
"""The trail is checkpointed (and anchored) after these many records."""
AGE = dt.timedelta(hours=2)
"""How long ago the records were written: older than an interval (300 s) plus the grace (600 s)."""


def record(n: int, *, patient: str | None = None) -> AuditRecord:
    return AuditRecord(
        time=dt.datetime(2025, 3, 4, 5, 6, 7, n, tzinfo=dt.UTC),
        type=EventType.REST,
        subtype=(EventSubtype.READ,),
        action="R",
        outcome="0",
        agent=Agent(sub=USERS[n % 3], issuer="hounsfield", roles=("radiologist",), address="127.0.0.1"),
        patient_id=patient or f"P{n % 4}",
        study_uid=f"1.2.826.0.1.{n}",
        method="GET",
        path=f"/dicom-web/studies/1.2.826.0.1.{n}",
        status=200,
    )


# --- the trail, written as the server writes it --------------------------------------------------------------


def _settings(data: Path) -> Settings:
    return Settings.from_env({}).with_overrides(data_dir=data)


async def _checkpoint(pool: asyncpg.Pool, data: Path) -> None:
    """One run of the `audit.checkpoint` job with the data folder's key and configured anchors."""
    key = keys.load_or_create(data)
    anchors = open_anchors(_settings(data))
    handler = checkpoint_handler(
        pool,
        key_signer(key.private_pem, key.kid),
        300,
        anchors=anchors,
        verifier=key_verifier({key.kid: key.public_jwk}),
    )
    try:
        await handler(jobs.Job(id=0, kind="audit.checkpoint", payload={}, attempts=1, max_attempts=1))
    finally:
        await anchors.close()
    assert not anchors.failing


async def as_owner(dsn: str, *statements: str) -> None:
    """The attacker: the database's owner, triggers off for the session."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET session_replication_role = replica")
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


def write_trail(dsn: str, data: Path, records: int = 60, checkpoints: tuple[int, ...] = CHECKPOINTS) -> None:
    """`records` records appended by the app role, backdated by AGE (as if written long ago), checkpointed and
    anchored after each count in `checkpoints`."""

    async def main() -> None:
        pool = await db.create_pool(app_dsn(dsn), 1, 2)
        try:
            trail = AuditTrail(pool)
            done = 0
            for upto in (*checkpoints, records):
                if upto > done:
                    await trail.append_many([record(n) for n in range(done + 1, upto + 1)])
                    await as_owner(dsn, f"UPDATE audit_log SET recorded_at = now() - interval '{AGE.seconds} s'")
                    done = upto
                if upto in checkpoints:
                    await _checkpoint(pool, data)
            await trail.close()
        finally:
            await pool.close()

    asyncio.run(main())


# --- what an attacker with the database does -----------------------------------------------------------------


@dataclass
class Row:
    seq: int
    text: str
    recorded_at: dt.datetime


async def _rows(conn: asyncpg.Connection) -> list[Row]:
    rows = await conn.fetch("SELECT seq, record::text AS r, recorded_at FROM audit_log ORDER BY seq")
    return [Row(r["seq"], canonical_json(json.loads(r["r"])), r["recorded_at"]) for r in rows]


async def rewrite(dsn: str, change: Callable[[list[Row]], list[Row]], *, keep_checkpoints: bool = False) -> None:
    """Replace the whole chain by `change(rows)`, renumbered from 1 and re-hashed consistently, the head moved to
    its end: the database then holds a chain that verifies on its own. Checkpoints are deleted unless kept."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET session_replication_role = replica")
        rows = change(await _rows(conn))
        await conn.execute("TRUNCATE audit_log")
        prev = GENESIS
        for seq, row in enumerate(rows, start=1):
            new = chain_hash(prev, row.text, seq)
            await conn.execute(
                "INSERT INTO audit_log (seq, recorded_at, record, prev_hash, hash) VALUES ($1, $2, $3::jsonb, $4, $5)",
                seq,
                row.recorded_at,
                row.text,
                prev,
                new,
            )
            prev = new
        await conn.execute("UPDATE audit_head SET seq = $1, hash = $2", len(rows), prev)
        if not keep_checkpoints:
            await conn.execute("DELETE FROM audit_checkpoints")
    finally:
        await conn.close()


def _edit(seq: int, **changes: Any) -> Callable[[list[Row]], list[Row]]:
    def change(rows: list[Row]) -> list[Row]:
        out = []
        for row in rows:
            if row.seq == seq:
                document = json.loads(row.text)
                document.update(changes)
                row = Row(row.seq, canonical_json(document), row.recorded_at)
            out.append(row)
        return out

    return change


def _without_user(sub: str) -> Callable[[list[Row]], list[Row]]:
    return lambda rows: [row for row in rows if json.loads(row.text)["agent"]["sub"] != sub]


def _every_patient(patient: str) -> Callable[[list[Row]], list[Row]]:
    def change(rows: list[Row]) -> list[Row]:
        return [Row(r.seq, canonical_json({**json.loads(r.text), "patient_id": patient}), r.recorded_at) for r in rows]

    return change


def _fresh(rows: list[Row]) -> list[Row]:
    """recorded_at is not hashed: the attacker makes every record look new, to slip under the freshness rule."""
    now = dt.datetime.now(dt.UTC)
    return [Row(r.seq, r.text, now) for r in rows]


async def forge_checkpoint(dsn: str, seq: int, *, data: Path | None = None) -> None:
    """A checkpoint of the chain's current hash at seq, signed with a key of the attacker's (or a garbage
    signature when no data folder is given)."""
    conn = await asyncpg.connect(dsn)
    try:
        chain_at = bytes(await conn.fetchval("SELECT hash FROM audit_log WHERE seq = $1", seq))
        signed_at = dt.datetime.now(dt.UTC)
        signature, kid = b"\x30\x06\x02\x01\x01\x02\x01\x01", "forged"
        if data is not None:
            from authz.audit import checkpoint_message

            key = keys.load_or_create(data)
            signature, kid = key_signer(key.private_pem, key.kid)(checkpoint_message(seq, chain_at, signed_at))
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "INSERT INTO audit_checkpoints (seq, hash, signed_at, signature, key_id) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (seq) DO UPDATE SET hash = $2, signed_at = $3, signature = $4, key_id = $5",
            seq,
            chain_at,
            signed_at,
            signature,
            kid,
        )
    finally:
        await conn.close()


Attack = Callable[[str, Path], Awaitable[None]]


async def _edit_in_place(dsn: str, tmp: Path) -> None:
    await as_owner(dsn, """UPDATE audit_log SET record = jsonb_set(record, '{patient_id}', '"P9"') WHERE seq = 7""")


async def _edit_and_rehash_row(dsn: str, tmp: Path) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        prev = bytes(await conn.fetchval("SELECT prev_hash FROM audit_log WHERE seq = 9"))
    finally:
        await conn.close()
    text = canonical_json(record(9, patient="ELSEWHERE").to_json())
    await as_owner(
        dsn,
        f"UPDATE audit_log SET record = '{text}'::jsonb, hash = '\\x{chain_hash(prev, text, 9).hex()}' WHERE seq = 9",
    )


async def _delete_middle(dsn: str, tmp: Path) -> None:
    await as_owner(dsn, "DELETE FROM audit_log WHERE seq IN (30, 31)")


async def _delete_end(dsn: str, tmp: Path) -> None:
    """Cut the last records, move the head back, drop the checkpoint that covered them: consistent in itself."""
    await as_owner(
        dsn,
        "DELETE FROM audit_log WHERE seq > 54",
        "UPDATE audit_head SET seq = 54, hash = (SELECT hash FROM audit_log WHERE seq = 54)",
        "DELETE FROM audit_checkpoints WHERE seq > 54",
    )


async def _reorder(dsn: str, tmp: Path) -> None:
    await as_owner(
        dsn,
        "UPDATE audit_log a SET record = b.record, hash = b.hash FROM audit_log b "
        "WHERE (a.seq, b.seq) IN ((12, 13), (13, 12))",
    )


async def _truncate_and_rehash(dsn: str, tmp: Path) -> None:
    await as_owner(dsn, "TRUNCATE audit_checkpoints")
    await rewrite(dsn, _every_patient("NOBODY"))


async def _remove_user_and_rehash(dsn: str, tmp: Path) -> None:
    await rewrite(dsn, _without_user(USERS[BOB]))


async def _delete_checkpoints(dsn: str, tmp: Path) -> None:
    await as_owner(dsn, "DELETE FROM audit_checkpoints")


async def _forge_checkpoint(dsn: str, tmp: Path) -> None:
    await forge_checkpoint(dsn, 50)


async def _rehash_and_resign(dsn: str, tmp: Path) -> None:
    """Rewrite one record, re-hash, and sign new checkpoints with the attacker's own key."""
    await rewrite(dsn, _edit(25, patient_id="P9"))
    for seq in CHECKPOINTS:
        await forge_checkpoint(dsn, seq, data=tmp / "attacker")


async def _remove_user_rehash_look_fresh(dsn: str, tmp: Path) -> None:
    await rewrite(dsn, lambda rows: _fresh(_without_user(USERS[BOB])(rows)))


async def _rehash_keeping_checkpoints(dsn: str, tmp: Path) -> None:
    """Change a record in the first segment, re-hash; the database's checkpoints stay (now they disagree)."""
    await rewrite(dsn, _edit(3, outcome="8"), keep_checkpoints=True)


MC, AM = "missing_checkpoint", "anchor_mismatch"
TABLE: list[tuple[str, Attack, set[tuple[int, str]]]] = [
    ("edit a record in place", _edit_in_place, {(7, "modified")}),
    ("edit a record and its hash", _edit_and_rehash_row, {(9, "modified")}),
    ("delete records in the middle", _delete_middle, {(30, "deleted")}),
    ("delete records at the end, head and checkpoint moved back", _delete_end, {(55, "deleted")}),
    ("reorder two records", _reorder, {(12, "reordered"), (13, "reordered")}),
    (
        "truncate and re-hash the whole chain",
        _truncate_and_rehash,
        {(20, AM), (40, AM), (60, AM), (20, MC), (40, MC), (60, MC)},
    ),
    (
        "remove one user's records and re-hash",
        _remove_user_and_rehash,
        {(20, AM), (40, AM), (20, MC), (40, MC), (41, "deleted")},
    ),
    ("delete the checkpoints", _delete_checkpoints, {(20, MC), (40, MC), (60, MC)}),
    ("forge a checkpoint", _forge_checkpoint, {(50, "bad_checkpoint")}),
    (
        "re-hash and re-sign with another key",
        _rehash_and_resign,
        {
            (40, AM),
            (60, AM),
            (20, MC),
            (40, MC),
            (60, MC),
            (20, "bad_checkpoint"),
            (40, "bad_checkpoint"),
            (60, "bad_checkpoint"),
        },
    ),
    (
        "remove one user's records, re-hash, make them look fresh",
        _remove_user_rehash_look_fresh,
        {(20, AM), (40, AM), (20, MC), (40, MC), (41, "deleted")},
    ),
    (
        "re-hash, keep the checkpoints",
        _rehash_keeping_checkpoints,
        {(20, AM), (40, AM), (60, AM), (20, "modified"), (40, "modified"), (60, "modified")},
    ),
]


# --- the command, as a user runs it --------------------------------------------------------------------------


def verify_cli(dsn: str, data: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HOUNSFIELD_") and k != "DATABASE_URL"}
    base.update(DATABASE_URL=dsn, HOUNSFIELD_DATA=str(data), **env)
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "audit", "verify", *args],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def problems(done: subprocess.CompletedProcess[str]) -> set[tuple[int, str]]:
    assert done.returncode == 1, done.stdout + done.stderr
    return {(p["seq"], p["kind"]) for p in json.loads(done.stdout)["problems"]}


def test_intact_trail_verifies_against_its_anchors(dsn: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_trail(dsn, data)
    anchors = data / "audit" / "anchors.jsonl"
    assert len(anchors.read_text().splitlines()) == 3
    ok = verify_cli(app_dsn(dsn), data)  # the app role may verify; so may the owner (below)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "60 records, 3 valid checkpoints" in ok.stdout and "anchors: 3 checkpoints (newest at seq 60)" in ok.stdout
    as_json = json.loads(verify_cli(dsn, data, "--json", "--anchors", str(anchors)).stdout)
    assert as_json["ok"] and as_json["anchored"] == 3 and as_json["last_anchored"] == 60


@pytest.mark.parametrize(("attack", "expected"), [(a, e) for _, a, e in TABLE], ids=[name for name, _, _ in TABLE])
def test_owner_attack_is_named_by_verify(
    dsn: str, tmp_path: Path, attack: Attack, expected: set[tuple[int, str]]
) -> None:
    data = tmp_path / "data"
    write_trail(dsn, data)
    asyncio.run(attack(dsn, tmp_path))
    found = problems(verify_cli(app_dsn(dsn), data, "--json"))
    assert found == expected, sorted(found)


def test_text_output_names_kind_and_seq(dsn: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_trail(dsn, data)
    asyncio.run(_remove_user_and_rehash(dsn, tmp_path))
    done = verify_cli(dsn, data)
    assert done.returncode == 1 and "TAMPERED" in done.stdout
    assert "seq 20: anchor_mismatch: the chain's hash at seq 20 is not the one anchored in" in done.stdout
    assert "seq 20: missing_checkpoint: the checkpoint signed" in done.stdout


def test_records_without_any_checkpoint_fail(dsn: str, tmp_path: Path) -> None:
    """Old records and no anchor at all (the job never ran, or ran with its sinks failing): verify fails, with
    anchors configured and with the anchor file turned off (then on the database's checkpoints, with a warning)."""
    data = tmp_path / "data"
    write_trail(dsn, data, records=10, checkpoints=())
    found = problems(verify_cli(dsn, data, "--json"))
    assert found == {(1, "missing_checkpoint")}
    off = verify_cli(dsn, data, HOUNSFIELD_AUDIT_ANCHOR_FILE="off")
    assert off.returncode == 1 and "WARNING: no anchor sink" in off.stdout
    assert "seq 1: missing_checkpoint: seqs 1..10 are not covered" in off.stdout
    # The same records, recent: nothing is late yet.
    asyncio.run(as_owner(dsn, "UPDATE audit_log SET recorded_at = now()"))
    assert verify_cli(dsn, data).returncode == 0


def test_records_since_the_newest_anchor_must_be_recent(dsn: str, tmp_path: Path) -> None:
    """Records written after the last anchored checkpoint and older than an interval plus the grace are named,
    even when the attacker rewrote them consistently (nothing anchored covers them)."""
    data = tmp_path / "data"
    write_trail(dsn, data, records=70)  # 61..70 never checkpointed
    asyncio.run(rewrite(dsn, _edit(65, patient_id="P9"), keep_checkpoints=True))
    assert problems(verify_cli(dsn, data, "--json")) == {(61, "missing_checkpoint")}


def test_checkpoint_job_refuses_to_sign_a_chain_rewritten_behind_deleted_checkpoints(dsn: str, tmp_path: Path) -> None:
    """The job starts its check at the newest anchored checkpoint, not at the database's (deleted) ones."""
    data = tmp_path / "data"
    write_trail(dsn, data)
    asyncio.run(rewrite(dsn, _without_user(USERS[BOB])))

    async def more() -> int:
        pool = await db.create_pool(app_dsn(dsn), 1, 2)
        try:
            await AuditTrail(pool).append_many([record(n) for n in range(100, 130)])
            await _checkpoint(pool, data)
            async with pool.acquire() as conn:
                return int(await conn.fetchval("SELECT count(*) FROM audit_checkpoints"))
        finally:
            await pool.close()

    assert asyncio.run(more()) == 0
    assert len((data / "audit" / "anchors.jsonl").read_text().splitlines()) == 3


# --- the app role ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE audit_log SET record = '{}' WHERE seq = 2",
        "DELETE FROM audit_log WHERE seq = 3",
        "TRUNCATE audit_log",
        "INSERT INTO audit_log (seq, record, prev_hash, hash) VALUES (99, '{}', '\\x00', '\\x00')",
        "UPDATE audit_head SET seq = 1",
        "DELETE FROM audit_head",
        "TRUNCATE audit_head",
        "UPDATE audit_checkpoints SET seq = seq + 1",
        "DELETE FROM audit_checkpoints",
        "TRUNCATE audit_checkpoints",
        "DELETE FROM audit_anchored",
        "DELETE FROM audit_pending",
        "UPDATE audit_pending SET record = '{}'",
        "TRUNCATE audit_pending",
        "INSERT INTO audit_pending (record) VALUES ('{}')",
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
        "SET session_replication_role = replica",
    ],
)
def test_app_role_cannot_rewrite_the_trail(dsn: str, sql: str) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(app_dsn(dsn))
        try:
            assert await conn.fetchval("SELECT current_user") == "hounsfield_app"
            await conn.fetchval("SELECT audit_append(ARRAY['{\"v\": 1}'])")  # appending works
            await conn.execute("INSERT INTO audit_checkpoints VALUES (1, '\\x00', now(), '\\x00', 'k')")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"permission denied|must be owner"):
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(main())


def test_append_cannot_be_redirected_by_a_temporary_table(dsn: str) -> None:
    """audit_append runs with its owner's rights and a fixed search_path: a temporary audit_head of the app
    role's session does not move where records go."""

    async def main() -> None:
        conn = await asyncpg.connect(app_dsn(dsn))
        try:
            await conn.execute("CREATE TEMP TABLE audit_head (id boolean, seq bigint, hash bytea)")
            await conn.execute("INSERT INTO audit_head VALUES (true, 1000, '\\x00')")
            assert await conn.fetchval("SELECT audit_append(ARRAY['{\"v\": 1}'])") == 1
        finally:
            await conn.close()

    asyncio.run(main())


def test_server_refuses_to_serve_as_a_role_that_can_rewrite_the_trail(dsn: str, tmp_path: Path, caplog: Any) -> None:
    settings = Settings.from_env({}).with_overrides(
        data_dir=tmp_path / "data", worker_enabled=False, dimse_enabled=False, inference_enabled=False, db_pool_min=1
    )

    async def start(allow: bool) -> None:
        async with DatabasePlugin(settings.with_overrides(database_allow_privileged=allow), dsn=dsn).lifespan():
            pass

    with pytest.raises(DatabaseRoleError, match=r"'postgres' can rewrite the audit trail \(is a superuser"):
        asyncio.run(start(False))
    asyncio.run(start(True))  # explicitly allowed: serves, and says so at error level
    assert any("serving anyway" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
