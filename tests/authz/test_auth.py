"""Bearer token authentication (RFC 6750, RFC 7519, RFC 8725): the JWT attacks of the security issue each get
401 with a `WWW-Authenticate` reason; good tokens from the embedded issuer, a keys file (RS256, PS256) and an
identity provider's JWKS URL (served on 127.0.0.1, with key rotation) are accepted."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jose import jwk, jwt

from authz.errors import Unauthenticated
from authz.keys import load_or_create, thumbprint
from authz.tokens import TokenValidator, issue_token, principal_from_claims
from server.cli_token import parse_ttl
from server.settings import Settings
from tests.conftest import LiveServer, bearer

STUDIES = "/dicom-web/studies"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def good_claims(settings: Settings, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.auth_issuer,
        "aud": settings.auth_audience,
        "sub": "mallory",
        "iat": now,
        "exp": now + 600,
        "roles": ["admin"],
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def sign_with_server_key(settings: Settings, claims: dict[str, Any], **header: Any) -> str:
    key = load_or_create(settings.data_dir)
    headers = {"kid": key.kid, **header}
    token: str = jwt.encode(claims, key.private_pem.decode(), algorithm="ES256", headers=headers)
    return token


def ec_pem(curve: ec.EllipticCurve) -> str:
    private = ec.generate_private_key(curve)
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_pem: str, alg: str, kid: str) -> dict[str, Any]:
    found: dict[str, Any] = jwk.construct(private_pem, alg).public_key().to_dict()
    found.update(kid=kid, use="sig")
    return found


def pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def ps256(key: rsa.RSAPrivateKey, claims: dict[str, Any], kid: str) -> str:
    """python-jose cannot sign PS256: RFC 7518 3.5 by hand."""
    signing_input = f"{b64(json.dumps({'alg': 'PS256', 'kid': kid}).encode())}.{b64(json.dumps(claims).encode())}"
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    return signing_input + "." + b64(key.sign(signing_input.encode(), pss, hashes.SHA256()))


def refused(server: LiveServer, token: str | None, path: str = STUDIES, **headers: str) -> httpx.Response:
    if token is not None:
        headers.setdefault("Authorization", f"Bearer {token}")
    response = httpx.get(server.url + path, headers=headers, timeout=30)
    assert response.status_code == 401, (response.status_code, response.text)
    assert response.headers["www-authenticate"].startswith('Bearer realm="hounsfield"')
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["status"] == 401
    assert response.headers["warning"].startswith("299 hounsfield")
    return response


def reason(response: httpx.Response) -> str:
    challenge = response.headers["www-authenticate"]
    assert 'error="invalid_token"' in challenge or 'error="invalid_request"' in challenge, challenge
    description = challenge.split('error_description="', 1)[1].rstrip('"')
    assert description == response.json()["error"]
    return description


# --- the happy path and the request shape ---


def test_valid_token_and_case_insensitive_scheme(server: LiveServer) -> None:
    token = server.token()
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = httpx.get(server.url + STUDIES, headers={"Authorization": f"{scheme} {token}"})
        assert response.status_code in (200, 204), response.text


def test_no_token_gets_a_challenge_without_an_error_code(server: LiveServer) -> None:
    response = refused(server, None)
    assert response.headers["www-authenticate"] == 'Bearer realm="hounsfield"'  # RFC 6750 3.1
    response = refused(server, None, Authorization="Basic YWxpY2U6c2VjcmV0")
    assert response.headers["www-authenticate"] == 'Bearer realm="hounsfield"'


def test_fhir_401_is_an_operation_outcome(server: LiveServer) -> None:
    answer = httpx.get(server.url + "/fhir/DiagnosticReport", headers={"Authorization": "Bearer x.y.z"})
    assert answer.status_code == 401 and answer.headers["content-type"] == "application/fhir+json"
    assert answer.headers["www-authenticate"].startswith('Bearer realm="hounsfield", error="invalid_token"')
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "login"
    assert httpx.get(server.url + "/fhirish").headers["content-type"] == "application/json"


def test_tokens_in_the_query_string_are_not_accepted(server: LiveServer) -> None:
    token = server.token()
    refused(server, None, path=f"{STUDIES}?access_token={token}")
    refused(server, None, path=f"/wado?requestType=WADO&access_token={token}")


def test_malformed_authorization_headers(server: LiveServer) -> None:
    assert "malformed" in reason(refused(server, None, Authorization="Bearer"))
    assert "malformed" in reason(refused(server, None, Authorization="Bearer a b"))


def test_public_paths_and_cors_preflight_need_no_token(make_server: Any) -> None:
    server = make_server(cors_origins=("http://viewer.example",))
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    preflight = httpx.options(
        server.url + STUDIES,
        headers={
            "Origin": "http://viewer.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code in (200, 204)
    assert preflight.headers["access-control-allow-origin"] == "http://viewer.example"
    # A browser's real request without a token is refused, and still carries the CORS headers so that the
    # viewer can read the 401.
    response = refused(server, None, Origin="http://viewer.example")
    assert response.headers["access-control-allow-origin"] == "http://viewer.example"


def test_openapi_needs_a_token(server: LiveServer) -> None:
    refused(server, None, path="/openapi/openapi.json")
    ok = httpx.get(server.url + "/openapi/openapi.json", headers=server.headers)
    assert ok.status_code == 200


# --- JWT attacks ---


def test_alg_none(server: LiveServer) -> None:
    claims = good_claims(server.settings)
    for alg in ("none", "None", "NONE"):
        token = compact({"alg": alg, "typ": "JWT"}, claims)
        assert "alg none" in reason(refused(server, token))


def test_key_confusion_hs256_signed_with_the_public_key(server: LiveServer) -> None:
    """The classic RS/ES → HS confusion: an HMAC over the token keyed with the server's public key bytes."""
    key = load_or_create(server.settings.data_dir)
    private = serialization.load_pem_private_key(key.private_pem, password=None)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hmac

    claims = good_claims(server.settings)
    for secret in (public_pem, json.dumps(key.public_jwk).encode()):
        signing_input = (
            f"{b64(json.dumps({'alg': 'HS256', 'kid': key.kid}).encode())}.{b64(json.dumps(claims).encode())}"
        )
        mac = hmac.new(secret, signing_input.encode(), "sha256").digest()
        assert "HMAC" in reason(refused(server, f"{signing_input}.{b64(mac)}"))


def test_expired_and_not_yet_valid(server: LiveServer) -> None:
    now = int(time.time())
    skew = server.settings.auth_clock_skew_seconds
    expired = sign_with_server_key(server.settings, good_claims(server.settings, exp=now - skew - 60))
    assert reason(refused(server, expired)) == "token expired"
    early = sign_with_server_key(server.settings, good_claims(server.settings, nbf=now + skew + 600))
    assert reason(refused(server, early)) == "token not yet valid"
    # Within the clock skew both are fine.
    slightly = sign_with_server_key(server.settings, good_claims(server.settings, exp=now - 5, nbf=now + 5))
    assert httpx.get(server.url + STUDIES, headers=bearer(slightly)).status_code in (200, 204)


def test_issued_in_the_future(server: LiveServer) -> None:
    """`iat` later than now plus the clock skew is refused (python-jose checks only that it is a number), with
    or without an `nbf`; a string `iat` is malformed; within the skew it is fine."""
    now = int(time.time())
    skew = server.settings.auth_clock_skew_seconds
    settings = server.settings
    for claims in (good_claims(settings, iat=now + 3600), good_claims(settings, iat=now + 3600, nbf=now)):
        response = refused(server, sign_with_server_key(settings, claims))
        assert reason(response) == "token issued in the future"
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    late_nbf = sign_with_server_key(settings, good_claims(settings, nbf=now + skew + 600))
    assert reason(refused(server, late_nbf)) == "token not yet valid"
    text = sign_with_server_key(settings, good_claims(settings, iat=str(now)))
    assert reason(refused(server, text)) == "malformed iat claim"
    slightly = sign_with_server_key(settings, good_claims(settings, iat=now + skew // 2))
    assert httpx.get(server.url + STUDIES, headers=bearer(slightly)).status_code in (200, 204)


def test_wrong_audience_and_issuer(server: LiveServer) -> None:
    settings = server.settings
    aud = sign_with_server_key(settings, good_claims(settings, aud="another-service"))
    assert reason(refused(server, aud)) == "wrong audience"
    iss = sign_with_server_key(settings, good_claims(settings, iss="https://evil.example"))
    assert reason(refused(server, iss)) == "wrong issuer"
    no_aud = sign_with_server_key(settings, good_claims(settings, aud=None))
    assert reason(refused(server, no_aud)) == "token has no aud claim"


def test_tampered_payload(server: LiveServer) -> None:
    token = server.token(sub="viewer", roles=["viewer"], scopes=[])
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    forged = f"{head}.{b64(json.dumps(claims).encode())}.{signature}"
    assert reason(refused(server, forged)) == "bad signature"
    # Flipping signature bits is caught as well.
    flipped = f"{head}.{payload}.{signature[:-4]}AAAA"
    assert reason(refused(server, flipped)) == "bad signature"


def test_unknown_kid_and_a_foreign_key_behind_our_kid(server: LiveServer) -> None:
    settings = server.settings
    attacker = ec_pem(ec.SECP256R1())
    claims = good_claims(settings)
    unknown = jwt.encode(claims, attacker, algorithm="ES256", headers={"kid": "attacker-key"})
    assert "unknown signing key" in reason(refused(server, unknown))
    # Our kid, the attacker's key, and the attacker's public key embedded in the header (`jwk`, `jku` are ignored).
    ours = load_or_create(settings.data_dir).kid
    injected = jwt.encode(
        claims,
        attacker,
        algorithm="ES256",
        headers={"kid": ours, "jwk": public_jwk(attacker, "ES256", ours), "jku": "http://127.0.0.1:1/jwks"},
    )
    assert reason(refused(server, injected)) == "bad signature"


def test_algorithm_allow_list_and_key_type(server: LiveServer) -> None:
    settings = server.settings
    p384 = ec_pem(ec.SECP384R1())
    es384 = jwt.encode(good_claims(settings), p384, algorithm="ES384", headers={"kid": "x"})
    assert "ES384 is not allowed" in reason(refused(server, es384))
    # RS256 is allowed, but the kid names our EC key: an RSA signature cannot be checked with it.
    ours = load_or_create(settings.data_dir).kid
    rs = jwt.encode(good_claims(settings), pem(rsa_key()), algorithm="RS256", headers={"kid": ours})
    assert "does not fit" in reason(refused(server, rs))


def test_malformed_tokens(server: LiveServer) -> None:
    header = b64(b'{"alg":"ES256"}')
    payload = b64(json.dumps(good_claims(server.settings)).encode())
    for garbage in (
        "garbage",
        "a.b.c",
        "a.b.c.d.e",  # JWE compact form
        f"{b64(b'not json')}.{payload}.AAAA",
        f"{b64(b'[1, 2]')}.{payload}.AAAA",
        f"{header}.{payload}",
        "x" * 20000,
    ):
        assert "malformed" in reason(refused(server, garbage)), garbage
    assert reason(refused(server, f"{header}.!!!.AAAA")) == "bad signature"
    crit = sign_with_server_key(server.settings, good_claims(server.settings), crit=["exp"])
    assert "critical" in reason(refused(server, crit))


def test_missing_sub_and_exp(server: LiveServer) -> None:
    settings = server.settings
    no_sub = sign_with_server_key(settings, good_claims(settings, sub=None))
    assert reason(refused(server, no_sub)) == "token has no sub claim"
    no_exp = sign_with_server_key(settings, good_claims(settings, exp=None))
    assert reason(refused(server, no_exp)) == "token has no exp claim"
    bad_exp = sign_with_server_key(settings, good_claims(settings, exp=[1]))
    assert "claim" in reason(refused(server, bad_exp))
    bad_roles = sign_with_server_key(settings, good_claims(settings, roles={"admin": True}))
    assert reason(refused(server, bad_roles)) == "malformed roles claim"


# --- claims, keys and the CLI ---


def test_claims_become_a_principal() -> None:
    principal = principal_from_claims(
        {
            "iss": "https://idp.example",
            "sub": "dr-who",
            "exp": 2_000_000_000,
            "roles": "radiologist referrer",
            "realm_access": {"roles": ["radiologist", "offline_access"]},
            "scope": "openid patient/ImagingStudy.rs launch/patient",
            "patient": "P123",
            "azp": "ohif",
            "purpose_of_use": "TREAT",
            "jti": "abc",
            "fhirUser": "Practitioner/7",
        }
    )
    assert principal.sub == "dr-who" and principal.issuer == "https://idp.example"
    assert principal.roles == ("radiologist", "referrer", "offline_access")
    assert principal.scopes == ("openid", "patient/ImagingStudy.rs", "launch/patient")
    assert principal.patient == "P123" and principal.client_id == "ohif"
    assert principal.purpose_of_use == ("TREAT",) and principal.token_id == "abc"
    assert principal.expires_at == 2_000_000_000 and principal.extra == {"fhirUser": "Practitioner/7"}
    with pytest.raises(Unauthenticated, match="purpose_of_use"):
        principal_from_claims({"iss": "i", "sub": "s", "exp": 1, "purpose_of_use": 7})


def test_signing_key_file_is_private_stable_and_thumbprinted(tmp_path: Path) -> None:
    first = load_or_create(tmp_path / "data")
    path = tmp_path / "data" / "keys" / "signing.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create(tmp_path / "data") == first
    assert first.kid == thumbprint(first.public_jwk)
    # RFC 7638 3.1's example key and thumbprint.
    example = {
        "kty": "RSA",
        "e": "AQAB",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRX"
        "jBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZ"
        "gnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqb"
        "w0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    }
    assert thumbprint(example) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    os.chmod(path, 0o644)
    load_or_create(tmp_path / "data")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_cli_token(server: LiveServer) -> None:
    from server.cli import main

    assert parse_ttl("8h") == 8 * 3600 and parse_ttl("3600") == 3600 and parse_ttl("15m") == 900
    import contextlib
    import io

    out = io.StringIO()
    args = ["token", "--sub", "alice", "--role", "radiologist", "--role", "admin", "--scope", "user/*.rs"]
    args += ["--patient", "P1", "--purpose", "BTG", "--client-id", "cli", "--ttl", "8h"]
    args += ["--data", str(server.settings.data_dir)]
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    token = out.getvalue().strip()
    claims = jwt.get_unverified_claims(token)
    assert claims["sub"] == "alice" and claims["roles"] == ["radiologist", "admin"]
    assert claims["scope"] == "user/*.rs" and claims["patient"] == "P1" and claims["purpose_of_use"] == ["BTG"]
    assert claims["client_id"] == "cli" and claims["exp"] - claims["iat"] == 8 * 3600
    assert httpx.get(server.url + STUDIES, headers=bearer(token)).status_code in (200, 204)


def test_keys_file_with_rs256_and_ps256(make_server: Any, tmp_path: Path) -> None:
    rsa_a, rsa_b = rsa_key(), rsa_key()
    keys = {
        "keys": [
            public_jwk(pem(rsa_a), "RS256", "rsa-a"),
            {**public_jwk(pem(rsa_b), "RS256", "rsa-b"), "alg": "PS256"},
            {"kty": "oct", "k": b64(b"shared-secret"), "kid": "hmac"},  # never trusted
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(keys))
    server = make_server(auth_keys_file=path)
    claims = good_claims(server.settings)
    rs256 = jwt.encode(claims, pem(rsa_a), algorithm="RS256", headers={"kid": "rsa-a"})
    assert httpx.get(server.url + STUDIES, headers=bearer(rs256)).status_code in (200, 204)
    good_ps = ps256(rsa_b, claims, "rsa-b")
    assert httpx.get(server.url + STUDIES, headers=bearer(good_ps)).status_code in (200, 204)
    assert reason(refused(server, ps256(rsa_a, claims, "rsa-b"))) == "bad signature"
    # rsa-b says alg PS256: an RS256 token under its kid is refused.
    rs_under_b = jwt.encode(claims, pem(rsa_b), algorithm="RS256", headers={"kid": "rsa-b"})
    assert "does not fit" in reason(refused(server, rs_under_b))
    hs = jwt.encode(claims, "shared-secret", algorithm="HS256", headers={"kid": "hmac"})
    assert "HMAC" in reason(refused(server, hs))
    # The embedded key is still trusted beside the file.
    assert httpx.get(server.url + STUDIES, headers=server.headers).status_code in (200, 204)


# --- an identity provider's JWKS URL ---


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving a JWKS document that a test can change (key rotation)."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/realms/test/protocol/openid-connect/certs"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JwksServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


def test_jwks_url_with_key_rotation(make_server: Any, idp: JwksServer) -> None:
    issuer = "https://idp.example/realms/test"
    old, new = ec_pem(ec.SECP256R1()), ec_pem(ec.SECP256R1())
    idp.document = {"keys": [public_jwk(old, "ES256", "2024-01")]}
    server = make_server(auth_jwks_url=idp.url, auth_issuer=issuer, auth_audience="hounsfield")
    claims = good_claims(server.settings, realm_access={"roles": ["admin"]})

    def get(token: str) -> int:
        return httpx.get(server.url + STUDIES, headers=bearer(token), timeout=30).status_code

    assert get(jwt.encode(claims, old, algorithm="ES256", headers={"kid": "2024-01"})) in (200, 204)
    assert idp.fetches == 1
    assert get(jwt.encode(claims, old, algorithm="ES256", headers={"kid": "2024-01"})) in (200, 204)
    assert idp.fetches == 1  # cached
    # The provider rotates: the new kid is unknown, so the JWKS is fetched again and the token accepted.
    idp.document = {"keys": [public_jwk(new, "ES256", "2024-02")]}
    assert get(jwt.encode(claims, new, algorithm="ES256", headers={"kid": "2024-02"})) in (200, 204)
    assert idp.fetches == 2
    # The retired key is gone; another unknown kid right away does not make us fetch again (rate limit).
    response = refused(server, jwt.encode(claims, old, algorithm="ES256", headers={"kid": "2024-01"}))
    assert "unknown signing key" in reason(response)
    refused(server, jwt.encode(claims, old, algorithm="ES256", headers={"kid": "random-kid"}))
    assert idp.fetches == 2
    # With a JWKS URL the embedded key is not trusted.
    assert "unknown signing key" in reason(refused(server, issue_token(server.settings, sub="local")))


def test_jwks_rotation_rate_limit_expires(idp: JwksServer, tmp_path: Path) -> None:
    first, second = ec_pem(ec.SECP256R1()), ec_pem(ec.SECP256R1())
    idp.document = {"keys": [public_jwk(first, "ES256", "k1")]}
    settings = Settings.from_env({}).with_overrides(data_dir=tmp_path, auth_jwks_url=idp.url)
    validator = TokenValidator(settings, refresh_interval=0.3)
    claims = good_claims(settings)

    async def run() -> None:
        await validator.validate(jwt.encode(claims, first, algorithm="ES256", headers={"kid": "k1"}))
        await validator.validate(jwt.encode(claims, first, algorithm="ES256", headers={"kid": "k1"}))
        assert idp.fetches == 1
        with pytest.raises(Unauthenticated, match="unknown signing key"):
            await validator.validate(jwt.encode(claims, second, algorithm="ES256", headers={"kid": "k2"}))
        assert idp.fetches == 2  # the first unknown kid refreshes
        idp.document = {"keys": [public_jwk(first, "ES256", "k1"), public_jwk(second, "ES256", "k2")]}
        with pytest.raises(Unauthenticated, match="unknown signing key"):
            await validator.validate(jwt.encode(claims, second, algorithm="ES256", headers={"kid": "k2"}))
        assert idp.fetches == 2  # too soon
        await asyncio.sleep(0.35)
        principal = await validator.validate(jwt.encode(claims, second, algorithm="ES256", headers={"kid": "k2"}))
        assert principal.sub == "mallory" and idp.fetches == 3
        # Concurrent requests with a new kid share one fetch.
        await asyncio.sleep(0.35)
        idp.document = {"keys": [public_jwk(first, "ES256", "k3")]}
        token = jwt.encode(claims, first, algorithm="ES256", headers={"kid": "k3"})
        results = await asyncio.gather(*(validator.validate(token) for _ in range(20)))
        assert len(results) == 20 and idp.fetches == 4

    asyncio.run(run())
    assert not (tmp_path / "keys").exists()  # no embedded key is made when a JWKS URL is configured


def test_unreachable_jwks_fails_closed(make_server: Any) -> None:
    from tests.conftest import free_port

    server = make_server(auth_jwks_url=f"http://127.0.0.1:{free_port()}/jwks")
    key = ec_pem(ec.SECP256R1())
    token = jwt.encode(good_claims(server.settings), key, algorithm="ES256", headers={"kid": "k"})
    response = httpx.get(server.url + STUDIES, headers=bearer(token), timeout=30)
    assert response.status_code == 503, response.text
    assert response.json() == {"error": "the identity provider's signing keys are unavailable", "status": 503}


def test_validation_is_fast(tmp_path: Path) -> None:
    """ES256 validation p50 well under a millisecond (it runs on every request)."""
    settings = Settings.from_env({}).with_overrides(data_dir=tmp_path)
    validator = TokenValidator(settings)
    token = issue_token(settings, sub="speed", roles=["admin"], scopes=["user/*.rs"])

    async def run() -> float:
        await validator.validate(token)
        times = []
        for _ in range(300):
            started = time.perf_counter()
            await validator.validate(token)
            times.append(time.perf_counter() - started)
        times.sort()
        return times[len(times) // 2]

    assert asyncio.run(run()) < 0.001


def test_a_bad_keys_file_stops_the_server_from_starting(tmp_path: Path) -> None:
    from server.app import create_app
    from server.settings import SettingsError

    path = tmp_path / "jwks.json"
    path.write_text("{not json")
    settings = Settings.from_env({}).with_overrides(data_dir=tmp_path / "data", auth_keys_file=path)
    with pytest.raises(SettingsError, match="HOUNSFIELD_AUTH_KEYS_FILE"):
        create_app(settings)
    assert not (tmp_path / "data").exists()


def test_a_broken_key_in_the_jwks_is_a_401_not_a_500(idp: JwksServer, tmp_path: Path) -> None:
    idp.document = {"keys": [{"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": "broken"}]}
    settings = Settings.from_env({}).with_overrides(data_dir=tmp_path, auth_jwks_url=idp.url)
    token = jwt.encode(good_claims(settings), ec_pem(ec.SECP256R1()), algorithm="ES256", headers={"kid": "broken"})
    with pytest.raises(Unauthenticated, match=r"unusable|bad signature"):
        asyncio.run(TokenValidator(settings).validate(token))


def test_the_principal_reaches_the_handler(tmp_path: Path) -> None:
    from litestar import Litestar, Request, get
    from litestar.testing import TestClient

    from authz.authn import PRINCIPAL, authenticate, principal_of

    @get("/whoami", sync_to_thread=False)
    def whoami(request: Request[Any, Any, Any]) -> dict[str, Any]:
        principal = principal_of(request)
        assert request.user is principal and request.scope["state"][PRINCIPAL] is principal
        return {"sub": principal.sub, "roles": list(principal.roles), "patient": principal.patient}

    settings = Settings.from_env({}).with_overrides(data_dir=tmp_path)
    app = Litestar(route_handlers=[whoami], middleware=[authenticate(settings)])
    token = issue_token(settings, sub="carol", roles=["referrer"], patient="P7")
    with TestClient(app) as client:
        assert client.get("/whoami", headers=bearer(token)).json() == {
            "sub": "carol",
            "roles": ["referrer"],
            "patient": "P7",
        }
        assert client.get("/whoami").status_code == 401
