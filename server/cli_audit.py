"""`hounsfield audit verify|export|checkpoint`: prove the audit trail unaltered, hand it to security teams.

- `verify [--data DIR] [--json] [--anchors SRC ...] [--public-key FILE]`: re-hash the whole chain, check the
  chain head and every signed checkpoint with the data folder's key (`<data>/keys/signing.pem`, or the public
  key given), check the chain against the anchored copies of the checkpoints (`--anchors`: a JSON-lines file or
  `s3://bucket/prefix`; by default the configured file and S3 sinks), and require records older than one
  checkpoint interval plus `HOUNSFIELD_AUDIT_ANCHOR_GRACE_SECONDS` to be covered by an anchored checkpoint.
  Print each problem (seq, kind, detail), and how many records committed with their changes (a stored instance's)
  the next append has still to chain. Exit status 0 when the trail is intact, 1 when anything was
  modified, deleted, reordered, inserted, a checkpoint is bad, missing or differs from its anchored copy, and 2
  when an anchor source cannot be read.
- `export [--since T] [--until T] [--data DIR]`: the records recorded in [since, until) as FHIR R4 AuditEvents, one
  JSON object per line (NDJSON), in chain order, on standard output.
- `checkpoint [--data DIR]`: sign the chain head now and copy it to the anchor sinks (the server also does so
  every HOUNSFIELD_AUDIT_CHECKPOINT_SECONDS).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from server.clisettings import settings_from_args
from server.platform import db
from server.platform.dbroles import database_url
from server.settings import Settings


def _verifier(settings: Settings, public_key: Path | None = None) -> Any:
    from authz import keys
    from authz.audit import key_verifier

    if public_key is not None:  # an auditor's copy of the public key: PEM, or a JWK / JWK set
        raw = public_key.read_bytes()
        if raw.lstrip().startswith(b"{"):
            trusted = keys.parse_jwks(json.loads(raw), str(public_key))
            return key_verifier({kid: key.jwk for kid, key in trusted.items()})
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        pem_key = serialization.load_pem_public_key(raw)  # e.g. `openssl ec -in signing.pem -pubout`
        if not isinstance(pem_key, ec.EllipticCurvePublicKey):
            raise SystemExit(f"{public_key}: not an EC public key")
        numbers = pem_key.public_numbers()
        jwk = {"kty": "EC", "crv": "P-256", "x": keys.b64url(numbers.x.to_bytes(32, "big"))}
        jwk["y"] = keys.b64url(numbers.y.to_bytes(32, "big"))
        return key_verifier({keys.thumbprint(jwk): pem_key})  # the key id is the RFC 7638 thumbprint
    if not (settings.data_dir / "keys" / keys.KEY_FILE).exists():
        return key_verifier({})  # every checkpoint is then reported: no key to check it with
    key = keys.load_or_create(settings.data_dir)
    return key_verifier({key.kid: key.private_pem})


@asynccontextmanager
async def _pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(await database_url(settings), 1, 2)
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn)
        yield pool
    finally:
        await pool.close()


async def _anchors(settings: Settings, sources: list[str]) -> tuple[list[str], list[Any]] | None:
    """The anchor sources (given, else the configured file and S3 sinks) and every entry read from them; None
    when there is none to read. Raises AnchorError when one cannot be read."""
    from authz.auditanchor import FileAnchor, ReadableSink, S3Anchor, open_anchors, read_anchored

    sinks: list[ReadableSink] = []
    for source in sources:
        if source.startswith("s3://"):
            s3 = Settings.from_env({**os.environ, "HOUNSFIELD_AUDIT_ANCHOR_S3": source}).audit_anchor_s3
            assert s3 is not None
            sinks.append(S3Anchor(s3))
        else:
            sinks.append(FileAnchor(Path(source)))
    if not sources:
        sinks = open_anchors(settings).readable()
    if not sinks:
        return None
    try:
        entries = await read_anchored(sinks)
    finally:
        for sink in sinks:
            await sink.close()
    return [sink.name for sink in sinks], entries


async def _verify(settings: Settings, as_json: bool, sources: list[str], public_key: Path | None) -> int:
    from authz.audit import SQL
    from authz.auditanchor import AnchorError
    from authz.auditverify import verify

    try:
        anchors = await _anchors(settings, sources)
    except AnchorError as exc:
        print(f"cannot read the anchored checkpoints: {exc}", file=sys.stderr)
        return 2
    unreadable = [entry for entry in anchors[1] if entry.checkpoint is None] if anchors else []
    max_age = dt.timedelta(seconds=settings.audit_checkpoint_seconds + settings.audit_anchor_grace_seconds)
    async with _pool(settings) as pool:
        result = await verify(
            pool, _verifier(settings, public_key), anchors=anchors[1] if anchors else None, max_age=max_age
        )
        pending = int(await pool.fetchval(SQL["pending_count"]))
    if as_json:
        print(
            json.dumps(
                {
                    "ok": result.ok,
                    "checked": result.checked,
                    "head_seq": result.head_seq,
                    "checkpoints": result.checkpoints,
                    "last_checkpoint": result.last_checkpoint,
                    "anchor_sources": anchors[0] if anchors else [],
                    "anchored": result.anchored,
                    "last_anchored": result.last_anchored,
                    "unreadable_anchors": [f"{a.source}: {a.error}" for a in unreadable],
                    "problems": [{"seq": p.seq, "kind": p.kind, "detail": p.detail} for p in result.problems],
                    "pending": pending,
                }
            )
        )
    else:
        signed = f"last signed checkpoint at seq {result.last_checkpoint}" if result.last_checkpoint else "none signed"
        print(f"audit trail: {result.checked} records, {result.checkpoints} valid checkpoints ({signed})")
        if anchors is None:
            print("WARNING: no anchor sink to check against: the database's owner could rewrite the chain unseen")
        else:
            newest = f"newest at seq {result.last_anchored}" if result.last_anchored else "none"
            print(f"anchors: {result.anchored} checkpoints ({newest}) in {', '.join(anchors[0])}")
        for entry in unreadable:
            print(f"WARNING: ignored {entry.source}: {entry.error}")
        if pending:
            print(f"{pending} records committed with their changes are not chained yet (the next append chains them)")
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
    from authz.audit import key_signer, key_verifier, make_checkpoint
    from authz.auditanchor import open_anchors

    key = keys.load_or_create(settings.data_dir)
    anchors = open_anchors(settings)
    try:
        async with _pool(settings) as pool:
            start = await anchors.trusted_start(key_verifier({key.kid: key.public_jwk}))
            checkpoint = await make_checkpoint(pool, key_signer(key.private_pem, key.kid), start=start)
            await anchors.flush(pool)
    finally:
        await anchors.close()
    if checkpoint is None:
        print("no checkpoint signed: nothing new since the last one, or the new records do not verify")
    else:
        print(f"signed checkpoint at seq {checkpoint.seq} with key {checkpoint.key_id}")
    for name, reason in sorted(anchors.failing.items()):
        print(f"anchor {name} failed: {reason}", file=sys.stderr)
    return 1 if anchors.failing else 0


def _time(value: str) -> dt.datetime:
    """ISO 8601 date or date-time; without a zone it is UTC."""
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def cmd_audit(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.audit_command == "verify":
        for source in args.anchors or []:
            if not source.startswith("s3://") and not Path(source).is_file():
                print(f"--anchors {source}: no such file", file=sys.stderr)
                return 2
        return asyncio.run(_verify(settings, args.json, args.anchors or [], args.public_key))
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
        "reordered or inserted, or a checkpoint is bad, missing or differs from its anchored copy (each problem "
        "is printed with its seq), 2 when an anchor source cannot be read.",
    )
    verify.add_argument("--json", action="store_true", help="print the result as one JSON object")
    verify.add_argument(
        "--anchors",
        action="append",
        metavar="SRC",
        help="anchored checkpoints to check against: a JSON-lines file or s3://bucket/prefix (repeatable; "
        "default: the configured HOUNSFIELD_AUDIT_ANCHOR_FILE and HOUNSFIELD_AUDIT_ANCHOR_S3)",
    )
    verify.add_argument(
        "--public-key",
        type=Path,
        help="verify signatures with this public key (PEM, or a JWK set) instead of the data folder's key",
    )
    export = sub.add_parser("export", help="write audit records as FHIR AuditEvent NDJSON to standard output")
    export.add_argument("--since", type=_time, help="recorded at or after (ISO 8601; default: the beginning)")
    export.add_argument("--until", type=_time, help="recorded before (ISO 8601; default: now)")
    checkpoint = sub.add_parser("checkpoint", help="sign the audit chain head now")
    for each in (verify, export, checkpoint):
        each.add_argument("--data", help="data folder (default ./var, or HOUNSFIELD_DATA)")
        each.set_defaults(func=cmd_audit)
