"""AI on ingest (issue 7): the cost of the lung fields model on pydicom-data's RG1 chest CR (1955 x 1841), called
directly, through the in-process backend (thread pool; arrays passed by reference) one at a time and with
concurrent calls, and the cost of building its DICOM SEG (highdicom). Prints images per second and p50/p95 per
stage as JSON; the backend's overhead over the direct call is reported as a percentage.

With `--ray`, the same through Ray Serve on a local Ray instance (`--ray-cpus` CPUs, dashboard off, no usage
stats): one request at a time without batching (`ray_1`; `ray_overhead_pct` is Ray's cost over the direct call:
object-store transfer of the pixel array and the mask, the handle's routing), then `--at-once` concurrent requests
with `@serve.batch` (max_batch_size = `--at-once`, 50 ms window; `ray_batched`, with the batch sizes seen).

    .venv/bin/python benchmarks/inference_bench.py [--repeat 20] [--workers 2] [--ray [--at-once 4]]

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
from tests.data import sample  # noqa: E402

BACKEND: dict[str, Any] = {"adapter": "chest-xray-lung-fields"}
DOC: dict[str, Any] = {"name": "lungs", "version": "1", "task": "bench", "backend": BACKEND}


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
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="also through Ray Serve on a local Ray instance")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--at-once", type=int, default=4, help="concurrent requests (and batch size) through Ray")
    parser.add_argument("--step", type=int, default=1, help="take every STEP-th row and column (smaller images)")
    args = parser.parse_args()
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    image = outputs.image_input(ds)
    inputs = ModelInput((replace(image, pixels=image.pixels[:: args.step, :: args.step]),))
    adapters = catalog()
    model = parse_model({**DOC, "status": "active"}, adapters)
    adapter = adapters[model.adapter](model.backend)
    direct = timed(args.repeat, lambda: adapter.predict(inputs))
    backend = InProcessBackend(adapters, args.workers)
    single = asyncio.run(through_backend(backend, model, inputs, args.repeat, 1))
    concurrent = asyncio.run(through_backend(backend, model, inputs, args.repeat, args.workers))
    asyncio.run(backend.close())
    prediction = adapter.predict(inputs)
    seg = (  # the SEG of the full image only (a smaller image's mask does not fit its source)
        timed(max(3, args.repeat // 4), lambda: outputs.segmentation([ds], prediction, adapter.algorithm, model, "1"))
        if args.step == 1
        else []
    )
    report: dict[str, Any] = {
        "image": "x".join(map(str, inputs.images[0].pixels.shape)) + " CR",
        "direct": stats(direct),
        "backend_1": stats(single),
        f"backend_{args.workers}_concurrent": stats(concurrent, args.workers),
        "backend_overhead_pct": round(100 * (statistics.median(single) / statistics.median(direct) - 1), 1),
    }
    if seg:
        report["seg_build"] = stats(seg)
    if args.ray:
        report.update(through_ray(model, inputs, args, statistics.median(direct)))
    print(json.dumps(report, indent=2))
    return 0


async def ray_calls(
    backend: Any, model: Any, inputs: ModelInput, repeat: int, at_once: int
) -> tuple[list[float], list[int]]:
    """`repeat` rounds of `at_once` concurrent calls; the seconds per round and the batch sizes the answers report."""
    await backend.predict(model, inputs)  # warm up (the replica's first call)
    times: list[float] = []
    sizes: list[int] = []
    for _ in range(repeat):
        started = time.perf_counter()
        answers = await asyncio.gather(*(backend.call(model, inputs) for _ in range(at_once)))
        for answer in answers:  # the server's side of the trip: the masks unpacked, as `predict` does
            unpack_prediction(answer.prediction)
        times.append(time.perf_counter() - started)
        sizes.extend(a.batch_size for a in answers)
    return times, sizes


def through_ray(model: Any, inputs: ModelInput, args: argparse.Namespace, direct_p50: float) -> dict[str, Any]:
    """Ray Serve on a local instance: unbatched one at a time, then concurrent requests with batching."""
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
            served = parse_model(
                {
                    **DOC,
                    "status": "active",
                    "backend": {
                        **dict(DOC["backend"]),
                        "max_batch_size": batch,
                        "batch_wait_timeout_s": wait,
                        "num_cpus": 1,
                    },
                },
                catalog(),
            )
            deploy.deploy([served], settings)
            samples, sizes = asyncio.run(ray_calls(RayServeBackend(settings), served, inputs, args.repeat, at_once))
            out[label] = {**stats(samples, at_once), "batch_sizes": sorted(set(sizes))}
        out["ray_overhead_pct"] = round(100 * (out["ray_1"]["p50_ms"] / (1000 * direct_p50) - 1), 1)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
