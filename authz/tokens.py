"""Bearer token validation (RFC 6750, RFC 7519 JWTs signed per RFC 7515) and the embedded issuer.

`TokenValidator.validate(token)` returns the `Principal` or raises `Unauthenticated` with a reason. The order
of checks follows RFC 8725 (JWT best current practices):

1. The compact form and the JOSE header are read without trusting them: `alg` must be on the allow-list
   (`HOUNSFIELD_AUTH_ALGORITHMS`, asymmetric only), so `none` and HMAC are refused before any key is touched;
   `crit` is refused (we understand no extensions, RFC 7515 4.1.11); `jku`, `x5u`, `jwk` and `x5c` are ignored:
   keys never come from the token itself.
2. The key is picked by `kid` from the trusted set and must fit the algorithm (RSA for RS*/PS*, EC with the
   right curve for ES*): a public key is never used as an HMAC secret (key confusion).
3. python-jose verifies the signature with that one algorithm and checks `exp` (required), `nbf`, `aud` and
   `iss` (required); `iat` must not be in the future; both time checks with `HOUNSFIELD_AUTH_CLOCK_SKEW_SECONDS`
   of leeway.
4. The claims become a `Principal` (SMART App Launch v2 scopes and patient context; HL7 v3 purpose of use).

Trusted keys: the identity provider's JWKS (`HOUNSFIELD_AUTH_JWKS_URL`; cached, fetched again when a token
names an unknown `kid`, at most once per `refresh_interval`, and when older than `max_age`), or else the
embedded key plus `HOUNSFIELD_AUTH_KEYS_FILE`. Tokens and claims are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jose import jwk, jws, jwt
from jose.backends.base import Key
from jose.exceptions import ExpiredSignatureError, JOSEError, JWTClaimsError, JWTError

from authz.errors import PolicyUnavailable, Unauthenticated
from authz.keys import ALGORITHM, SigningKey, TrustedKey, b64url, load_jwks_file, load_or_create, parse_jwks
from authz.principal import Principal
from authz.settings import AuthzSettings
from server.platform.settings import SettingsError

log = logging.getLogger(__name__)

ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"})
MAX_TOKEN_CHARS = 16 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9+._-]")
_REGISTERED = frozenset(
    {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "scp", "roles", "realm_access", "patient"}
    | {"client_id", "azp", "purpose_of_use"}
)


def _shown(value: object) -> str:
    """An attacker-controlled header value, made safe to echo in a reason."""
    return _SAFE.sub("?", str(value))[:32]


class _PSSKey(Key):  # type: ignore[misc]
    """RSASSA-PSS (RFC 7518 3.5: MGF1 with the same hash, salt as long as the hash): python-jose only knows
    RS*/ES*/HS*, so PS* verification is done here with `cryptography` and handed to jose as a `Key`."""

    def __init__(self, key: dict[str, Any], algorithm: str) -> None:
        kinds: dict[str, type[hashes.HashAlgorithm]] = {
            "PS256": hashes.SHA256,
            "PS384": hashes.SHA384,
            "PS512": hashes.SHA512,
        }
        self._hash = kinds[algorithm]()
        prepared = jwk.construct(key, "RS256").prepared_key
        if not isinstance(prepared, rsa.RSAPublicKey):
            raise JWTError("not an RSA public key")
        self._key = prepared

    def verify(self, msg: bytes, sig: bytes) -> bool:
        pss = padding.PSS(mgf=padding.MGF1(self._hash), salt_length=self._hash.digest_size)
        try:
            self._key.verify(sig, msg, pss, self._hash)
        except InvalidSignature:
            return False
        return True


def _verifier(key: TrustedKey, alg: str) -> Any:
    found = key.verifiers.get(alg)
    if found is None:
        found = _PSSKey(key.jwk, alg) if alg.startswith("PS") else jwk.construct(key.jwk, alg)
        key.verifiers[alg] = found
    return found


CACHE_SECONDS = 60.0
"""How long a validated token is answered from the cache (never past its `exp`)."""
CACHE_ENTRIES = 4096


class TokenValidator:
    """Made once per application; `validate` is safe to call concurrently."""

    def __init__(
        self,
        settings: AuthzSettings,
        *,
        signing_key: SigningKey | None = None,
        http_timeout: float = 5.0,
        refresh_interval: float = 30.0,
        max_age: float = 600.0,
    ) -> None:
        self._settings = settings
        self._algorithms = frozenset(a for a in settings.auth_algorithms if a in ASYMMETRIC)
        self._signing_key = signing_key
        self._timeout = http_timeout
        self._refresh_interval = refresh_interval
        self._max_age = max_age
        self._keys: dict[str, TrustedKey] | None = None
        self._fetched_at = float("-inf")  # last successful JWKS fetch (monotonic)
        self._tried_at = float("-inf")  # last JWKS fetch attempt
        self._kid_refresh_at = float("-inf")  # last fetch for an unknown kid
        self._lock = asyncio.Lock()
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._file_keys: dict[str, TrustedKey] = {}
        if settings.auth_keys_file is not None and not settings.auth_jwks_url:
            try:  # read now: a bad keys file stops the server from starting (SettingsError)
                self._file_keys = load_jwks_file(settings.auth_keys_file)
            except ValueError as exc:
                raise SettingsError(f"HOUNSFIELD_AUTH_KEYS_FILE: {exc}") from None
        self._options = {
            "leeway": settings.auth_clock_skew_seconds,
            "require_exp": True,
            "require_aud": True,
            "require_iss": True,
            "verify_at_hash": False,  # an ID token check; access tokens carry no at_hash
        }

    def load(self) -> None:
        """Trust the embedded key (made in `<data>/keys/` if missing) and the keys file; done on first use, so
        that building an app (tests, the conformance check) writes nothing."""
        if self._settings.auth_jwks_url or self._keys is not None:
            return
        embedded = self._signing_key or load_or_create(self._settings.data_dir)
        self._keys = parse_jwks(embedded.jwks, "embedded key") | self._file_keys

    async def validate(self, token: str) -> Principal:
        """The principal of a valid token. A token validated in the last `CACHE_SECONDS` (and not yet past its
        `exp`) is answered from a bounded cache: a viewer sends the same token with every frame request, and
        a signature check costs far more than a dictionary lookup. A key withdrawn from the JWKS stops
        validating new tokens at once and cached ones within `CACHE_SECONDS`."""
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None:
            principal, until = cached
            if now < until:
                self._cache.move_to_end(token)
                return principal
            del self._cache[token]
        alg, kid = self._header(token)
        candidates = await self._candidates(kid, alg)
        claims = self._decode(token, candidates, alg)
        principal = principal_from_claims(claims)
        until = now + CACHE_SECONDS
        if principal.expires_at is not None:
            until = min(until, float(principal.expires_at))
        self._cache[token] = (principal, until)
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return principal

    # --- header ---
    def _header(self, token: str) -> tuple[str, str | None]:
        if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise Unauthenticated("malformed token: expected a signed JWT (three base64url parts)")
        try:
            header = jws.get_unverified_header(token)
        except (JOSEError, UnicodeError, ValueError):
            raise Unauthenticated("malformed token header") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise Unauthenticated("malformed token header: no alg")
        if alg.lower() == "none":
            raise Unauthenticated("unsigned tokens (alg none) are not accepted")
        if alg.upper().startswith("HS"):
            raise Unauthenticated(f"HMAC-signed tokens ({_shown(alg)}) are not accepted")
        if alg not in self._algorithms:
            raise Unauthenticated(f"token algorithm {_shown(alg)} is not allowed")
        if "crit" in header:
            raise Unauthenticated("token header has critical extensions this server does not understand")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
            raise Unauthenticated("malformed token header: bad kid")
        return alg, kid

    # --- keys ---
    async def _candidates(self, kid: str | None, alg: str) -> list[Any]:
        keys = await self._current_keys()
        found = self._match(keys, kid, alg)
        if found is None and self._settings.auth_jwks_url:
            keys = await self._refresh(stale=keys, unknown_kid=True)
            found = self._match(keys, kid, alg)
        if found is None:
            raise Unauthenticated(
                f"unknown signing key {_shown(kid)}" if kid is not None else "no trusted key for this token"
            )
        if not found:
            raise Unauthenticated(f"signing key {_shown(kid)} does not fit algorithm {alg}")
        try:
            return [_verifier(k, alg) for k in found]
        except (JOSEError, ValueError, TypeError) as exc:
            log.warning("trusted key %s cannot verify %s: %s", _shown(found[0].kid), alg, exc)
            raise Unauthenticated(f"signing key {_shown(kid)} is unusable") from None

    @staticmethod
    def _match(keys: Mapping[str, TrustedKey], kid: str | None, alg: str) -> list[TrustedKey] | None:
        """None: no such key (worth a refresh); []: the key exists but may not verify `alg`."""
        if kid is not None:
            key = keys.get(kid)
            if key is None:
                return None
            return [key] if key.fits(alg) else []
        fitting = [k for k in keys.values() if k.fits(alg)]
        return fitting or None

    async def _current_keys(self) -> Mapping[str, TrustedKey]:
        if not self._settings.auth_jwks_url:
            if self._keys is None:
                self.load()
            assert self._keys is not None
            return self._keys
        if self._keys is None or time.monotonic() - self._fetched_at > self._max_age:
            return await self._refresh(stale=self._keys, unknown_kid=False)
        return self._keys

    async def _refresh(self, stale: Mapping[str, TrustedKey] | None, unknown_kid: bool) -> Mapping[str, TrustedKey]:
        """Fetch the JWKS again unless another request just did. A refresh for an unknown `kid` (key rotation)
        happens at most once per `refresh_interval`, so random `kid`s cannot make us hammer the identity
        provider; a failed fetch is retried after `refresh_interval` (one second while there are no keys at
        all). On failure keep the keys we had; with none, fail closed (503: the token may well be valid)."""
        async with self._lock:
            if self._keys is not None and self._keys is not stale:
                return self._keys  # another request refreshed while this one waited
            now = time.monotonic()
            if unknown_kid:
                due = now - self._kid_refresh_at >= self._refresh_interval
                if due:
                    self._kid_refresh_at = now
            else:
                due = now - self._tried_at >= (self._refresh_interval if self._keys is not None else 1.0)
            if due:
                self._tried_at = now
                try:
                    self._keys = await self._fetch()
                    self._fetched_at = time.monotonic()
                except (httpx.HTTPError, ValueError) as exc:
                    log.warning("cannot fetch the JWKS from %s: %s", self._settings.auth_jwks_url, exc)
            if self._keys is None:
                raise PolicyUnavailable("the identity provider's signing keys are unavailable")
            return self._keys

    async def _fetch(self) -> dict[str, TrustedKey]:
        url = self._settings.auth_jwks_url
        assert url is not None
        async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
            response = await client.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            document = response.json()
        return parse_jwks(document, url)

    # --- signature and claims ---
    def _decode(self, token: str, candidates: list[Any], alg: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                candidates,
                algorithms=[alg],
                audience=self._settings.auth_audience,
                issuer=self._settings.auth_issuer,
                options=dict(self._options),
            )
        except ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except JWTClaimsError as exc:
            raise Unauthenticated(_claims_reason(str(exc))) from None
        except JWTError as exc:
            raise Unauthenticated(_jwt_reason(str(exc))) from None
        except (TypeError, ValueError, OverflowError):
            raise Unauthenticated("malformed token claims") from None
        self._check_issued_at(claims)
        return claims

    def _check_issued_at(self, claims: Mapping[str, Any]) -> None:
        """`iat` (RFC 7519 4.1.6) must be a NumericDate not later than now plus the clock skew: python-jose only
        checks that it is a number, and a token stamped in the future was made by a wrong clock or minted ahead
        for later use (its age, and any limit on it, would be wrong)."""
        iat = claims.get("iat")
        if iat is None:
            return
        if isinstance(iat, bool) or not isinstance(iat, int | float):
            raise Unauthenticated("malformed iat claim")
        if iat > time.time() + self._settings.auth_clock_skew_seconds:
            raise Unauthenticated("token issued in the future")


def _claims_reason(message: str) -> str:
    low = message.lower()
    if "not yet valid" in low:
        return "token not yet valid"
    if "audience" in low:
        return "wrong audience"
    if "issuer" in low:
        return "wrong issuer"
    if "subject" in low:
        return "malformed sub claim"
    return "invalid token claims"


def _jwt_reason(message: str) -> str:
    low = message.lower()
    if "signature verification failed" in low:
        return "bad signature"
    match = re.search(r'missing required key "(\w+)"', message)
    if match:
        return f"token has no {match.group(1)} claim"
    if "payload" in low or "claims" in low:
        return "malformed token claims"
    if "padding" in low or "segments" in low or "header" in low:
        return "malformed token"
    return "invalid token"


# --- claims to Principal ---
def _strings(value: Any, name: str, split: bool = True) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split()) if split else (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise Unauthenticated(f"malformed {name} claim")


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))


def _optional_str(claims: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        value = claims.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise Unauthenticated(f"malformed {name} claim")
        return value
    return None


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Map verified claims: `roles` (list or space-separated) plus Keycloak's `realm_access.roles`; SMART scopes
    from `scope` (or a `scp` list); `patient`; `client_id` or `azp`; `purpose_of_use` (string or list)."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise Unauthenticated("token has no sub claim")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise Unauthenticated("malformed exp claim")
    roles = list(_strings(claims.get("roles"), "roles"))
    realm = claims.get("realm_access")
    if isinstance(realm, dict):
        roles.extend(_strings(realm.get("roles"), "realm_access.roles", split=False))
    scopes = _strings(claims.get("scope"), "scope") or _strings(claims.get("scp"), "scp")
    return Principal(
        sub=sub,
        issuer=str(claims["iss"]),
        roles=_unique(roles),
        scopes=_unique(scopes),
        patient=_optional_str(claims, "patient"),
        client_id=_optional_str(claims, "client_id", "azp"),
        purpose_of_use=_unique(_strings(claims.get("purpose_of_use"), "purpose_of_use")),
        token_id=_optional_str(claims, "jti"),
        expires_at=int(exp),
        extra={k: v for k, v in claims.items() if k not in _REGISTERED},
    )


# --- the embedded issuer ---
def issue_token(
    settings: AuthzSettings,
    sub: str,
    roles: Iterable[str] = (),
    scopes: Iterable[str] = (),
    patient: str | None = None,
    purpose_of_use: Iterable[str] = (),
    ttl_seconds: int = 3600,
    client_id: str | None = None,
    *,
    extra_claims: Mapping[str, Any] | None = None,
    key: SigningKey | None = None,
) -> str:
    """A token signed (ES256) with the data folder's key (made if missing), for `hounsfield token` and tests.
    `extra_claims` are added last and may override any claim (tests build bad tokens with it)."""
    if not sub:
        raise ValueError("sub is required")
    if ttl_seconds <= 0:
        raise ValueError("ttl must be positive")
    key = key or load_or_create(settings.data_dir)
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.auth_issuer,
        "aud": settings.auth_audience,
        "sub": sub,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": b64url(uuid.uuid4().bytes),
        "roles": list(roles),
    }
    if scopes := " ".join(scopes):
        claims["scope"] = scopes
    if patient:
        claims["patient"] = patient
    if purposes := list(purpose_of_use):
        claims["purpose_of_use"] = purposes
    if client_id:
        claims["client_id"] = client_id
    claims.update(extra_claims or {})
    token: str = jwt.encode(claims, key.private_pem.decode("ascii"), algorithm=ALGORITHM, headers={"kid": key.kid})
    return token
