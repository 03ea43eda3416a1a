"""What the decoders (`dicomweb.pixels.decode`) and the encoders (`dicomweb.pixels.encode`) both stand on: the native
transfer syntaxes, the Image Pixel module values a codec needs, the one error of pixel conversion, and whole
instances rewritten between native encodings (PS3.5 A.1-A.3, A.5).

The encoders need that last conversion themselves: a data set without Pixel Data asked for in an encapsulated
syntax is written as Explicit VR Little Endian under that syntax's UID (PS3.5 A.4), so it lives here, below both.

Pure and blocking (house style 1): bytes in, bytes out, no I/O; callers run these in a worker thread.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
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


def native_instance(data: bytes, target: str) -> bytes:
    """A Part 10 file re-encoded in the native transfer syntax `target` (one of `UNCOMPRESSED`), its Pixel Data
    decoded first when it is stored compressed. Raises `TranscodeError` when it cannot be done."""
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
