"""The Ray Serve backend (the scale-out path): the server calls each model version's Serve deployment
through a `DeploymentHandle`, behind the same `InferenceBackend` Protocol as the in-process thread pool.

- Pixel data travels as numpy arrays (`inference.ray_wire`): Ray serializes them with pickle protocol 5 out-of-band
  buffers into its shared-memory object store (zero-copy on the same node), never as JSON lists; pixels as the
  smallest integer dtype that holds them, masks bit-packed (1/8 of a bool mask), both restored exactly.
- One replica (`inference.ray_replica`) batches concurrent requests with `@serve.batch` (dynamic batching: up to
  `max_batch_size` inputs or `batch_wait_timeout_s`, both from the model's backend settings); an adapter with a
  `predict_batch` method (`BatchModelAdapter`) gets the whole batch at once (should it raise, each input is run
  alone so that one bad input fails only its own request), any other is called once per input. Every answer
  carries the size of the batch it ran in and the algorithm identification, so batching is observable and the
  outputs are identified without loading the model in the server.
- A failure inside the deployment (the adapter raised, the replica died, the deployment is missing) becomes
  `ModelFailed`: the job queue retries it and the result shows it. So does a call that has no answer within
  `HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S` (a replica that cannot be placed, a queue that does not move, a model
  that runs too long; the reason carries Serve's account of the deployment), and a model the cluster can never
  place (named with what it asks and what the cluster has).
- The cluster: `HOUNSFIELD_RAY_ADDRESS` / `RAY_ADDRESS` (an existing cluster, models deployed by
  `hounsfield models deploy`), else a local Ray instance started in this process on first use, which also
  deploys the registered models itself (`make run` style). Usage stats are off, the dashboard is off, Serve's HTTP
  proxy is disabled (handles only), and nothing is downloaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from inference import deploy
from inference.errors import InvalidModel, ModelFailed
from inference.models import Algorithm, ModelAdapter, ModelInput, Prediction
from inference.ray_replica import Served
from inference.ray_wire import pack_input, unpack_prediction
from inference.registry import Model
from inference.settings import InferenceSettings

ModelLister = Callable[[], Awaitable[list[Model]]]
"""The active and shadow models of the registry (the local cluster deploys them on first use)."""


@dataclass(frozen=True, slots=True)
class RemoteAdapter:
    """What the server knows of a model served by Ray: its algorithm identification (from its answers)."""

    algorithm: Algorithm

    def predict(self, inputs: ModelInput) -> Prediction:
        raise ModelFailed("this model runs in Ray Serve: call the backend")


class RayServeBackend:
    """`InferenceBackend` over Ray Serve deployment handles, one per model version (`inference.deploy`)."""

    def __init__(self, settings: InferenceSettings, models: ModelLister | None = None) -> None:
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
        timeout = self.settings.inference_run_timeout_s
        try:
            async with asyncio.timeout(timeout):
                served = await self.call(model, inputs)
        except TimeoutError:
            self._handles.pop(model.key, None)
            raise ModelFailed(
                f"Ray Serve {model.key}: no answer within {timeout:g} s (HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S);"
                f" {await self._account(model)}"
            ) from None
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

    async def _account(self, model: Model) -> str:
        """Serve's account of the model's deployment, to say why a call had no answer."""
        try:
            said = await asyncio.wait_for(
                asyncio.to_thread(deploy.account, self.settings, deploy.deployment_name(model)), 10
            )
        except Exception as exc:
            return f"its state could not be read ({type(exc).__name__})"
        return f"Serve says: {said}"

    def adapter(self, model: Model) -> ModelAdapter:
        algorithm = self._algorithms.get(model.key)
        if algorithm is None:
            raise InvalidModel(f"model {model.key} has not answered from Ray Serve yet")
        return RemoteAdapter(algorithm)

    async def _handle(self, model: Model) -> Any:
        found = self._handles.get(model.key)
        if found is not None:
            return found
        async with self._lock:
            if model.key not in self._handles:
                self._owned = await asyncio.to_thread(deploy.connect, self.settings, self.local) or self._owned
                deploy.keep_signal_handlers()  # on the event loop's thread: the main one in `hounsfield serve`
                deployed = await asyncio.to_thread(deploy.deployed, self.settings)
                if deploy.deployment_name(model) not in deployed:
                    if not self.local:
                        raise ModelFailed(
                            f"model {model.key} is not deployed in Serve application "
                            f"{self.settings.inference_ray_app!r}: run `hounsfield models deploy`"
                        )
                    models = await self.models() if self.models is not None else []
                    if model.key not in {m.key for m in models}:
                        models.append(model)
                    refused = await asyncio.to_thread(deploy.placement_problems, models, self.settings)
                    if deploy.deployment_name(model) in refused:
                        raise ModelFailed(refused[deploy.deployment_name(model)])
                    placeable = [m for m in models if deploy.deployment_name(m) not in refused]
                    await asyncio.to_thread(deploy.deploy, placeable, self.settings)
                self._handles[model.key] = await asyncio.to_thread(deploy.handle, model, self.settings)
            return self._handles[model.key]

    async def close(self) -> None:
        """Shut down Serve and Ray only when this backend started them (never an operator's cluster)."""
        self._handles.clear()
        if self._owned:
            await asyncio.to_thread(deploy.disconnect, True)
            self._owned = False
