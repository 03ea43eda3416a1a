"""AI on ingest (issue 7): the cost of the lung fields model on pydicom-data's RG1 chest CR (1955 x 1841), called
directly, through the in-process backend (thread pool; arrays passed by reference) one at a time and with
concurrent calls, and the cost of building its DICOM SEG (highdicom). Prints images per second and p50/p95 per
stage as JSON; the backend's overhead over the direct call is reported as a percentage.

    .venv/bin/python benchmarks/inference_bench.py [--repeat 20] [--workers 2]

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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from inference import outputs  # noqa: E402
from inference.backends import InProcessBackend  # noqa: E402
from inference.models import ModelInput, catalog  # noqa: E402
from inference.registry import parse_model  # noqa: E402
from tests.data import sample  # noqa: E402

DOC = {"name": "lungs", "version": "1", "task": "bench", "backend": {"adapter": "chest-xray-lung-fields"}}


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
    args = parser.parse_args()
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    inputs = ModelInput((outputs.image_input(ds),))
    adapters = catalog()
    model = parse_model({**DOC, "status": "active"}, adapters)
    adapter = adapters[model.adapter](model.backend)
    direct = timed(args.repeat, lambda: adapter.predict(inputs))
    backend = InProcessBackend(adapters, args.workers)
    single = asyncio.run(through_backend(backend, model, inputs, args.repeat, 1))
    concurrent = asyncio.run(through_backend(backend, model, inputs, args.repeat, args.workers))
    asyncio.run(backend.close())
    prediction = adapter.predict(inputs)
    seg = timed(
        max(3, args.repeat // 4), lambda: outputs.segmentation([ds], prediction, adapter.algorithm, model, "1.2.3")
    )
    report = {
        "image": f"{ds.Rows}x{ds.Columns} CR",
        "direct": stats(direct),
        "backend_1": stats(single),
        f"backend_{args.workers}_concurrent": stats(concurrent, args.workers),
        "backend_overhead_pct": round(100 * (statistics.median(single) / statistics.median(direct) - 1), 1),
        "seg_build": stats(seg),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
