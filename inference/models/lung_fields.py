"""Chest X-ray lung fields by classical image processing (model 3): no weights, numpy and scipy only.

Per image: shown as MONOCHROME2 (MONOCHROME1 inverted, PS3.3 C.7.6.3.1.2) so that the aerated lungs are dark;
reduced to about 256 pixels on the long side (block means); contrast stretched between the 1st and 99th
percentiles; Otsu's threshold (Otsu 1979) separates dark from bright; dark regions touching the image border are
air outside the body and dropped; a binary opening removes thin bridges and fill-holes closes vessels; the two
largest remaining components inside the thorax are the lung fields. The mask is brought back to full size by
nearest-neighbour repetition.

A research demonstration, not a medical device: its results are marked not for diagnostic use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.sr.codedict import codes
from scipy import ndimage

from inference.errors import ModelFailed
from inference.models import Algorithm, ImageInput, ModelInput, Prediction, Segment

TARGET = 256
"""Working resolution (pixels on the long side)."""
ORGAN = codes.SCT.Organ
LUNG = codes.SCT.Lung


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximizing the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist / max(1, hist.sum())
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m = np.cumsum(p * centers)
    between = (m[-1] * w0 - m) ** 2 / (w0 * (1.0 - w0) + 1e-12)
    return float(centers[int(np.argmax(between))])


def _displayed(image: ImageInput) -> np.ndarray:
    pixels = image.pixels
    if pixels.ndim == 3:  # a multi-frame image: its first frame
        pixels = pixels[0]
    if pixels.ndim != 2 or min(pixels.shape) < 16:
        raise ModelFailed(f"expected a grayscale 2D image of at least 16x16 pixels, got shape {image.pixels.shape}")
    values = pixels.astype(np.float32)
    if image.photometric == "MONOCHROME1":
        values = values.max() - values
    elif image.photometric != "MONOCHROME2":
        raise ModelFailed(f"expected a MONOCHROME image, got {image.photometric}")
    return values


def _reduce(values: np.ndarray) -> tuple[np.ndarray, int]:
    factor = max(1, int(np.ceil(max(values.shape) / TARGET)))
    rows, cols = values.shape[0] // factor * factor, values.shape[1] // factor * factor
    small = values[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))
    low, high = np.percentile(small, [1, 99])
    if high <= low:
        raise ModelFailed("the image has no contrast")
    return np.clip((small - low) / (high - low), 0.0, 1.0), factor


def lung_mask(image: ImageInput) -> np.ndarray:
    """The lung fields of one image as a boolean mask of its full size."""
    values = _displayed(image)
    small, factor = _reduce(values)
    dark = small < otsu(small)
    labels, _ = ndimage.label(dark)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inside = dark & ~np.isin(labels, border[border > 0])
    inside = ndimage.binary_opening(inside, iterations=2)
    inside = ndimage.binary_fill_holes(inside)
    labels, count = ndimage.label(inside)
    if count == 0:
        return np.zeros(values.shape, dtype=bool)
    sizes = np.asarray(ndimage.sum(inside, labels, range(1, count + 1)))
    keep = np.argsort(sizes)[-2:] + 1
    small_mask = np.isin(labels, keep)
    full = np.repeat(np.repeat(small_mask, factor, axis=0), factor, axis=1)
    mask = np.zeros(values.shape, dtype=bool)
    mask[: full.shape[0], : full.shape[1]] = full
    return mask


@dataclass(frozen=True, slots=True)
class LungFields:
    algorithm: Algorithm

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> LungFields:
        return cls(Algorithm("chest-xray-lung-fields", "1.0.0", codes.cid7162.MorphologicalOperations))

    def predict(self, inputs: ModelInput) -> Prediction:
        if not inputs.images:
            raise ModelFailed("no images")
        masks = tuple(lung_mask(image) for image in inputs.images)
        fractions = [float(m.mean()) for m in masks]
        measurements: dict[str, float] = {"lung_area_fraction": float(np.mean(fractions))}
        areas = [
            float(m.sum()) * image.pixel_spacing[0] * image.pixel_spacing[1]
            for m, image in zip(masks, inputs.images, strict=True)
            if image.pixel_spacing is not None
        ]
        if len(areas) == len(masks):
            measurements["lung_area_mm2"] = float(np.mean(areas))
        found = sum(1 for m in masks if m.any())
        conclusion = (
            f"Lung fields segmented automatically in {found} of {len(masks)} images "
            f"({100 * measurements['lung_area_fraction']:.1f}% of the image area). "
            "AI-generated research result; not for diagnostic use."
        )
        segment = Segment("Lung fields", ORGAN, LUNG, masks)
        return Prediction((segment,), measurements, conclusion)

    def predict_batch(self, batch: Sequence[ModelInput]) -> list[Prediction]:
        """`BatchModelAdapter`: each input in turn. The pipeline (Otsu threshold, connected components, opening,
        hole filling) is per image with data-dependent shapes, so there is no vectorised form to gain from."""
        return [self.predict(inputs) for inputs in batch]
