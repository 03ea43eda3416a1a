"""Module-scoped fixtures of the OHIF tests: one database, server, viewer origin and browser per test module.

A test module imports the `*_fixture` functions; pytest registers them under the names without `_fixture`
(`api`, `browser`, `module_dsn`, `studies`, `viewer`), which the tests then ask for as parameters.
The server is the real app (`create_app`) on its own port with CORS for the viewer's origin, wrapped in
`ohif.RequestLog` so that tests can see what OHIF asked for."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.conftest import _Thread, admin_token, app_dsn, bearer, cloned_database, free_port
from tests.support import ohif, ohif_data
from tests.support.factory import multipart, part10, stow_headers


@dataclass(frozen=True)
class Api:
    url: str
    settings: Settings
    log: ohif.RequestLog

    def token(self) -> str:
        """An admin token for this server (the identity OHIF is configured with)."""
        return admin_token(self.settings)


@pytest.fixture(scope="module", name="module_dsn")
def module_dsn_fixture(pg_uri: str, template_db: str) -> Iterator[str]:
    """A migrated database for one test module's server (cloned from the template)."""
    with cloned_database(pg_uri, template_db, "t_ohif") as url:
        yield url


@pytest.fixture(scope="module", name="viewer")
def viewer_fixture() -> Iterator[ohif.StaticViewer]:
    """OHIF's static files on their own origin (checks first that every tool is installed)."""
    ohif.require_tools()
    static = ohif.StaticViewer()
    yield static
    static.close()


@pytest.fixture(scope="module", name="api")
def api_fixture(module_dsn: str, viewer: ohif.StaticViewer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    port = free_port()
    settings = Settings.from_env({}).with_overrides(
        data_dir=tmp_path_factory.mktemp("ohif-data"),
        port=port,
        worker_poll_seconds=0.2,
        db_pool_min=1,
        db_pool_max=8,
        dimse_enabled=False,
        cors_origins=(viewer.origin,),
    )
    log = ohif.RequestLog(create_app(settings, dsn=app_dsn(module_dsn)))
    runner = _Thread(log, port)
    runner.start()
    yield Api(f"http://127.0.0.1:{port}", settings, log)
    runner.stop()


@pytest.fixture(scope="module", name="studies")
def studies_fixture(api: Api) -> ohif_data.Studies:
    """A 20-slice 512x512 16-bit CT series and one other study, stored with STOW-RS."""
    series = ohif_data.ct_series()
    other = ohif_data.other_study()
    with httpx.Client(base_url=api.url, timeout=120, headers=bearer(api.token())) as http:
        for chunk in ohif_data.iter_chunks([*series, other], 7):
            body = multipart([part10(d) for d in chunk])
            r = http.post("/dicom-web/studies", content=body, headers=stow_headers())
            assert r.status_code == 200, r.text
    return ohif_data.Studies(
        series[0].StudyInstanceUID,
        series[0].SeriesInstanceUID,
        tuple(d.SOPInstanceUID for d in series),
        other.StudyInstanceUID,
    )


@pytest.fixture(scope="module", name="browser")
def browser_fixture(tmp_path_factory: pytest.TempPathFactory, viewer: ohif.StaticViewer) -> Iterator[ohif.Chromium]:
    """Chromium with a fresh profile, once per module (each scenario gets its own browser context)."""
    base = tmp_path_factory.mktemp("chromium")
    chrome = ohif.Chromium(base / "profile", base / "chromium.log")
    yield chrome
    chrome.stop()
