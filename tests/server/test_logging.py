"""The log of a served process: `HOUNSFIELD_LOG_LEVEL` holds for every logger (Litestar used to reset the root
logger to INFO at start-up, so `warning` still logged every INFO line, e.g. the FHIR backfill); and no PHI, no
token and no forged line gets into it, whatever a client sends."""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from server.platform.logs import FORMAT, OneLineFormatter
from server.settings import Settings
from tests.conftest import admin_token
from tests.support.factory import ct, multipart, part10, stow_headers
from tests.support.procs import serve


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


SECRET_ID = "PSECRET5"
SECRET_NAME = "SECRETNAME^JANE"
FORGED = "FORGED-LINE"
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


def test_log_holds_no_phi_no_token_and_no_forged_line(dsn: str, tmp_path: Path) -> None:
    """What an attacker or an ordinary client sends in a target (Patient IDs and names in searches, a token in
    `access_token=`, CR, LF and NUL in a path) and a break-glass start naming a patient, against `hounsfield
    serve` at the most verbose level: the log names route templates, holds none of those values, and every line
    is a record of its own (or an indented continuation of one)."""
    with serve(dsn, tmp_path / "data", HOUNSFIELD_LOG_LEVEL="debug") as server:
        token = server.headers["Authorization"].removeprefix("Bearer ")
        forge = f"%0A2026-01-01 00:00:00,000 WARNING forged: {FORGED}"
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
            stored = ct(PatientID=SECRET_ID, PatientName=SECRET_NAME)
            assert http.post("/dicom-web/studies", content=multipart([part10(stored)]), headers=stow_headers())
            study, series = stored.StudyInstanceUID, stored.SeriesInstanceUID
            targets = [
                f"/dicom-web/studies?PatientID={SECRET_ID}",
                f"/dicom-web/studies?PatientName={quote(SECRET_NAME)}",
                f"/dicom-web/studies/{study}/series?PatientID={SECRET_ID}",
                f"/fhir/ImagingStudy?patient.identifier={SECRET_ID}",
                f"/fhir/Patient?identifier={SECRET_ID}",
                f"/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
                f"&objectUID={stored.SOPInstanceUID}&PatientID={SECRET_ID}",
                f"/dicom-web/studies?access_token={token}",
                f"/dicom-web/studies/1.2{forge}",
                f"/dicom-web/studies/1.2{forge}%00",
                f"/dicom-web/studies/1.2%0D{forge}%00/series",
                f"/fhir/Patient/x{forge}%00",
                f"/no/such/route{forge}%00",
            ]
            for url in targets:
                http.get(url)
            anonymous = httpx.get(f"{server.url}/dicom-web/studies/1.2{forge}", params={"access_token": token})
            assert anonymous.status_code in (400, 401)
            assert http.request("PATCH", f"/dicom-web/studies?PatientID={SECRET_ID}").status_code == 405
            dr = {"Authorization": "Bearer " + _token(server.data, sub="dr-who", roles=["referring"])}
            started = httpx.post(
                server.url + "/break-glass",
                json={"reason": "unconscious trauma patient, prior CT needed", "patient_id": SECRET_ID},
                headers=dr,
            )
            assert started.status_code == 201, started.text
            request_id = started.headers.get("x-request-id")
        time.sleep(0.5)
    log = server.log.read_text(errors="backslashreplace")
    for secret in (SECRET_ID, "SECRETNAME", token, token.split(".")[1], "access_token"):
        assert secret not in log, (secret, [line for line in log.splitlines() if secret in line][:3])
    lines = log.splitlines()
    foreign = [line for line in lines if not (RECORD.match(line) or line.startswith("    ") or "Hounsfield on" in line)]
    assert foreign == [], foreign[:5]
    assert not any(FORGED in line and not line.startswith("    ") and " forged: " in line[:60] for line in lines)
    assert "\x00" not in log and "\r" not in log
    access = [line for line in lines if " hounsfield.access: " in line]
    assert any(" GET /dicom-web/studies/{study}/series " in line for line in access), access
    assert any(" GET /dicom-web/studies 200 " in line for line in access), access
    assert any(" GET <unrouted> 400 " in line for line in access), access
    assert any(" PATCH <unrouted> 405 " in line for line in access), access
    assert any("BREAK-GLASS session" in line and "scope=patient" in line for line in lines)
    assert request_id and any("POST /break-glass 201 " in line and f"rid={request_id}" in line for line in access)


def _token(data: Path, **claims: Any) -> str:
    return admin_token(Settings.from_env({}).with_overrides(data_dir=data), scopes=[], **claims)


def test_one_line_formatter_escapes_messages_and_indents_tracebacks() -> None:
    formatter = OneLineFormatter(FORMAT)
    try:
        raise ValueError("bad value\n2026-01-01 00:00:00,000 ERROR forged: x")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "path %s", ("/a\nb\x00c\r",), sys.exc_info())
    lines = formatter.format(record).split("\n")
    assert lines[0].endswith("path /a\\x0ab\\x00c\\x0d")
    assert len(lines) > 2 and all(line.startswith("    ") for line in lines[1:])
    assert any("forged" in line for line in lines[1:])
