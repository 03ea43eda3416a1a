"""Anchors: every signed audit checkpoint (`authz.auditchain.Checkpoint`) is also copied to places the database's
owner cannot rewrite, so that `hounsfield audit verify` can check the chain against copies held elsewhere. A
checkpoint signs (seq, hash of the chain at seq, time); with the copies, a chain re-hashed consistently, cut
short, or stripped of its checkpoints no longer matches what was anchored.

Sinks (`open_anchors`, from the settings):
- `FileAnchor`: a JSON-lines file, one checkpoint a line, opened O_APPEND (mode 0600, folder 0700) and fsynced
  before the write counts. Default `<data>/audit/anchors.jsonl`: that guards against the database's owner only;
  on another host (NFS, a log shipper's spool), a WORM medium or with `chattr +a` it guards against more.
- `S3Anchor`: one object per checkpoint (`<prefix>/<seq>.json`) with Object Lock retention in COMPLIANCE mode
  (S3 User Guide, "Object Lock": no user, the root account included, can delete a locked version or shorten its
  retention). Verify reads every version, so an overwrite or a delete marker hides nothing.
- `SyslogAnchor`: the audit syslog stream (`authz.auditsyslog`, MSGID HF-CHECKPOINT): the collector keeps them.
- `WitnessAnchor`: an HTTP POST of the checkpoint's JSON to a witness service; a 2xx answer counts.

The checkpoint is written to the database first, then to the sinks (`AuditAnchors.flush`): the database is what
is being vouched for, and a sink write can fail or hang. Written the other way round, a crash or a failed insert
after a sink took the copy would leave an anchored checkpoint the database never held, which verify must report
as deleted (a false alarm that teaches people to ignore alarms). This order leaves at worst a database checkpoint
not yet anchored; `audit_anchored` (migrations/0015) lists what each sink took, and every run of the checkpoint
job copies what is missing, oldest first. A sink that fails is logged at error level on every run and named in
`/readyz` (`audit_anchors`); verify fails once records older than an interval plus a grace lack an anchor.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio.to_thread
import asyncpg
import httpx

from authz.auditchain import Checkpoint, Verifier, checkpoint_message
from authz.auditsyslog import SyslogForwarder, format_checkpoint
from server.platform.db import Queries, vouch_stateless

if TYPE_CHECKING:
    from authz.settings import AuthzSettings
    from server.platform.settings import S3Settings

log = logging.getLogger(__name__)
SQL = Queries(Path(__file__).with_name("auditanchor.sql"))

FORMAT = "hounsfield-audit-checkpoint/1"
FLUSH_LIMIT = 1000
"""Checkpoints copied to one sink per run at most (a sink added to a long-running server catches up in steps)."""


class AnchorError(Exception):
    """A sink could not be written or read; the message names the sink, never a credential."""


def entry(checkpoint: Checkpoint) -> bytes:
    """A checkpoint as one line of JSON (sorted keys, no spaces): what every sink stores."""
    document = {
        "format": FORMAT,
        "seq": checkpoint.seq,
        "hash": checkpoint.hash.hex(),
        "signed_at": checkpoint.signed_at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "signature": base64.b64encode(checkpoint.signature).decode("ascii"),
        "key_id": checkpoint.key_id,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")


def parse_entry(raw: bytes | str) -> Checkpoint:
    """The checkpoint of one stored entry; ValueError when it is not one."""
    try:
        document = json.loads(raw)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError("not a hounsfield checkpoint")
        signed_at = dt.datetime.fromisoformat(document["signed_at"])
        if signed_at.tzinfo is None:
            raise ValueError("signed_at has no time zone")
        return Checkpoint(
            seq=int(document["seq"]),
            hash=bytes.fromhex(document["hash"]),
            signed_at=signed_at,
            signature=base64.b64decode(document["signature"], validate=True),
            key_id=str(document["key_id"]),
        )
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a checkpoint entry ({exc})") from None


@dataclass(frozen=True, slots=True)
class Anchored:
    """One entry read back from a sink: its checkpoint, or why it is not one."""

    source: str
    """Where it was read (`<file> line 3`, `s3://bucket/key version v`)."""
    checkpoint: Checkpoint | None
    error: str | None = None


class AnchorSink(Protocol):
    name: str
    """Stable and unique among the sinks: the key of `audit_anchored`."""

    async def write(self, checkpoint: Checkpoint) -> None: ...

    async def close(self) -> None: ...


class ReadableSink(AnchorSink, Protocol):
    async def read(self) -> list[Anchored]: ...


# --- the append-only file ------------------------------------------------------------------------------------


class FileAnchor:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file:{path.resolve()}"

    async def write(self, checkpoint: Checkpoint) -> None:
        line = entry(checkpoint) + b"\n"
        try:
            await anyio.to_thread.run_sync(self._append, line)
        except OSError as exc:
            raise AnchorError(exc.strerror or str(exc)) from exc

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if not created and os.fstat(fd).st_size and not self._ends_with_newline():
                line = b"\n" + line  # a line torn by a crash stays a bad line of its own
            if os.write(fd, line) != len(line):
                raise OSError(f"short write to {self.path}")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new name must survive a crash too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    async def read(self) -> list[Anchored]:
        """Every line (none when the file is missing); a line that is not a checkpoint comes back with why."""
        try:
            data = await anyio.to_thread.run_sync(self._read_bytes)
        except OSError as exc:
            raise AnchorError(f"{self.path}: {exc.strerror or exc}") from exc
        found = []
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            where = f"{self.path} line {number}"
            try:
                found.append(Anchored(where, parse_entry(raw)))
            except ValueError as exc:
                found.append(Anchored(where, None, str(exc)))
        return found

    def _read_bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    async def last(self) -> Checkpoint | None:
        """The newest entry (the file's last good line), read from the end."""

        def tail() -> bytes:
            try:
                with open(self.path, "rb") as fh:
                    size = fh.seek(0, os.SEEK_END)
                    fh.seek(max(0, size - 8192))
                    return fh.read()
            except FileNotFoundError:
                return b""

        for raw in reversed((await anyio.to_thread.run_sync(tail)).split(b"\n")):
            try:
                return parse_entry(raw)
            except ValueError:
                continue
        return None

    async def close(self) -> None:
        return None


# --- S3 Object Lock ------------------------------------------------------------------------------------------


class S3Anchor:
    def __init__(self, settings: S3Settings, retention_days: int = 2190) -> None:
        self.settings = settings
        self.retention = dt.timedelta(days=retention_days)
        prefix = settings.prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.name = f"s3://{settings.bucket}/{self.prefix}"
        self._client: Any = None
        self._context: Any = None

    async def _s3(self) -> Any:
        if self._client is None:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session

            kwargs: dict[str, Any] = {
                "region_name": self.settings.region,
                "config": AioConfig(
                    retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=30
                ),
            }
            if self.settings.endpoint_url:
                kwargs["endpoint_url"] = self.settings.endpoint_url
            if self.settings.access_key_id:
                kwargs["aws_access_key_id"] = self.settings.access_key_id
                kwargs["aws_secret_access_key"] = self.settings.secret_access_key
            self._context = get_session().create_client("s3", **kwargs)
            self._client = await self._context.__aenter__()
        return self._client

    async def write(self, checkpoint: Checkpoint) -> None:
        body = entry(checkpoint)
        until = dt.datetime.now(dt.UTC) + self.retention
        try:
            s3 = await self._s3()
            await s3.put_object(
                Bucket=self.settings.bucket,
                Key=f"{self.prefix}{checkpoint.seq:020d}.json",
                Body=body,
                ContentType="application/json",
                ContentMD5=base64.b64encode(hashlib.md5(body).digest()).decode("ascii"),  # Object Lock wants one
                ObjectLockMode="COMPLIANCE",
                ObjectLockRetainUntilDate=until,
            )
        except Exception as exc:
            raise AnchorError(_s3_reason(exc)) from exc

    async def read(self) -> list[Anchored]:
        """Every version of every object under the prefix (delete markers skipped)."""
        found: list[Anchored] = []
        try:
            s3 = await self._s3()
            paginator = s3.get_paginator("list_object_versions")
            async for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=self.prefix):
                for version in page.get("Versions", []):
                    key, version_id = version["Key"], version.get("VersionId")
                    where = f"s3://{self.settings.bucket}/{key} version {version_id}"
                    args = {"Bucket": self.settings.bucket, "Key": key}
                    if version_id and version_id != "null":
                        args["VersionId"] = version_id
                    response = await s3.get_object(**args)
                    async with response["Body"] as stream:
                        raw = await stream.read()
                    try:
                        found.append(Anchored(where, parse_entry(raw)))
                    except ValueError as exc:
                        found.append(Anchored(where, None, str(exc)))
        except Exception as exc:
            raise AnchorError(f"{self.name}: {_s3_reason(exc)}") from exc
        return found

    async def close(self) -> None:
        if self._context is not None:
            context, self._context, self._client = self._context, None, None
            await context.__aexit__(None, None, None)


def _s3_reason(exc: BaseException) -> str:
    """The S3 error code and message (never request data, so no credential), or the exception's class."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return f"{error.get('Code', '')}: {error.get('Message', '')}".strip(": ") or type(exc).__name__
    return type(exc).__name__


# --- syslog and witness (write only) -------------------------------------------------------------------------


class SyslogAnchor:
    def __init__(self, forwarder: SyslogForwarder, url: str) -> None:
        self.forwarder = forwarder
        self.name = f"syslog:{url}"

    async def write(self, checkpoint: Checkpoint) -> None:
        self.forwarder.send(format_checkpoint(entry(checkpoint), hostname=self.forwarder.hostname))

    async def close(self) -> None:
        return None  # the forwarder belongs to the audit trail


class WitnessAnchor:
    timeout_seconds = 10.0

    def __init__(self, url: str) -> None:
        self.url = url
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
        self.name = f"witness:{httpx.URL(url).host}#{digest}"  # the URL's path may be a secret: never logged
        self._client: httpx.AsyncClient | None = None

    async def write(self, checkpoint: Checkpoint) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_seconds, follow_redirects=False)
        try:
            response = await self._client.post(
                self.url, content=entry(checkpoint), headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise AnchorError(type(exc).__name__) from exc
        if not response.is_success:
            raise AnchorError(f"HTTP {response.status_code}")

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


# --- the set of sinks ----------------------------------------------------------------------------------------


@dataclass
class AuditAnchors:
    """The configured sinks, what they took (`audit_anchored`), and which are failing (for /readyz)."""

    sinks: Sequence[AnchorSink]
    failing: dict[str, str] = field(default_factory=dict)
    """Sink name -> why its last write failed; empty when every sink is up to date."""

    async def flush(self, pool: asyncpg.Pool) -> int:
        """Copy to each sink the checkpoints it does not hold yet, oldest first; a failure stops that sink's run
        (the next run starts again from the checkpoint that failed). Returns the copies written."""
        written = 0
        for sink in self.sinks:
            async with pool.acquire() as conn:
                rows = await conn.fetch(SQL["unanchored"], sink.name, FLUSH_LIMIT)
                vouch_stateless(conn)
            try:
                for row in rows:
                    checkpoint = Checkpoint(
                        int(row["seq"]), bytes(row["hash"]), row["signed_at"], bytes(row["signature"]), row["key_id"]
                    )
                    await asyncio.wait_for(sink.write(checkpoint), timeout=60)
                    async with pool.acquire() as conn:
                        await conn.execute(SQL["mark_anchored"], sink.name, checkpoint.seq)
                        vouch_stateless(conn)
                    written += 1
            except Exception as exc:  # one sink's failure must not stop the others
                reason = str(exc) if isinstance(exc, AnchorError) else type(exc).__name__
                self.failing[sink.name] = reason
                log.error("audit anchor %s failed: %s; retried at the next checkpoint run", sink.name, reason)
                continue
            if self.failing.pop(sink.name, None) is not None:
                log.warning("audit anchor %s is up to date again", sink.name)
        return written

    def status(self) -> str | None:
        """A line for /readyz (unauthenticated) when a sink is failing: the kinds of sink only (file, s3,
        syslog, witness); their names and the reasons are in the log."""
        if not self.failing:
            return None
        return "failing: " + ", ".join(sorted({name.partition(":")[0] for name in self.failing}))

    async def trusted_start(self, verifier: Verifier) -> Checkpoint | None:
        """The newest checkpoint of the anchor file whose signature verifies: where the checkpoint job starts
        checking the chain, so a chain rewritten behind a deleted database checkpoint is never signed."""
        for sink in self.sinks:
            if isinstance(sink, FileAnchor):
                try:
                    last = await sink.last()
                except OSError as exc:
                    log.warning("audit anchor %s cannot be read: %s", sink.name, exc)
                    return None
                if last is not None and verifier(
                    checkpoint_message(last.seq, last.hash, last.signed_at), last.signature, last.key_id
                ):
                    return last
        return None

    def readable(self) -> list[ReadableSink]:
        return [sink for sink in self.sinks if isinstance(sink, FileAnchor | S3Anchor)]

    async def close(self) -> None:
        for sink in self.sinks:
            await sink.close()


async def read_anchored(sinks: Sequence[ReadableSink]) -> list[Anchored]:
    """Every entry of every sink (AnchorError when one cannot be read)."""
    entries: list[Anchored] = []
    for sink in sinks:
        entries += await sink.read()
    return entries


def open_anchors(settings: AuthzSettings, forwarder: SyslogForwarder | None = None) -> AuditAnchors:
    """The sinks the settings name: the file (unless `off`), S3, the syslog stream, each witness URL."""
    sinks: list[AnchorSink] = []
    if settings.audit_anchor_path is not None:
        sinks.append(FileAnchor(settings.audit_anchor_path))
    if settings.audit_anchor_s3 is not None:
        sinks.append(S3Anchor(settings.audit_anchor_s3, settings.audit_anchor_retention_days))
    if forwarder is not None and settings.audit_syslog:
        sinks.append(SyslogAnchor(forwarder, settings.audit_syslog))
    sinks.extend(WitnessAnchor(url) for url in settings.audit_anchor_witness)
    return AuditAnchors(sinks)
