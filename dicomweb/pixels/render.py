"""Rendering stored images for display: a decoded frame and its DICOM attributes in, image bytes out.

Pure and blocking (house style 1): no I/O; callers run `render_frame` and `render_animation` in a worker thread.

The grayscale pipeline is the standard display pipeline of PS3.4 N.2.1: Modality LUT (Rescale Slope/Intercept or
the Modality LUT Sequence, PS3.3 C.11.1), then a VOI transform (PS3.3 C.11.2: the window the request gives, else
the first Window Center/Width of the instance, else its first VOI LUT, else the frame's own minimum and maximum),
then MONOCHROME1 inversion, into 8-bit display values. Color images are shown as RGB: YBR_FULL and YBR_FULL_422
are converted (PS3.3 C.7.6.3.1.2), PALETTE COLOR goes through its palette (C.7.6.3.1.5) and samples wider than
8 bits are scaled down. Enhanced multi-frame images take rescale and window values from their functional groups
(Pixel Value Transformation, Frame VOI LUT; PS3.3 C.7.6.16.2).

Then the geometry of PS3.18 8.3.5.1.3 (`viewport`: a source region, cropped, flipped when its width or height is
negative, and scaled to fit the viewport with its aspect ratio kept) and the encoding into a rendered media type
(PS3.18 8.7.4: image/jpeg with `quality`, image/png, image/gif; a GIF of all frames for a multi-frame image).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi, convert_color_space
from pydicom.uid import UID as PydicomUID

from dicomweb.errors import InvalidParameter, NotAcceptable, NotFound

JPEG = "image/jpeg"
PNG = "image/png"
GIF = "image/gif"
RENDERED_TYPES = (JPEG, PNG, GIF)
"""Rendered media types for single-frame images, the default first (PS3.18 Table 8.7.4-1)."""
DEFAULT_QUALITY = 90
THUMBNAIL_SIZE = 128
"""Thumbnails fit in THUMBNAIL_SIZE x THUMBNAIL_SIZE pixels unless a viewport says otherwise (never enlarged)."""
MAX_ANIMATED_FRAMES = 1000
"""A GIF of a multi-frame image is refused (406) above this many frames: ask for frames by number instead."""
DEFAULT_FRAME_MS = 100

_AS_RGB: dict[str, Any] = {"as_rgb": True}
"""YBR_FULL(_422), YBR_ICT and YBR_RCT decode to RGB (pydicom's decoders convert)."""

LINEAR = "LINEAR"
LINEAR_EXACT = "LINEAR_EXACT"
SIGMOID = "SIGMOID"


@dataclass(frozen=True, slots=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center, width and function (LINEAR, LINEAR_EXACT, SIGMOID)."""

    center: float
    width: float
    function: str = LINEAR


@dataclass(frozen=True, slots=True)
class Crop:
    """A source region in pixels (PS3.18 8.3.5.1.3 sx, sy, sw, sh); None means "to the image's edge";
    a negative width or height flips the region."""

    x: int = 0
    y: int = 0
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True, slots=True)
class Options:
    """What a rendered or thumbnail request asks for, already checked (see `dicomweb.retrieve.render_params`)."""

    media_type: str = JPEG
    window: Window | None = None
    quality: int = DEFAULT_QUALITY
    crop: Crop | None = None
    region: tuple[float, float, float, float] | None = None
    """WADO-URI `region` (PS3.18 9): left, top, right, bottom as fractions of the image."""
    size: tuple[int | None, int | None] | None = None
    """Fit within (width, height), aspect kept; None for a side leaves it free."""
    shrink_only: bool = False
    """Thumbnails: scale down to `size`, never up."""

    def key(self) -> str:
        """A stable text naming every choice (part of the entity tag)."""
        return repr((self.media_type, self.window, self.quality, self.crop, self.region, self.size, self.shrink_only))


# ---------------------------------------------------------------------------------------------- data sets


def read_dataset(data: bytes) -> Dataset:
    """The stored Part 10 file as a data set (pixel data not yet decoded)."""
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many kinds of errors for bad input
        raise NotAcceptable(f"the stored instance cannot be read for rendering: {exc}") from exc


def has_pixels(ds: Dataset) -> bool:
    return "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds


def frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def middle_frame(ds: Dataset) -> int:
    """The 0-based index of the representative frame of a thumbnail (the middle one)."""
    return (frame_count(ds) - 1) // 2


def _decode(ds: Dataset, index: int) -> tuple[np.ndarray, str]:
    """One frame as an array (color already RGB where the decoder converts) and its photometric interpretation."""
    if not has_pixels(ds):
        raise NotAcceptable("the instance has no pixel data to render")
    syntax = str(ds.file_meta.get("TransferSyntaxUID") or "1.2.840.10008.1.2")
    try:
        decoder = get_decoder(PydicomUID(syntax))
    except NotImplementedError:
        raise NotAcceptable(f"no decoder for the stored transfer syntax {syntax}", (syntax,)) from None
    if not decoder.is_available:
        raise NotAcceptable(f"no decoder plugin is installed for {syntax}", (syntax,))
    try:
        arr, meta = decoder.as_array(ds, index=index, **_AS_RGB)
    except Exception as exc:  # codec plugins raise many kinds of errors for bad data
        raise NotAcceptable(f"the stored pixel data cannot be decoded: {exc}", (syntax,)) from exc
    photometric = str(meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation") or "")
    return arr, photometric


# ---------------------------------------------------------------------------------------------- pixels


_PIPELINE_KEYWORDS = (
    *("PhotometricInterpretation", "BitsStored", "BitsAllocated", "PixelRepresentation"),
    *("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence"),
    *("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"),
)


def _frame_attributes(ds: Dataset, index: int) -> Dataset:
    """The attributes of the display pipeline for one frame: top-level ones, overridden by the shared and then
    the per-frame functional groups of an enhanced multi-frame image (PS3.3 C.7.6.16)."""
    groups = [ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")]
    if not any(groups):
        return ds
    view = Dataset()
    for keyword in _PIPELINE_KEYWORDS:
        if keyword in ds:
            setattr(view, keyword, ds[keyword].value)
    for position, sequence in enumerate(groups):
        item_index = 0 if position == 0 else index
        if not sequence or item_index >= len(sequence):
            continue
        item = sequence[item_index]
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if item.get(macro):
                for element in item.get(macro)[0]:
                    view[element.tag] = element
    return view


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0]
    return float(value)


def _clip8(values: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out


def window_values(arr: np.ndarray, window: Window) -> np.ndarray:
    """Map values through a VOI window to 0..255 (PS3.3 C.11.2.1.2.1 LINEAR, C.11.2.1.3.2 LINEAR_EXACT and
    SIGMOID, with the output range 0..255)."""
    x = arr.astype(np.float32, copy=False)
    c, w = float(window.center), float(window.width)
    if window.function == SIGMOID:
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function == LINEAR_EXACT:
        y = ((x - c) / w + 0.5) * 255.0
    elif w <= 1.0:
        y = np.where(x <= c - 0.5, 0.0, 255.0)
    else:
        y = ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
    return _clip8(y)


Extent = Callable[[], tuple[float, float]]


def _voi(arr: np.ndarray, attrs: Dataset, window: Window | None, extent: Extent) -> np.ndarray:
    """The VOI transform to 0..255: the request's window, the instance's first window, its first VOI LUT, or
    the `extent` (smallest and largest modality value of the frame) as a LINEAR_EXACT window."""
    if window is not None:
        return window_values(arr, window)
    if "WindowCenter" in attrs and "WindowWidth" in attrs:
        try:
            center, width = _first(attrs.WindowCenter), _first(attrs.WindowWidth)
        except (TypeError, ValueError, IndexError):
            center = width = math.nan
        if math.isfinite(center) and math.isfinite(width) and width > 0:
            function = str(attrs.get("VOILUTFunction") or LINEAR).upper()
            return window_values(arr, Window(center, width, function))
    if attrs.get("VOILUTSequence"):
        item = attrs.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        out = apply_voi(arr, attrs, index=0).astype(np.float32)
        top = float(2 ** min(max(bits, 1), 16) - 1)
        return _clip8(out * (255.0 / top))
    low, high = extent()
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    return window_values(arr, Window((low + high) / 2.0, high - low, LINEAR_EXACT))


def _modality(arr: np.ndarray, attrs: Dataset) -> np.ndarray:
    """The Modality LUT (PS3.3 C.11.1): the LUT sequence, or Rescale Slope and Intercept."""
    if "ModalityLUTSequence" in attrs:
        out: np.ndarray = apply_modality_lut(arr, attrs)
        return out
    try:
        slope = float(attrs.get("RescaleSlope") or 1)
        intercept = float(attrs.get("RescaleIntercept") or 0)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    if slope == 1.0 and intercept == 0.0:
        return arr
    return arr.astype(np.float64) * slope + intercept


def _gray(arr: np.ndarray, attrs: Dataset, window: Window | None) -> np.ndarray:
    """Modality LUT, VOI and MONOCHROME1 inversion. Integer data of up to 16 bits goes through one lookup table
    over every possible stored value (the pipeline computed once per value, not once per pixel)."""
    invert = str(attrs.get("PhotometricInterpretation") or "") == "MONOCHROME1"
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 and arr.size:
        unsigned = np.ascontiguousarray(arr).view(np.uint8 if arr.dtype.itemsize == 1 else np.uint16)
        count = 1 << (8 * arr.dtype.itemsize)
        values = _modality(np.arange(count, dtype=unsigned.dtype).view(arr.dtype).astype(np.int32), attrs)

        def extent() -> tuple[float, float]:
            present = values[np.bincount(unsigned.ravel(), minlength=count) > 0]
            return float(present.min()), float(present.max())

        lut = _voi(values, attrs, window, extent)
        out: np.ndarray = (255 - lut if invert else lut)[unsigned]
        return out
    modality = _modality(arr, attrs)
    out = _voi(modality, attrs, window, lambda: (float(np.min(modality)), float(np.max(modality))))
    return 255 - out if invert else out


def _to_8_bits(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        return _clip8(arr)
    shift = max(int(bits) - 8, 0)
    return (arr.astype(np.uint64) >> shift).clip(0, 255).astype(np.uint8)


def display_array(ds: Dataset, index: int, window: Window | None = None) -> np.ndarray:
    """One frame as 8-bit display values: (rows, columns) gray or (rows, columns, 3) RGB."""
    arr, photometric = _decode(ds, index)
    attrs = _frame_attributes(ds, index)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, photometric, "RGB")
        photometric = "RGB"
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:  # malformed palettes
            raise NotAcceptable(f"the palette cannot be applied: {exc}") from exc
        return _to_8_bits(rgb, 16 if rgb.dtype != np.uint8 else 8)
    if arr.ndim == 3:  # RGB and the decoded YBR_ICT / YBR_RCT
        return _to_8_bits(arr, int(ds.get("BitsStored") or 8))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotAcceptable(f"photometric interpretation {photometric!r} cannot be rendered")
    return _gray(arr, attrs, window)


# ---------------------------------------------------------------------------------------------- geometry


def _crop(image: Image.Image, options: Options) -> Image.Image:
    width, height = image.size
    flip_x = flip_y = False
    if options.region is not None:
        left, top, right, bottom = options.region
        box = (
            round(left * width),
            round(top * height),
            max(round(right * width), round(left * width) + 1),
            max(round(bottom * height), round(top * height) + 1),
        )
    elif options.crop is not None:
        c = options.crop
        sw = c.width if c.width is not None else width - c.x
        sh = c.height if c.height is not None else height - c.y
        flip_x, flip_y = sw < 0, sh < 0
        x0, x1 = sorted((c.x, c.x + sw))
        y0, y1 = sorted((c.y, c.y + sh))
        box = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
    else:
        return image
    if box[2] <= box[0] or box[3] <= box[1]:
        raise InvalidParameter("viewport", f"the source region lies outside the {width}x{height} image")
    if box != (0, 0, width, height):
        image = image.crop(box)
    if flip_x:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip_y:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def _scale(image: Image.Image, options: Options) -> Image.Image:
    if options.size is None:
        return image
    width, height = image.size
    box_w, box_h = options.size
    factors = [f for f in ((box_w / width) if box_w else None, (box_h / height) if box_h else None) if f]
    if not factors:
        return image
    factor = min(factors)
    if options.shrink_only:
        factor = min(factor, 1.0)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    if size == image.size:
        return image
    if factor < 1:  # reduce by an integer factor first, then resample (Pillow's reducing_gap)
        return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image.resize(size, Image.Resampling.BICUBIC)


def _image(ds: Dataset, index: int, options: Options) -> Image.Image:
    pixels = display_array(ds, index, options.window)
    image = Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L")
    return _scale(_crop(image, options), options)


# ---------------------------------------------------------------------------------------------- encoding


def encode(image: Image.Image, media_type: str, quality: int = DEFAULT_QUALITY) -> bytes:
    out = io.BytesIO()
    if media_type == JPEG:
        image.save(out, format="JPEG", quality=quality)
    elif media_type == PNG:
        image.save(out, format="PNG", compress_level=3)
    elif media_type == GIF:
        _for_gif(image).save(out, format="GIF")
    else:
        raise NotAcceptable(f"{media_type} is not a rendered media type", RENDERED_TYPES)
    return out.getvalue()


def _for_gif(image: Image.Image) -> Image.Image:
    return image if image.mode == "L" else image.convert("P", palette=Image.Palette.ADAPTIVE)


def render_frame(ds: Dataset, index: int, options: Options) -> bytes:
    """One frame (0-based `index`) rendered as `options.media_type`."""
    if not 0 <= index < frame_count(ds):
        raise NotFound("frame", f"frame {index + 1} does not exist: the instance has {frame_count(ds)} frame(s)")
    return encode(_image(ds, index, options), options.media_type, options.quality)


def render_animation(ds: Dataset, options: Options) -> bytes:
    """Every frame of a multi-frame image as one animated GIF (PS3.18 Table 8.7.4-1, multi-frame image/gif);
    the frame delay is Frame Time (0018,1063) when given."""
    count = frame_count(ds)
    if count > MAX_ANIMATED_FRAMES:
        raise NotAcceptable(f"{count} frames are too many to animate (at most {MAX_ANIMATED_FRAMES})", (JPEG, PNG))
    frames = [_for_gif(_image(ds, i, options)) for i in range(count)]
    try:
        delay = max(20, round(float(ds.get("FrameTime") or DEFAULT_FRAME_MS)))
    except (TypeError, ValueError):
        delay = DEFAULT_FRAME_MS
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=delay, loop=0)
    return out.getvalue()
