"""OHIF v3 in headless Chromium against a live Hounsfield server: the harness of tests/e2e/test_ohif*.py.

The parts are real: the prebuilt viewer from npm `@ohif/app` (its `dist/`) served by a small static file server
on its own port, so OHIF calls the API across origins through `HOUNSFIELD_CORS_ORIGINS`; Debian's `chromium`
started once per test module with the flags below and a fresh profile; `playwright-core` (npm, never
`playwright install`) driven by tests/browser/ohif.mjs, one Node process per scenario, attached over CDP.
`make test` installs chromium (apt) and the npm packages (`npm ci` in tests/browser); a missing tool is an
error, never a skip.

The bearer token reaches OHIF through its own configuration: app-config.js registers an inline extension whose
`preRegistration` hook gives OHIF's `userAuthenticationService` a `getAuthorizationHeader` implementation (the
same service OHIF's `?token=` URL parameter and its OIDC login set); every DICOMweb request OHIF makes then
carries `Authorization: Bearer ...`. The browser itself adds no headers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.ohif_data import Studies

BROWSER_DIR = Path(__file__).parents[1] / "browser"
OHIF_DIST = BROWSER_DIR / "node_modules" / "@ohif" / "app" / "dist"
PLAYWRIGHT = BROWSER_DIR / "node_modules" / "playwright-core"
DRIVER = BROWSER_DIR / "ohif.mjs"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
"""The flags the issue fixes. WebGL then runs on SwiftShader (ANGLE's software Vulkan), which headless Chromium
picks by itself; `--enable-unsafe-swiftshader` (below) keeps that fallback allowed in Chromium versions that
make it opt-in."""
WEBGL_FLAGS = ("--enable-unsafe-swiftshader",)


def require_tools() -> None:
    """node, chromium and the npm packages are test dependencies (`make test` installs them): missing is an
    error with the remedy, never a skip."""
    missing = []
    if shutil.which("node") is None:
        missing.append("node (Node.js 20)")
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    if not (OHIF_DIST / "index.html").exists() or not (PLAYWRIGHT / "package.json").exists():
        missing.append("tests/browser/node_modules (@ohif/app, playwright-core)")
    if missing:
        raise RuntimeError("missing for the OHIF tests: " + ", ".join(missing) + "; run `make test` (installs them)")


# --- the viewer's static files ---------------------------------------------------------------------------


RANGE_AUTH_SHIM = """
// Cornerstone's byte-range frame loader (dicom-image-loader 5.6.8 in OHIF 3.13, internal/rangeRequest.js) calls
// fetch() with only an Accept header: unlike its XHR and streaming loaders it never calls the `beforeSend` hook
// through which OHIF adds the Authorization header (related report: cornerstonejs/cornerstone3D#915). Frames under
// the wadoRoot requested without one get the header from OHIF's userAuthenticationService (the same token).
window.config.extensions.push({
  id: 'hounsfield-range-request-auth',
  preRegistration({ servicesManager }) {
    const auth = servicesManager.services.userAuthenticationService;
    const root = window.config.dataSources[0].configuration.wadoRoot + '/';
    const plainFetch = window.fetch.bind(window);
    window.fetch = (input, init = {}) => {
      const url = typeof input === 'string' ? input : input.url;
      const headers = new Headers(init.headers || {});
      if (url.startsWith(root) && /\\/frames\\//.test(url) && !headers.has('Authorization')) {
        const header = auth.getAuthorizationHeader();
        if (header && header.Authorization) headers.set('Authorization', header.Authorization);
        return plainFetch(input, { ...init, headers });
      }
      return plainFetch(input, init);
    };
  },
});
"""


def app_config(api: str, token: str, *, range_auth_shim: bool = False, **datasource: Any) -> str:
    """OHIF's app-config.js: one DICOMweb data source on `api`/dicom-web, authenticated with `token`.

    `datasource` entries are added to (or replace) the data source configuration (e.g. `stackRetrieveOptions`,
    `thumbnailRendering`). `range_auth_shim` adds `RANGE_AUTH_SHIM`, which progressive (byte range) loading
    needs on a server with authentication on."""
    root = api.rstrip("/") + "/dicom-web"
    configuration: dict[str, Any] = {
        "friendlyName": "Hounsfield",
        "name": "hounsfield",
        "qidoRoot": root,
        "wadoRoot": root,
        "wadoUriRoot": api.rstrip("/") + "/wado",
        "qidoSupportsIncludeField": True,
        "supportsFuzzyMatching": True,
        "supportsWildcard": True,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "staticWado": False,
        "singlepart": "bulkdata,video",
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        "omitQuotationForMultipartRequest": True,
    }
    configuration.update(datasource)
    config = {
        "routerBasename": "/",
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "defaultDataSourceName": "hounsfield",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "hounsfield",
                "configuration": configuration,
            }
        ],
    }
    return f"""/* Generated by tests/support/ohif.py: OHIF v3 on a Hounsfield server with a static bearer token. */
window.config = {json.dumps(config, indent=2)};
window.config.extensions = [
  {{
    id: 'hounsfield-static-token',
    preRegistration({{ servicesManager }}) {{
      const token = {json.dumps(token)};
      servicesManager.services.userAuthenticationService.setServiceImplementation({{
        getAuthorizationHeader: () => ({{ Authorization: 'Bearer ' + token }}),
      }});
    }},
  }},
];
""" + (RANGE_AUTH_SHIM if range_auth_shim else "")


class _ViewerHandler(SimpleHTTPRequestHandler):
    """OHIF's dist/ with a generated app-config.js; unknown paths get index.html (the viewer routes its URLs
    itself, like the `/* /index.html 200` rule OHIF ships for Netlify)."""

    viewer: StaticViewer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            body = self.viewer.config_js.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
            return
        if not (OHIF_DIST / path.lstrip("/")).is_file():
            self.path = "/index.html"
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class StaticViewer:
    """A static file server for the viewer on 127.0.0.1 (its own origin); `config_js` is what app-config.js
    returns (set it before a page loads)."""

    def __init__(self) -> None:
        handler = type("Handler", (_ViewerHandler,), {"viewer": self})
        self.config_js = ""
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(OHIF_DIST)))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- the browser -------------------------------------------------------------------------------------------


class Chromium:
    """Debian's chromium with the issue's flags and a fresh profile, reachable over the DevTools protocol."""

    def __init__(self, profile: Path, log: Path) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        self.log = log
        args = [CHROMIUM, *CHROMIUM_FLAGS, *WEBGL_FLAGS, f"--user-data-dir={profile}"]
        args += ["--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out)
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not active.exists() or not active.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"chromium did not start; its log:\n{log.read_text()[-4000:]}")
            time.sleep(0.05)
        port = active.read_text().split()[0]
        self.cdp_url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def drive(browser: Chromium, scenario: dict[str, Any], out: Path, timeout: float = 150) -> dict[str, Any]:
    """Run one scenario of tests/browser/ohif.mjs (a fresh browser context) and return its JSON report.

    The driver writes screenshots under `out`; a failed scenario raises with the driver's own message, the
    page's console errors and its failed requests."""
    out.mkdir(parents=True, exist_ok=True)
    job = {**scenario, "cdp": browser.cdp_url, "out": str(out)}
    try:
        done = subprocess.run(
            ["node", str(DRIVER)],
            input=json.dumps(job).encode(),
            capture_output=True,
            timeout=timeout,
            cwd=BROWSER_DIR,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"OHIF driver ran past {timeout}s: {(exc.stderr or b'').decode()[-4000:]}") from None
    print(f"OHIF screenshots: {out}")
    lines = done.stdout.decode().strip().splitlines()
    report: dict[str, Any] = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if done.returncode != 0 or not report.get("ok"):
        detail = json.dumps({k: report.get(k) for k in ("error", "consoleErrors", "failedRequests")}, indent=1)
        raise AssertionError(f"OHIF scenario {scenario['scenario']} failed: {detail}\n{done.stderr.decode()[-4000:]}")
    return report


# --- what the server saw -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int
    response_headers: dict[str, str]


@dataclass
class RequestLog:
    """An ASGI wrapper around the app under test that notes every HTTP request and its status (it observes;
    it changes nothing)."""

    app: Any
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, response_headers = 0, {}

        async def noting_send(message: Any) -> None:
            nonlocal status, response_headers
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message["headers"]}
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            query = scope.get("query_string", b"").decode("latin-1")
            self.seen.append(Seen(scope["method"], scope["path"], query, headers, status, response_headers))

    def since(self, mark: int) -> list[Seen]:
        return self.seen[mark:]

    def frames(self, mark: int = 0) -> list[Seen]:
        return [s for s in self.since(mark) if s.method == "GET" and "/frames/" in s.path]


def instance_of(path: str) -> str:
    """The SOP Instance UID in a `/studies/{s}/series/{se}/instances/{i}/...` path."""
    parts = path.split("/")
    return parts[parts.index("instances") + 1]


# --- assertions shared by the viewer tests -----------------------------------------------------------------


def instance_for(slice_text: str, studies: Studies) -> str:
    """The SOP Instance UID behind OHIF's slice indicator `n (k/N)` (n is the Instance Number, 1-based here)."""
    return studies.ct_instances[int(slice_text.split()[0]) - 1]


def assert_renders_and_scrolls(report: dict[str, Any], log: RequestLog, mark: int, studies: Studies) -> None:
    """The viewport showed an image (not black, not uniform, not white), scrolling showed another slice (the
    indicator and the pixels changed), the server served the frames of both slices, and every DICOMweb request
    OHIF made carried its bearer token."""
    context = json.dumps({k: report.get(k) for k in ("steps", "consoleErrors", "failedRequests", "screenshots")})
    before, after = report["before"], report["after"]
    for state in (before, after):
        stats = state["stats"]
        assert stats["nonBlack"] > 0.05 and stats["std"] > 5 and stats["mean"] < 250, (stats, context)
    assert before["slice"] != after["slice"], context
    assert report["distance"] > 10, (report["distance"], context)
    first, second = instance_for(before["slice"], studies), instance_for(after["slice"], studies)
    assert first != second
    frames = log.frames(mark)
    served = {instance_of(s.path) for s in frames if s.status in (200, 206)}
    assert first in served and second in served, context
    assert all(s.status in (200, 206, 304) for s in frames), [(s.path, s.status) for s in frames if s.status >= 300]
    calls = [s for s in log.since(mark) if s.path.startswith("/dicom-web/") and s.method != "OPTIONS"]
    assert calls and all(s.headers.get("authorization", "").startswith("Bearer ") for s in calls)
    assert not report["failedRequests"], context
