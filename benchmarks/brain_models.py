"""The shipped brain models on the CPU, called directly through their adapters: deepbet brain extraction
on the MNI152 T1 template as an MR series, detect-tumor on its middle slice, and the SEG / SR builders. Prints
p50 and min over the repeats (the first call, which loads the weights, is timed apart).

    .venv/bin/python benchmarks/brain_models.py [--step 2] [--repeat 5]

`--step 1` is the full 1 mm template (189 slices of 233 x 197); the default 2 is the tests' 2 mm series.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.models import ModelInput
from inference.models.deepbet_brain import DeepbetBrain
from inference.models.tumor import TumorClassifier
from inference.outputs import image_input, segmentation
from inference.registry import parse_model
from inference.sr import measurement_report
from tests.support.mr_volume import mr_series


def timed(label: str, call: Callable[[], Any], repeat: int) -> Any:
    started = time.perf_counter()
    value = call()
    first = time.perf_counter() - started
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        value = call()
        times.append(time.perf_counter() - started)
    print(
        f"{label:<28} first {first * 1000:9.1f} ms   p50 {statistics.median(times) * 1000:9.1f} ms   "
        f"min {min(times) * 1000:9.1f} ms   (n={repeat})"
    )
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    series = mr_series(args.step)
    inputs = ModelInput(tuple(image_input(ds) for ds in series))
    print(f"MR series: {len(series)} slices of {series[0].Rows} x {series[0].Columns}")
    brain, tumor = DeepbetBrain.from_settings({}), TumorClassifier.from_settings({})
    prediction = timed("deepbet (predict)", lambda: brain.predict(inputs), args.repeat)
    print(f"  total intracranial volume {prediction.measurements['total_intracranial_volume_ml']:.1f} mL")
    timed("detect-tumor (predict)", lambda: tumor.predict(inputs), args.repeat)
    doc = {"name": "brain", "version": "1", "task": "b", "backend": {"adapter": "deepbet-brain-extraction"}}
    model = parse_model(doc, ["deepbet-brain-extraction"])
    uid = series[0].SeriesInstanceUID
    timed("SEG (highdicom)", lambda: segmentation(series, prediction, brain.algorithm, model, uid), args.repeat)
    timed(
        "SR TID 1500 (highdicom)",
        lambda: measurement_report(series, prediction, brain.algorithm, model, uid),
        args.repeat,
    )


if __name__ == "__main__":
    main()
