"""OHIF v3 end to end, the configurations that need server features beyond basic WADO-RS: progressive
loading of HTJ2K frames by byte range (`stackRetrieveOptions`) and server-made thumbnails
(`thumbnailRendering: 'thumbnail'`). Same harness as tests/e2e/test_ohif.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support import ohif
from tests.support.ohif_data import Studies
from tests.support.ohif_fixtures import (  # noqa: F401 - the module-scoped fixtures api, browser, module_dsn, studies, viewer
    Api,
    api_fixture,
    browser_fixture,
    module_dsn_fixture,
    studies_fixture,
    viewer_fixture,
)

pytestmark = pytest.mark.timeout(300)

FIRST_STAGE = 65536
PROGRESSIVE: dict[str, Any] = {
    "stackRetrieveOptions": {
        "retrieveOptions": {
            "singleFast": {
                "rangeIndex": 0,
                "chunkSize": FIRST_STAGE,
                "urlArguments": "accept=image/jhc",
                "streaming": False,
            },
            "singleFinal": {"rangeIndex": -1, "urlArguments": "accept=image/jhc", "streaming": False},
        },
        "stages": [
            {"id": "lossySequential", "retrieveType": "singleFast"},
            {"id": "finalSequential", "retrieveType": "singleFinal"},
        ],
    }
}
"""What OHIF 3.13 / Cornerstone3D send for progressive HTJ2K (the issue's recording): the first 64 KiB of each
frame with `?accept=image/jhc` and `Range: bytes=0-65535` (the multipart Accept header still present, the query
parameter wins), then the rest of the stream (`Range: bytes=65536-<last byte>`)."""

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def test_progressive_htj2k_by_byte_range(
    api: Api, studies: Studies, viewer: ohif.StaticViewer, browser: ohif.Chromium, tmp_path: Path
) -> None:
    viewer.config_js = ohif.app_config(api.url, api.token(), range_auth_shim=True, **PROGRESSIVE)
    url = f"{viewer.origin}/viewer?StudyInstanceUIDs={studies.ct_study}"
    mark = len(api.log.seen)
    report = ohif.drive(browser, {"scenario": "viewer", "url": url, "name": "progressive"}, tmp_path)
    ohif.assert_renders_and_scrolls(report, api.log, mark, studies)
    # the stack's frames come by range (a thumbnail in the study browser may be fetched whole)
    ranged = [s for s in api.log.frames(mark) if "range" in s.headers]
    assert ranged and all(s.query == "accept=image/jhc" for s in ranged), [s.query for s in ranged]
    assert all(s.status == 206 for s in ranged), [(s.headers["range"], s.status) for s in ranged]
    by_instance: dict[str, list[ohif.Seen]] = {}
    for seen in ranged:
        by_instance.setdefault(ohif.instance_of(seen.path), []).append(seen)
    shown = ohif.instance_for(report["after"]["slice"], studies)
    stages = by_instance[shown]
    first = CONTENT_RANGE.fullmatch(stages[0].response_headers.get("content-range", ""))
    assert stages[0].headers["range"] == f"bytes=0-{FIRST_STAGE - 1}" and first, stages[0]
    total = int(first.group(3))
    assert (int(first.group(1)), int(first.group(2))) == (0, FIRST_STAGE - 1) and total > FIRST_STAGE
    assert "jhc" in stages[0].response_headers.get("content-type", "") or "jphc" in stages[0].response_headers.get(
        "content-type", ""
    )
    rest = [
        s for s in stages[1:] if s.headers["range"] in (f"bytes={FIRST_STAGE}-", f"bytes={FIRST_STAGE}-{total - 1}")
    ]
    assert rest, "the final stage asks for the rest of the stream"
    last = CONTENT_RANGE.fullmatch(rest[0].response_headers.get("content-range", ""))
    assert last and (int(last.group(1)), int(last.group(2)), int(last.group(3))) == (FIRST_STAGE, total - 1, total)


def test_server_thumbnails_in_the_study_browser(
    api: Api, studies: Studies, viewer: ohif.StaticViewer, browser: ohif.Chromium, tmp_path: Path
) -> None:
    viewer.config_js = ohif.app_config(api.url, api.token(), thumbnailRendering="thumbnail")
    url = f"{viewer.origin}/viewer?StudyInstanceUIDs={studies.ct_study}"
    mark = len(api.log.seen)
    report = ohif.drive(browser, {"scenario": "viewer", "url": url, "name": "thumbnail", "thumbnails": True}, tmp_path)
    ohif.assert_renders_and_scrolls(report, api.log, mark, studies)
    thumbs = [s for s in api.log.since(mark) if s.method == "GET" and s.path.endswith("/thumbnail")]
    assert thumbs and all(s.status == 200 for s in thumbs), [(s.path, s.query, s.status) for s in thumbs]
    assert all(s.response_headers.get("content-type", "").startswith("image/jpeg") for s in thumbs)
    assert all(s.headers.get("authorization", "").startswith("Bearer ") for s in thumbs)
    shown = report["thumbnails"]
    assert shown and all(t["width"] > 0 and t["std"] > 5 for t in shown), shown
