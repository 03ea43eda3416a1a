"""The audit chain's ground: what appending (`authz.audit`), verifying (`authz.auditverify`) and anchoring
(`authz.auditanchor`) share. The chain hash (migrations/0004_audit.sql), the checkpoint a key signs and how it is
signed and verified, and the named queries over the chain's tables.

A checkpoint signs (seq, the chain hash at seq, the signing time) with the server's EC P-256 key (ECDSA with
SHA-256; `authz.keys`): a verifier holding the public key detects even a chain altered and consistently
re-hashed up to the head. `cryptography` is imported where keys are loaded, not with this module.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.platform.db import Queries

SQL = Queries(Path(__file__).with_name("audit.sql"))

GENESIS = bytes(32)
"""prev_hash of the first record."""


def chain_hash(prev_hash: bytes, canonical: str, seq: int) -> bytes:
    """sha256(prev_hash || canonical JSON (UTF-8) || seq as 8-byte big-endian): what audit_append computes."""
    return hashlib.sha256(prev_hash + canonical.encode("utf-8") + seq.to_bytes(8, "big", signed=True)).digest()


# --- checkpoints ---------------------------------------------------------------------------------------------

Signer = Callable[[bytes], tuple[bytes, str]]
"""sign(message) -> (signature, key_id)."""
Verifier = Callable[[bytes, bytes, str], bool]
"""verify(message, signature, key_id) -> valid."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_CHECKPOINT_TAG = b"hounsfield-audit-checkpoint/1\n"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: bytes
    signed_at: dt.datetime
    signature: bytes
    key_id: str


def checkpoint_message(seq: int, head_hash: bytes, signed_at: dt.datetime) -> bytes:
    """What a checkpoint signs: a tag, seq (8 bytes big-endian), the chain hash at seq (32 bytes) and the signing
    time in microseconds since 1970 (8 bytes big-endian)."""
    micros = (signed_at - _EPOCH) // dt.timedelta(microseconds=1)
    return _CHECKPOINT_TAG + seq.to_bytes(8, "big", signed=True) + head_hash + micros.to_bytes(8, "big", signed=True)


def key_signer(private_pem: bytes, key_id: str) -> Signer:
    """ECDSA P-256 / SHA-256 (DER signature) with the server's key, e.g. `authz.keys.load_or_create(data)`:
    `key_signer(key.private_pem, key.kid)`."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("checkpoint signing needs an EC private key")

    def sign(message: bytes) -> tuple[bytes, str]:
        return key.sign(message, ec.ECDSA(hashes.SHA256())), key_id

    return sign


def key_verifier(public_keys: Mapping[str, Any]) -> Verifier:
    """Verifies with the public key named by the checkpoint's key id: `public_keys` maps key id to an EC public
    key, a PEM (private or public) or a public JWK (keys retired by rotation stay verifiable)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = {kid: _public_key(value) for kid, value in public_keys.items()}

    def verify(message: bytes, signature: bytes, key_id: str) -> bool:
        key = keys.get(key_id)
        if key is None:
            return False
        try:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    return verify


def _public_key(value: Any) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(value, ec.EllipticCurvePublicKey):
        return value
    if isinstance(value, bytes):
        if b"PRIVATE KEY" in value:
            private = serialization.load_pem_private_key(value, password=None)
            assert isinstance(private, ec.EllipticCurvePrivateKey)
            return private.public_key()
        return serialization.load_pem_public_key(value)
    if isinstance(value, Mapping) and value.get("kty") == "EC" and value.get("crv") == "P-256":
        x, y = (int.from_bytes(base64.urlsafe_b64decode(value[c] + "=" * (-len(value[c]) % 4)), "big") for c in "xy")
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    raise ValueError("unsupported checkpoint verification key")
