"""What travels between the server and a Ray Serve model replica: a pure codec, no Ray in here.

Ray serializes arguments and results with pickle protocol 5: a contiguous numpy array's buffer goes out of band
into the shared-memory object store (one copy in, zero-copy out on the same node) once the whole value is over
Ray's inline limit (100 KiB); a non-contiguous view is copied in band. So the codec makes every array it sends
small and contiguous, and the other side restores exactly what the adapter or the server expects:

- Input pixels go as the smallest integer dtype that holds their values (`narrow`), contiguous, with the original
  dtype alongside: the replica casts back, so an adapter sees the same values and dtype as in process.
- A series whose images share one shape and dtype (a volume: an MR or CT series) goes as one stacked array, not
  one array per slice: one buffer to serialize instead of hundreds (95 slices: 2.5 -> 1 ms to put).
- Binary masks (bool, or integers holding only 0 and 1) go bit-packed (`np.packbits`, 1/8 of a bool mask) with
  their shape and dtype, a segment's same-shaped masks (one per slice) packed together; the server unpacks them
  (`unpack_prediction`). Other masks travel as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from inference.models import ImageInput, ModelInput, Prediction


@dataclass(frozen=True, slots=True)
class WireInput:
    """A `ModelInput` whose pixel arrays may be narrowed; `dtypes` are the originals, one per image. When `volume`
    is set, image i's pixels are `volume[i]` (the images hold empty placeholders)."""

    images: tuple[ImageInput, ...]
    dtypes: tuple[str, ...]
    volume: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class PackedMask:
    """A binary mask as `np.packbits` of its flattened values, with what restores it."""

    bits: np.ndarray
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class PackedMasks:
    """Several binary masks of one shape and dtype (a segment's masks, one per slice) as one `np.packbits`."""

    bits: np.ndarray
    count: int
    shape: tuple[int, ...]
    dtype: str


WireMask = PackedMask | np.ndarray


@dataclass(frozen=True, slots=True)
class WirePrediction:
    """A `Prediction` with its segments' masks taken out (`masks[segment][image]`) and packed where binary."""

    prediction: Prediction
    masks: tuple[tuple[WireMask, ...] | PackedMasks, ...]


def narrow(pixels: np.ndarray) -> np.ndarray:
    """`pixels` as the smallest integer dtype that holds its values (C-contiguous); other dtypes unchanged."""
    if pixels.dtype.kind in "iu" and pixels.dtype.itemsize > 1 and pixels.size:
        low, high = pixels.min(), pixels.max()
        smallest = np.result_type(np.min_scalar_type(low), np.min_scalar_type(high))
        if smallest.itemsize < pixels.dtype.itemsize:
            return pixels.astype(smallest, order="C")
    return np.ascontiguousarray(pixels)


def _same_shape(arrays: list[np.ndarray]) -> bool:
    first = arrays[0]
    return all(a.shape == first.shape and a.dtype == first.dtype for a in arrays[1:])


def pack_input(inputs: ModelInput) -> WireInput:
    dtypes = tuple(image.pixels.dtype.str for image in inputs.images)
    pixels = [image.pixels for image in inputs.images]
    if len(pixels) > 1 and _same_shape(pixels):
        volume = narrow(np.stack(pixels))
        placeholder = np.empty((0,), dtype=volume.dtype)
        return WireInput(tuple(replace(image, pixels=placeholder) for image in inputs.images), dtypes, volume)
    images = tuple(replace(image, pixels=narrow(image.pixels)) for image in inputs.images)
    return WireInput(images, dtypes)


def unpack_input(wire: WireInput | ModelInput) -> ModelInput:
    """The adapter's input, each image's pixels in their original dtype (a plain `ModelInput` passes through)."""
    if isinstance(wire, ModelInput):
        return wire
    if wire.volume is not None:
        volume = wire.volume if wire.volume.dtype.str == wire.dtypes[0] else wire.volume.astype(wire.dtypes[0])
        return ModelInput(tuple(replace(image, pixels=volume[i]) for i, image in enumerate(wire.images)))
    images = tuple(
        image if image.pixels.dtype.str == dtype else replace(image, pixels=image.pixels.astype(dtype))
        for image, dtype in zip(wire.images, wire.dtypes, strict=True)
    )
    return ModelInput(images)


def _binary(mask: np.ndarray) -> bool:
    return mask.dtype == np.bool_ or bool(mask.dtype.kind in "iu" and mask.size and 0 <= mask.min() and mask.max() <= 1)


def pack_mask(mask: np.ndarray) -> WireMask:
    if _binary(mask):
        return PackedMask(np.packbits(mask.ravel()), mask.shape, mask.dtype.str)
    return mask


def pack_masks(masks: tuple[np.ndarray, ...]) -> tuple[WireMask, ...] | PackedMasks:
    """A segment's masks: packed together when there are several binary ones of one shape, else one by one."""
    if len(masks) > 1 and _same_shape(list(masks)) and all(_binary(m) for m in masks):
        stacked = np.stack(masks)
        return PackedMasks(np.packbits(stacked.ravel()), len(masks), masks[0].shape, masks[0].dtype.str)
    return tuple(pack_mask(m) for m in masks)


def _unbits(bits: np.ndarray, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    flat = np.unpackbits(bits, count=int(np.prod(shape)))
    return (flat.view(np.bool_) if dtype == np.dtype(np.bool_).str else flat.astype(dtype)).reshape(shape)


def unpack_mask(wire: WireMask) -> np.ndarray:
    if isinstance(wire, np.ndarray):
        return wire
    return _unbits(wire.bits, wire.shape, wire.dtype)


def unpack_masks(wire: tuple[WireMask, ...] | PackedMasks) -> tuple[np.ndarray, ...]:
    if isinstance(wire, PackedMasks):
        return tuple(_unbits(wire.bits, (wire.count, *wire.shape), wire.dtype))
    return tuple(unpack_mask(m) for m in wire)


def pack_prediction(prediction: Prediction) -> WirePrediction:
    masks = tuple(pack_masks(segment.masks) for segment in prediction.segments)
    segments = tuple(replace(segment, masks=()) for segment in prediction.segments)
    return WirePrediction(replace(prediction, segments=segments), masks)


def unpack_prediction(wire: WirePrediction) -> Prediction:
    segments = tuple(
        replace(segment, masks=unpack_masks(masks))
        for segment, masks in zip(wire.prediction.segments, wire.masks, strict=True)
    )
    return replace(wire.prediction, segments=segments)
