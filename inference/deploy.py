"""`hounsfield models deploy`: one Ray Serve application (`HOUNSFIELD_RAY_APP`) with one deployment per active or
shadow model version (except those whose registration pins them in process: `backend.backend: "in-process"`),
made or updated in place (`serve.run` of the whole application is declarative: deployments
of models no longer listed are removed, unchanged ones keep their replicas' configuration).

Per model, from its registered backend settings (checked here, `InvalidModel` naming the field):
- `max_batch_size` (1-256, default 8) and `batch_wait_timeout_s` (0-10, default 0.01): `@serve.batch`.
- `num_gpus` (>= 0, fractional allowed: 0.25 shares one GPU between four replicas; default 0) and `num_cpus`
  (> 0, default 1): the replica's Ray resources. Ray sizes a replica's torch and OpenMP thread pools by its
  `num_cpus`: a torch model given 1 CPU computes on one thread (deepbet: 1.8 s per 2 mm volume on 2 threads).
- `max_ongoing_requests` is twice the batch size, so that one batch fills while the previous one runs, and
  autoscaling (`HOUNSFIELD_RAY_MIN_REPLICAS`..`HOUNSFIELD_RAY_MAX_REPLICAS`) targets one full batch per replica.
The ingress deployment (`Catalog`) only lists the models: the server calls each model deployment's own handle,
so a request takes one hop. Serve's HTTP proxy is disabled; nothing listens on a port.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray import serve
from ray.serve.config import ProxyLocation

from inference.errors import InvalidModel
from inference.ray_replica import ModelReplica
from inference.registry import Model
from inference.settings import InferenceSettings

CATALOG = "catalog"


def _number(settings: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidModel(f"backend.{key}: expected a number")
    if not low <= value <= high:
        raise InvalidModel(f"backend.{key}: expected {low:g} to {high:g}, got {value:g}")
    return float(value)


def serve_options(model: Model, settings: InferenceSettings) -> dict[str, Any]:
    """The Serve deployment options of `model` (see the module docstring)."""
    batch = _number(model.backend, "max_batch_size", 8, 1, 256)
    if batch != int(batch):
        raise InvalidModel("backend.max_batch_size: expected a whole number")
    num_gpus = _number(model.backend, "num_gpus", 0, 0, 64)
    num_cpus = _number(model.backend, "num_cpus", 1, 0.01, 256)
    low = settings.inference_ray_min_replicas
    return {
        "name": deployment_name(model),
        "max_ongoing_requests": 2 * int(batch),
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "autoscaling_config": {
            "min_replicas": low,
            "initial_replicas": max(1, low),
            "max_replicas": max(1, low, settings.inference_ray_max_replicas),
            "target_ongoing_requests": int(batch),
        },
    }


def deployment_name(model: Model) -> str:
    return f"{model.name}@{model.version}"


class Catalog:
    """The application's ingress: which model versions it serves (`hounsfield models deploy` prints them)."""

    def __init__(self, models: dict[str, Any]) -> None:
        self.models = sorted(models)

    def __call__(self) -> list[str]:
        return self.models


CATALOG_DEPLOYMENT: Any = serve.deployment(name=CATALOG, ray_actor_options={"num_cpus": 0})(Catalog)


def application(models: Sequence[Model], settings: InferenceSettings) -> Any:
    """The Serve application of `models`: active and shadow versions, except those whose registration pins them
    in process (`backend.backend`); retired ones are left out."""
    bound: dict[str, Any] = {}
    for model in models:
        if model.status == "retired" or model.runs_in("ray") != "ray":
            continue
        batch_wait = _number(model.backend, "batch_wait_timeout_s", 0.01, 0, 10)
        options = serve_options(model, settings)
        replica: Any = serve.deployment(ModelReplica)
        replica = replica.options(**options)
        bound[options["name"]] = replica.bind(
            model.adapter,
            dict(model.backend),
            settings.inference_plugins,
            options["max_ongoing_requests"] // 2,
            batch_wait,
        )
    return CATALOG_DEPLOYMENT.bind(bound)


def connect(settings: InferenceSettings, local: bool) -> bool:
    """Join the configured cluster (or start a local one when `local`); True when this call started Ray."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if ray.is_initialized():
        return False
    if local:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(address=settings.inference_ray_address, logging_level=logging.WARNING, log_to_driver=False)
    serve.start(proxy_location=ProxyLocation.Disabled)
    return True


def disconnect(shutdown_serve: bool) -> None:
    if shutdown_serve:
        serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


def deploy(models: Sequence[Model], settings: InferenceSettings) -> list[str]:
    """Create or update the application; returns the deployed model deployments' names."""
    serve.start(proxy_location=ProxyLocation.Disabled)
    handle = serve.run(application(models, settings), name=settings.inference_ray_app, route_prefix=None)
    names: list[str] = handle.remote().result(timeout_s=60)
    return names


def deployed(settings: InferenceSettings) -> set[str]:
    """The deployments of the application now (empty when it does not exist)."""
    app = serve.status().applications.get(settings.inference_ray_app)
    return set(app.deployments) - {CATALOG} if app is not None else set()


def handle(model: Model, settings: InferenceSettings) -> Any:
    return serve.get_deployment_handle(deployment_name(model), app_name=settings.inference_ray_app)
