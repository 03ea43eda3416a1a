"""`hounsfield models deploy`: one Ray Serve application (`HOUNSFIELD_RAY_APP`) with one deployment per active or
shadow model version (except those whose registration pins them in process: `backend.backend: "in-process"`),
made or updated in place (`serve.run` of the whole application is declarative: deployments
of models no longer listed are removed, unchanged ones keep their replicas' configuration).

Per model, from its registered backend settings (checked here, `InvalidModel` naming the field):
- `max_batch_size` (1-256, default 8) and `batch_wait_timeout_s` (0-10, default 0.01): `@serve.batch`.
- `num_gpus` (>= 0, fractional allowed: 0.25 shares one GPU between four replicas; default 0), `num_cpus`
  (> 0, default 1) and `resources` (custom resources, `{"name": amount}`, e.g. a node label given to
  `ray start --resources`): the replica's Ray resources. Ray sizes a replica's torch and OpenMP thread pools by its
  `num_cpus`: a torch model given 1 CPU computes on one thread (deepbet: 1.8 s per 2 mm volume on 2 threads).
- `max_ongoing_requests` is twice the batch size, so that one batch fills while the previous one runs, and
  autoscaling (`HOUNSFIELD_RAY_MIN_REPLICAS`..`HOUNSFIELD_RAY_MAX_REPLICAS`) targets one full batch per replica.
The ingress deployment (`Catalog`) only lists the models: the server calls each model deployment's own handle,
so a request takes one hop. Serve's HTTP proxy is disabled.

Never waiting without bound: a deployment the cluster can never place is refused before anything changes
(`inference.ray_capacity`, naming the model, what it asks and what the cluster has), and a deploy waits for its
replicas at most `HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S`, then fails with Serve's own account of each deployment.

The connection (`connect`):
- A cluster address: Ray's token authentication as Ray documents it (`RAY_AUTH_MODE=token`, the token in
  `RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`). With `RAY_AUTH_MODE` unset and a token
  available, token mode is used, as `ray start --head` does on the same machine. The token is never logged.
- No address: a local Ray instance in this process, bound to the loopback interface only (`127.0.0.1` as the
  node address makes Ray's gRPC servers, agents and metrics listeners bind there), dashboard off.
- Either way Ray's fatal-signal handler, which takes SIGTERM over and aborts the process, is given back to the
  process's own handler once Ray is up (`keep_signal_handlers`, from the main thread), so that SIGTERM reaches the
  server's graceful shutdown, which stops Ray and everything Ray started.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray import serve
from ray.serve.config import ProxyLocation

from inference import ray_capacity
from inference.errors import InferenceError, InvalidModel, ModelFailed
from inference.ray_replica import ModelReplica, loopback_only
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
    actor: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    custom = _resources(model.backend)
    if custom:
        actor["resources"] = custom
    return {
        "name": deployment_name(model),
        "max_ongoing_requests": 2 * int(batch),
        "ray_actor_options": actor,
        "autoscaling_config": {
            "min_replicas": low,
            "initial_replicas": max(1, low),
            "max_replicas": max(1, low, settings.inference_ray_max_replicas),
            "target_ongoing_requests": int(batch),
        },
    }


def _resources(settings: Mapping[str, Any]) -> dict[str, float]:
    value = settings.get("resources", {})
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise InvalidModel("backend.resources: expected an object of resource names to amounts")
    if any(k in ("CPU", "GPU", "memory", "object_store_memory") for k in value):
        raise InvalidModel("backend.resources: CPU and GPU are num_cpus and num_gpus; name custom resources only")
    return {k: _number(value, k, 0, 0, 1_000_000) for k in value}


def demand(model: Model, settings: InferenceSettings) -> ray_capacity.Demand:
    """What one model's deployment asks of the cluster: per replica, times the replicas Serve starts."""
    options = serve_options(model, settings)
    actor = options["ray_actor_options"]
    per_replica = {"CPU": actor["num_cpus"], "GPU": actor["num_gpus"], **actor.get("resources", {})}
    return ray_capacity.Demand(options["name"], per_replica, options["autoscaling_config"]["initial_replicas"])


def placement_problems(models: Sequence[Model], settings: InferenceSettings) -> dict[str, str]:
    """The deployments of `models` (those that run in Ray) that the connected cluster can never place."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
    return ray_capacity.problems([demand(m, settings) for m in _served(models)], nodes)


def _served(models: Sequence[Model]) -> list[Model]:
    return [m for m in models if m.status != "retired" and m.runs_in("ray") == "ray"]


def deployment_name(model: Model) -> str:
    return f"{model.name}@{model.version}"


class Catalog:
    """The application's ingress: which model versions it serves (`hounsfield models deploy` prints them)."""

    def __init__(self, models: dict[str, Any]) -> None:
        loopback_only()
        self.models = sorted(models)

    def __call__(self) -> list[str]:
        return self.models


CATALOG_DEPLOYMENT: Any = serve.deployment(name=CATALOG, ray_actor_options={"num_cpus": 0})(Catalog)


def application(models: Sequence[Model], settings: InferenceSettings) -> Any:
    """The Serve application of `models`: active and shadow versions, except those whose registration pins them
    in process (`backend.backend`); retired ones are left out."""
    bound: dict[str, Any] = {}
    for model in _served(models):
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
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if local:
        _loopback_only()
        ray.init(
            address="local", include_dashboard=False, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", **quiet
        )
    else:
        address = settings.inference_ray_address
        _token_auth_when_available()
        try:
            ray.init(address=address, **quiet)
        except Exception as exc:  # the cluster refused this client: name the settings, never the token
            raise InferenceError(
                f"cannot join the Ray cluster at {address}: {type(exc).__name__}; with token authentication set"
                " RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN_PATH (a file), RAY_AUTH_TOKEN or"
                " ~/.ray/auth_token"
            ) from None
    serve.start(proxy_location=ProxyLocation.Disabled)
    return True


def keep_signal_handlers() -> None:
    """Give SIGTERM and SIGINT back to the handlers Python has for them (Ray's core worker replaced them with its
    own, which aborts). Only the main thread may set handlers: elsewhere (a server in a test's thread) nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(number)
        if handler is not None:
            signal.signal(number, handler)


def _loopback_only() -> None:
    """A local Ray instance on 127.0.0.1 only: Ray treats the machine as a single-node, loopback cluster (its
    gRPC servers, agents and metrics exporters then bind to 127.0.0.1, not to every interface)."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # the processes Ray starts read it too
    ray_constants.ENABLE_RAY_CLUSTER = False


def _token_auth_when_available() -> None:
    """Ray's rule for a cluster found on this machine, applied to an address: token mode when `RAY_AUTH_MODE` is
    unset and a token is available (an explicit `RAY_AUTH_MODE` always wins)."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def disconnect(shutdown_serve: bool) -> None:
    if shutdown_serve:
        serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


def deploy(models: Sequence[Model], settings: InferenceSettings) -> list[str]:
    """Create or update the application; returns the deployed model deployments' names. Refused (`ModelFailed`,
    nothing changed) when the cluster can never place one of them; fails when the replicas are not running
    within `HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S`."""
    refused = placement_problems(models, settings)
    if refused:
        raise ModelFailed("; ".join(refused[name] for name in sorted(refused)))
    serve.start(proxy_location=ProxyLocation.Disabled)
    app = application(models, settings)
    handle = serve._run(app, _blocking=False, name=settings.inference_ray_app, route_prefix=None)
    wait_running(settings, settings.inference_run_timeout_s)
    names: list[str] = handle.remote().result(timeout_s=60)
    return names


def _state(status: Any) -> str:
    return str(getattr(status, "value", status))


def wait_running(settings: InferenceSettings, timeout_s: float) -> None:
    """Until the application runs; `ModelFailed` with Serve's account of it when it failed or timed out."""
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(settings.inference_ray_app)
        state = _state(app.status) if app is not None else "NOT_STARTED"
        if state == "RUNNING":
            return
        if state == "DEPLOY_FAILED" or time.monotonic() >= deadline:
            what = "failed" if state == "DEPLOY_FAILED" else f"is not running after {timeout_s:g} s"
            raise ModelFailed(f"Serve application {settings.inference_ray_app!r} {what}: {account(settings)}")
        time.sleep(0.5)


def account(settings: InferenceSettings, name: str | None = None) -> str:
    """Serve's own words on the application's deployments that are not healthy (or on the one named)."""
    app = serve.status().applications.get(settings.inference_ray_app)
    if app is None:
        return "the application is not deployed"
    said = [
        f"{key}: {_state(state.status)}" + (f" ({state.message})" if state.message else "")
        for key, state in sorted(app.deployments.items())
        if key == name or (name is None and _state(state.status) != "HEALTHY")
    ]
    return "; ".join(said) or app.message or _state(app.status)


def deployed(settings: InferenceSettings) -> set[str]:
    """The deployments of the application now (empty when it does not exist)."""
    app = serve.status().applications.get(settings.inference_ray_app)
    return set(app.deployments) - {CATALOG} if app is not None else set()


def handle(model: Model, settings: InferenceSettings) -> Any:
    return serve.get_deployment_handle(deployment_name(model), app_name=settings.inference_ray_app)
