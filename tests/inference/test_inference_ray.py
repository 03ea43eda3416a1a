"""The Ray Serve backend on a real local Ray cluster: one session-scoped `ray.init(num_cpus=2,
include_dashboard=False)` with Serve (HTTP proxy disabled), shut down at the end of the session.

- `hounsfield models deploy` (the CLI, in its own process, joining the cluster by address) deploys the registered
  models (not those pinned in process by `backend.backend`, which the server runs beside itself); a server with
  `HOUNSFIELD_INFERENCE_BACKEND=ray` then turns a STOW of RG1 into the same lung fields SEG and DiagnosticReport
  as the in-process backend, and a failing deployment is retried and reported.
- Concurrent requests are batched by `@serve.batch` (each answer says the size of its batch).
- Deployment options follow the model's backend settings; bad ones are refused.
- Nothing waits without bound: a model the cluster can never place is refused by `models deploy` and fails its
  run, each naming what it asks and what the cluster has; a run without an answer within
  `HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S` fails its attempt with that reason, visibly, and is retried.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

from inference import deploy, outputs, ray_capacity
from inference.backend_ray import RayServeBackend
from inference.errors import InvalidModel
from inference.models import ModelInput
from inference.models.lung_fields import LungFields
from inference.registry import parse_model
from server.settings import Settings, SettingsError
from tests.conftest import LiveServer
from tests.inference.test_inference_e2e import CHEST, LUNGS, result_of, stow_chest
from tests.server.test_cli import _env, hounsfield
from tests.support.data import sample

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ("tests.support.inference_plugins",)
RAY_LUNGS = {
    **LUNGS,
    "backend": {**LUNGS["backend"], "num_cpus": 0.5, "max_batch_size": 4, "batch_wait_timeout_s": 0.5},
}  # type: ignore[dict-item]
LOCAL = {  # pinned in process: not deployed in Serve, run beside the server even though its default is Ray
    **LUNGS,
    "name": "lungs-local",
    "outputs": ["DiagnosticReport"],
    "backend": {"adapter": "chest-xray-lung-fields", "backend": "in-process"},
}
BROKEN = {
    **RAY_LUNGS,
    "name": "broken",
    "outputs": ["SEG"],
    "backend": {"adapter": "test-always-fails", "num_cpus": 0.25},
}

HUGE = {
    **RAY_LUNGS,
    "name": "huge",
    "outputs": ["SEG"],
    "backend": {"adapter": "chest-xray-lung-fields", "num_cpus": 64},
}
SLOW = {
    **RAY_LUNGS,
    "name": "slow",
    "status": "shadow",
    "backend": {"adapter": "test-sleeps", "seconds": 6, "num_cpus": 0.25},
}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A local Ray instance with Serve for the whole session; yields its address (for other processes)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve
    from ray.serve.config import ProxyLocation

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}},
    )
    try:
        serve.start(proxy_location=ProxyLocation.Disabled)
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        serve.shutdown()
        ray.shutdown()


def _settings(address: str, **overrides: Any) -> Settings:
    return Settings.from_env({}).with_overrides(
        inference_backend="ray", inference_ray_address=address, inference_plugins=PLUGINS, **overrides
    )


def _chest_input(step: int = 1) -> tuple[pydicom.Dataset, ModelInput]:
    ds = pydicom.dcmread(sample(CHEST))
    image = outputs.image_input(ds)
    return ds, ModelInput((replace(image, pixels=image.pixels[::step, ::step]),))


def test_deploy_cli_then_stow_makes_the_same_seg_and_report(ray_cluster: str, make_server: Any) -> None:
    ai: LiveServer = make_server(
        inference_quiet_seconds=0.5,
        inference_max_attempts=2,
        inference_plugins=PLUGINS,
        inference_backend="ray",
        inference_ray_address=ray_cluster,
    )
    with httpx.Client(base_url=ai.url, timeout=60, headers=ai.headers) as api:
        assert api.post("/models", json=RAY_LUNGS).status_code == 201
        assert api.post("/models", json=BROKEN).status_code == 201
        assert api.post("/models", json=LOCAL).status_code == 201
        assert api.post("/models", json={**RAY_LUNGS, "version": "0.1", "status": "retired"}).status_code == 201
        env = _env(RAY_ADDRESS=ray_cluster, DATABASE_URL=ai.dsn, HOUNSFIELD_INFERENCE_PLUGINS=",".join(PLUGINS))
        done = hounsfield("models", "deploy", env=env)
        assert done.returncode == 0, done.stderr
        assert sorted(done.stdout.split()) == sorted(
            "deployed broken@1.0.0 in hounsfield deployed lungs@1.0.0 in hounsfield".split()
        )
        # neither the retired version nor the model pinned in process
        assert deploy.deployed(ai.settings) == {"lungs@1.0.0", "broken@1.0.0"}

        source = stow_chest(api)
        result = result_of(api, source.SeriesInstanceUID, "lungs", ("succeeded", "failed"))
        assert result["state"] == "succeeded", result
        [instance] = result["outputs"]["instances"]
        wado = api.get(
            f"/dicom-web/studies/{source.StudyInstanceUID}/series/{result['outputs']['series']}/instances/{instance}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
        )
        assert wado.status_code == 200
        seg = pydicom.dcmread(io.BytesIO(wado.content[wado.content.index(b"DICM") - 128 :]))
        assert seg.SegmentSequence[0].SegmentAlgorithmName == "chest-xray-lung-fields"
        assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "1.0.0"
        # exactly what the in-process adapter makes of the same pixels
        _, inputs = _chest_input()
        expected = LungFields.from_settings({}).predict(inputs)
        assert np.array_equal(seg.pixel_array.astype(bool), expected.segments[0].masks[0].astype(bool))
        assert result["stats"]["lung_area_fraction"] == pytest.approx(expected.measurements["lung_area_fraction"])
        report = api.get(f"/fhir/{result['report']}").json()
        assert report["status"] == "preliminary" and report["meta"]["security"][0]["code"] == "AIAST"
        # the pinned model ran in process (through Ray it would fail: it has no deployment there)
        local = result_of(api, source.SeriesInstanceUID, "lungs-local", ("succeeded", "failed"))
        assert local["state"] == "succeeded" and local["report"] is not None, local
        assert local["stats"]["lung_area_fraction"] == pytest.approx(expected.measurements["lung_area_fraction"])

        # the failing deployment: retried with backoff, then failed with the adapter's own message
        failed = result_of(api, source.SeriesInstanceUID, "broken", ("failed",))
        assert failed["attempts"] == 2 and "test model refuses 1 images" in failed["error"]


def test_without_address_the_server_deploys_registered_models(ray_cluster: str, make_server: Any) -> None:
    """`make run` style (no cluster address): the server deploys the registry's models on first use."""
    ai: LiveServer = make_server(inference_quiet_seconds=0.5, inference_backend="ray", inference_ray_address=None)
    lungs = {**RAY_LUNGS, "version": "3.0.0"}
    with httpx.Client(base_url=ai.url, timeout=60, headers=ai.headers) as api:
        assert api.post("/models", json=lungs).status_code == 201
        assert "lungs@3.0.0" not in deploy.deployed(ai.settings)
        source = stow_chest(api)
        result = result_of(api, source.SeriesInstanceUID, "lungs", ("succeeded", "failed"))
        assert result["state"] == "succeeded" and result["version"] == "3.0.0", result
        assert result["outputs"]["series"] is not None and result["report"] is not None
    assert "lungs@3.0.0" in deploy.deployed(ai.settings)


def test_concurrent_requests_are_batched(ray_cluster: str) -> None:
    settings = _settings(ray_cluster)
    model = parse_model(RAY_LUNGS, {"chest-xray-lung-fields"})
    assert deploy.deploy([model], settings) == ["lungs@1.0.0"]
    _, inputs = _chest_input(step=4)
    backend = RayServeBackend(settings)

    async def burst() -> list[int]:
        answers = await asyncio.gather(*(backend.call(model, inputs) for _ in range(4)))
        return [a.batch_size for a in answers]

    sizes = asyncio.run(burst())
    assert max(sizes) > 1, sizes  # four requests within the 0.5 s batch window share a batch
    assert all(1 <= s <= 4 for s in sizes)
    one = asyncio.run(backend.predict(model, inputs))
    assert one.segments and 0.05 < one.measurements["lung_area_fraction"] < 0.6
    assert backend.adapter(model).algorithm.name == "chest-xray-lung-fields"
    asyncio.run(backend.close())


def test_missing_deployment_is_a_model_failure(ray_cluster: str) -> None:
    from inference.errors import ModelFailed

    settings = _settings(ray_cluster)
    model = parse_model({**RAY_LUNGS, "version": "9.9"}, {"chest-xray-lung-fields"})
    with pytest.raises(ModelFailed, match="not deployed"):
        asyncio.run(RayServeBackend(settings).predict(model, _chest_input(step=8)[1]))


def test_serve_options_follow_the_model() -> None:
    settings = Settings.from_env({"HOUNSFIELD_RAY_MIN_REPLICAS": "0", "HOUNSFIELD_RAY_MAX_REPLICAS": "3"})
    doc = {**RAY_LUNGS, "backend": {"adapter": "chest-xray-lung-fields", "max_batch_size": 16, "num_gpus": 0.25}}
    options = deploy.serve_options(parse_model(doc, {"chest-xray-lung-fields"}), settings)
    assert options["name"] == "lungs@1.0.0"
    assert options["max_ongoing_requests"] == 32
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert options["autoscaling_config"]["min_replicas"] == 0
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert options["autoscaling_config"]["target_ongoing_requests"] == 16
    for bad in ({"max_batch_size": 0}, {"max_batch_size": 2.5}, {"num_gpus": -1}, {"num_gpus": "1"}):
        model = parse_model(
            {**doc, "backend": {"adapter": "chest-xray-lung-fields", **bad}}, {"chest-xray-lung-fields"}
        )
        with pytest.raises(InvalidModel, match=f"backend.{next(iter(bad))}"):
            deploy.serve_options(model, settings)
    with pytest.raises(SettingsError, match="HOUNSFIELD_INFERENCE_BACKEND"):
        Settings.from_env({"HOUNSFIELD_INFERENCE_BACKEND": "gpu"})
    assert Settings.from_env({"RAY_ADDRESS": "auto"}).inference_ray_address == "auto"


def test_deploy_cli_needs_a_cluster_address(tmp_path: Path) -> None:
    env = {k: v for k, v in _env().items() if k != "RAY_ADDRESS"}
    done = hounsfield("models", "deploy", "--data", str(tmp_path), env=env, timeout=60)
    assert done.returncode == 1 and "RAY_ADDRESS" in done.stderr


def test_deploy_refuses_a_model_the_cluster_cannot_place(ray_cluster: str, make_server: Any) -> None:
    ai: LiveServer = make_server(inference_plugins=PLUGINS, inference_backend="ray", inference_ray_address=ray_cluster)
    with httpx.Client(base_url=ai.url, timeout=60, headers=ai.headers) as api:
        assert api.post("/models", json=HUGE).status_code == 201
    env = _env(RAY_ADDRESS=ray_cluster, DATABASE_URL=ai.dsn, HOUNSFIELD_INFERENCE_PLUGINS=",".join(PLUGINS))
    done = hounsfield("models", "deploy", env=env, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "model huge@1.0.0 asks 64 CPU per replica" in done.stderr and "2 CPU" in done.stderr, done.stderr
    assert "huge@1.0.0" not in deploy.deployed(ai.settings)


def test_a_model_that_cannot_be_placed_fails_its_run_with_the_reason(ray_cluster: str, make_server: Any) -> None:
    """No cluster address (the server deploys itself): the run fails with the reason instead of waiting."""
    ai: LiveServer = make_server(
        inference_quiet_seconds=0.5, inference_max_attempts=1, inference_backend="ray", inference_ray_address=None
    )
    with httpx.Client(base_url=ai.url, timeout=60, headers=ai.headers) as api:
        assert api.post("/models", json=HUGE).status_code == 201
        source = stow_chest(api)
        result = result_of(api, source.SeriesInstanceUID, "huge", ("succeeded", "failed"))
    assert result["state"] == "failed", result
    assert "huge@1.0.0 asks 64 CPU per replica" in result["error"] and "2 CPU" in result["error"], result


def test_a_run_without_an_answer_times_out_and_is_retried(ray_cluster: str, make_server: Any) -> None:
    ai: LiveServer = make_server(
        inference_quiet_seconds=0.5,
        inference_max_attempts=2,
        inference_plugins=PLUGINS,
        inference_backend="ray",
        inference_ray_address=ray_cluster,
        inference_run_timeout_s=2.0,
    )
    model = parse_model(SLOW, {"test-sleeps"})
    assert deploy.deploy([model], _settings(ray_cluster)) == ["slow@1.0.0"]
    with httpx.Client(base_url=ai.url, timeout=60, headers=ai.headers) as api:
        assert api.post("/models", json=SLOW).status_code == 201
        source = stow_chest(api)
        retrying = result_of(api, source.SeriesInstanceUID, "slow", ("retrying", "succeeded", "failed"))
        assert retrying["state"] == "retrying", retrying  # the attempt's reason shows while it waits for the next
        assert "no answer within 2 s (HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S)" in retrying["error"], retrying
        assert "slow@1.0.0" in retrying["error"]
        failed = result_of(api, source.SeriesInstanceUID, "slow", ("succeeded", "failed"))
    assert failed["state"] == "failed" and failed["attempts"] == 2, failed
    assert "no answer within 2 s" in failed["error"], failed


def test_capacity_names_what_each_model_asks_and_what_there_is() -> None:
    nodes = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 1.0, "GPU": 1.0, "ward": 1.0}]
    demands = [
        ray_capacity.Demand("a@1", {"CPU": 1.0}, 2),
        ray_capacity.Demand("b@1", {"CPU": 1.0, "GPU": 0.5}, 1),
        ray_capacity.Demand("c@1", {"CPU": 1.0}, 1),
        ray_capacity.Demand("d@1", {"CPU": 3.0}, 1),
        ray_capacity.Demand("e@1", {"ward": 1.0, "CPU": 2.0}, 1),
        ray_capacity.Demand("f@1", {"GPU": 0.5}, 1),
    ]
    found = ray_capacity.problems(demands, nodes)
    assert set(found) == {"c@1", "d@1", "e@1"}
    assert found["c@1"] == (
        "model c@1 asks 1 CPU for 1 replica(s), but the Ray cluster has 3 CPU, of which a@1, b@1 take(s) 3 CPU"
    )
    assert "asks 3 CPU per replica" in found["d@1"] and "the most one node has: 2 CPU" in found["d@1"]
    assert "asks 2 CPU, 1 ward per replica" in found["e@1"]
    assert ray_capacity.problems(demands[:2], nodes) == {}
