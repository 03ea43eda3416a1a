"""The checks an instance must pass before it is parsed into index values: the Part 10 structure
(`dicomweb.ingest.wellformed`), the identifying UIDs as written, Number of Frames, the identity attributes, the native
Pixel Data size, and text the index can keep. Each failure is an `InstanceRejected` naming the fault (PS3.4 B.2.3:
C000 cannot understand, A900 data set does not match)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicomweb.ingest import wellformed
from dicomweb.ingest.columns import int_value, text_value
from dicomweb.ingest.reasons import CANNOT_UNDERSTAND, DATASET_MISMATCH, OUT_OF_RESOURCES, InstanceRejected
from dicomweb.uids import is_valid_uid

IDENTITY_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
"""The identifying UIDs, checked on their raw bytes: pydicom strips any whitespace around a UI value, dcmtk only
the padding, so "1.2.3" followed by a line feed would be one instance to us and another to them."""
META_UIDS = {0x00020002: "MediaStorageSOPClassUID", 0x00020003: "MediaStorageSOPInstanceUID"}
NUMBER_OF_FRAMES = 0x00280008
_WANTED = frozenset({*IDENTITY_TAGS, NUMBER_OF_FRAMES})


def check_structure(path: Path) -> wellformed.Structure:
    """The structural checks of `parse_instance` alone (`dicomweb.ingest.wellformed`, and the UIDs as written), for a
    caller that must decode the data set before ingesting it (the C-STORE handler): a refusal then names the
    fault instead of a decoder's exception."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fp:
            return read_structure(fp, size)
    except OSError as exc:
        raise InstanceRejected(
            OUT_OF_RESOURCES, f"the received instance could not be read back: {exc.strerror}"
        ) from None


def read_structure(fp: Any, size: int) -> wellformed.Structure:
    """The Part 10 preamble and prefix (PS3.10 7.1), the element structure, and the UIDs as written."""
    if size < 132:
        raise InstanceRejected(CANNOT_UNDERSTAND, "not a DICOM Part 10 file: shorter than the preamble")
    fp.seek(128)
    if fp.read(4) != b"DICM":
        raise InstanceRejected(
            CANNOT_UNDERSTAND, "not a DICOM Part 10 file: no 'DICM' prefix after the 128-byte preamble"
        )
    try:
        structure = wellformed.check_file(fp, size, wanted=_WANTED)
    except wellformed.Malformed as exc:
        raise InstanceRejected(CANNOT_UNDERSTAND, str(exc)) from None
    _check_raw_uids(structure)
    return structure


def _check_raw_uids(structure: wellformed.Structure) -> None:
    """UIDs as written, before any reader's clean-up: valid once their padding is removed (PS3.5 9.1)."""
    syntax = structure.meta.get(wellformed.TRANSFER_SYNTAX_UID, b"")
    if not is_valid_uid(wellformed.uid_text(syntax) or ""):
        raise InstanceRejected(CANNOT_UNDERSTAND, f"TransferSyntaxUID is not a valid UID: {_raw(syntax)}")
    for tags, where in ((META_UIDS, structure.meta), (IDENTITY_TAGS, structure.values)):
        for tag, keyword in tags.items():
            raw = where.get(tag)
            if raw is not None and raw.rstrip(b"\0 ") and not is_valid_uid(wellformed.uid_text(raw) or ""):
                raise InstanceRejected(DATASET_MISMATCH, f"{keyword} is not a valid UID: {_raw(raw)}")


def _raw(value: bytes) -> str:
    return repr(value[:70].decode("latin-1"))


def number_of_frames(structure: wellformed.Structure, sop_class: str, sop_uid: str) -> int | None:
    """Number of Frames (0028,0008) as written: absent or empty is None; otherwise an IS of one integer of at
    least 1 (PS3.3 C.7.6.6), refused when not (pydicom would read "0" or "x" as no value and count one frame)."""
    raw = structure.values.get(NUMBER_OF_FRAMES)
    if raw is None:
        if structure.lengths.get(NUMBER_OF_FRAMES):  # longer than any IS value
            raise InstanceRejected(DATASET_MISMATCH, "NumberOfFrames is not an integer", sop_class, sop_uid)
        return None
    text = raw.decode("latin-1").strip(" \0")
    if not text:
        return None
    if not (text.lstrip("+").isdigit() and text.isascii()):
        raise InstanceRejected(DATASET_MISMATCH, f"NumberOfFrames is not an integer: {text[:16]!r}", sop_class, sop_uid)
    frames = int(text)
    if frames < 1:
        raise InstanceRejected(
            DATASET_MISMATCH, f"NumberOfFrames is {frames}: it must be at least 1", sop_class, sop_uid
        )
    return frames


def check_storable(metadata: str, rows: Iterable[dict[str, Any]], sop_class: str, sop_uid: str) -> None:
    """Text the index keeps (the DICOM JSON `metadata` and the columns of `rows`) must be valid UTF-8 without NUL
    (PostgreSQL text and jsonb refuse both). PS3.5 6.1 allows NUL in no character string, and a reader in C stops
    at one: such a value is refused, not cut."""
    columns = [v for d in rows for v in d.values() if isinstance(v, str)]
    if "\\u0000" not in metadata and all(_storable(t) for t in [metadata, *columns]):
        return  # the common case, decided without parsing the metadata again
    where = _first_unstorable(json.loads(metadata), "")
    if where is None and all(_storable(t) for t in columns):
        return  # the six characters \\u0000 in some text (JSON escapes their backslash)
    raise InstanceRejected(
        DATASET_MISMATCH,
        f"a text value{f' in {where}' if where else ''} holds a NUL or an undecodable character",
        sop_class,
        sop_uid,
    )


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_unstorable(value: Any, where: str) -> str | None:
    """The DICOM JSON attribute (gggg,eeee) holding the first string that is not storable, or None."""
    if isinstance(value, str):
        return None if _storable(value) else where
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((where, v) for v in value)  # type: ignore[assignment]
    else:
        return None
    for key, item in items:
        inner = f"({key[:4]},{key[4:]})" if isinstance(value, dict) and len(key) == 8 else where
        found = _first_unstorable(item, inner)
        if found is not None:
            return found
    return None


def check_identity(ds: Dataset, sop_class: str, sop_uid: str) -> None:
    meta = ds.file_meta
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = ds.get(keyword)
        if value is None or str(value).strip() == "":
            raise InstanceRejected(DATASET_MISMATCH, f"{keyword} is missing", sop_class, sop_uid)
        if not is_valid_uid(str(value)):
            raise InstanceRejected(
                DATASET_MISMATCH, f"{keyword} is not a valid UID: {str(value)[:70]!r}", sop_class, sop_uid
            )
    if meta.get("MediaStorageSOPInstanceUID") and str(meta.MediaStorageSOPInstanceUID) != sop_uid:
        raise InstanceRejected(
            DATASET_MISMATCH, "MediaStorageSOPInstanceUID differs from SOPInstanceUID", sop_class, sop_uid
        )
    if meta.get("MediaStorageSOPClassUID") and str(meta.MediaStorageSOPClassUID) != str(ds.SOPClassUID):
        raise InstanceRejected(DATASET_MISMATCH, "MediaStorageSOPClassUID differs from SOPClassUID", sop_class, sop_uid)


def dimensions(ds: Dataset, frames: int, sop_class: str, sop_uid: str) -> tuple[int, int, int, int]:
    """Rows, Columns, BitsAllocated and SamplesPerPixel of an image: present and positive (PS3.3 C.7.6.3)."""
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if int_value(ds, k) is None]
    if missing:
        raise InstanceRejected(DATASET_MISMATCH, f"Pixel Data without {', '.join(missing)}", sop_class, sop_uid)
    rows, cols, bits = int_value(ds, "Rows") or 0, int_value(ds, "Columns") or 0, int_value(ds, "BitsAllocated") or 0
    samples = int_value(ds, "SamplesPerPixel") or 1
    if rows <= 0 or cols <= 0 or bits <= 0 or frames <= 0 or samples <= 0:
        raise InstanceRejected(
            DATASET_MISMATCH,
            "Rows, Columns, BitsAllocated, NumberOfFrames must be positive",
            sop_class,
            sop_uid,
        )
    return rows, cols, bits, samples


def native_size(ds: Dataset, length: int, frames: int, sop_class: str, sop_uid: str) -> int:
    """Bits per frame of native Pixel Data, whose length must be what Rows x Columns x SamplesPerPixel x
    BitsAllocated x NumberOfFrames needs (PS3.5 8.1.1, 8.2), plus less than a frame of padding: with more, each
    toolkit would count the frames differently (from NumberOfFrames, or from the length)."""
    rows, cols, bits, samples = dimensions(ds, frames, sop_class, sop_uid)
    if bits != 1 and bits % 8:
        raise InstanceRejected(
            DATASET_MISMATCH, f"BitsAllocated is {bits}: it must be 1 or a multiple of 8", sop_class, sop_uid
        )
    photometric = text_value(ds, "PhotometricInterpretation") or ""
    if photometric.startswith("YBR") and photometric.endswith("_422"):
        samples = 2  # two samples per pixel on average after horizontal subsampling (PS3.3 C.7.6.3.1.2)
    pixel_bits = rows * cols * samples * bits
    expected = (pixel_bits * frames + 7) // 8
    if length < expected:
        raise InstanceRejected(DATASET_MISMATCH, _short(length, expected), sop_class, sop_uid)
    if (length - expected - expected % 2) * 8 >= pixel_bits:
        # Room for another whole frame: pydicom can read it as one (`allow_excess_frames`), others cannot. Less
        # is trailing padding that every reader drops.
        raise InstanceRejected(DATASET_MISMATCH, _long(length, expected), sop_class, sop_uid)
    return pixel_bits


def _long(length: int, expected: int) -> str:
    return (
        f"Pixel Data is {length} bytes; Rows x Columns x SamplesPerPixel x BitsAllocated x NumberOfFrames "
        f"gives {expected}: room for more frames than NumberOfFrames"
    )


def _short(length: int, expected: int) -> str:
    return (
        f"Pixel Data is {length} bytes; Rows x Columns x SamplesPerPixel x BitsAllocated x NumberOfFrames "
        f"needs {expected}"
    )
