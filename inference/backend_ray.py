"""The Ray Serve backend (issue 7, the scale-out path): the server calls each model version's Serve deployment
through a `DeploymentHandle`, behind the same `InferenceBackend` Protocol as the in-process thread pool.

- Pixel data travels as numpy arrays (`inference.ray_wire`): Ray serializes them with pickle protocol 5 out-of-band
  buffers into its shared-memory object store (zero-copy on the same node), never as JSON lists; pixels as the
  smallest integer dtype that holds them, masks bit-packed (1/8 of a bool mask), both restored exactly.
- One replica batches concurrent requests with `@serve.batch` (dynamic batching: up to `max_batch_size` inputs or
  `batch_wait_timeout_s`, both from the model's backend settings); an adapter with a `predict_batch` method
  (`BatchModelAdapter`) gets the whole batch at once (should it raise, each input is run alone so that one bad
  input fails only its own request), any other is called once per input. Every answer carries the size of the
  batch it ran in and the algorithm identification, so batching is observable and the outputs are identified
  without loading the model in the server.
- A failure inside the deployment (the adapter raised, the replica died, the deployment is missing) becomes
  `ModelFailed`: the job queue retries it and the result shows it.
- The cluster: `HOUNSFIELD_RAY_ADDRESS` / `RAY_ADDRESS` (an existing cluster, models deployed by
  `hounsfield models deploy`), else a local Ray instance started in this process on first use, which also
  deploys the registered models itself (`make run` style). Usage stats are off, the dashboard is off, Serve's HTTP
  proxy is disabled (handles only), and nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ray import serve

from inference.errors import InvalidModel, ModelFailed
from inference.models import Algorithm, ModelAdapter, ModelInput, Prediction, catalog
from inference.ray_wire import WireInput, WirePrediction, pack_input, pack_prediction, unpack_input, unpack_prediction
from inference.registry import Model
from server.settings import Settings

ModelLister = Callable[[], Awaitable[list[Model]]]
"""The active and shadow models of the registry (the local cluster deploys them on first use)."""


@dataclass(frozen=True, slots=True)
class Served:
    """One answer of a model deployment: the prediction or the error, and how it ran."""

    prediction: WirePrediction | None
    """The prediction with its masks packed for the trip (`inference.ray_wire.unpack_prediction`)."""
    error: str | None
    batch_size: int
    algorithm: Algorithm
    model_seconds: float = 0.0
    """The adapter's time in the replica for the whole batch (the rest of a call's latency is Ray's)."""


class ModelReplica:
    """The body of one model version's Serve deployment (`inference.deploy` wraps it in `serve.deployment`)."""

    def __init__(
        self,
        adapter: str,
        settings: Mapping[str, Any],
        plugins: tuple[str, ...],
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        factory = catalog(plugins).get(adapter)
        if factory is None:
            raise InvalidModel(f"adapter {adapter!r} is not available in this Ray cluster")
        self.adapter: ModelAdapter = factory(settings)
        self.predict_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    async def __call__(self, inputs: WireInput | ModelInput) -> Served:
        served: Served = await self.predict_batch(inputs)
        return served

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict_batch(self, batch: list[WireInput | ModelInput]) -> list[Served]:
        return await asyncio.to_thread(self._run, batch)

    def _run(self, wired: list[WireInput | ModelInput]) -> list[Served]:
        batch = [unpack_input(w) for w in wired]
        started = time.perf_counter()
        whole = getattr(self.adapter, "predict_batch", None)
        results: list[Prediction | Exception] = []
        if whole is not None and len(batch) > 1:
            try:
                results = list(whole(batch))
            except Exception:
                results = []  # run each input alone below: only the bad one fails
            if len(results) != len(batch):
                results = []
        if not results:
            for inputs in batch:
                try:
                    results.append(self.adapter.predict(inputs))
                except Exception as exc:
                    results.append(exc)
        took = time.perf_counter() - started
        return [self._served(result, len(batch), took) for result in results]

    def _served(self, result: Prediction | Exception, size: int, took: float) -> Served:
        algorithm = self.adapter.algorithm
        if isinstance(result, Exception):
            return Served(None, _describe(result), size, algorithm, took)
        try:
            return Served(pack_prediction(result), None, size, algorithm, took)
        except Exception as exc:  # a mask that cannot be packed fails its own input only
            return Served(None, _describe(exc), size, algorithm, took)


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, ModelFailed) else f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class RemoteAdapter:
    """What the server knows of a model served by Ray: its algorithm identification (from its answers)."""

    algorithm: Algorithm

    def predict(self, inputs: ModelInput) -> Prediction:
        raise ModelFailed("this model runs in Ray Serve: call the backend")


class RayServeBackend:
    """`InferenceBackend` over Ray Serve deployment handles, one per model version (`inference.deploy`)."""

    def __init__(self, settings: Settings, models: ModelLister | None = None) -> None:
        self.settings = settings
        self.models = models
        self.last_batch_size: dict[str, int] = {}
        self._algorithms: dict[str, Algorithm] = {}
        self._handles: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._owned = False

    @property
    def local(self) -> bool:
        """No cluster address: Ray runs in this process and the server deploys its models itself."""
        return self.settings.inference_ray_address is None

    async def predict(self, model: Model, inputs: ModelInput) -> Prediction:
        served = await self.call(model, inputs)
        if served.error is not None or served.prediction is None:
            raise ModelFailed(served.error or "the deployment returned no prediction")
        return unpack_prediction(served.prediction)

    async def call(self, model: Model, inputs: ModelInput) -> Served:
        """The deployment's whole answer (with its batch size), or `ModelFailed` when Ray could not run it."""
        handle = await self._handle(model)
        try:
            served: Served = await handle.remote(pack_input(inputs))
        except Exception as exc:  # RayTaskError, RayServeException, a dead replica: all retried by the job
            self._handles.pop(model.key, None)  # look the deployment up again next time (redeployed, moved)
            raise ModelFailed(f"Ray Serve {model.key}: {type(exc).__name__}: {exc}"[:2000]) from None
        self._algorithms[model.key] = served.algorithm
        self.last_batch_size[model.key] = served.batch_size
        return served

    def adapter(self, model: Model) -> ModelAdapter:
        algorithm = self._algorithms.get(model.key)
        if algorithm is None:
            raise InvalidModel(f"model {model.key} has not answered from Ray Serve yet")
        return RemoteAdapter(algorithm)

    async def _handle(self, model: Model) -> Any:
        from inference import deploy

        found = self._handles.get(model.key)
        if found is not None:
            return found
        async with self._lock:
            if model.key not in self._handles:
                self._owned = await asyncio.to_thread(deploy.connect, self.settings, self.local) or self._owned
                deployed = await asyncio.to_thread(deploy.deployed, self.settings)
                if deploy.deployment_name(model) not in deployed:
                    if not self.local:
                        raise ModelFailed(
                            f"model {model.key} is not deployed in Serve application "
                            f"{self.settings.inference_ray_app!r}: run `hounsfield models deploy`"
                        )
                    models = await self.models() if self.models is not None else []
                    keys = {m.key for m in models}
                    await asyncio.to_thread(
                        deploy.deploy, [*models, *([] if model.key in keys else [model])], self.settings
                    )
                self._handles[model.key] = await asyncio.to_thread(deploy.handle, model, self.settings)
            return self._handles[model.key]

    async def close(self) -> None:
        """Shut down Serve and Ray only when this backend started them (never an operator's cluster)."""
        self._handles.clear()
        if self._owned:
            from inference import deploy

            await asyncio.to_thread(deploy.disconnect, True)
            self._owned = False
