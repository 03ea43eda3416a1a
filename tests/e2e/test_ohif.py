"""OHIF v3 end to end: the prebuilt viewer from npm in headless Chromium, on a live server with
authentication on, lists the studies, renders a CT series and scrolls through it. The harness is tests/support/ohif.py
(screenshots are kept in each test's tmp_path; the path is printed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import ohif
from tests.support.ohif_data import CT_PATIENT, OTHER_PATIENT, Studies
from tests.support.ohif_fixtures import (  # noqa: F401 - the module-scoped fixtures api, browser, module_dsn, studies, viewer
    Api,
    api_fixture,
    browser_fixture,
    module_dsn_fixture,
    studies_fixture,
    viewer_fixture,
)

pytestmark = pytest.mark.timeout(300)


def test_study_list_shows_both_studies(
    api: Api, studies: Studies, viewer: ohif.StaticViewer, browser: ohif.Chromium, tmp_path: Path
) -> None:
    viewer.config_js = ohif.app_config(api.url, api.token())
    # OHIF shows names as "Family, Given"
    expect = ["Phantom, Ohif", "Second, Study", CT_PATIENT[2], OTHER_PATIENT[2]]
    mark = len(api.log.seen)
    ohif.drive(browser, {"scenario": "worklist", "url": viewer.origin + "/", "expect": expect}, tmp_path)
    qido = [s for s in api.log.since(mark) if s.path == "/dicom-web/studies" and s.method == "GET"]
    assert qido and all(s.status == 200 for s in qido)
    assert all(s.headers.get("authorization", "").startswith("Bearer ") for s in qido)
    preflights = [s for s in api.log.since(mark) if s.method == "OPTIONS"]
    assert preflights and all(s.status in (200, 204) for s in preflights), "the cross-origin preflights pass"


def test_viewer_renders_ct_and_scrolls(
    api: Api, studies: Studies, viewer: ohif.StaticViewer, browser: ohif.Chromium, tmp_path: Path
) -> None:
    viewer.config_js = ohif.app_config(api.url, api.token())
    url = f"{viewer.origin}/viewer?StudyInstanceUIDs={studies.ct_study}"
    mark = len(api.log.seen)
    report = ohif.drive(browser, {"scenario": "viewer", "url": url}, tmp_path)
    ohif.assert_renders_and_scrolls(report, api.log, mark, studies)


def test_viewer_without_a_token_shows_nothing(
    api: Api, studies: Studies, viewer: ohif.StaticViewer, browser: ohif.Chromium, tmp_path: Path
) -> None:
    """The negative control: the same configuration with a token the server does not accept gets 401s and an
    empty study list (so the tests above pass because of the token OHIF sends)."""
    viewer.config_js = ohif.app_config(api.url, "not-a-token")
    mark = len(api.log.seen)
    report = ohif.drive(browser, {"scenario": "worklist", "url": viewer.origin + "/", "expect": []}, tmp_path)
    qido = [s for s in api.log.since(mark) if s.path == "/dicom-web/studies" and s.method == "GET"]
    assert qido and all(s.status == 401 for s in qido)
    assert "Phantom" not in report["text"] and CT_PATIENT[2] not in report["text"]
