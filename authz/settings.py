"""The authentication, authorization and audit section of the settings: tokens, policies, break-glass, the audit
trail's checkpoints and anchors. Every field names its environment variable (`setting(...)`,
server/platform/settings.py) and is documented in the README."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from server.platform.settings import (
    PlatformSettings,
    S3Settings,
    SettingsError,
    http_url,
    integer,
    items,
    path,
    s3_location,
    setting,
    url_prefixes,
)

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


@dataclass(frozen=True)
class AuthzSettings(PlatformSettings):
    """What authentication, the policy engines, break-glass and the audit trail read."""

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

    @property
    def audit_anchor_path(self) -> Path | None:
        """The anchor file (`HOUNSFIELD_AUDIT_ANCHOR_FILE`), or None when it is `off`."""
        if self.audit_anchor_file is None:
            return self.data_dir / "audit" / "anchors.jsonl"
        return None if self.audit_anchor_file.lower() == "off" else Path(self.audit_anchor_file)


def authz_values(env: Mapping[str, str]) -> dict[str, Any]:
    """`HOUNSFIELD_AUDIT_ANCHOR_S3`: `s3://bucket/prefix` for checkpoint objects under Object Lock."""
    url = env.get("HOUNSFIELD_AUDIT_ANCHOR_S3") or None
    if url is None:
        return {"audit_anchor_s3": None}
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SettingsError(f"HOUNSFIELD_AUDIT_ANCHOR_S3: expected s3://bucket/prefix, got {url!r}")
    endpoint = env.get("HOUNSFIELD_AUDIT_ANCHOR_S3_ENDPOINT") or None
    anchor: S3Settings = s3_location(env, url, endpoint=endpoint, multipart=False)
    return {"audit_anchor_s3": anchor}
