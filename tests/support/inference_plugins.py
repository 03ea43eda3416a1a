"""A model adapter plugin for the inference tests (loaded through HOUNSFIELD_INFERENCE_PLUGINS, as a site's own
models would be): `test-always-fails` is a test model that fails on every input, so that retries and the
failure report can be observed end to end; `test-measures` is a test model that succeeds at once with one
measurement (the mean pixel value), for tests that need a published result without a real model's cost;
`test-sleeps` takes `backend.seconds` to answer and reports the process it ran in (`pid`), for tests of time
limits and of where Ray placed it."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.sr.codedict import codes

from inference.errors import ModelFailed
from inference.models import Algorithm, ModelInput, Prediction


@dataclass(frozen=True, slots=True)
class AlwaysFails:
    algorithm: Algorithm

    def predict(self, inputs: ModelInput) -> Prediction:
        raise ModelFailed(f"test model refuses {len(inputs.images)} images")


def always_fails(settings: Mapping[str, Any]) -> AlwaysFails:
    return AlwaysFails(Algorithm("test-always-fails", "0", codes.cid7162.ArtificialIntelligence))


@dataclass(frozen=True, slots=True)
class Measures:
    algorithm: Algorithm

    def predict(self, inputs: ModelInput) -> Prediction:
        mean = sum(float(image.pixels.mean()) for image in inputs.images) / max(len(inputs.images), 1)
        return Prediction(measurements={"mean_pixel_value": mean}, conclusion="test measurement")


def measures(settings: Mapping[str, Any]) -> Measures:
    return Measures(Algorithm("test-measures", "0", codes.cid7162.ArtificialIntelligence))


@dataclass(frozen=True, slots=True)
class Sleeps:
    algorithm: Algorithm
    seconds: float

    def predict(self, inputs: ModelInput) -> Prediction:
        time.sleep(self.seconds)
        return Prediction(measurements={"pid": float(os.getpid())}, conclusion="test sleep")


def sleeps(settings: Mapping[str, Any]) -> Sleeps:
    return Sleeps(Algorithm("test-sleeps", "0", codes.cid7162.ArtificialIntelligence), float(settings["seconds"]))


ADAPTERS = {"test-always-fails": always_fails, "test-measures": measures, "test-sleeps": sleeps}
