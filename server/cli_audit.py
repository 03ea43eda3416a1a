"""`hounsfield audit verify|export|checkpoint`: prove the audit trail unaltered, hand it to security teams.

- `verify [--data DIR] [--json]`: re-hash the whole chain, check the chain head and every signed checkpoint with
  the data folder's key (`<data>/keys/signing.pem`); print each problem (seq, kind, detail). Exit status 0 when
  the trail is intact, 1 when anything was modified, deleted, reordered, inserted, or a checkpoint is bad.
- `export [--since T] [--until T] [--data DIR]`: the records recorded in [since, until) as FHIR R4 AuditEvents, one
  JSON object per line (NDJSON), in chain order, on standard output.
- `checkpoint [--data DIR]`: sign the chain head now (the server also does so every
  HOUNSFIELD_AUDIT_CHECKPOINT_SECONDS).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from server import db
from server.settings import Settings


def _verifier(settings: Settings) -> Any:
    from authz import keys
    from authz.audit import key_verifier

    if not (settings.data_dir / "keys" / keys.KEY_FILE).exists():
        return key_verifier({})  # every checkpoint is then reported: no key to check it with
    key = keys.load_or_create(settings.data_dir)
    return key_verifier({key.kid: key.private_pem})


@asynccontextmanager
async def _pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    from server.resources import database_url

    pool = await db.create_pool(await database_url(settings), 1, 2)
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn)
        yield pool
    finally:
        await pool.close()


async def _verify(settings: Settings, as_json: bool) -> int:
    from authz.auditverify import verify

    async with _pool(settings) as pool:
        result = await verify(pool, _verifier(settings))
    if as_json:
        print(
            json.dumps(
                {
                    "ok": result.ok,
                    "checked": result.checked,
                    "head_seq": result.head_seq,
                    "checkpoints": result.checkpoints,
                    "last_checkpoint": result.last_checkpoint,
                    "problems": [{"seq": p.seq, "kind": p.kind, "detail": p.detail} for p in result.problems],
                }
            )
        )
    else:
        signed = f"last signed checkpoint at seq {result.last_checkpoint}" if result.last_checkpoint else "none signed"
        print(f"audit trail: {result.checked} records, {result.checkpoints} valid checkpoints ({signed})")
        if result.ok:
            print("OK: every record, link and checkpoint verifies")
        else:
            print(f"TAMPERED: {len(result.problems)} problems")
            for problem in result.problems:
                print(f"  {problem}")
    return 0 if result.ok else 1


async def _export(settings: Settings, since: dt.datetime, until: dt.datetime | None) -> int:
    from authz.audit import SQL
    from authz.auditevent import to_fhir
    from authz.auditrecord import AuditRecord

    out = sys.stdout
    count = 0
    async with _pool(settings) as pool, pool.acquire() as conn, conn.transaction(readonly=True):
        async for row in conn.cursor(SQL["export_since"], since, until, prefetch=1000):
            try:
                record = AuditRecord.from_json(json.loads(row["record"]))
            except (ValueError, KeyError, TypeError) as exc:
                print(f"seq {row['seq']}: malformed record left out: {exc}", file=sys.stderr)
                continue
            event = to_fhir(record, int(row["seq"]), recorded_at=row["recorded_at"])
            out.write(json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n")
            count += 1
    out.flush()
    print(f"exported {count} audit events", file=sys.stderr)
    return 0


async def _checkpoint(settings: Settings) -> int:
    from authz import keys
    from authz.audit import key_signer, make_checkpoint

    key = keys.load_or_create(settings.data_dir)
    async with _pool(settings) as pool:
        checkpoint = await make_checkpoint(pool, key_signer(key.private_pem, key.kid))
    if checkpoint is None:
        print("no checkpoint signed: nothing new since the last one, or the new records do not verify")
        return 0
    print(f"signed checkpoint at seq {checkpoint.seq} with key {checkpoint.key_id}")
    return 0


def _time(value: str) -> dt.datetime:
    """ISO 8601 date or date-time; without a zone it is UTC."""
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def cmd_audit(args: argparse.Namespace) -> int:
    from server.cli import _settings

    settings = _settings(args)
    if args.audit_command == "verify":
        return asyncio.run(_verify(settings, args.json))
    if args.audit_command == "export":
        since = args.since or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        return asyncio.run(_export(settings, since, args.until))
    return asyncio.run(_checkpoint(settings))


def register(subparsers: Any) -> None:
    """`hounsfield audit verify [--data DIR] [--json]`, `hounsfield audit export [--since T] [--until T]`,
    `hounsfield audit checkpoint`."""
    parser = subparsers.add_parser("audit", help="verify or export the tamper-evident audit trail")
    sub = parser.add_subparsers(dest="audit_command", required=True)
    verify = sub.add_parser(
        "verify",
        help="check every record, link and signed checkpoint of the audit chain",
        description="Exit status 0 when the audit trail verifies, 1 when a record was modified, deleted, "
        "reordered or inserted, or a checkpoint signature is bad (each problem is printed with its seq).",
    )
    verify.add_argument("--json", action="store_true", help="print the result as one JSON object")
    export = sub.add_parser("export", help="write audit records as FHIR AuditEvent NDJSON to standard output")
    export.add_argument("--since", type=_time, help="recorded at or after (ISO 8601; default: the beginning)")
    export.add_argument("--until", type=_time, help="recorded before (ISO 8601; default: now)")
    checkpoint = sub.add_parser("checkpoint", help="sign the audit chain head now")
    for each in (verify, export, checkpoint):
        each.add_argument("--data", help="data folder (default ./var, or HOUNSFIELD_DATA)")
        each.set_defaults(func=cmd_audit)
