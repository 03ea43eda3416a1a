"""Settings declared once: a field of a frozen settings dataclass names its environment variable and its parser
in the field's metadata (`setting(...)`), next to its one default and its docstring; `load` reads every such
field from an environment. An unset or empty variable leaves the default; a malformed value raises
`SettingsError` naming the variable, so a misconfigured server refuses to start instead of failing on the first
request. Values that need several variables or checks across fields are built by the settings class itself."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

Parser = Callable[[str, str], Any]
"""(variable name, its non-empty value) -> the field's value; raises `SettingsError`."""


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the environment variable."""


@dataclass(frozen=True, slots=True)
class Variable:
    """A field's environment variable and how its value is read."""

    name: str
    parse: Parser


def setting(variable: str, default: Any = dataclasses.MISSING, *, parse: Parser | None = None, **kw: Any) -> Any:
    """A dataclass field read from `variable` (a string as is, unless `parse` says otherwise)."""
    metadata = {"env": Variable(variable, parse or text)}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def load(cls: type, env: Mapping[str, str]) -> dict[str, Any]:
    """The values of `cls`'s environment fields whose variable is set and not empty (the others keep their
    defaults)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        var: Variable | None = f.metadata.get("env")
        if var is None:
            continue
        raw = env.get(var.name)
        if raw is None or raw == "":
            continue
        values[f.name] = var.parse(var.name, raw)
    return values


# --- parsers ---------------------------------------------------------------------------------------------------


def text(_name: str, raw: str) -> str:
    return raw


def boolean(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}: expected a boolean (true/false), got {raw!r}")


def integer(minimum: int = 0, maximum: int = 2**63, *, per: int | None = None) -> Parser:
    """An integer within [minimum, maximum]; with `per`, the float `value / per` (per=1000: milliseconds to
    seconds)."""

    def parse(name: str, raw: str) -> Any:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise SettingsError(f"{name}: {value} is outside {minimum}..{maximum}")
        return value if per is None else value / per

    return parse


def choice(*allowed: str) -> Parser:
    """One of `allowed`, case-insensitive."""

    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise SettingsError(f"{name}: expected {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}")
        return value

    return parse


def items(_name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated items, blanks dropped."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def http_url(name: str, raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise SettingsError(f"{name}: expected an http(s):// URL")
    return raw


def url_prefixes(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated http(s) URL prefixes, each with a host and neither credentials, query nor fragment."""
    prefixes = items(name, raw)
    for prefix in prefixes:
        parts = urlparse(prefix)
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
            raise SettingsError(f"{name}: {prefix!r} is not an http(s)://host/... URL prefix")
        if parts.query or parts.fragment:
            raise SettingsError(f"{name}: {prefix!r} must not have a query or fragment")
    return prefixes


def postgres_url(name: str, raw: str) -> str:
    if not raw.startswith(("postgres://", "postgresql://")):
        raise SettingsError(f"{name}: expected a postgresql:// URL")
    return raw


def path(_name: str, raw: str) -> Path:
    return Path(raw)


# --- sections shared by every package ----------------------------------------------------------------------------


def public_url(name: str, raw: str) -> str | None:
    url = raw.rstrip("/") or None
    if url and not url.startswith(("http://", "https://")):
        raise SettingsError(f"{name}: expected an http(s):// URL")
    return url


@dataclass(frozen=True, slots=True)
class S3Settings:
    """Where blobs live when the storage URL is `s3://bucket/prefix`."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    """`HOUNSFIELD_S3_ENDPOINT`: an S3-compatible endpoint (MinIO, Ceph, moto); AWS when unset."""
    region: str = "us-east-1"
    """`HOUNSFIELD_S3_REGION` (or `AWS_DEFAULT_REGION`)."""
    access_key_id: str | None = None
    """`AWS_ACCESS_KEY_ID`; when unset botocore's default credential chain is used."""
    secret_access_key: str | None = field(default=None, repr=False)
    """`AWS_SECRET_ACCESS_KEY`; never logged."""
    multipart_threshold: int = 16 * 1024 * 1024
    """`HOUNSFIELD_S3_MULTIPART_THRESHOLD`: objects at least this large are sent as multipart uploads."""


def s3_location(env: Mapping[str, str], url: str, *, endpoint: str | None = None, multipart: bool = True) -> S3Settings:
    """An `s3://bucket/prefix` URL with the endpoint, region and credentials the environment gives every S3 client
    (`HOUNSFIELD_S3_ENDPOINT`, `HOUNSFIELD_S3_REGION` or `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
    `AWS_SECRET_ACCESS_KEY`)."""
    parsed = urlparse(url)
    return S3Settings(
        bucket=parsed.netloc,
        prefix=parsed.path.strip("/"),
        endpoint_url=endpoint or env.get("HOUNSFIELD_S3_ENDPOINT") or None,
        region=env.get("HOUNSFIELD_S3_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
        secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        **({"multipart_threshold": _multipart_threshold(env)} if multipart else {}),
    )


def _multipart_threshold(env: Mapping[str, str]) -> int:
    """`HOUNSFIELD_S3_MULTIPART_THRESHOLD`: at least S3's 5 MiB part size; default 16 MiB."""
    name = "HOUNSFIELD_S3_MULTIPART_THRESHOLD"
    raw = env.get(name)
    return integer(5 * 1024 * 1024)(name, raw) if raw else 16 * 1024 * 1024


@dataclass(frozen=True)
class PlatformSettings:
    """What every package may read: where the data lives, the address served, the database, the HTTP edge, the
    free-space watermark, the worker, telemetry and logging. Each package's section extends it
    (`dicomweb.settings`, `authz.settings`, `fhir.settings`, `inference.settings`); the server's `Settings` is their
    union."""

    def __post_init__(self) -> None:
        if self.db_pool_max < self.db_pool_min:
            raise SettingsError("HOUNSFIELD_DB_POOL_MAX must be at least HOUNSFIELD_DB_POOL_MIN")

    data_dir: Path = setting("HOUNSFIELD_DATA", Path("var"), parse=path)
    """`HOUNSFIELD_DATA` (or `hounsfield serve --data`): embedded PostgreSQL, blobs and spool files live here."""
    host: str = setting("HOUNSFIELD_HOST", "127.0.0.1")
    """`HOUNSFIELD_HOST`: the address to bind; loopback unless told otherwise."""
    port: int = setting("HOUNSFIELD_PORT", 8080, parse=integer(0, 65535))
    """`HOUNSFIELD_PORT`."""
    database_url: str | None = setting("DATABASE_URL", None, parse=postgres_url)
    """`DATABASE_URL`: an external PostgreSQL, as the role the server serves as (a member of `hounsfield_app`,
    which may only append to the audit trail: platform/dbroles.py); when unset an embedded one runs in `<data>/pg`
    and the server connects to it as `hounsfield_app`."""
    database_owner_url: str | None = None
    """`HOUNSFIELD_DATABASE_OWNER_URL`: the same database as the schema's owner, used only to apply migrations
    at start; unset: DATABASE_URL applies them (and must then own the schema)."""
    database_allow_privileged: bool = setting("HOUNSFIELD_DATABASE_ALLOW_PRIVILEGED", False, parse=boolean)
    """`HOUNSFIELD_DATABASE_ALLOW_PRIVILEGED`: serve even when the serving role could rewrite the audit trail (a
    superuser, the tables' owner, or UPDATE/DELETE/TRUNCATE on them), logging an error; false (the default): the
    server refuses to start."""
    db_pool_min: int = setting("HOUNSFIELD_DB_POOL_MIN", 2, parse=integer(1, 1000))
    """`HOUNSFIELD_DB_POOL_MIN`."""
    db_pool_max: int = setting("HOUNSFIELD_DB_POOL_MAX", 10, parse=integer(1, 1000))
    """`HOUNSFIELD_DB_POOL_MAX`."""
    public_url: str | None = setting("HOUNSFIELD_PUBLIC_URL", None, parse=public_url)
    """`HOUNSFIELD_PUBLIC_URL`: base URL written into RetrieveURL/BulkDataURI (behind a proxy); default: taken
    from each request's Host header."""
    cors_origins: tuple[str, ...] = setting("HOUNSFIELD_CORS_ORIGINS", (), parse=items)
    """`HOUNSFIELD_CORS_ORIGINS`: comma-separated origins allowed to call the API from a browser."""
    max_request_header_bytes: int = setting("HOUNSFIELD_MAX_REQUEST_HEADER_BYTES", 64 * 1024, parse=integer(4096))
    """`HOUNSFIELD_MAX_REQUEST_HEADER_BYTES`: requests with larger HTTP headers in all get 431."""
    http_header_timeout_seconds: int = setting("HOUNSFIELD_HTTP_HEADER_TIMEOUT_SECONDS", 30, parse=integer(1, 600))
    """`HOUNSFIELD_HTTP_HEADER_TIMEOUT_SECONDS`: a connection whose request headers are not complete this long after
    it opened (or after its previous response) is closed, with 408 when part of a request had come (a client that
    sends nothing, or a byte at a time, cannot hold a connection)."""
    http_body_timeout_seconds: int = setting("HOUNSFIELD_HTTP_BODY_TIMEOUT_SECONDS", 60, parse=integer(1, 3600))
    """`HOUNSFIELD_HTTP_BODY_TIMEOUT_SECONDS`: the longest wait for the next piece of a request body. A body that
    stalls this long ends the request: 408 and the connection closed; a STOW-RS answers for the parts it received
    whole (they stay stored) and names the cut one as failed."""
    http_keepalive_seconds: int = setting("HOUNSFIELD_HTTP_KEEPALIVE_SECONDS", 5, parse=integer(1, 3600))
    """`HOUNSFIELD_HTTP_KEEPALIVE_SECONDS`: an idle keep-alive connection is closed after this long."""
    http_max_connections: int = setting("HOUNSFIELD_HTTP_MAX_CONNECTIONS", 1024, parse=integer(1, 1_000_000))
    """`HOUNSFIELD_HTTP_MAX_CONNECTIONS`: open HTTP connections per server process; one more is answered 503 with
    Retry-After and closed at once, so idle connections cannot use up the file descriptors that requests need. At
    start the process raises its descriptor limit (RLIMIT_NOFILE) to the hard limit, and lowers this one to fit
    in it when it does not."""
    min_free_bytes: int = setting("HOUNSFIELD_MIN_FREE_BYTES", 1024**3, parse=integer(0))
    """`HOUNSFIELD_MIN_FREE_BYTES` (default 1 GiB; 0 with a percent of 0 turns the watermark off): below this much
    free space on the data folder, the spool, the filesystem blob store or the embedded database's folder, ingest
    (STOW-RS, C-STORE, import, AI results) is refused (503 with Retry-After, or Out of Resources A700 per instance)
    and derived work (renditions, AI runs) waits; reads go on. `/readyz` names the low volume."""
    min_free_percent: int = setting("HOUNSFIELD_MIN_FREE_PERCENT", 0, parse=integer(0, 99))
    """`HOUNSFIELD_MIN_FREE_PERCENT` (0 to 99, default 0): the watermark as a share of each volume's size, when that
    is more than `HOUNSFIELD_MIN_FREE_BYTES`."""
    worker_enabled: bool = setting("HOUNSFIELD_WORKER", True, parse=boolean)
    """`HOUNSFIELD_WORKER`: run the job worker inside the server process."""
    processes: int = setting("HOUNSFIELD_PROCESSES", 1, parse=integer(1, 256))
    """`HOUNSFIELD_PROCESSES` (default 1): `hounsfield serve` runs this many server processes on one port, each
    with its own event loop and interpreter lock (one process is bound by its GIL at about one core).
    Each serves HTTP and runs the DICOM AE on the shared ports (each with its own C-STORE intake slot); the first
    to lock the data folder's `primary.lock` also runs the job worker. The parent process owns the embedded
    PostgreSQL. Each process holds its own pools and
    caches: budget its resident size (~150 MiB) and database connections (`HOUNSFIELD_DB_POOL_MAX`) per process."""
    worker_poll_seconds: float = 5.0
    """How long an idle worker waits for a NOTIFY before polling the queue again."""
    otel_exporter: str = setting("HOUNSFIELD_OTEL_EXPORTER", "none", parse=choice("none", "console", "otlp"))
    """`HOUNSFIELD_OTEL_EXPORTER`: `none` (default), `console` or `otlp` (then the standard
    `OTEL_EXPORTER_OTLP_ENDPOINT` applies)."""
    log_level: str = setting(
        "HOUNSFIELD_LOG_LEVEL", "info", parse=choice("debug", "info", "warning", "error", "critical")
    )
    """`HOUNSFIELD_LOG_LEVEL`."""
    malloc_arenas: int = setting(
        "HOUNSFIELD_MALLOC_ARENAS", parse=integer(0, 1024), default_factory=lambda: os.cpu_count() or 2
    )
    """`HOUNSFIELD_MALLOC_ARENAS`: glibc malloc arenas of `hounsfield serve` (default: one per CPU; 0 leaves
    glibc's own limit, 8 per CPU). Worker threads that parse, encode and write each get an arena by default, and
    freed memory stays resident in each: one per CPU keeps the server's resident size down at no
    measured cost in throughput."""


def platform_values(env: Mapping[str, str]) -> dict[str, Any]:
    """The platform fields that need several variables."""
    return {"database_owner_url": _database_owner_url(env)}


def _database_owner_url(env: Mapping[str, str]) -> str | None:
    """`HOUNSFIELD_DATABASE_OWNER_URL`: a postgresql:// URL, only beside DATABASE_URL."""
    url = env.get("HOUNSFIELD_DATABASE_OWNER_URL") or None
    if url and not url.startswith(("postgres://", "postgresql://")):
        raise SettingsError("HOUNSFIELD_DATABASE_OWNER_URL: expected a postgresql:// URL")
    if url and not env.get("DATABASE_URL"):
        raise SettingsError("HOUNSFIELD_DATABASE_OWNER_URL: set only with DATABASE_URL (the embedded one has its own)")
    return url
