"""`HOUNSFIELD_LOG_LEVEL` holds for every logger of a served process (Litestar used to reset the root logger to
INFO at start-up, so `warning` still logged every INFO line, e.g. the FHIR backfill)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.procs import serve


def test_log_level_applies_to_all_loggers(dsn: str, tmp_path: Path) -> None:
    with serve(dsn, tmp_path / "quiet", HOUNSFIELD_LOG_LEVEL="warning") as quiet:
        assert httpx.get(quiet.url + "/dicom-web/studies", headers=quiet.headers).status_code == 200
        time.sleep(0.5)
    with serve(dsn, tmp_path / "chatty", HOUNSFIELD_LOG_LEVEL="info") as chatty:
        assert httpx.get(chatty.url + "/dicom-web/studies", headers=chatty.headers).status_code == 200
        time.sleep(0.5)
    quiet_log = quiet.log.read_text()
    chatty_log = chatty.log.read_text()
    assert " INFO " in chatty_log  # the control: this process does log at INFO
    assert " INFO " not in quiet_log, quiet_log
