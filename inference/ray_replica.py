"""The body of each model version's Ray Serve deployment (`inference.deploy` wraps `ModelReplica` in
`serve.deployment`; `inference.backend_ray` calls it and reads its `Served` answers): it runs in the replica's
process, batches concurrent requests with `@serve.batch` and runs the model adapter on each batch.

On a node whose address is the loopback interface (the server's own local Ray instance, or `ray start
--node-ip-address=127.0.0.1`), the replica's inter-deployment gRPC server, which Serve binds to every interface,
is bound to 127.0.0.1 as well (`loopback_only`): nothing the server starts listens beyond the machine."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from inference.errors import InvalidModel, ModelFailed
from inference.models import Algorithm, ModelAdapter, ModelInput, Prediction, catalog
from inference.ray_wire import WireInput, WirePrediction, pack_prediction, unpack_input


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
        loopback_only()
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


LOOPBACK = ("127.0.0.1", "::1")


def loopback_only() -> None:
    """In a replica on a loopback node: Serve's replica gRPC server on 127.0.0.1 instead of `[::]` (Serve starts it
    after the deployment's constructor, which calls this)."""
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    node: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    if bind is None or node not in LOOPBACK or getattr(bind, "loopback", False):
        return

    def on_loopback(server: Any, address: str) -> Any:
        return bind(server, "127.0.0.1:" + address.rsplit(":", 1)[-1] if address.startswith("[::]") else address)

    on_loopback.loopback = True  # type: ignore[attr-defined]
    setattr(replica, "add_port_to_grpc_server", on_loopback)  # noqa: B010 - a name Ray does not export


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, ModelFailed) else f"{type(exc).__name__}: {exc}"
