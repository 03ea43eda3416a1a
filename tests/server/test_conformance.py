"""The DICOM Conformance Statement stays true: its endpoint and failure-reason tables match the code."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar import Litestar, Router, get, post
from litestar.params import FromPath

from conformance import check
from server.app import create_app
from server.settings import Settings


def test_statement_lists_exactly_the_dicomweb_routes() -> None:
    app = create_app(Settings.from_env({}))
    assert check.endpoint_problems(app) == []


def test_statement_failure_reasons_match_the_ingest() -> None:
    assert check.reason_problems() == []


def test_statement_lists_the_core_services() -> None:
    documented = check.documented_endpoints()
    assert ("POST", "/dicom-web/studies") in documented
    assert ("GET", "/dicom-web/studies") in documented
    assert ("GET", "/dicom-web/studies/{study}/series/{series}/instances/{instance}/metadata") in documented
    assert ("GET", "/wado") in documented
    assert len(documented) == 19 + 8  # + rendered and thumbnail resources (4 + 4)


def test_the_check_catches_differences(tmp_path: Path) -> None:
    @post("/studies", sync_to_thread=False)
    def store() -> None:
        return None

    @get("/studies/{study:str}/extra", sync_to_thread=False)
    def extra(study: FromPath[str]) -> str:
        return study

    app = Litestar(route_handlers=[Router(path="/dicom-web", route_handlers=[store, extra])])
    statement = tmp_path / "statement.md"
    statement.write_text(
        "<!-- endpoints:begin -->\n| Method | Path |\n| --- | --- |\n| POST | /dicom-web/studies |\n"
        "| GET | /dicom-web/studies |\n<!-- endpoints:end -->\n"
    )
    assert check.endpoint_problems(app, statement) == [
        "documented but not served: GET /dicom-web/studies",
        "served but not documented: GET /dicom-web/studies/{study}/extra",
    ]


def test_normalize() -> None:
    assert check.normalize("/dicom-web/studies/{study:str}/") == "/dicom-web/studies/{study}"


def test_the_command_reports_a_true_statement(capsys: pytest.CaptureFixture[str]) -> None:
    """`hounsfield conformance` checks the statement against the app it builds, as an operator would run it."""
    from server.cli import main

    assert main(["conformance"]) == 0
    assert "match the code" in capsys.readouterr().out
