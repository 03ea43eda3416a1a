"""The embedded signing key: an EC P-256 key (ES256, RFC 7518 3.4) made in `<data>/keys/signing.pem` on first
start and loaded afterwards. It signs the tokens of `hounsfield token` and is trusted by the validator when no
identity provider's JWKS URL is configured.

The file is written once, atomically and without ever replacing an existing key (a temporary file is hard-linked
into place), so two processes starting together on a fresh data folder end up with the same key. The folder is
0700 and the file 0600. The key id (`kid`) is the RFC 7638 JWK thumbprint of the public key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.platform import private

log = logging.getLogger(__name__)

KEY_FILE = "signing.pem"
ALGORITHM = "ES256"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 3: SHA-256 over the required members only, in lexicographic order, no whitespace."""
    kty = jwk.get("kty")
    members: tuple[str, ...]
    if kty == "EC":
        members = ("crv", "kty", "x", "y")
    elif kty == "RSA":
        members = ("e", "kty", "n")
    elif kty == "OKP":
        members = ("crv", "kty", "x")
    else:
        raise ValueError(f"no thumbprint for key type {kty!r}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


@dataclass(frozen=True, slots=True)
class SigningKey:
    private_pem: bytes
    kid: str
    public_jwk: dict[str, Any]
    """`{"kty": "EC", "crv": "P-256", "x", "y", "kid", "alg": "ES256", "use": "sig"}` (RFC 7517 4)."""

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self.public_jwk)]}


def _public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    jwk: dict[str, Any] = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(size, "big")),
        "y": b64url(numbers.y.to_bytes(size, "big")),
    }
    jwk["kid"] = thumbprint(jwk)
    jwk["alg"] = ALGORITHM
    jwk["use"] = "sig"
    return jwk


def _from_pem(pem: bytes, path: Path) -> SigningKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{path}: not an EC P-256 private key")
    jwk = _public_jwk(key)
    return SigningKey(private_pem=pem, kid=jwk["kid"], public_jwk=jwk)


def _write_new(folder: Path, pem: bytes) -> None:
    """Create `folder/signing.pem` unless it exists: write a 0600 temporary file, fsync, hard-link it into place
    (fails if another process got there first), fsync the folder."""
    tmp = folder / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, folder / KEY_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _tighten(path: Path, mode: int) -> None:
    current = stat.S_IMODE(path.stat().st_mode)
    if current & ~mode:
        log.warning("%s had mode %o; setting %o", path, current, mode)
        os.chmod(path, mode)


def load_or_create(data_dir: Path) -> SigningKey:
    """The data folder's signing key, made on first use."""
    folder = data_dir / "keys"
    private.make_dirs(folder)  # the data folder too, when a token is issued before the server first ran
    _tighten(folder, 0o700)
    path = folder / KEY_FILE
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_new(folder, pem)
        log.info("made a new token signing key in %s", path)
    _tighten(path, 0o600)
    return _from_pem(path.read_bytes(), path)


# --- trusted public keys (JWKS, RFC 7517 5) ---

_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


def key_type_for(alg: str) -> str | None:
    """The only JWK `kty` that may verify `alg` (RFC 7518 3.1): RSA for RS*/PS*, EC for ES*. HMAC (`oct`) keys
    are never trusted, so a public key can never be misused as an HMAC secret (key confusion)."""
    return _KTY.get(alg[:2]) if len(alg) == 5 else None


@dataclass(slots=True)
class TrustedKey:
    """One public signing key from a JWKS document or the embedded key."""

    kid: str
    jwk: dict[str, Any]
    verifiers: dict[str, Any]
    """Prepared verifier per algorithm (python-jose `Key` objects), made on first use."""

    @property
    def kty(self) -> str:
        return str(self.jwk["kty"])

    def fits(self, alg: str) -> bool:
        """May this key verify a token signed with `alg`? Key type and curve must match the algorithm, and a
        key that names its own `alg` (RFC 7517 4.4) only verifies that one."""
        if key_type_for(alg) != self.kty:
            return False
        if self.kty == "EC" and self.jwk.get("crv") != _CURVE.get(alg):
            return False
        named = self.jwk.get("alg")
        return named is None or named == alg


def parse_jwks(document: Any, source: str) -> dict[str, TrustedKey]:
    """The usable signing keys of a JWKS document (or a single JWK), by `kid`. Keys that are not RSA/EC public
    signing keys (`oct`, `use: enc`, private parts present, malformed) are skipped with a warning; a key without
    `kid` is named by its RFC 7638 thumbprint."""
    if isinstance(document, dict) and "keys" in document:
        entries = document["keys"]
    elif isinstance(document, dict) and "kty" in document:
        entries = [document]
    else:
        raise ValueError(f"{source}: not a JWK set")
    if not isinstance(entries, list):
        raise ValueError(f"{source}: `keys` is not a list")
    keys: dict[str, TrustedKey] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            log.warning("%s: skipping a key that is not a JSON object", source)
            continue
        kty = entry.get("kty")
        if kty not in {"RSA", "EC"}:
            log.warning("%s: skipping a key of type %r (only RSA and EC signing keys are trusted)", source, kty)
            continue
        if entry.get("use", "sig") != "sig":
            continue
        required = ("n", "e") if kty == "RSA" else ("crv", "x", "y")
        if not all(isinstance(entry.get(m), str) for m in required):
            log.warning("%s: skipping a malformed %s key", source, kty)
            continue
        if "d" in entry:
            log.warning("%s: a key holds private parts; using only its public parts", source)
        public = {k: v for k, v in entry.items() if k not in {"d", "p", "q", "dp", "dq", "qi", "oth"}}
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            kid = thumbprint(public)
        keys[kid] = TrustedKey(kid=kid, jwk=public, verifiers={})
    return keys


def load_jwks_file(path: Path) -> dict[str, TrustedKey]:
    """`HOUNSFIELD_AUTH_KEYS_FILE`: a JWKS JSON document (or one JWK)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read a JWK set ({exc})") from exc
    return parse_jwks(document, str(path))
