"""A model adapter plugin for the inference tests (loaded through HOUNSFIELD_INFERENCE_PLUGINS, as a site's own
models would be): `test-always-fails` is a test model that fails on every input, so that retries and the
failure report can be observed end to end."""

from __future__ import annotations

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


ADAPTERS = {"test-always-fails": always_fails}
