"""Inference backends behind one Protocol (house style 10): the server hands a model and its input arrays to a
backend and awaits a `Prediction`. The in-process backend (the embedded default) runs adapters in a pool of
worker threads: numpy, scipy, ONNX Runtime and torch release the GIL in their kernels, arrays are passed by
reference (never serialized), and the event loop never blocks. The Ray Serve backend (scale-out,
`inference.backend_ray`) sits behind the same Protocol; `ByModel` sends each model to the one its registration
pins (`backend.backend`), or to the server's default.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from inference.errors import InvalidModel
from inference.models import AdapterFactory, ModelAdapter, ModelInput, Prediction
from inference.registry import Model


class InferenceBackend(Protocol):
    async def predict(self, model: Model, inputs: ModelInput) -> Prediction:
        """Run `model` on `inputs`; raises what the adapter raises (the job queue retries)."""
        ...

    def adapter(self, model: Model) -> ModelAdapter:
        """The adapter instance that serves `model` (its algorithm identification goes into the outputs)."""
        ...

    async def close(self) -> None: ...


class InProcessBackend:
    """A thread pool of `workers`; one adapter instance per model version, made on first use."""

    def __init__(self, adapters: Mapping[str, AdapterFactory], workers: int) -> None:
        self.factories = dict(adapters)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hounsfield-inference")
        self._adapters: dict[str, ModelAdapter] = {}
        self._lock = threading.Lock()

    def adapter(self, model: Model) -> ModelAdapter:
        with self._lock:
            found = self._adapters.get(model.key)
            if found is None:
                factory = self.factories.get(model.adapter)
                if factory is None:
                    raise InvalidModel(f"model {model.key}: adapter {model.adapter!r} is not available here")
                found = self._adapters[model.key] = factory(model.backend)
            return found

    async def predict(self, model: Model, inputs: ModelInput) -> Prediction:
        adapter = self.adapter(model)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, adapter.predict, inputs)

    async def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class ByModel:
    """Each model to the backend it runs in (`Model.runs_in`: its pinned `backend.backend`, else `default`);
    a backend is made on first use (Ray is started or joined only when a model runs there)."""

    def __init__(self, default: str, factories: Mapping[str, Callable[[], InferenceBackend]]) -> None:
        self.default = default
        self.factories = dict(factories)
        self._made: dict[str, InferenceBackend] = {}
        self._lock = threading.Lock()

    def backend(self, model: Model) -> InferenceBackend:
        kind = model.runs_in(self.default)
        with self._lock:
            found = self._made.get(kind)
            if found is None:
                factory = self.factories.get(kind)
                if factory is None:
                    raise InvalidModel(f"model {model.key}: no {kind} backend here")
                found = self._made[kind] = factory()
            return found

    async def predict(self, model: Model, inputs: ModelInput) -> Prediction:
        return await self.backend(model).predict(model, inputs)

    def adapter(self, model: Model) -> ModelAdapter:
        return self.backend(model).adapter(model)

    async def close(self) -> None:
        for made in list(self._made.values()):
            await made.close()
        self._made.clear()
