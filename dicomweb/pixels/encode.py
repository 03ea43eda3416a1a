"""Encoding native pixels into compressed transfer syntaxes (PS3.5 8.2, A.4): frames and whole instances.

The encoders:

* JPEG 2000 lossless (1.2.840.10008.1.2.4.90) and lossy (.4.91), RLE Lossless (1.2.840.10008.1.2.5), JPEG-LS
  lossless (.4.80) and near-lossless (.4.81): pydicom's encoder API (`pydicom.pixels.encoders`) with the
  pylibjpeg-openjpeg, pydicom/pylibjpeg-rle and pyjpegls plugins (JPEG-LS only where pyjpegls is installed).
  pylibjpeg-openjpeg always asks OpenJPEG for 6 resolution levels, which needs both sides of the image to be
  at least 32 pixels; smaller JPEG 2000 images are encoded by imagecodecs' OpenJPEG with the levels the image
  has room for (`resolutions`).
* HTJ2K lossless (.4.201), HTJ2K lossless RPCL (.4.202) and HTJ2K lossy (.4.203): imagecodecs (OpenJPH).
  `.4.202` streams use the RPCL progression order, a TLM marker segment and one tile-part per resolution
  (PS3.5 A.4.11), so that any prefix of the stream holds whole lower resolutions: the first 64 KiB of a CT
  frame decode to a recognizable image (progressive loading by byte range).
* JPEG baseline (.4.50), 8-bit unsigned data only: imagecodecs (libjpeg-turbo), color as YCbCr 4:4:4
  (Photometric Interpretation YBR_FULL).

Every encoder takes pixel values in the machine's byte order (`native_order`): the codec libraries read an
array's memory as native integers whatever its dtype says, and pydicom reads Explicit VR Big Endian Pixel Data
into big-endian arrays. `encode_array` is the one place a codec is called.

Color is encoded without a multi-component transform so that the Photometric Interpretation of the data set
(RGB) stays true for frames served alone (PS3.5 8.2.4 allows either). Lossless syntaxes are bit-exact: what
`pydicom` with the pylibjpeg plugins decodes equals the native pixels.

Pure and blocking (house style 1): callers run these in a worker thread.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import UID as PydicomUID

from dicomweb.pixels.native import UNCOMPRESSED, ImageInfo, TranscodeError, native_instance, read_dataset, why
from dicomweb.uids import EXPLICIT_VR_LITTLE_ENDIAN

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K_LOSSY = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K_LOSSY = "1.2.840.10008.1.2.4.203"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

J2K_LOSSY_RATIO = 10
"""Compression ratio asked of the JPEG 2000 lossy encoder (.4.91)."""
JPEG_QUALITY = 90
"""libjpeg quality of JPEG baseline (.4.50) frames."""
JLS_NEAR = 2
"""JPEG-LS near-lossless (.4.81) maximum error (NEAR)."""
HTJ2K_LOSSY_STEPS = 4
"""HTJ2K lossy (.4.203): quantization step in units of the stored value (about; the 9/7 wavelet spreads it)."""
J2K_SMALL_LOSSY_PSNR = 50
"""JPEG 2000 lossy (.4.91) of images too small for pylibjpeg-openjpeg: the quality asked of OpenJPEG, as PSNR in
dB over the image's range of values (imagecodecs offers no rate target; see `_fixed_quality`)."""
_OPENJPEG_ENCODER = threading.Lock()
"""pylibjpeg-openjpeg's encoder is not thread-safe: two encodes at once in one process (worker threads of
concurrent requests) corrupt memory and end the process with a segmentation fault; its decoder, imagecodecs'
encoders and the other plugins are safe. It runs holding the GIL but for its Python write callbacks, so
serializing it costs no parallelism."""
MAX_RESOLUTIONS = 6
"""Resolution levels (decomposition levels + 1) of JPEG 2000 and HTJ2K codestreams of images large enough:
OpenJPEG's and OpenJPH's default, and what pylibjpeg-openjpeg always asks for."""


@dataclass(frozen=True, slots=True)
class Codec:
    """One target transfer syntax: how to encode a frame, whether it loses information and how PS3.3
    C.7.6.1.1.5 names the method (Lossy Image Compression Method)."""

    syntax: str
    lossy: bool
    method: str
    encode: Callable[[np.ndarray[Any, Any], ImageInfo], bytes]
    available: Callable[[], bool]
    eight_bit_only: bool = False


def resolutions(rows: int, columns: int) -> int:
    """Resolution levels a JPEG 2000 codestream of a `rows` x `columns` image can have (ISO 15444-1 B.5):
    each decomposition level halves the image, and OpenJPEG refuses levels that would leave the smaller side
    with less than one sample (2^(levels - 1) <= side), so a 10 x 50 image takes 4 and a 512 x 512 one the
    default `MAX_RESOLUTIONS`. Code blocks (64 x 64) and the single tile need no choice: both are clipped to
    the image and its sub-bands."""
    side = max(1, min(rows, columns))
    return max(1, min(MAX_RESOLUTIONS, side.bit_length()))


def _pydicom_codec(syntax: str, **options: Any) -> Callable[[np.ndarray[Any, Any], ImageInfo], bytes]:
    def encode(arr: np.ndarray[Any, Any], image: ImageInfo) -> bytes:
        encoder = get_encoder(PydicomUID(syntax))
        return bytes(encoder.encode(arr, use_mct=False, **_pixel_options(image, planar=0), **options))

    return encode


def _j2k(syntax: str, **options: Any) -> Callable[[np.ndarray[Any, Any], ImageInfo], bytes]:
    """JPEG 2000 (.4.90, .4.91): pylibjpeg-openjpeg where its fixed 6 resolution levels fit the image, else
    imagecodecs' OpenJPEG with the levels `resolutions` allows (it may take fewer: at most log2(side) - 2)."""
    pydicom_encode = _pydicom_codec(syntax, **options)

    def encode(arr: np.ndarray[Any, Any], image: ImageInfo) -> bytes:
        levels = resolutions(image.rows, image.columns)
        if levels == MAX_RESOLUTIONS:
            with _OPENJPEG_ENCODER:
                return pydicom_encode(arr, image)
        lossy = syntax == J2K_LOSSY
        return bytes(
            imagecodecs.jpeg2k_encode(
                arr,
                _fixed_quality(arr, image.bits_stored) if lossy else None,
                codecformat="J2K",
                bitspersample=image.bits_stored,
                resolutions=levels,
                reversible=not lossy,
                mct=False,
                numthreads=1,
            )
        )

    return encode


def _fixed_quality(arr: np.ndarray[Any, Any], bits_stored: int) -> int | None:
    """OpenJPEG's fixed-quality target (dB, over the nominal peak 2^BitsStored - 1) that puts the error
    `J2K_SMALL_LOSSY_PSNR` dB below the image's own range of values: an image using a few hundred of 65536
    values would otherwise be all error. None (lossless) for a flat image; imagecodecs codes levels over 1000
    reversibly."""
    spread = float(arr.max()) - float(arr.min()) if arr.size else 0.0
    if spread <= 0:
        return None
    level = J2K_SMALL_LOSSY_PSNR + 20 * np.log10((2.0**bits_stored - 1) / spread)
    return int(min(round(level), 999))


def _jpegls(syntax: str, near: int = 0) -> Callable[[np.ndarray[Any, Any], ImageInfo], bytes]:
    """JPEG-LS (.4.80, .4.81): pyjpegls through pydicom, which writes the sample precision Bits Stored says. Its
    output buffer is the size of the input, too small when the codestream is larger (a few pixels, or noise);
    imagecodecs' CharLS then encodes the frame, with the precision of the array's type: right for unsigned
    values, and for signed ones that fill it (a decoder sign-extends from the precision, not from Bits Stored)."""
    pydicom_encode = _pydicom_codec(syntax, **({"jls_error": near} if near else {}))

    def encode(arr: np.ndarray[Any, Any], image: ImageInfo) -> bytes:
        try:
            return pydicom_encode(arr, image)
        except RuntimeError as exc:
            fits = not image.pixel_representation or image.bits_stored == arr.dtype.itemsize * 8
            if "buffer is too small" not in str(exc) or not fits or not _imagecodecs_has("JPEGLS")():
                raise
            return bytes(imagecodecs.jpegls_encode(arr, level=near or None))

    return encode


def _pydicom_available(syntax: str) -> Callable[[], bool]:
    def available() -> bool:
        try:
            return bool(get_encoder(PydicomUID(syntax)).is_available)
        except NotImplementedError:
            return False

    return available


def _htj2k(syntax: str) -> Callable[[np.ndarray[Any, Any], ImageInfo], bytes]:
    def encode(arr: np.ndarray[Any, Any], image: ImageInfo) -> bytes:
        color = image.samples_per_pixel > 1
        # decomposition levels; imagecodecs takes 0 for "default", so a side of 1 pixel gets 1 level (whose
        # high-pass sub-bands are empty, which ISO 15444-1 allows)
        levels = max(1, resolutions(image.rows, image.columns) - 1)
        if syntax == HTJ2K_LOSSY:
            step = HTJ2K_LOSSY_STEPS / float(2 ** (arr.dtype.itemsize * 8))
            return bytes(
                imagecodecs.htj2k_encode(arr, step, reversible=False, rgb=False if color else None, resolutions=levels)
            )
        if syntax == HTJ2K_RPCL:
            return bytes(
                imagecodecs.htj2k_encode(
                    arr,
                    reversible=True,
                    rgb=False if color else None,
                    resolutions=levels,
                    tlm=True,
                    tilepart=imagecodecs.HTJ2K.TILEPART.RESOLUTIONS,
                )
            )
        return bytes(imagecodecs.htj2k_encode(arr, reversible=True, rgb=False if color else None, resolutions=levels))

    return encode


def _jpeg_baseline(arr: np.ndarray[Any, Any], image: ImageInfo) -> bytes:
    """Color as YCbCr 4:4:4: RGB values are converted by libjpeg, YBR_FULL values (already YCbCr, PS3.3
    C.7.6.3.1.2) are coded as they are."""
    if image.samples_per_pixel > 1:
        source = "YCbCr" if image.photometric_interpretation == "YBR_FULL" else "RGB"
        return bytes(
            imagecodecs.jpeg8_encode(arr, JPEG_QUALITY, colorspace=source, outcolorspace="YCbCr", subsampling="444")
        )
    return bytes(imagecodecs.jpeg8_encode(arr, JPEG_QUALITY))


def _imagecodecs_has(name: str) -> Callable[[], bool]:
    return lambda: bool(getattr(getattr(imagecodecs, name, None), "available", False))


CODECS: dict[str, Codec] = {
    J2K_LOSSLESS: Codec(J2K_LOSSLESS, False, "ISO_15444_1", _j2k(J2K_LOSSLESS), _pydicom_available(J2K_LOSSLESS)),
    J2K_LOSSY: Codec(
        J2K_LOSSY,
        True,
        "ISO_15444_1",
        _j2k(J2K_LOSSY, j2k_cr=[J2K_LOSSY_RATIO]),
        _pydicom_available(J2K_LOSSY),
    ),
    HTJ2K_LOSSLESS: Codec(HTJ2K_LOSSLESS, False, "ISO_15444_15", _htj2k(HTJ2K_LOSSLESS), _imagecodecs_has("HTJ2K")),
    HTJ2K_RPCL: Codec(HTJ2K_RPCL, False, "ISO_15444_15", _htj2k(HTJ2K_RPCL), _imagecodecs_has("HTJ2K")),
    HTJ2K_LOSSY: Codec(HTJ2K_LOSSY, True, "ISO_15444_15", _htj2k(HTJ2K_LOSSY), _imagecodecs_has("HTJ2K")),
    RLE_LOSSLESS: Codec(RLE_LOSSLESS, False, "", _pydicom_codec(RLE_LOSSLESS), _pydicom_available(RLE_LOSSLESS)),
    JPEG_LS_LOSSLESS: Codec(
        JPEG_LS_LOSSLESS,
        False,
        "ISO_14495_1",
        _jpegls(JPEG_LS_LOSSLESS),
        _pydicom_available(JPEG_LS_LOSSLESS),
    ),
    JPEG_LS_NEAR_LOSSLESS: Codec(
        JPEG_LS_NEAR_LOSSLESS,
        True,
        "ISO_14495_1",
        _jpegls(JPEG_LS_NEAR_LOSSLESS, JLS_NEAR),
        _pydicom_available(JPEG_LS_NEAR_LOSSLESS),
    ),
    JPEG_BASELINE: Codec(
        JPEG_BASELINE, True, "ISO_10918_1", _jpeg_baseline, _imagecodecs_has("JPEG8"), eight_bit_only=True
    ),
}


def _versions() -> str:
    from importlib.metadata import version

    openjpeg = version("pylibjpeg-openjpeg")
    return (
        f"openjph/{imagecodecs.htj2k_version()};openjpeg/{openjpeg};{imagecodecs.jpeg2k_version()};"
        f"pydicom/{pydicom.__version__}"
    )


CODEC_VERSION = _versions()
"""Names the encoder builds: part of the entity tag of encoded frames (same input + same encoder = same bytes)."""


def can_encode(target: str) -> bool:
    """Is there an installed encoder for this transfer syntax (whatever the image)?"""
    codec = CODECS.get(target)
    return codec is not None and codec.available()


def is_lossy(target: str) -> bool:
    codec = CODECS.get(target)
    return codec is not None and codec.lossy


def unsupported(target: str, image: ImageInfo) -> str | None:
    """Why frames of `image` cannot be encoded in `target`, or None when they can."""
    if not can_encode(target):
        return f"no encoder is installed for {target}"
    codec = CODECS[target]
    if image.bits_allocated not in (8, 16):
        return f"{target} encoding needs 8 or 16 bits allocated, the image has {image.bits_allocated}"
    if image.samples_per_pixel not in (1, 3):
        return f"{target} encoding needs 1 or 3 samples per pixel"
    if image.photometric_interpretation not in ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL"):
        return f"{target} encoding of {image.photometric_interpretation} data is not supported"
    if codec.lossy and image.photometric_interpretation == "PALETTE COLOR":
        return "palette color data is only encoded losslessly"
    if codec.eight_bit_only and (image.bits_allocated != 8 or image.pixel_representation):
        return f"{target} (JPEG baseline) carries 8-bit unsigned data only"
    return None


def frame_array(native: bytes, image: ImageInfo, *, planar: int | None = None) -> np.ndarray[Any, Any]:
    """One native little-endian frame as pixel values (sign-extended and masked to Bits Stored, color as
    (rows, columns, samples)), the way pydicom reads them (PS3.5 8.1)."""
    decoder = get_decoder(PydicomUID(EXPLICIT_VR_LITTLE_ENDIAN))
    options = _pixel_options(image, planar=image.planar_configuration if planar is None else planar)
    options.update(pixel_keyword="PixelData", as_rgb=False)  # values as stored: no YBR to RGB conversion
    try:
        arr, _props = decoder.as_array(native, **options)
    except Exception as exc:  # pydicom raises ValueError/AttributeError for data that does not fit
        raise TranscodeError(f"cannot read the native frame: {why(exc)}") from exc
    return native_order(arr)


def native_order(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """`arr` as a C-contiguous array of the same values in the machine's byte order. The codec libraries read an
    array's memory as native integers and ignore a non-native dtype; pydicom reads Explicit VR Big Endian Pixel
    Data (PS3.5 A.3) into big-endian arrays."""
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


def encode_array(arr: np.ndarray[Any, Any], target: str, image: ImageInfo) -> bytes:
    """One frame's pixel values (rows x columns, or rows x columns x samples) encoded in `target`: the only call
    of a codec, so every encoder gets values in the machine's byte order."""
    try:
        return CODECS[target].encode(native_order(arr), image)
    except Exception as exc:  # the codec libraries raise their own error types
        raise TranscodeError(f"cannot encode a frame in {target}: {why(exc)}") from exc


def encode_frame(native: bytes, target: str, image: ImageInfo, *, planar: int | None = None) -> bytes:
    """One native little-endian frame (Planar Configuration `planar`, default the image's) encoded in `target`."""
    reason = unsupported(target, image)
    if reason is not None:
        raise TranscodeError(reason)
    return encode_array(frame_array(native, image, planar=planar), target, image)


def _pixel_options(image: ImageInfo, *, planar: int) -> dict[str, Any]:
    return {
        "rows": image.rows,
        "columns": image.columns,
        "samples_per_pixel": image.samples_per_pixel,
        "bits_allocated": image.bits_allocated,
        "bits_stored": image.bits_stored,
        "pixel_representation": image.pixel_representation,
        "photometric_interpretation": image.photometric_interpretation,
        "planar_configuration": planar,
        "number_of_frames": 1,
    }


# ---------------------------------------------------------------------------------------------- whole instances


def image_of(ds: pydicom.Dataset) -> ImageInfo:
    """The Image Pixel module values of a data set (PS3.3 C.7.6.3)."""
    bits = int(ds.get("BitsAllocated") or 8)
    return ImageInfo(
        rows=int(ds.get("Rows") or 0),
        columns=int(ds.get("Columns") or 0),
        samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
        bits_allocated=bits,
        bits_stored=int(ds.get("BitsStored") or bits),
        pixel_representation=int(ds.get("PixelRepresentation") or 0),
        photometric_interpretation=str(ds.get("PhotometricInterpretation") or "MONOCHROME2"),
        planar_configuration=int(ds.get("PlanarConfiguration") or 0),
    )


def encode_instance(data: bytes, target: str, frames: list[bytes] | None = None) -> bytes:
    """A Part 10 file with its Pixel Data encapsulated in `target` (PS3.5 A.4): one fragment per frame, a Basic
    Offset Table, the Transfer Syntax UID updated, and for lossy syntaxes the Lossy Image Compression attributes
    (PS3.3 C.7.6.1.1.5). The SOP Instance UID is kept (the transfer does not make a new instance).

    `frames`, when given, are the frames already encoded in `target` (a stored rendition); otherwise each frame
    is decoded (if needed) and encoded here."""
    try:
        ds = read_dataset(data)
        if "PixelData" not in ds:
            return _without_pixels(data, target)
        source = str(ds.file_meta.get("TransferSyntaxUID") or "")
        if source == target:
            return data
        if PydicomUID(source).is_compressed:
            ds.decompress(generate_instance_uid=False)
        image = image_of(ds)
        reason = unsupported(target, image)
        if reason is not None:
            raise TranscodeError(reason)
        native_size = len(ds.PixelData)
        if frames is None:
            frames = _encode_all(ds, target, image)
        _set_encapsulated(ds, target, image, frames, native_size)
        out = io.BytesIO()
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
        return out.getvalue()
    except TranscodeError:
        raise
    except Exception as exc:  # pydicom and the codec plugins raise many kinds of errors for bad input
        raise TranscodeError(f"cannot encode the instance in {target}: {why(exc)}") from exc


def _without_pixels(data: bytes, target: str) -> bytes:
    """A data set without Pixel Data in an encapsulated transfer syntax: everything but Pixel Data is Explicit VR
    Little Endian there (PS3.5 A.4), so it is that encoding under `target`'s UID (an SR, a KOS or a
    presentation state in a study asked for in JPEG 2000)."""
    ds = read_dataset(native_instance(data, EXPLICIT_VR_LITTLE_ENDIAN))
    ds.file_meta.TransferSyntaxUID = PydicomUID(target)
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def _encode_all(ds: pydicom.Dataset, target: str, image: ImageInfo) -> list[bytes]:
    return [encode_array(frame, target, image) for frame in pixel_frames(ds, image)]


def pixel_frames(ds: pydicom.Dataset, image: ImageInfo) -> Iterator[np.ndarray[Any, Any]]:
    """Each frame of a data set's native Pixel Data as pixel values (as stored: no YBR to RGB conversion; color
    as rows x columns x samples) in the machine's byte order, whatever byte order the data set was read in."""
    ds.pixel_array_options(as_rgb=False)
    arr = ds.pixel_array
    count = int(ds.get("NumberOfFrames") or 1)
    stack = arr.reshape((count, *arr.shape[-(3 if image.samples_per_pixel > 1 else 2) :]))
    for frame in stack:
        yield native_order(frame)


def _set_encapsulated(ds: pydicom.Dataset, target: str, image: ImageInfo, frames: list[bytes], size: int) -> None:
    ds.PixelData = encapsulate(frames, has_bot=True)
    element = ds["PixelData"]
    element.VR = "OB"
    element.is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = PydicomUID(target)
    if image.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
        if target == JPEG_BASELINE:
            ds.PhotometricInterpretation = "YBR_FULL"  # YCbCr 4:4:4 (PS3.5 8.2.1)
    codec = CODECS[target]
    if codec.lossy:
        compressed = sum(len(f) for f in frames) or 1
        ratios = [str(v) for v in _values(ds, "LossyImageCompressionRatio")]
        methods = [str(v) for v in _values(ds, "LossyImageCompressionMethod")]
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = [*ratios, f"{size / compressed:.4g}"]
        ds.LossyImageCompressionMethod = [*methods, codec.method]


def _values(ds: pydicom.Dataset, keyword: str) -> list[Any]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]


def fits(target: str, bits_allocated: int | None) -> bool:
    """Can an image of `bits_allocated` be sent in `target` as far as the index tells (negotiation before any
    pixel is read)? Native targets always; compressed ones need an encoder that takes that depth. No Bits
    Allocated means no Pixel Data: any syntax we encode into carries such a data set (`_without_pixels`)."""
    if target not in CODECS:
        return target in UNCOMPRESSED
    if bits_allocated is None:
        return can_encode(target)
    if not can_encode(target) or bits_allocated not in (8, 16):
        return False
    return not (CODECS[target].eight_bit_only and bits_allocated != 8)
