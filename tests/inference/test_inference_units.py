"""The inference parts below HTTP: registration documents and selectors (pure), the lung fields model on the RG1
chest CR and on images it must refuse, the quiet period of dispatch (each new instance pushes the series' job
later), and the `hounsfield models` CLI on a real database."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pydicom
import pytest

from inference.dispatch import QUIET_JOB
from inference.errors import InvalidModel, ModelFailed
from inference.models import ImageInput, ModelInput, catalog
from inference.models.lung_fields import LungFields, otsu
from inference.outputs import image_input, valid_spacing
from inference.registry import SeriesFacts, parse_model, parse_selector
from server.cli import main
from tests.conftest import LiveServer
from tests.support.data import sample
from tests.support.factory import ct, multipart, part10, stow_headers

ADAPTERS = ["chest-xray-lung-fields"]
DOC = {
    "name": "lungs",
    "version": "1",
    "task": "lung fields",
    "selector": {"modality": "cr", "body_part": ["Chest"], "series_description": "^pa", "min_instances": 1},
    "outputs": ["SEG"],
    "backend": {"adapter": "chest-xray-lung-fields"},
}


def facts(**changes: Any) -> SeriesFacts:
    base: dict[str, Any] = dict(
        study_uid="1.2",
        series_uid="1.2.3",
        modality="CR",
        body_part="CHEST",
        series_description="PA chest",
        sop_classes=frozenset({"1.2.840.10008.5.1.4.1.1.1"}),
        instances=1,
    )
    base.update(changes)
    return SeriesFacts(**base)


def test_registration_documents_are_checked() -> None:
    model = parse_model(DOC, ADAPTERS)
    assert model.status == "shadow" and model.backend == {"adapter": "chest-xray-lung-fields"}
    assert model.runs_in("inprocess") == "inprocess" and model.runs_in("ray") == "ray"  # the server's default
    for pinned, where in (("in-process", "inprocess"), ("ray", "ray")):
        doc = {**DOC, "backend": {"adapter": ADAPTERS[0], "backend": pinned}}
        assert parse_model(doc, ADAPTERS).runs_in("inprocess") == where == parse_model(doc, ADAPTERS).runs_in("ray")
    assert model.selector.modality == ("CR",) and model.selector.body_part == ("CHEST",)
    for bad, field in [
        ({**DOC, "name": "Bad Name"}, "name"),
        ({**DOC, "version": ""}, "version"),
        ({**DOC, "outputs": ["PNG"]}, "outputs"),
        ({**DOC, "status": "live"}, "status"),
        ({**DOC, "backend": {"adapter": "x"}}, "backend.adapter"),
        ({**DOC, "backend": {"adapter": ADAPTERS[0], "backend": "gpu-farm"}}, "backend.backend"),
        ({**DOC, "selector": {"colour": "red"}}, "selector"),
        ({**DOC, "selector": {"min_instances": 0}}, "selector.min_instances"),
        ({**DOC, "selector": {"sop_class": ["1.2.x"]}}, "selector.sop_class"),
        ({**DOC, "task": ""}, "task"),
    ]:
        with pytest.raises(InvalidModel, match=field.replace(".", r"\.")):
            parse_model(bad, ADAPTERS)


def test_selectors_match_series() -> None:
    selector = parse_model(DOC, ADAPTERS).selector
    assert selector.matches(facts())
    assert not selector.matches(facts(modality="CT"))
    assert not selector.matches(facts(body_part="HEAD"))
    assert not selector.matches(facts(series_description="lateral"))
    assert not selector.matches(facts(series_description=None))
    assert not parse_selector({"min_instances": 20}).matches(facts(instances=19))
    assert parse_selector({"sop_class": "1.2.840.10008.5.1.4.1.1.1"}).matches(facts())
    assert not parse_selector({"sop_class": ["1.2.3"]}).matches(facts())
    assert parse_selector(None).matches(facts(modality=None))


def test_lung_fields_on_the_rg1_chest_cr() -> None:
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    assert valid_spacing(ds) is None  # its PixelSpacing is 0\0
    inputs = ModelInput((image_input(ds),))
    adapter = catalog()["chest-xray-lung-fields"]({})
    prediction = adapter.predict(inputs)
    [segment] = prediction.segments
    mask = segment.masks[0]
    assert mask.shape == ds.pixel_array.shape and mask.dtype == bool
    assert 0.1 < prediction.measurements["lung_area_fraction"] < 0.45
    # two lung fields, left and right of the midline, the mediastinum between them mostly empty
    columns = mask.any(axis=0)
    middle = mask.shape[1] // 2
    assert columns[: middle - 100].any() and columns[middle + 100 :].any()
    assert mask[:, middle - 20 : middle + 20].mean() < 0.1
    assert "not for diagnostic use" in prediction.conclusion


def test_lung_fields_refuses_what_it_cannot_read() -> None:
    model = LungFields.from_settings({})
    flat = ImageInput("1.2", np.full((64, 64), 7, dtype=np.uint16), "MONOCHROME2")
    with pytest.raises(ModelFailed, match="no contrast"):
        model.predict(ModelInput((flat,)))
    rgb = ImageInput("1.2", np.zeros((64, 64, 3), dtype=np.uint8), "RGB")
    with pytest.raises(ModelFailed):
        model.predict(ModelInput((rgb,)))
    with pytest.raises(ModelFailed, match="no images"):
        model.predict(ModelInput(()))
    spaced = ImageInput("1.2", np.tile(np.arange(64, dtype=np.uint16), (64, 1)), "MONOCHROME2", (0.5, 0.5))
    assert "lung_area_mm2" in model.predict(ModelInput((spaced,))).measurements
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(0.2, 0.04, 500), rng.normal(0.8, 0.04, 500)]).clip(0, 1)
    assert 0.3 < otsu(bimodal) < 0.7


def _quiet_jobs(dsn: str) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch("SELECT id, run_at, state FROM jobs WHERE kind = $1", QUIET_JOB)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_each_instance_restarts_the_quiet_period(make_server: Any) -> None:
    server: LiveServer = make_server(inference_quiet_seconds=60)
    import httpx

    first = ct()
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        assert http.post("/dicom-web/studies", content=multipart([part10(first)]), headers=stow_headers()).is_success
        [before] = _quiet_jobs(server.dsn)
        assert before["run_at"] > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=50)
        time.sleep(0.3)
        second = ct(first.StudyInstanceUID, first.SeriesInstanceUID)
        assert http.post("/dicom-web/studies", content=multipart([part10(second)]), headers=stow_headers()).is_success
        [after] = _quiet_jobs(server.dsn)
        assert after["id"] == before["id"] and after["run_at"] > before["run_at"]
        seg = ct(first.StudyInstanceUID, Modality="SEG")
        assert http.post("/dicom-web/studies", content=multipart([part10(seg)]), headers=stow_headers()).is_success
        assert len(_quiet_jobs(server.dsn)) == 1  # results never start a quiet period


def test_models_cli(tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("HOUNSFIELD_DATA", str(tmp_path / "data"))
    doc = tmp_path / "lungs.json"
    doc.write_text(json.dumps({**DOC, "status": "active"}))
    assert main(["models", "register", str(doc)]) == 0
    doc.write_text(json.dumps({**DOC, "version": "2"}))
    assert main(["models", "register", str(doc)]) == 0
    assert main(["models", "register", str(doc)]) == 1  # the same version again
    assert "registered already" in capsys.readouterr().err
    assert main(["models", "promote", "lungs", "2"]) == 0
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {m["version"]: m["status"] for m in listed} == {"1": "retired", "2": "active"}
    assert main(["models", "retire", "lungs", "2"]) == 0
    assert main(["models", "shadow", "lungs", "9"]) == 1
    doc.write_text(json.dumps({**DOC, "backend": {"adapter": "nope"}}))
    assert main(["models", "register", str(doc)]) == 1
    assert main(["models", "list"]) == 0
    assert "lungs\t2\tretired" in capsys.readouterr().out


def test_the_server_loads_no_model_or_report_library_until_one_is_used() -> None:
    """highdicom and pydicom's SR code dictionary (~20 MiB resident) load with the first SEG/SR or model run,
    not with the app (the server's memory)."""
    import subprocess
    import sys

    script = """
import sys
from server.app import create_app
from server.settings import Settings
create_app(Settings.from_env({}))
print(sorted(m for m in ("highdicom", "pydicom.sr", "inference.models.lung_fields", "torch") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
