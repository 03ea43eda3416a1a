"""Brain extraction on 3D T1 MR with deepbet (model 1): Fisch et al., "deepbet: Fast brain extraction of
T1-weighted MRI using Convolutional Neural Networks" (2024), MIT licence. Two TorchScript U-Nets ship inside the
deepbet wheel (`<site-packages>/data/models/{bbox_model,model}.pt`, loaded with `torch.jit.load` from that path:
nothing downloads); a coarse one finds the brain's bounding box at 128^3, the fine one segments that box at 256^3.

Input: the slices of one series, sorted along the slice normal (the cross product of Image Orientation
(Patient)'s row and column cosines, PS3.3 C.7.6.2.1.1) by Image Position (Patient). They are stacked into a
volume whose voxel (c, r, k) is pixel (r, c) of slice k, with an affine in LPS+ millimetres; NIfTI (deepbet's
input) wants RAS+, so the first two axes change sign. Output: the brain mask per source slice (in the sources'
order) and the total intracranial volume in mL (voxel count x voxel volume; deepbet's mask includes the CSF
spaces). Stored pixel values are used as they are: deepbet normalizes between the volume's 0.5th and 99.5th
percentiles, so a linear Rescale Slope/Intercept changes nothing. Runs on the CPU. A research demonstration:
its results are marked not for diagnostic use.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.sr.codedict import codes

from inference.errors import ModelFailed
from inference.models import Algorithm, ImageInput, ModelInput, Prediction, Segment

TIV = "total_intracranial_volume_ml"
MIN_SLICES = 16
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, slots=True)
class Volume:
    voxels: np.ndarray
    """Columns x rows x slices (float32)."""
    affine: np.ndarray
    """Voxel index -> LPS+ mm (4 x 4)."""
    order: tuple[int, ...]
    """order[k]: the index in the input of slice k."""


def _normal(image: ImageInput) -> np.ndarray:
    if image.orientation is None or image.position is None:
        raise ModelFailed("every slice needs Image Position and Orientation (Patient)")
    cosines = np.asarray(image.orientation, dtype=np.float64)
    return np.cross(cosines[:3], cosines[3:])


def build_volume(images: Sequence[ImageInput]) -> Volume:
    """The slices as one volume: sorted along the normal, checked for one orientation, size and even spacing."""
    if len(images) < MIN_SLICES:
        raise ModelFailed(f"a volume needs at least {MIN_SLICES} slices, got {len(images)}")
    normal = _normal(images[0])
    first = images[0]
    for image in images:
        if image.orientation != first.orientation or image.pixels.shape != first.pixels.shape:
            raise ModelFailed("the slices differ in orientation or size")
        if image.pixels.ndim != 2 or image.photometric != "MONOCHROME2":
            raise ModelFailed("expected single-frame MONOCHROME2 slices")
    distances = np.array([float(np.dot(normal, np.asarray(i.position))) for i in images])
    order = tuple(int(i) for i in np.argsort(distances))
    steps = np.diff(distances[list(order)])
    if steps.min() <= 0 or steps.max() - steps.min() > 0.01 * abs(float(np.median(steps))) + 1e-3:
        raise ModelFailed("the slices are not evenly spaced along their normal")
    spacing = first.pixel_spacing
    if spacing is None:
        raise ModelFailed("the slices have no valid Pixel Spacing")
    cosines = np.asarray(first.orientation, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, 0] = cosines[:3] * spacing[1]  # along a row: column spacing
    affine[:3, 1] = cosines[3:] * spacing[0]
    start = np.asarray(images[order[0]].position, dtype=np.float64)
    affine[:3, 2] = (np.asarray(images[order[-1]].position) - start) / (len(images) - 1)
    affine[:3, 3] = start
    voxels = np.stack([images[i].pixels.T for i in order], axis=-1).astype(np.float32)
    return Volume(voxels, affine, order)


@dataclass(slots=True)
class DeepbetBrain:
    """The adapter. deepbet's `BrainExtraction` keeps state between its steps (`bbox`), so one call at a time."""

    algorithm: Algorithm
    threshold: float = 0.5
    _extractor: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> DeepbetBrain:
        from importlib.metadata import version

        threshold = float(settings.get("threshold", 0.5))
        return cls(Algorithm("deepbet", version("deepbet"), codes.cid7162.ArtificialIntelligence), threshold)

    def _bet(self) -> Any:
        if self._extractor is None:
            from deepbet import BrainExtraction

            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; deepbet ships TorchScript
                warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
                self._extractor = BrainExtraction(no_gpu=True)
        return self._extractor

    def mask(self, volume: Volume) -> np.ndarray:
        """The brain mask of the volume (same shape, boolean)."""
        import nibabel as nib

        image = nib.Nifti1Image(volume.voxels, LPS_TO_RAS @ volume.affine)  # type: ignore[no-untyped-call]
        with self._lock:
            _, mask, _ = self._bet().run(image, threshold=self.threshold)
        return np.asarray(mask.dataobj).astype(bool)

    def predict(self, inputs: ModelInput) -> Prediction:
        volume = build_volume(inputs.images)
        mask = self.mask(volume)
        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        tiv = float(mask.sum()) * voxel_ml
        masks: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(inputs.images)
        for k, index in enumerate(volume.order):
            masks[index] = np.ascontiguousarray(mask[:, :, k].T)
        conclusion = (
            f"Brain extracted automatically: total intracranial volume {tiv:.0f} mL. "
            "AI-generated research result; not for diagnostic use."
        )
        segment = Segment("Brain", codes.SCT.Organ, codes.SCT.Brain, tuple(masks))
        return Prediction((segment,), {TIV: tiv}, conclusion)
