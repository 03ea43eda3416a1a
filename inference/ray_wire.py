"""What travels between the server and a Ray Serve model replica (issue 7): a pure codec, no Ray in here.

Ray serializes arguments and results with pickle protocol 5: a contiguous numpy array's buffer goes out of band
into the shared-memory object store (one copy in, zero-copy out on the same node) once the whole value is over
Ray's inline limit (100 KiB); a non-contiguous view is copied in band. So the codec makes every array it sends
small and contiguous, and the other side restores exactly what the adapter or the server expects:

- Input pixels go as the smallest integer dtype that holds their values (`narrow`), contiguous, with the original
  dtype alongside: the replica casts back, so an adapter sees the same values and dtype as in process.
- Binary masks (bool, or integers holding only 0 and 1) go bit-packed (`np.packbits`, 1/8 of a bool mask) with
  their shape and dtype; the server unpacks them (`unpack_prediction`). Other masks travel as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from inference.models import ImageInput, ModelInput, Prediction


@dataclass(frozen=True, slots=True)
class WireInput:
    """A `ModelInput` whose pixel arrays may be narrowed; `dtypes` are the originals, one per image."""

    images: tuple[ImageInput, ...]
    dtypes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PackedMask:
    """A binary mask as `np.packbits` of its flattened values, with what restores it."""

    bits: np.ndarray
    shape: tuple[int, ...]
    dtype: str


WireMask = PackedMask | np.ndarray


@dataclass(frozen=True, slots=True)
class WirePrediction:
    """A `Prediction` with its segments' masks taken out (`masks[segment][image]`) and packed where binary."""

    prediction: Prediction
    masks: tuple[tuple[WireMask, ...], ...]


def narrow(pixels: np.ndarray) -> np.ndarray:
    """`pixels` as the smallest integer dtype that holds its values (C-contiguous); other dtypes unchanged."""
    if pixels.dtype.kind in "iu" and pixels.dtype.itemsize > 1 and pixels.size:
        low, high = pixels.min(), pixels.max()
        smallest = np.result_type(np.min_scalar_type(low), np.min_scalar_type(high))
        if smallest.itemsize < pixels.dtype.itemsize:
            return pixels.astype(smallest, order="C")
    return np.ascontiguousarray(pixels)


def pack_input(inputs: ModelInput) -> WireInput:
    images = tuple(replace(image, pixels=narrow(image.pixels)) for image in inputs.images)
    return WireInput(images, tuple(image.pixels.dtype.str for image in inputs.images))


def unpack_input(wire: WireInput | ModelInput) -> ModelInput:
    """The adapter's input, each image's pixels in their original dtype (a plain `ModelInput` passes through)."""
    if isinstance(wire, ModelInput):
        return wire
    images = tuple(
        image if image.pixels.dtype.str == dtype else replace(image, pixels=image.pixels.astype(dtype))
        for image, dtype in zip(wire.images, wire.dtypes, strict=True)
    )
    return ModelInput(images)


def pack_mask(mask: np.ndarray) -> WireMask:
    if mask.dtype == np.bool_ or (mask.dtype.kind in "iu" and mask.size and 0 <= mask.min() and mask.max() <= 1):
        return PackedMask(np.packbits(mask.ravel()), mask.shape, mask.dtype.str)
    return mask


def unpack_mask(wire: WireMask) -> np.ndarray:
    if isinstance(wire, np.ndarray):
        return wire
    count = int(np.prod(wire.shape))
    flat = np.unpackbits(wire.bits, count=count)
    return (flat.view(np.bool_) if wire.dtype == np.dtype(np.bool_).str else flat.astype(wire.dtype)).reshape(
        wire.shape
    )


def pack_prediction(prediction: Prediction) -> WirePrediction:
    masks = tuple(tuple(pack_mask(m) for m in segment.masks) for segment in prediction.segments)
    segments = tuple(replace(segment, masks=()) for segment in prediction.segments)
    return WirePrediction(replace(prediction, segments=segments), masks)


def unpack_prediction(wire: WirePrediction) -> Prediction:
    segments = tuple(
        replace(segment, masks=tuple(unpack_mask(m) for m in masks))
        for segment, masks in zip(wire.prediction.segments, wire.masks, strict=True)
    )
    return replace(wire.prediction, segments=segments)
