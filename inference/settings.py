"""The AI-on-ingest section of the settings: dispatch, runs, backends. Every field names its environment variable
(`setting(...)`, server/platform/settings.py) and is documented in the README."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicomweb.settings import DicomwebSettings
from server.platform.settings import boolean, choice, integer, items, setting


@dataclass(frozen=True)
class InferenceSettings(DicomwebSettings):
    """What dispatch, the runner and the backends read (with DICOMweb's: runs read and store instances)."""

    inference_enabled: bool = setting("HOUNSFIELD_INFERENCE", True, parse=boolean)
    """`HOUNSFIELD_INFERENCE`: dispatch new series to the registered models (the ingest hook and job handlers)."""
    inference_quiet_seconds: float = setting("HOUNSFIELD_INFERENCE_QUIET_SECONDS", 30.0, parse=integer(0, per=1))
    """`HOUNSFIELD_INFERENCE_QUIET_SECONDS`: a series counts as complete when no instance of it arrived for this
    long; then the matching models run."""
    inference_workers: int = setting("HOUNSFIELD_INFERENCE_WORKERS", 2, parse=integer(1, 256))
    """`HOUNSFIELD_INFERENCE_WORKERS`: model runs at once: the job worker runs this many `inference.run` jobs
    together (so Ray Serve can batch their calls), and the in-process backend has this many threads."""
    inference_max_attempts: int = setting("HOUNSFIELD_INFERENCE_MAX_ATTEMPTS", 5, parse=integer(1, 20))
    """`HOUNSFIELD_INFERENCE_MAX_ATTEMPTS`: attempts of one model run (retried after 2, 4, 8 ... seconds) before
    its result is `failed`."""
    inference_max_instances: int = setting("HOUNSFIELD_INFERENCE_MAX_INSTANCES", 2000, parse=integer(1, 100_000))
    """`HOUNSFIELD_INFERENCE_MAX_INSTANCES`: the most instances of one series a model reads; a run on a larger
    series fails at once with the count and this limit as its reason (never a partial volume as a result)."""
    inference_run_timeout_s: float = setting(
        "HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S", 300.0, parse=integer(1, 86_400, per=1)
    )
    """`HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S`: the longest a run waits for its Ray Serve deployment (placement,
    queueing, the model itself), and `hounsfield models deploy` for its replicas to start; then the attempt fails
    with the deployment's state as its reason and is retried like any other failure."""
    inference_plugins: tuple[str, ...] = setting("HOUNSFIELD_INFERENCE_PLUGINS", (), parse=items)
    """`HOUNSFIELD_INFERENCE_PLUGINS`: comma-separated Python modules with more model adapters (`ADAPTERS`)."""
    inference_subject: str = setting("HOUNSFIELD_INFERENCE_SUBJECT", "hounsfield-ai")
    """`HOUNSFIELD_INFERENCE_SUBJECT`: the `sub` of the AI service identity (role `ai-service`) in policy
    decisions and audit records."""
    inference_backend: str = setting("HOUNSFIELD_INFERENCE_BACKEND", "inprocess", parse=choice("inprocess", "ray"))
    """`HOUNSFIELD_INFERENCE_BACKEND`: `inprocess` (the thread pool, the embedded default) or `ray` (Ray Serve
    deployments made by `hounsfield models deploy`, called through DeploymentHandles; inference/backend_ray.py)."""
    inference_ray_address: str | None = None
    """`HOUNSFIELD_RAY_ADDRESS` (else `RAY_ADDRESS`): the Ray cluster of the `ray` backend. Unset: a local Ray
    instance is started in this process (dashboard off, no usage stats) and models are deployed on first use."""
    inference_ray_app: str = setting("HOUNSFIELD_RAY_APP", "hounsfield")
    """`HOUNSFIELD_RAY_APP`: the Serve application that holds one deployment per active or shadow model."""
    inference_ray_min_replicas: int = setting("HOUNSFIELD_RAY_MIN_REPLICAS", 1, parse=integer(0, 1000))
    """`HOUNSFIELD_RAY_MIN_REPLICAS`: Serve autoscaling lower bound, per model deployment."""
    inference_ray_max_replicas: int = setting("HOUNSFIELD_RAY_MAX_REPLICAS", 1, parse=integer(1, 1000))
    """`HOUNSFIELD_RAY_MAX_REPLICAS`: Serve autoscaling upper bound, per model deployment."""


def inference_values(env: Mapping[str, str]) -> dict[str, Any]:
    """`HOUNSFIELD_RAY_ADDRESS`, else Ray's own `RAY_ADDRESS`."""
    return {"inference_ray_address": env.get("HOUNSFIELD_RAY_ADDRESS") or env.get("RAY_ADDRESS") or None}
