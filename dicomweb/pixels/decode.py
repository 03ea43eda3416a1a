"""Decoding to native (uncompressed) encodings: whole instances and single frames (PS3.18 8.7.3.4).

Every origin server must be able to return a data set in Explicit VR Little Endian whatever form it was stored
in (PS3.18 8.7.3.4 Note 2). `transcode_instance` does that and the cheaper conversions between the uncompressed
transfer syntaxes (Implicit/Explicit VR Little Endian, Explicit VR Big Endian, Deflated Explicit VR Little
Endian), which `dicomweb.pixels.native` holds with the rest of what decoders and encoders share. Encoding into
compressed transfer syntaxes is `dicomweb.pixels.encode`'s; `transcode_instance` hands it those targets.

Pure and blocking (house style 1): bytes in, bytes out, no I/O; callers run these in a worker thread
(`anyio.to_thread`), because decoding a large multi-frame image takes seconds of CPU.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID as PydicomUID

from dicomweb.pixels import encode
from dicomweb.pixels.native import (
    UNCOMPRESSED,
    ImageInfo,
    TranscodeError,
    can_decode,
    is_compressed,
    native_instance,
    pixel_swap_width,
    swap_bytes,
    why,
)


def can_transcode(stored: str, target: str) -> bool:
    """Can a stored instance be returned in `target`? Same syntax: always; otherwise when the stored one is native
    or we can decode it, and the target is native or has an encoder (`dicomweb.pixels.encode`; whether the image suits
    the encoder, e.g. JPEG baseline for 8-bit data only, is found when encoding)."""
    if stored == target:
        return True
    if target not in UNCOMPRESSED and not encode.can_encode(target):
        return False
    return can_decode(stored)


# ---------------------------------------------------------------------------------------------- whole instances


def dataset_in(data: bytes, target: str) -> Dataset:
    """A stored Part 10 file as a data set in the transfer syntax `target`: Pixel Data decoded, byte-swapped or
    encoded as needed, the file meta's Transfer Syntax UID set. For senders that must send an instance in the
    syntax a peer accepted (PS3.8 9.3: a presentation context fixes one transfer syntax); `can_transcode` says
    beforehand whether it can be done. Raises `TranscodeError` when it cannot."""
    return pydicom.dcmread(io.BytesIO(transcode_instance(data, target)))


def transcode_instance(data: bytes, target: str) -> bytes:
    """A Part 10 file re-encoded in the transfer syntax `target` (decoding Pixel Data when needed; compressed
    targets are encoded by `dicomweb.pixels.encode`)."""
    if target not in UNCOMPRESSED:
        if not encode.can_encode(target):
            raise TranscodeError(f"encoding into {target} is not supported")
        return encode.encode_instance(data, target)
    return native_instance(data, target)


# ---------------------------------------------------------------------------------------------- single frames


def decode_frame(encoded: bytes, transfer_syntax: str, image: ImageInfo) -> bytes:
    """One compressed frame (its fragments concatenated) as native little-endian pixel bytes, in the form the
    instance's Image Pixel module describes, since that (the WADO-RS metadata) is all a client has to read
    native frames with (PS3.5 8.2, PS3.3 C.7.6.3.1.2).

    Color is interleaved (Planar Configuration 0). YBR_FULL stays YBR_FULL (no conversion to RGB); YBR_FULL_422
    is decoded (the codec upsamples the chroma) and packed again in the native YBR_FULL_422 layout, each pair
    of pixels as Y1 Y2 Cb Cr with the pair's mean chroma (`pack_ybr_422`); an odd number of columns has no such
    layout and is refused. JPEG 2000 YBR_RCT/YBR_ICT data come out as RGB: those values name a component
    transform inside the codestream, which the decoder undoes, and have no native form. This differs from a
    whole instance decoded to a native transfer syntax (`transcode_instance`), which converts YBR to RGB and
    says so in its own Photometric Interpretation."""
    try:
        decoder = get_decoder(PydicomUID(transfer_syntax))
    except NotImplementedError:
        raise TranscodeError(f"no decoder for {transfer_syntax}") from None
    if not decoder.is_available:
        raise TranscodeError(f"no decoder plugin is installed for {transfer_syntax}")
    photometric = image.photometric_interpretation
    if photometric == "YBR_FULL_422" and image.columns % 2:
        raise TranscodeError("YBR_FULL_422 frames with an odd number of columns have no native form")
    options: dict[str, Any] = {
        "rows": image.rows,
        "columns": image.columns,
        "samples_per_pixel": image.samples_per_pixel,
        "bits_allocated": image.bits_allocated,
        "bits_stored": image.bits_stored,
        "pixel_representation": image.pixel_representation,
        "photometric_interpretation": photometric,
        "planar_configuration": image.planar_configuration,
        "number_of_frames": 1,
        "as_rgb": False,
    }
    try:
        arr, props = decoder.as_array(encapsulate([encoded]), **options)
    except Exception as exc:  # plugins raise RuntimeError, ValueError, their own errors
        raise TranscodeError(f"cannot decode a {transfer_syntax} frame: {why(exc)}") from exc
    if photometric == "YBR_FULL_422" and props.get("photometric_interpretation") == "YBR_FULL_422":
        arr = pack_ybr_422(arr)
    return _little_endian_bytes(arr)


def pack_ybr_422(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Full-resolution YCbCr (rows, columns, 3), columns even, as native YBR_FULL_422 (PS3.3 C.7.6.3.1.2): for
    each pair of pixels Y1 Y2 Cb Cr, the chroma being the pair's mean (rounded half up)."""
    rows, columns = arr.shape[0], arr.shape[1]
    wide = arr.astype(np.int64)
    pairs = wide.reshape(rows, columns // 2, 2, 3)
    chroma = (pairs[:, :, 0, 1:] + pairs[:, :, 1, 1:] + 1) // 2
    out = np.concatenate([pairs[:, :, :, 0], chroma], axis=2)  # (rows, pairs, 4): Y1 Y2 Cb Cr
    return out.astype(arr.dtype).reshape(rows, columns * 2)


def _little_endian_bytes(arr: np.ndarray[Any, Any]) -> bytes:
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


def aligned_range(offset: int, length: int, value_offset: int, width: int) -> tuple[int, int]:
    """The byte range to read so that a frame at `offset` of a big-endian value starting at `value_offset` can
    be swapped word by word: widened to whole `width`-byte words of the value."""
    if width <= 1:
        return offset, length
    rel = offset - value_offset
    start = rel - rel % width
    end = rel + length
    end += (-end) % width
    return value_offset + start, end - start


def native_frame(data: bytes, offset: int, read_offset: int, length: int, width: int) -> bytes:
    """A frame read (as `aligned_range` said) from big-endian native Pixel Data, as little-endian bytes."""
    if width <= 1:
        return data
    skip = offset - read_offset
    return swap_bytes(data, width)[skip : skip + length]


def extract_bits(data: bytes, first_bit: int, bit_count: int) -> bytes:
    """Bits [first_bit, first_bit + bit_count) of bit-packed data (least significant bit first, PS3.5 8.1.1),
    re-packed from bit 0 and zero-padded to whole bytes: one frame of 1-bit Pixel Data whose frames do not
    start on byte boundaries, in the form a single-frame native Pixel Data value has."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    frame = bits[first_bit : first_bit + bit_count]
    if len(frame) != bit_count:
        raise TranscodeError("1-bit Pixel Data is shorter than the frame asked for")
    return np.packbits(frame, bitorder="little").tobytes()


def frames_of_file(data: bytes, frames: list[int]) -> list[bytes]:
    """Native little-endian bytes of 1-based `frames` read from a whole Part 10 file: used where frames have no
    byte offsets in the stored file (Deflated Explicit VR Little Endian)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        source = str(ds.file_meta.get("TransferSyntaxUID") or "")
        if is_compressed(source):
            ds.decompress(generate_instance_uid=False)
        pixel = bytes(ds.PixelData)
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
        count = int(ds.get("NumberOfFrames") or 1)
        if str(ds.get("PhotometricInterpretation", "")).endswith("_422"):
            samples = 2  # horizontally subsampled native YBR: two samples per pixel on average (PS3.3 C.7.6.3.1.2)
        if not is_compressed(source) and not PydicomUID(source).is_little_endian:
            pixel = swap_bytes(pixel, pixel_swap_width(bits, str(ds["PixelData"].VR)))
    except Exception as exc:
        raise TranscodeError(f"cannot read the instance's Pixel Data: {why(exc)}") from exc
    frame_bits = rows * cols * samples * bits
    out: list[bytes] = []
    for number in frames:
        if not 1 <= number <= count:
            raise TranscodeError(f"frame {number} does not exist")
        if frame_bits % 8:
            out.append(extract_bits(pixel, (number - 1) * frame_bits, frame_bits))
            continue
        size = frame_bits // 8
        out.append(pixel[(number - 1) * size : number * size])
    return out
