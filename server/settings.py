"""Typed, frozen settings built once at start from the environment.

Every field is documented here and in the README. A field read from one environment variable declares it with
its default and parser (`setting(...)`, server/platform/settings.py); `Settings.from_env` loads those and builds
the few values that need several variables or checks across fields. A malformed value raises `SettingsError`
naming the variable, so a misconfigured server refuses to start instead of failing on the first request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

from dicomweb.dimse.config import DimseConfig, DimseConfigError, ae_title, parse_destinations, parse_peers, parse_routes
from dicomweb.dimse.config import check as check_dimse
from dicomweb.dimse.config import check_tls as check_dimse_tls
from dicomweb.dimse.config import parse_tls as parse_dimse_tls
from server.platform.settings import (
    SettingsError,
    boolean,
    choice,
    http_url,
    integer,
    items,
    load,
    path,
    postgres_url,
    setting,
    url_prefixes,
)

__all__ = ["PUBLIC_PATHS", "S3Settings", "Settings", "SettingsError"]

PUBLIC_PATHS = (
    "/healthz",
    "/readyz",
    "/fhir/metadata",
    "/fhir/.well-known/smart-configuration",
    "/.well-known/smart-configuration",
    "/fhir/SearchParameter/DiagnosticReport-imaging-study",
)
"""Paths answered without a token by default (`HOUNSFIELD_AUTH_PUBLIC_PATHS` replaces the list)."""


_ASYMMETRIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}


def _algorithms(name: str, raw: str) -> tuple[str, ...]:
    names = items(name, raw) or ("RS256", "ES256", "PS256")
    bad = [n for n in names if n not in _ASYMMETRIC]
    if bad:
        raise SettingsError(f"{name}: only asymmetric algorithms are allowed, not {', '.join(bad)}")
    return names


def _public_paths(name: str, raw: str) -> tuple[str, ...]:
    return items(name, raw) or PUBLIC_PATHS


def _public_url(name: str, raw: str) -> str | None:
    url = raw.rstrip("/") or None
    if url and not url.startswith(("http://", "https://")):
        raise SettingsError(f"{name}: expected an http(s):// URL")
    return url


def _ae_title(name: str, raw: str) -> str:
    try:
        return ae_title(raw)
    except DimseConfigError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def _dimse_max_pdu(name: str, raw: str) -> int:
    """`HOUNSFIELD_DIMSE_MAX_PDU`: 0 (no limit) or 4096 bytes to 64 MiB."""
    value: int = integer(0, 64 * 1_048_576)(name, raw)
    if 0 < value < 4096:
        raise SettingsError(f"{name}: {value} is below 4096 bytes (0 means no limit)")
    return value


def _dimse(env: Mapping[str, str]) -> DimseConfig:
    name = "HOUNSFIELD_DIMSE_PEERS"
    try:
        peers = parse_peers(env.get(name, ""))
        name = "HOUNSFIELD_DIMSE_DESTINATIONS"
        destinations = parse_destinations(env.get(name, ""))
        name = "HOUNSFIELD_DIMSE_ROUTES"
        config = DimseConfig(peers, destinations, parse_routes(env.get(name, "")))
        check_dimse(config)
        name = "HOUNSFIELD_DIMSE_TLS"
        tls = (env.get(f"{name}_{part}", "") for part in ("CERT", "KEY", "CA", "PORT", "CLIENT_CERTS", "ONLY"))
        config = replace(config, tls=parse_dimse_tls(*tls))
        check_dimse_tls(config)
    except DimseConfigError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    return config


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


DEFAULT_RENDITIONS = ("1.2.840.10008.1.2.4.202",)
"""HTJ2K lossless RPCL: what progressive viewers (OHIF/Cornerstone3D) ask frames in."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server reads from its environment, validated once."""

    data_dir: Path = setting("HOUNSFIELD_DATA", Path("var"), parse=path)
    """`HOUNSFIELD_DATA` (or `hounsfield serve --data`): embedded PostgreSQL, blobs and spool files live here."""
    host: str = setting("HOUNSFIELD_HOST", "127.0.0.1")
    """`HOUNSFIELD_HOST`: the address to bind; loopback unless told otherwise."""
    port: int = setting("HOUNSFIELD_PORT", 8080, parse=integer(0, 65535))
    """`HOUNSFIELD_PORT`."""
    database_url: str | None = setting("DATABASE_URL", None, parse=postgres_url)
    """`DATABASE_URL`: an external PostgreSQL, as the role the server serves as (a member of `hounsfield_app`,
    which may only append to the audit trail: server/dbroles.py); when unset an embedded one runs in `<data>/pg`
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
    storage_url: str | None = None
    """`HOUNSFIELD_STORAGE_URL`: `s3://bucket/prefix` or a folder path; default `<data>/blobs`."""
    s3: S3Settings | None = None
    public_url: str | None = setting("HOUNSFIELD_PUBLIC_URL", None, parse=_public_url)
    """`HOUNSFIELD_PUBLIC_URL`: base URL written into RetrieveURL/BulkDataURI (behind a proxy); default: taken
    from each request's Host header."""
    overwrite: bool = setting("HOUNSFIELD_OVERWRITE", False, parse=boolean)
    """`HOUNSFIELD_OVERWRITE`: a STOW of an existing SOP Instance UID with different bytes replaces it (true) or
    fails with a reason (false, the default). Identical bytes are always an idempotent success."""
    cors_origins: tuple[str, ...] = setting("HOUNSFIELD_CORS_ORIGINS", (), parse=items)
    """`HOUNSFIELD_CORS_ORIGINS`: comma-separated origins allowed to call the API from a browser."""
    max_instance_bytes: int = setting("HOUNSFIELD_MAX_INSTANCE_BYTES", 8 * 1024**3, parse=integer(1024))
    """`HOUNSFIELD_MAX_INSTANCE_BYTES`: a single part larger than this is rejected (default 8 GiB)."""
    max_part_header_bytes: int = setting("HOUNSFIELD_MAX_PART_HEADER_BYTES", 16 * 1024, parse=integer(256))
    """`HOUNSFIELD_MAX_PART_HEADER_BYTES`: larger multipart part headers get 413."""
    max_request_header_bytes: int = setting("HOUNSFIELD_MAX_REQUEST_HEADER_BYTES", 64 * 1024, parse=integer(4096))
    """`HOUNSFIELD_MAX_REQUEST_HEADER_BYTES`: requests with larger HTTP headers in all get 431."""

    # --- HTTP connections (server/platform/connections.py) ---
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

    # --- free space (server/platform/diskspace.py) ---
    min_free_bytes: int = setting("HOUNSFIELD_MIN_FREE_BYTES", 1024**3, parse=integer(0))
    """`HOUNSFIELD_MIN_FREE_BYTES` (default 1 GiB; 0 with a percent of 0 turns the watermark off): below this much
    free space on the data folder, the spool, the filesystem blob store or the embedded database's folder, ingest
    (STOW-RS, C-STORE, import, AI results) is refused (503 with Retry-After, or Out of Resources A700 per instance)
    and derived work (renditions, AI runs) waits; reads go on. `/readyz` names the low volume."""
    min_free_percent: int = setting("HOUNSFIELD_MIN_FREE_PERCENT", 0, parse=integer(0, 99))
    """`HOUNSFIELD_MIN_FREE_PERCENT` (0 to 99, default 0): the watermark as a share of each volume's size, when that
    is more than `HOUNSFIELD_MIN_FREE_BYTES`."""
    bulkdata_threshold: int = setting("HOUNSFIELD_BULKDATA_THRESHOLD", 1024, parse=integer(0))
    """`HOUNSFIELD_BULKDATA_THRESHOLD`: binary attributes longer than this become BulkDataURI in metadata."""
    fhir_max_bundle_entries: int = setting("HOUNSFIELD_FHIR_MAX_BUNDLE_ENTRIES", 1000, parse=integer(1, 100_000))
    """`HOUNSFIELD_FHIR_MAX_BUNDLE_ENTRIES`: a batch or transaction Bundle with more entries gets 413 (request
    bodies are also limited to 10 MB)."""
    worker_enabled: bool = setting("HOUNSFIELD_WORKER", True, parse=boolean)
    """`HOUNSFIELD_WORKER`: run the job worker inside the server process."""
    processes: int = setting("HOUNSFIELD_PROCESSES", 1, parse=integer(1, 256))
    """`HOUNSFIELD_PROCESSES` (default 1): `hounsfield serve` runs this many server processes on one port, each
    with its own event loop and interpreter lock (one process is bound by its GIL at about one core).
    The first to lock the data folder's `primary.lock` also runs the DICOM AE and the job worker; the others
    answer HTTP only. The parent process owns the embedded PostgreSQL. Each process holds its own pools and
    caches: budget its resident size (~150 MiB) and database connections (`HOUNSFIELD_DB_POOL_MAX`) per process."""
    worker_poll_seconds: float = 5.0
    """How long an idle worker waits for a NOTIFY before polling the queue again."""
    fhir_sync_delay_seconds: float = setting("HOUNSFIELD_FHIR_SYNC_DELAY_MS", 1.0, parse=integer(0, 600_000, per=1000))
    """`HOUNSFIELD_FHIR_SYNC_DELAY_MS` (milliseconds, default 1000): a stored instance's ImagingStudy is brought up
    to date this long after it arrives, so that a burst of instances of one study makes one new version."""
    gc_grace_seconds: int = setting("HOUNSFIELD_GC_GRACE_SECONDS", 3600, parse=integer(0))
    """`HOUNSFIELD_GC_GRACE_SECONDS`: blobs without an index row younger than this are left alone (they may
    belong to a store in flight)."""
    gc_interval_seconds: int = setting("HOUNSFIELD_GC_INTERVAL_SECONDS", 3600, parse=integer(1))
    """`HOUNSFIELD_GC_INTERVAL_SECONDS`: how often the orphan-blob sweep is scheduled."""
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

    # --- authentication (bearer JWTs) ---
    auth_issuer: str = setting("HOUNSFIELD_AUTH_ISSUER", "hounsfield")
    """`HOUNSFIELD_AUTH_ISSUER`: the expected `iss`. The embedded issuer (default) signs with a key made in
    `<data>/keys/` on first start; `hounsfield token` issues its tokens."""
    auth_audience: str = setting("HOUNSFIELD_AUTH_AUDIENCE", "hounsfield")
    """`HOUNSFIELD_AUTH_AUDIENCE`: the expected `aud`."""
    auth_jwks_url: str | None = setting("HOUNSFIELD_AUTH_JWKS_URL", None, parse=http_url)
    """`HOUNSFIELD_AUTH_JWKS_URL`: an identity provider's JWKS (cached; refreshed on an unknown `kid`). When
    unset, the keys are the embedded key plus `HOUNSFIELD_AUTH_KEYS_FILE`."""
    auth_keys_file: Path | None = setting("HOUNSFIELD_AUTH_KEYS_FILE", None, parse=path)
    """`HOUNSFIELD_AUTH_KEYS_FILE`: a JWKS JSON file of trusted public keys (in addition to the embedded key)."""
    auth_algorithms: tuple[str, ...] = setting(
        "HOUNSFIELD_AUTH_ALGORITHMS", ("RS256", "ES256", "PS256"), parse=_algorithms
    )
    """`HOUNSFIELD_AUTH_ALGORITHMS`: the allow-list; `none` and HMAC algorithms are never accepted."""
    auth_clock_skew_seconds: int = setting("HOUNSFIELD_AUTH_CLOCK_SKEW_SECONDS", 60, parse=integer(0, 600))
    """`HOUNSFIELD_AUTH_CLOCK_SKEW_SECONDS`: leeway for `exp`/`nbf`/`iat`."""
    auth_public_paths: tuple[str, ...] = setting("HOUNSFIELD_AUTH_PUBLIC_PATHS", PUBLIC_PATHS, parse=_public_paths)
    """`HOUNSFIELD_AUTH_PUBLIC_PATHS`: paths answered without a token: health checks for load balancers, and the
    FHIR discovery documents (CapabilityStatement, SMART configuration), which SMART clients read before they
    have a token and which carry no patient data."""
    smart_authorization_url: str | None = setting("HOUNSFIELD_SMART_AUTHORIZE_URL", None, parse=http_url)
    """`HOUNSFIELD_SMART_AUTHORIZE_URL`: the authorization server's authorize endpoint, advertised in the SMART
    configuration and the CapabilityStatement (none by default: the embedded issuer has no OAuth endpoints)."""
    smart_token_url: str | None = setting("HOUNSFIELD_SMART_TOKEN_URL", None, parse=http_url)
    """`HOUNSFIELD_SMART_TOKEN_URL`: the authorization server's token endpoint (advertised likewise)."""

    # --- authorization (OPA / Rego) ---
    policy_dir: Path | None = setting("HOUNSFIELD_POLICY_DIR", None, parse=path)
    """`HOUNSFIELD_POLICY_DIR`: Rego policies (default: the shipped `authz/policies`)."""
    policy_data_file: Path | None = setting("HOUNSFIELD_POLICY_DATA", None, parse=path)
    """`HOUNSFIELD_POLICY_DATA`: JSON policy data (care lists, consents); default: the shipped example data."""
    opa_url: str | None = setting("HOUNSFIELD_OPA_URL", None, parse=http_url)
    """`HOUNSFIELD_OPA_URL`: evaluate on an OPA server (Data API) instead of in-process with regopy."""
    policy_cache_seconds: float = setting("HOUNSFIELD_POLICY_CACHE_SECONDS", 5.0, parse=integer(0, 3600, per=1))
    """`HOUNSFIELD_POLICY_CACHE_SECONDS`: identical questions (same subject, action, resource, context but the
    time) are answered from a cache this long; 0 turns the cache off."""
    policy_cache_entries: int = setting("HOUNSFIELD_POLICY_CACHE_ENTRIES", 4096, parse=integer(1, 1_000_000))
    """`HOUNSFIELD_POLICY_CACHE_ENTRIES`: decisions the cache holds at most (the least recently used go first), so
    that its memory stays bounded however many distinct questions arrive (an entry is the question as JSON and
    its decision: one or two KB)."""
    opa_timeout_seconds: float = setting("HOUNSFIELD_OPA_TIMEOUT_MS", 2.0, parse=integer(10, 60000, per=1000))
    """`HOUNSFIELD_OPA_TIMEOUT_MS` (milliseconds): a decision that takes longer fails closed (503)."""

    # --- break-glass and audit ---
    break_glass_minutes: int = setting("HOUNSFIELD_BREAK_GLASS_MINUTES", 60, parse=integer(1, 24 * 60))
    """`HOUNSFIELD_BREAK_GLASS_MINUTES`: how long an emergency access window lasts."""
    break_glass_webhook: str | None = setting("HOUNSFIELD_BREAK_GLASS_WEBHOOK", None, parse=http_url)
    """`HOUNSFIELD_BREAK_GLASS_WEBHOOK`: URL that receives a JSON alert when someone breaks the glass."""
    audit_checkpoint_seconds: int = setting("HOUNSFIELD_AUDIT_CHECKPOINT_SECONDS", 300, parse=integer(1))
    """`HOUNSFIELD_AUDIT_CHECKPOINT_SECONDS`: how often the audit chain head is signed (a checkpoint)."""
    audit_syslog: str | None = setting("HOUNSFIELD_AUDIT_SYSLOG", None)
    """`HOUNSFIELD_AUDIT_SYSLOG`: `udp://host:port` or `tcp://host:port` to forward audit records (RFC 5424)."""
    audit_anchor_file: str | None = setting("HOUNSFIELD_AUDIT_ANCHOR_FILE", None)
    """`HOUNSFIELD_AUDIT_ANCHOR_FILE`: the append-only JSON-lines file every signed checkpoint is copied to (one
    object a line, opened O_APPEND, mode 0600, fsynced); unset: `<data>/audit/anchors.jsonl`; `off`: none. In
    the data folder it only guards against whoever owns the database but not the host: for a real guarantee put
    it on another host or a WORM medium, or make it append-only (`chattr +a`)."""
    audit_anchor_s3: S3Settings | None = None
    """`HOUNSFIELD_AUDIT_ANCHOR_S3`: `s3://bucket/prefix`, one object per checkpoint written with Object Lock
    retention in COMPLIANCE mode (the bucket must have Object Lock enabled); endpoint, region and credentials
    as the blob store's (`HOUNSFIELD_AUDIT_ANCHOR_S3_ENDPOINT` overrides `HOUNSFIELD_S3_ENDPOINT`)."""
    audit_anchor_retention_days: int = setting("HOUNSFIELD_AUDIT_ANCHOR_RETENTION_DAYS", 2190, parse=integer(1))
    """`HOUNSFIELD_AUDIT_ANCHOR_RETENTION_DAYS`: the Object Lock retention of each checkpoint object (default
    six years); nobody, the bucket's owner included, can delete or shorten it before then."""
    audit_anchor_witness: tuple[str, ...] = setting("HOUNSFIELD_AUDIT_ANCHOR_WITNESS", (), parse=url_prefixes)
    """`HOUNSFIELD_AUDIT_ANCHOR_WITNESS`: comma-separated http(s) URLs each signed checkpoint is POSTed to as
    JSON (a witness service run by someone else than the database's owner); any 2xx is success. With
    `HOUNSFIELD_AUDIT_SYSLOG` set, checkpoints also go on that stream (MSGID `HF-CHECKPOINT`)."""
    audit_anchor_grace_seconds: int = setting("HOUNSFIELD_AUDIT_ANCHOR_GRACE_SECONDS", 600, parse=integer(0))
    """`HOUNSFIELD_AUDIT_ANCHOR_GRACE_SECONDS`: `hounsfield audit verify` fails when a record older than one
    checkpoint interval plus this has no anchored checkpoint covering it (the job was late, a sink failed, or
    checkpoints were deleted)."""

    # --- FHIR Subscriptions (fhir/subscriptions.py) ---
    fhir_subscription_endpoints: tuple[str, ...] = setting(
        "HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS", (), parse=url_prefixes
    )
    """`HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS`: comma-separated URL prefixes (`https://ehr.example.org/hooks/`)
    that a Subscription's rest-hook endpoint must start with (same scheme, host and port; whole path segments).
    Empty (the default): no Subscription can be created. The server calls only these (no request forgery)."""
    fhir_subscription_attempts: int = setting("HOUNSFIELD_FHIR_SUBSCRIPTION_ATTEMPTS", 8, parse=integer(1, 20))
    """`HOUNSFIELD_FHIR_SUBSCRIPTION_ATTEMPTS`: delivery attempts of one notification (retried after 2, 4, 8 ...
    seconds) before the Subscription is set to `error`."""

    # --- classic DICOM networking (DIMSE; dicomweb/dimse) ---
    dimse_enabled: bool = setting("HOUNSFIELD_DIMSE", True, parse=boolean)
    """`HOUNSFIELD_DIMSE`: run the DICOM Application Entity (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET)."""
    dimse_port: int = setting("HOUNSFIELD_DIMSE_PORT", 11112, parse=integer(0, 65535))
    """`HOUNSFIELD_DIMSE_PORT`: the DIMSE port (bound on `HOUNSFIELD_HOST`)."""
    dimse_ae_title: str = setting("HOUNSFIELD_DIMSE_AE_TITLE", "HOUNSFIELD", parse=_ae_title)
    """`HOUNSFIELD_DIMSE_AE_TITLE`: this server's AE title (also the calling AE of C-MOVE and routing)."""
    dimse: DimseConfig = field(default_factory=DimseConfig)
    """`HOUNSFIELD_DIMSE_PEERS` (`TITLE=role[+role][:sub][@binding...],...`: the only calling AE titles accepted,
    where each may connect from and with which certificate, and their identities), `HOUNSFIELD_DIMSE_DESTINATIONS`
    (`TITLE@host:port[+tls],...`: C-MOVE and routing targets), `HOUNSFIELD_DIMSE_ROUTES` (auto-routing rules: a
    JSON array or a JSON file), `HOUNSFIELD_DIMSE_TLS_CERT`, `_KEY`, `_CA`, `_PORT`, `_CLIENT_CERTS`, `_ONLY`
    (DICOM TLS: `dimse.tls`); see dicomweb/dimse/config.py."""
    dimse_max_associations: int = setting("HOUNSFIELD_DIMSE_MAX_ASSOCIATIONS", 32, parse=integer(1, 1000))
    """`HOUNSFIELD_DIMSE_MAX_ASSOCIATIONS`: concurrent associations; more are rejected (transient)."""
    dimse_timeout_seconds: int = setting("HOUNSFIELD_DIMSE_TIMEOUT_SECONDS", 30, parse=integer(1, 3600))
    """`HOUNSFIELD_DIMSE_TIMEOUT_SECONDS`: ACSE/DIMSE timeouts, and the longest one operation may wait on the
    server (index, blob store, policy)."""
    dimse_max_pdu: int = setting("HOUNSFIELD_DIMSE_MAX_PDU", 1_048_576, parse=_dimse_max_pdu)
    """`HOUNSFIELD_DIMSE_MAX_PDU`: the Maximum Length Received this AE proposes (PS3.8 D.1.1; 0: no limit).
    Peers cut data sets into P-DATA PDUs of at most this size, and each PDU costs pynetdicom's reactor a loop:
    1 MiB instead of pynetdicom's 16 KiB default takes a 512x512 CT image's receive from ~32 PDUs to one
    (a no-op pynetdicom SCP under storescu: 202 -> 250 images/s, 3.2 -> 2.2 ms CPU per image)."""

    # --- AI on ingest (inference/) ---
    inference_enabled: bool = setting("HOUNSFIELD_INFERENCE", True, parse=boolean)
    """`HOUNSFIELD_INFERENCE`: dispatch new series to the registered models (the ingest hook and job handlers)."""
    inference_quiet_seconds: float = setting("HOUNSFIELD_INFERENCE_QUIET_SECONDS", 30.0, parse=integer(0, per=1))
    """`HOUNSFIELD_INFERENCE_QUIET_SECONDS`: a series counts as complete when no instance of it arrived for this
    long; then the matching models run."""
    inference_workers: int = setting("HOUNSFIELD_INFERENCE_WORKERS", 2, parse=integer(1, 256))
    """`HOUNSFIELD_INFERENCE_WORKERS`: threads of the in-process backend (models running at once)."""
    inference_max_attempts: int = setting("HOUNSFIELD_INFERENCE_MAX_ATTEMPTS", 5, parse=integer(1, 20))
    """`HOUNSFIELD_INFERENCE_MAX_ATTEMPTS`: attempts of one model run (retried after 2, 4, 8 ... seconds) before
    its result is `failed`."""
    inference_max_instances: int = setting("HOUNSFIELD_INFERENCE_MAX_INSTANCES", 2000, parse=integer(1, 100_000))
    """`HOUNSFIELD_INFERENCE_MAX_INSTANCES`: the most instances of one series a model reads; a run on a larger
    series fails at once with the count and this limit as its reason (never a partial volume as a result)."""
    inference_plugins: tuple[str, ...] = setting("HOUNSFIELD_INFERENCE_PLUGINS", (), parse=items)
    """`HOUNSFIELD_INFERENCE_PLUGINS`: comma-separated Python modules with more model adapters (`ADAPTERS`)."""
    inference_subject: str = setting("HOUNSFIELD_INFERENCE_SUBJECT", "hounsfield-ai")
    """`HOUNSFIELD_INFERENCE_SUBJECT`: the `sub` of the AI service identity (role `ai-service`) in policy
    decisions and audit records."""
    inference_backend: str = setting("HOUNSFIELD_INFERENCE_BACKEND", "inprocess", parse=choice("inprocess", "ray"))
    """`HOUNSFIELD_INFERENCE_BACKEND`: `inprocess` (the thread pool, the embedded default) or `ray` (Ray Serve
    deployments made by `hounsfield models deploy`, called through DeploymentHandles; inference/backend_ray.py)."""
    inference_ray_address: str | None = None
    """`HOUNSFIELD_RAY_ADDRESS` (else `RAY_ADDRESS`): the Ray cluster of the `ray` backend. Unset: a local Ray
    instance is started in this process (dashboard off, no usage stats) and models are deployed on first use."""
    inference_ray_app: str = setting("HOUNSFIELD_RAY_APP", "hounsfield")
    """`HOUNSFIELD_RAY_APP`: the Serve application that holds one deployment per active or shadow model."""
    inference_ray_min_replicas: int = setting("HOUNSFIELD_RAY_MIN_REPLICAS", 1, parse=integer(0, 1000))
    """`HOUNSFIELD_RAY_MIN_REPLICAS`: Serve autoscaling lower bound, per model deployment."""
    inference_ray_max_replicas: int = setting("HOUNSFIELD_RAY_MAX_REPLICAS", 1, parse=integer(1, 1000))
    """`HOUNSFIELD_RAY_MAX_REPLICAS`: Serve autoscaling upper bound, per model deployment."""
    inference_run_timeout_s: float = setting(
        "HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S", 300.0, parse=integer(1, 86_400, per=1)
    )
    """`HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S`: the longest a run waits for its Ray Serve deployment (placement,
    queueing, the model itself), and `hounsfield models deploy` for its replicas to start; then the attempt fails
    with the deployment's state as its reason and is retried like any other failure."""

    # --- renditions (dicomweb/renditions.py) ---
    renditions: tuple[str, ...] = DEFAULT_RENDITIONS
    """`HOUNSFIELD_RENDITIONS`: comma-separated transfer syntax UIDs each new image's frames are encoded in at
    ingest (a `rendition` job), so that frame requests in them never wait for an encoder. Default HTJ2K lossless
    RPCL (progressive loading by byte range); empty: none ahead of time (still made and kept on first demand)."""
    renditions_idle_seconds: float = setting(
        "HOUNSFIELD_RENDITIONS_IDLE_MS", 2.0, parse=integer(0, 3_600_000, per=1000)
    )
    """`HOUNSFIELD_RENDITIONS_IDLE_MS` (milliseconds, default 2000): rendition jobs give way to ingest; this server's
    worker takes them once it has stored no instance for this long (0: at once). Server processes that share the
    data folder count together (`dicomweb.store.IngestActivity`). A frame request during an ingest encodes the
    frames it asks for itself, as for any image without a rendition."""
    renditions_max_wait_seconds: float = setting(
        "HOUNSFIELD_RENDITIONS_MAX_WAIT_S", 60.0, parse=integer(0, 86_400, per=1)
    )
    """`HOUNSFIELD_RENDITIONS_MAX_WAIT_S` (seconds, default 60): the most a rendition job waits for ingest to go quiet
    (under a continuous ingest, renditions are made this late)."""

    # --- storage compression (dicomweb/compress.py) ---
    store_compression: str = setting("HOUNSFIELD_STORE_COMPRESSION", "none", parse=choice("none", "htj2k", "j2k"))
    """`HOUNSFIELD_STORE_COMPRESSION`: `none` (default: store as received), `htj2k` (HTJ2K lossless RPCL,
    1.2.840.10008.1.2.4.202, its own progressive rendition) or `j2k` (JPEG 2000 lossless, .4.90). Uncompressed
    images are stored compressed and verified bit-exact; every retrieve still returns exact pixels in any syntax."""

    @property
    def blob_dir(self) -> Path:
        if self.storage_url and not self.storage_url.startswith("s3://"):
            return Path(self.storage_url.removeprefix("file://"))
        return self.data_dir / "blobs"

    @property
    def audit_anchor_path(self) -> Path | None:
        """The anchor file (`HOUNSFIELD_AUDIT_ANCHOR_FILE`), or None when it is `off`."""
        if self.audit_anchor_file is None:
            return self.data_dir / "audit" / "anchors.jsonl"
        return None if self.audit_anchor_file.lower() == "off" else Path(self.audit_anchor_file)

    @property
    def spool_dir(self) -> Path:
        """Incoming parts are spooled here before validation; same file system as `blob_dir` by default so
        that the filesystem blob store can rename instead of copy."""
        if self.s3 is None:
            return self.blob_dir / ".spool"
        return self.data_dir / "spool"

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        storage_url = env.get("HOUNSFIELD_STORAGE_URL") or None
        s3 = None
        if storage_url and storage_url.startswith("s3://"):
            parsed = urlparse(storage_url)
            if not parsed.netloc:
                raise SettingsError(f"HOUNSFIELD_STORAGE_URL: no bucket in {storage_url!r}")
            s3 = S3Settings(
                bucket=parsed.netloc,
                prefix=parsed.path.strip("/"),
                endpoint_url=env.get("HOUNSFIELD_S3_ENDPOINT") or None,
                region=env.get("HOUNSFIELD_S3_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                multipart_threshold=_multipart_threshold(env),
            )
        elif storage_url and "://" in storage_url and not storage_url.startswith("file://"):
            raise SettingsError(f"HOUNSFIELD_STORAGE_URL: expected s3://bucket/prefix or a folder, got {storage_url!r}")
        values = load(cls, env)  # every field declared with `setting(...)`
        if values.get("db_pool_max", 10) < values.get("db_pool_min", 2):
            raise SettingsError("HOUNSFIELD_DB_POOL_MAX must be at least HOUNSFIELD_DB_POOL_MIN")
        settings = cls(
            **values,
            storage_url=storage_url,
            s3=s3,
            database_owner_url=_database_owner_url(env),
            audit_anchor_s3=_anchor_s3(env),
            dimse=_dimse(env),
            inference_ray_address=env.get("HOUNSFIELD_RAY_ADDRESS") or env.get("RAY_ADDRESS") or None,
            renditions=_renditions(env),
        )
        return settings.with_overrides(**overrides) if overrides else settings


def _multipart_threshold(env: Mapping[str, str]) -> int:
    """`HOUNSFIELD_S3_MULTIPART_THRESHOLD`: at least S3's 5 MiB part size; default 16 MiB."""
    name = "HOUNSFIELD_S3_MULTIPART_THRESHOLD"
    raw = env.get(name)
    return integer(5 * 1024 * 1024)(name, raw) if raw else 16 * 1024 * 1024


def _renditions(env: Mapping[str, str]) -> tuple[str, ...]:
    """`HOUNSFIELD_RENDITIONS`: unset means the default (HTJ2K RPCL); each value must be a syntax we encode."""
    if "HOUNSFIELD_RENDITIONS" not in env:
        return DEFAULT_RENDITIONS
    from dicomweb.encode import CODECS  # the encoders' table; imported only when the variable is set

    values = items("HOUNSFIELD_RENDITIONS", env["HOUNSFIELD_RENDITIONS"])
    unknown = [v for v in values if v not in CODECS]
    if unknown:
        raise SettingsError(f"HOUNSFIELD_RENDITIONS: no encoder for {unknown[0]!r}; one of {', '.join(CODECS)}")
    return values


def _database_owner_url(env: Mapping[str, str]) -> str | None:
    """`HOUNSFIELD_DATABASE_OWNER_URL`: a postgresql:// URL, only beside DATABASE_URL."""
    url = env.get("HOUNSFIELD_DATABASE_OWNER_URL") or None
    if url and not url.startswith(("postgres://", "postgresql://")):
        raise SettingsError("HOUNSFIELD_DATABASE_OWNER_URL: expected a postgresql:// URL")
    if url and not env.get("DATABASE_URL"):
        raise SettingsError("HOUNSFIELD_DATABASE_OWNER_URL: set only with DATABASE_URL (the embedded one has its own)")
    return url


def _anchor_s3(env: Mapping[str, str]) -> S3Settings | None:
    """`HOUNSFIELD_AUDIT_ANCHOR_S3`: `s3://bucket/prefix` for checkpoint objects under Object Lock."""
    url = env.get("HOUNSFIELD_AUDIT_ANCHOR_S3") or None
    if url is None:
        return None
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SettingsError(f"HOUNSFIELD_AUDIT_ANCHOR_S3: expected s3://bucket/prefix, got {url!r}")
    return S3Settings(
        bucket=parsed.netloc,
        prefix=parsed.path.strip("/"),
        endpoint_url=env.get("HOUNSFIELD_AUDIT_ANCHOR_S3_ENDPOINT") or env.get("HOUNSFIELD_S3_ENDPOINT") or None,
        region=env.get("HOUNSFIELD_S3_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
        secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
    )
