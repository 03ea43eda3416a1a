"""No route answers without a valid token: every method of every path in the application's route table, with
path parameters filled with valid-looking values, gets 401 without a token (and not 401 with an admin token).
Only `HOUNSFIELD_AUTH_PUBLIC_PATHS` (health checks) and CORS preflight (`OPTIONS`) are open. A route added
later is swept without changing this test."""

from __future__ import annotations

import re
import uuid

import httpx
from litestar.routes import HTTPRoute

from tests.conftest import LiveServer

VALUES = {
    "study": "1.2.826.0.1.3680043.8.498.1",
    "series": "1.2.826.0.1.3680043.8.498.2",
    "instance": "1.2.826.0.1.3680043.8.498.3",
    "frames": "1",
    "tag": "7FE00010",
    "path": "openapi.yaml",
}
QUERIES = {"/wado": "?requestType=WADO&studyUID=1.2.3&seriesUID=1.2.4&objectUID=1.2.5"}


def concrete(route: HTTPRoute, **override: str) -> str:
    """The route's path with its parameters filled (`override` gives some their values) and its query."""

    def fill(match: re.Match[str]) -> str:
        name, _, kind = match.group(1).partition(":")
        if name in override:
            return override[name]
        if name in VALUES:
            return VALUES[name]
        return str(uuid.uuid4()) if kind == "uuid" else "1"

    return re.sub(r"\{([^}]+)\}", fill, route.path) + QUERIES.get(route.path, "")


def requests(server: LiveServer) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for route in server.app.routes:
        assert isinstance(route, HTTPRoute), f"{route.path}: not an HTTP route; teach this sweep about it"
        found.extend((method, concrete(route)) for method in sorted(route.methods) if method != "OPTIONS")
    return found


def test_every_route_needs_a_token(server: LiveServer) -> None:
    public = set(server.settings.auth_public_paths)
    swept = requests(server)
    assert len(swept) >= 20 and any(m == "POST" for m, _ in swept)
    admin = server.headers
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for method, url in swept:
            path = url.split("?", 1)[0]
            anonymous = http.request(method, url)
            if path in public:
                assert anonymous.status_code != 401, (method, url)
                continue
            assert anonymous.status_code == 401, (method, url, anonymous.status_code, anonymous.text[:200])
            assert anonymous.headers["www-authenticate"] == 'Bearer realm="hounsfield"', (method, url)
            if path.startswith("/fhir/") or path == "/fhir":  # FHIR clients get an OperationOutcome
                assert anonymous.json()["issue"][0]["code"] == "login", (method, url)
            else:
                assert anonymous.json()["status"] == 401
            bad = http.request(method, url, headers={"Authorization": "Bearer not.a.token"})
            assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]
            allowed = http.request(method, url, headers=admin)
            assert allowed.status_code != 401, (method, url, allowed.text[:200])
    templates = [
        re.compile(re.sub(r"\\\{\w+(?::\w+)?\\\}", "[^/]+", re.escape(r.path)) + "$") for r in server.app.routes
    ]
    unrouted = [p for p in public if not any(t.match(p) for t in templates)]
    assert unrouted == [], "a public path is not a route"


def test_preflight_options_carry_no_data(server: LiveServer) -> None:
    """OPTIONS is answered without a token (browsers send none on preflight); it only lists methods."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for route in server.app.routes:
            response = http.options(concrete(route))
            assert response.status_code == 204, (route.path, response.status_code)
            assert response.content == b""


def test_unknown_paths_reveal_nothing(server: LiveServer) -> None:
    """Litestar answers 404 for a path with no route before any route middleware runs; the answer carries
    nothing but the status."""
    response = httpx.get(server.url + "/no/such/route", timeout=30)
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found", "status": 404}


CONTROLS = ("%00", "%0A", "%0D", "%1B", "%7F")


def test_control_characters_in_the_target_are_400(server: LiveServer) -> None:
    """Every path parameter of every route (each method), then every query value of a route's own query (and a
    Patient ID search on routes that have none), carrying a control character, is a clean 400: an
    OperationOutcome under /fhir, the DICOMweb JSON error elsewhere. Never a 500 from the database (NUL), a
    dropped connection, or a 404 from a typed parameter that did not parse."""
    cases: list[tuple[str, str]] = []
    for n, route in enumerate(server.app.routes):
        names = re.findall(r"\{([^}:]+)[^}]*\}", route.path)
        for method in sorted(route.methods):
            for i, name in enumerate(names):
                control = CONTROLS[(n + i) % len(CONTROLS)]
                cases.append((method, concrete(route, **{name: f"1.2{control}3"})))
            query = QUERIES.get(route.path, "?PatientID=P5")
            for key in re.findall(r"[?&]([^=&]+)=", query):
                tainted = re.sub(rf"([?&]{key}=)([^&]*)", rf"\g<1>\g<2>{CONTROLS[n % len(CONTROLS)]}", query)
                cases.append((method, concrete(route).split("?")[0] + tainted))
    assert len(cases) >= 60
    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as http:
        for method, url in cases:
            response = http.request(method, url)
            assert response.status_code == 400, (method, url, response.status_code, response.text[:200])
            if url.startswith("/fhir"):
                assert response.json()["resourceType"] == "OperationOutcome", (method, url)
                assert response.json()["issue"][0]["code"] == "invalid"
            else:
                assert response.json()["status"] == 400, (method, url)
