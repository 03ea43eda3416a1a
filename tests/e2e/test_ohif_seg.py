"""OHIF v3 shows a DICOM SEG over its CT (the AI results' SEG overlays the image): a CT series
and a SEG that references it (made by the AI results' SEG builder, inference.outputs.segmentation, as every
model's SEG is: tests/support/ohif_seg_data.py) are stored with STOW-RS; OHIF opens the study, the SEG series is loaded
from the study browser, and the viewport shows the segment's colour while the segmentation panel lists the
segment. Same harness and fixtures as tests/e2e/test_ohif.py."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import bearer
from tests.support import ohif
from tests.support.factory import multipart, part10, stow_headers
from tests.support.ohif_fixtures import (  # noqa: F401 - the module-scoped fixtures api, browser, module_dsn, viewer
    Api,
    api_fixture,
    browser_fixture,
    module_dsn_fixture,
    viewer_fixture,
)
from tests.support.ohif_seg_data import SEGMENT_LABEL, ct_with_seg

pytestmark = pytest.mark.timeout(300)


def test_seg_overlays_the_ct(api: Api, viewer: ohif.StaticViewer, browser: ohif.Chromium, tmp_path: Path) -> None:
    series, seg = ct_with_seg()
    with httpx.Client(base_url=api.url, timeout=120, headers=bearer(api.token())) as http:
        r = http.post(
            "/dicom-web/studies", content=multipart([part10(d) for d in [*series, seg]]), headers=stow_headers()
        )
        assert r.status_code == 200, r.text
    viewer.config_js = ohif.app_config(api.url, api.token())
    url = f"{viewer.origin}/viewer?StudyInstanceUIDs={seg.StudyInstanceUID}"
    mark = len(api.log.seen)
    scenario = {"scenario": "seg", "url": url, "segmentLabel": SEGMENT_LABEL, "name": "seg"}
    report = ohif.drive(browser, scenario, tmp_path)
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "phantom-bone"  # an AI result, identified as such
    assert "not for diagnostic use" in seg.SeriesDescription.lower()
    assert report["colourBefore"] < 0.0005, "the CT alone is grey"
    assert report["colourAfter"] > 0.002 and SEGMENT_LABEL in report["text"]
    seg_reads = [s for s in api.log.since(mark) if seg.SOPInstanceUID in s.path and s.method == "GET"]
    assert seg_reads and all(s.status in (200, 206) for s in seg_reads), "OHIF read the SEG from the server"
