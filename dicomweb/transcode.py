"""Decoding to native (uncompressed) encodings: whole instances and single frames (PS3.18 8.7.3.4).

Every origin server must be able to return a data set in Explicit VR Little Endian whatever form it was stored
in (PS3.18 8.7.3.4 Note 2). This module does that and the cheaper conversions between the uncompressed transfer
syntaxes (Implicit/Explicit VR Little Endian, Explicit VR Big Endian, Deflated Explicit VR Little Endian).
Encoding into compressed transfer syntaxes is `dicomweb.encode`'s; `transcode_instance` hands it those targets.

Pure and blocking (house style 1): bytes in, bytes out, no I/O; callers run these in a worker thread
(`anyio.to_thread`), because decoding a large multi-frame image takes seconds of CPU.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID as PydicomUID

from dicomweb.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

UNCOMPRESSED = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    }
)
"""Transfer syntaxes whose Pixel Data is native: we can write any of them from any data set we can read."""

# Value widths of the binary VRs whose bytes follow the data set's byte order (PS3.5 7.3).
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


class TranscodeError(Exception):
    """The stored data cannot be turned into the requested transfer syntax (no decoder, corrupt codestream)."""


def why(exc: BaseException) -> str:
    """A codec's or pydicom's error as one short line for a 406 reason: pydicom and the plugins put several
    lines (and whole tracebacks of the plugins they tried) in their messages."""
    lines: list[str] = []
    for line in str(exc).splitlines():
        if line.startswith("Traceback"):
            break
        if line.strip():
            lines.append(line.strip())
    text = " ".join(lines[:3]) or type(exc).__name__
    return text[:300]


def is_compressed(transfer_syntax: str) -> bool:
    """Encapsulated Pixel Data (PS3.5 A.4): any known syntax that is not one of the native ones."""
    return transfer_syntax not in UNCOMPRESSED


def can_decode(transfer_syntax: str) -> bool:
    """Is there a pydicom decoder with an installed plugin for this (compressed) transfer syntax?"""
    if not is_compressed(transfer_syntax):
        return True
    try:
        decoder = get_decoder(PydicomUID(transfer_syntax))
    except NotImplementedError:
        return False
    return bool(decoder.is_available)


def can_transcode(stored: str, target: str) -> bool:
    """Can a stored instance be returned in `target`? Same syntax: always; otherwise when the stored one is native
    or we can decode it, and the target is native or has an encoder (`dicomweb.encode`; whether the image suits
    the encoder, e.g. JPEG baseline for 8-bit data only, is found when encoding)."""
    if stored == target:
        return True
    if target not in UNCOMPRESSED:
        from dicomweb import encode

        if not encode.can_encode(target):
            return False
    return can_decode(stored)


# ---------------------------------------------------------------------------------------------- whole instances


def read_dataset(data: bytes) -> Dataset:
    """A stored Part 10 file as a data set ready to be written in another encoding. pydicom leaves elements as read
    until they are used; one read from implicit VR data inside an explicit VR file (an encoder error the ingest
    accepts with a warning, PS3.5 7.1.2) has no VR until then, and pydicom cannot write it. Every element is
    resolved here (its VR from the data dictionary, UN for unknown private ones)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for _element in ds.iterall():
        pass
    return ds


def dataset_in(data: bytes, target: str) -> Dataset:
    """A stored Part 10 file as a data set in the transfer syntax `target`: Pixel Data decoded, byte-swapped or
    encoded as needed, the file meta's Transfer Syntax UID set. For senders that must send an instance in the
    syntax a peer accepted (PS3.8 9.3: a presentation context fixes one transfer syntax); `can_transcode` says
    beforehand whether it can be done. Raises `TranscodeError` when it cannot."""
    return pydicom.dcmread(io.BytesIO(transcode_instance(data, target)))


def transcode_instance(data: bytes, target: str) -> bytes:
    """A Part 10 file re-encoded in the transfer syntax `target` (decoding Pixel Data when needed; compressed
    targets are encoded by `dicomweb.encode`)."""
    if target not in UNCOMPRESSED:
        from dicomweb import encode

        if not encode.can_encode(target):
            raise TranscodeError(f"encoding into {target} is not supported")
        return encode.encode_instance(data, target)
    try:
        ds = read_dataset(data)
        source = str(ds.file_meta.get("TransferSyntaxUID") or "")
        if source == target:
            return data
        if is_compressed(source):
            if not can_decode(source):
                raise TranscodeError(f"no decoder is installed for {source}")
            ds.decompress(generate_instance_uid=False)  # -> Explicit VR Little Endian
            source = EXPLICIT_VR_LITTLE_ENDIAN
        target_uid = PydicomUID(target)
        if PydicomUID(source).is_little_endian != target_uid.is_little_endian:
            _swap_byte_order(ds)
        ds.file_meta.TransferSyntaxUID = target_uid
        out = io.BytesIO()
        pydicom.dcmwrite(
            out,
            ds,
            implicit_vr=target_uid.is_implicit_VR,
            little_endian=target_uid.is_little_endian,
            enforce_file_format=True,
        )
        return out.getvalue()
    except TranscodeError:
        raise
    except Exception as exc:  # pydicom and the codec plugins raise many kinds of errors for bad input
        raise TranscodeError(f"cannot convert the instance to {target}: {why(exc)}") from exc


def _swap_byte_order(ds: Dataset) -> None:
    """Byte-swap the values pydicom keeps as raw bytes (OW, OF, OL, OD, OV) for a change of endianness.

    pydicom re-encodes numbers (US, SS, UL, FL, ...) in the target byte order itself but leaves these alone
    (see `pydicom.filewriter.dcmwrite`). Pixel Data swaps by Bits Allocated (its VR says OW for any width)."""
    bits = int(ds.get("BitsAllocated") or 16)

    def visit(dataset: Dataset, elem: Any) -> None:
        if not isinstance(elem.value, (bytes, bytearray)) or not elem.value:
            return
        if elem.tag in _PIXEL_TAGS and dataset is ds:
            width = pixel_swap_width(bits, str(elem.VR))
        else:
            width = _SWAP_WIDTH.get(str(elem.VR), 1)
        if width > 1 and len(elem.value) % width == 0:
            elem.value = swap_bytes(bytes(elem.value), width)

    ds.walk(visit)


def pixel_swap_width(bits_allocated: int, vr: str) -> int:
    """How native Pixel Data changes between byte orders: by Bits Allocated for wider pixels; 8-bit (and 1-bit)
    data written as OW swap in 16-bit words (PS3.5 A.3; pydicom reads them so)."""
    if bits_allocated > 8:
        return bits_allocated // 8
    return 2 if vr == "OW" else 1


def swap_bytes(data: bytes, width: int) -> bytes:
    """Reverse the byte order of each `width`-byte word of `data` (a trailing partial word is kept as is)."""
    if width <= 1 or len(data) < width:
        return data
    whole = len(data) - len(data) % width
    arr = np.frombuffer(data, dtype=np.uint8, count=whole).reshape(-1, width)[:, ::-1]
    return arr.tobytes() + data[whole:]


# ---------------------------------------------------------------------------------------------- single frames


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """The Image Pixel module values a decoder needs (PS3.3 C.7.6.3), taken from the index."""

    rows: int
    columns: int
    samples_per_pixel: int = 1
    bits_allocated: int = 16
    bits_stored: int = 16
    pixel_representation: int = 0
    photometric_interpretation: str = "MONOCHROME2"
    planar_configuration: int = 0


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
