"""Read and validate one spooled Part 10 file, and compute everything the index keeps about it.

`parse_instance` runs in a worker thread (it does blocking file reads); it never loads bulk values into
memory: element values larger than the bulk data threshold, and Pixel Data, are located by offset
(`dicomweb.layout`) and left on disk. Its result holds the index columns, the DICOM JSON metadata with
BulkDataURI placeholders, and the byte ranges of frames and bulk data.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID as PydicomUID

from dicomweb import layout, wellformed
from dicomweb.levels import SERIES_TAGS, STUDY_TAGS
from dicomweb.uids import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, is_valid_uid

# Failure and warning reasons of the Store Instances Response Module (PS3.18 10.5.3, PS3.4 Annex B.2.3).
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_REJECTED = 0x0111  # Duplicate SOP Instance (PS3.7 C.4.2: 0111H)
WARNING_COERCION = 0xB000
WARNING_ELEMENTS_DISCARDED = 0xB006

BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
BULK_PREFIX = "studies/"
_TS_TAG = "00083002"  # Available Transfer Syntax UID, added to metadata so clients know the stored syntax


class InstanceRejected(Exception):
    """The part is not an instance we can store; carries the DICOM failure reason and a readable comment."""

    def __init__(self, reason: int, comment: str, sop_class: str | None = None, sop_instance: str | None = None):
        super().__init__(comment)
        self.reason = reason
        self.comment = comment
        # Only valid UIDs are echoed back (a response's UI values, a Warning header): the comment shows others.
        self.sop_class = sop_class if sop_class and is_valid_uid(sop_class) else None
        self.sop_instance = sop_instance if sop_instance and is_valid_uid(sop_instance) else None


@dataclass(slots=True)
class ParsedInstance:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    study_attrs: dict[str, Any]
    series_attrs: dict[str, Any]
    metadata: str
    bulk: dict[str, list[int]]
    pixel: dict[str, object] | None
    warnings: list[tuple[int, str]] = field(default_factory=list)


# pydicom reports invalid values through the warnings module, which is process-global state.
_warnings_lock = threading.Lock()


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def normalize_date(value: str | None) -> str | None:
    """DA as YYYYMMDD; the ACR-NEMA form YYYY.MM.DD is accepted. Anything else is not indexed."""
    if not value:
        return None
    text = value.replace(".", "").strip()
    return text if len(text) == 8 and text.isdigit() else None


def normalize_time(value: str | None) -> str | None:
    """TM as HHMMSS.FFFFFF (shorter forms kept as they sort); the ACR-NEMA HH:MM:SS form is accepted."""
    if not value:
        return None
    text = value.replace(":", "").strip()
    head = text.split(".")[0]
    if not head.isdigit() or len(head) not in (2, 4, 6):
        return None
    return text


def name_search(value: str | None) -> str | None:
    """Person names for matching: upper case, components and groups separated by single spaces."""
    if not value:
        return None
    text = value.upper().replace("^", " ").replace("=", " ")
    return " ".join(text.split()) or None


def name_groups(value: str | None) -> list[str | None] | None:
    """A person name's component groups (alphabetic, ideographic, phonetic: PS3.5 6.2.1), each normalized as
    `name_search` normalizes a whole name, None for an empty group; None when every group is empty. QIDO-RS
    and C-FIND match each group on its own (`dicomweb.index.search`)."""
    if not value:
        return None
    groups = [name_search(group) for group in value.split("=")[:3]]
    groups += [None] * (3 - len(groups))
    return groups if any(groups) else None


def _data_set_start(fp: Any, size: int) -> int:
    """Offset of the first data set element after the explicit-VR-little-endian File Meta group."""
    pos = 132
    fp.seek(pos)
    while pos + 8 <= size:
        head = fp.read(8)
        group = struct.unpack("<H", head[:2])[0]
        if group != 0x0002:
            return pos
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            length = struct.unpack("<I", fp.read(4))[0]
            pos += 12 + length
        else:
            length = struct.unpack("<H", head[6:8])[0]
            pos += 8 + length
        fp.seek(pos)
    return pos


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


def parse_instance(path: Path, *, bulk_threshold: int) -> ParsedInstance:
    """Read one spooled Part 10 file. The one place where reading input can fail: whatever goes wrong (pydicom
    raises many kinds of exception for malformed input, and recurses on nesting) ends as `InstanceRejected` with
    a reason and a comment naming the problem, never as another exception (PS3.4 B.2.3: C000 cannot understand;
    A700 when the spooled file cannot be read back or memory runs out)."""
    try:
        return _parse(path, bulk_threshold)
    except InstanceRejected:
        raise
    except MemoryError:
        raise InstanceRejected(OUT_OF_RESOURCES, "not enough memory to read the instance") from None
    except RecursionError:
        raise InstanceRejected(CANNOT_UNDERSTAND, "unreadable DICOM: nested too deeply") from None
    except OSError as exc:
        if exc.errno is not None:  # the spool itself failed (EIO, ENOENT): not the sender's fault
            raise InstanceRejected(
                OUT_OF_RESOURCES, f"the received instance could not be read back: {exc.strerror}"
            ) from None
        raise InstanceRejected(CANNOT_UNDERSTAND, f"unreadable DICOM: {_describe(exc)}") from None
    except Exception as exc:
        raise InstanceRejected(CANNOT_UNDERSTAND, f"unreadable DICOM: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__)[:300]


def check_structure(path: Path) -> wellformed.Structure:
    """The structural checks of `parse_instance` alone (`dicomweb.wellformed`, and the UIDs as written), for a
    caller that must decode the data set before ingesting it (the C-STORE handler): a refusal then names the
    fault instead of a decoder's exception."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fp:
            return _structure(fp, size)
    except OSError as exc:
        raise InstanceRejected(
            OUT_OF_RESOURCES, f"the received instance could not be read back: {exc.strerror}"
        ) from None


def _structure(fp: Any, size: int) -> wellformed.Structure:
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


def _parse(path: Path, bulk_threshold: int) -> ParsedInstance:
    size = os.path.getsize(path)
    with open(path, "rb") as fp:
        structure = _structure(fp, size)
        fp.seek(0)
        with _warnings_lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=max(bulk_threshold, 1024) + 1)
            meta = ds.file_meta
            ts = str(meta.get("TransferSyntaxUID") or "")
            sop_class = str(meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID") or "")
            sop_uid = str(ds.get("SOPInstanceUID") or "")
            if not PydicomUID(ts).is_transfer_syntax:
                raise InstanceRejected(
                    TRANSFER_SYNTAX_NOT_SUPPORTED, f"unknown transfer syntax {ts[:64]}", sop_class, sop_uid
                )
            _check_identity(ds, sop_class, sop_uid)
            frames = _number_of_frames(structure, sop_class, sop_uid)
            parsed = _build(ds, fp, size, structure, frames, bulk_threshold)
            for w in caught:
                parsed.warnings.append((WARNING_COERCION, f"value coerced for indexing: {str(w.message)[:200]}"))
    _check_storable(parsed)
    return parsed


def _number_of_frames(structure: wellformed.Structure, sop_class: str, sop_uid: str) -> int | None:
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


def _check_storable(parsed: ParsedInstance) -> None:
    """Text the index keeps must be valid UTF-8 without NUL (PostgreSQL text and jsonb refuse both). PS3.5 6.1
    allows NUL in no character string, and a reader in C stops at one: such a value is refused, not cut."""
    columns = [v for d in (parsed.study, parsed.series, parsed.instance) for v in d.values() if isinstance(v, str)]
    if "\\u0000" not in parsed.metadata and all(_storable(t) for t in [parsed.metadata, *columns]):
        return  # the common case, decided without parsing the metadata again
    where = _first_unstorable(json.loads(parsed.metadata), "")
    if where is None and all(_storable(t) for t in columns):
        return  # the six characters \\u0000 in some text (JSON escapes their backslash)
    raise InstanceRejected(
        DATASET_MISMATCH,
        f"a text value{f' in {where}' if where else ''} holds a NUL or an undecodable character",
        parsed.sop_class_uid,
        parsed.sop_instance_uid,
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


def _check_identity(ds: Dataset, sop_class: str, sop_uid: str) -> None:
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


def _build(
    ds: Dataset, fp: Any, size: int, structure: wellformed.Structure, frames: int | None, bulk_threshold: int
) -> ParsedInstance:
    ts = structure.transfer_syntax
    sop_class = str(ds.SOPClassUID)
    sop_uid = str(ds.SOPInstanceUID)
    study_uid = str(ds.StudyInstanceUID)
    series_uid = str(ds.SeriesInstanceUID)
    tsu = PydicomUID(ts)
    elements: dict[int, layout.Element] = {}
    if ts != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        start = structure.data_set_start
        try:
            elements = layout.walk(fp, start, size, implicit=tsu.is_implicit_VR, little=tsu.is_little_endian)
        except layout.LayoutError as exc:
            # Some writers encode implicit VR under an explicit transfer syntax (or the reverse); pydicom reads
            # such files by detection, and so do we.
            try:
                elements = layout.walk(fp, start, size, implicit=not tsu.is_implicit_VR, little=tsu.is_little_endian)
            except layout.LayoutError:
                raise InstanceRejected(CANNOT_UNDERSTAND, str(exc), sop_class, sop_uid) from None

    if ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        # A deflated data set has no stable byte offsets: frames are served by inflating the whole file.
        pixel: dict[str, object] | None = None
        if wellformed.PIXEL_DATA in structure.lengths:
            length = structure.lengths[wellformed.PIXEL_DATA]
            _native_size(ds, length, frames or 1, sop_class, sop_uid)
            pixel = {"deflated": frames or 1}
    else:
        pixel = _pixel_layout(ds, fp, elements, tsu, frames or 1, sop_class, sop_uid)
    base = f"{BULK_PREFIX}{study_uid}/series/{series_uid}/instances/{sop_uid}/bulk/"
    bulk: dict[str, list[int]] = {}
    json_ds = Dataset()
    json_ds.set_original_encoding(ds.is_implicit_VR, ds.is_little_endian, ds._character_set)
    extra: dict[str, dict[str, Any]] = {}
    for elem_tag in ds.keys():
        tag = int(elem_tag)
        raw = ds.get_item(elem_tag)
        where = elements.get(tag)
        vr = raw.VR if raw is not None and raw.VR else (where.vr if where else None)
        key = f"{tag:08X}"
        if where is not None and vr in BULK_VRS and where.length != 0xFFFFFFFF and where.length > bulk_threshold:
            bulk[key] = [where.value_offset, where.length]
            extra[key] = {"vr": vr, "BulkDataURI": base + key}
            continue
        json_ds[elem_tag] = ds[elem_tag]
    for tag, where in elements.items():
        if tag in (layout.PIXEL_DATA, layout.FLOAT_PIXEL_DATA, layout.DOUBLE_PIXEL_DATA):
            key = f"{tag:08X}"
            if where.length == 0xFFFFFFFF:  # encapsulated: the items up to the end of the last fragment
                last_offset, last_length = where.fragments[-1] if where.fragments else (where.value_offset, 0)
                length = last_offset + last_length - where.value_offset
            else:
                length = where.length
            bulk[key] = [where.value_offset, length]
            vr = where.vr or ("OW" if tsu.is_implicit_VR else "OB")
            extra[key] = {"vr": vr, "BulkDataURI": base + key}
    try:
        doc = json_ds.to_json_dict(bulk_data_threshold=2**31)
    except Exception as exc:  # pydicom raises a variety of errors for values it cannot represent
        raise InstanceRejected(
            CANNOT_UNDERSTAND, f"cannot represent data set as DICOM JSON: {exc}", sop_class, sop_uid
        ) from None
    doc.update(extra)
    doc[_TS_TAG] = {"vr": "UI", "Value": [ts]}
    ordered = {k: doc[k] for k in sorted(doc)}
    metadata = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)
    study_attrs = {k: v for k, v in ordered.items() if k in STUDY_TAGS}
    series_attrs = {k: v for k, v in ordered.items() if k in SERIES_TAGS}

    patient_name = _text(ds, "PatientName")
    referring = _text(ds, "ReferringPhysicianName")
    study = {
        "study_uid": study_uid,
        "patient_id": _text(ds, "PatientID"),
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID"),
        "patient_name": patient_name,
        "patient_name_search": name_search(patient_name),
        "patient_birth_date": normalize_date(_text(ds, "PatientBirthDate")),
        "patient_sex": _text(ds, "PatientSex"),
        "study_date": normalize_date(_text(ds, "StudyDate")),
        "study_time": normalize_time(_text(ds, "StudyTime")),
        "accession_number": _text(ds, "AccessionNumber"),
        "study_id": _text(ds, "StudyID"),
        "study_description": _text(ds, "StudyDescription"),
        "referring_physician_name": referring,
        "referring_physician_search": name_search(referring),
        "patient_name_groups": name_groups(patient_name),
        "referring_physician_groups": name_groups(referring),
    }
    series = {
        "series_uid": series_uid,
        "modality": _text(ds, "Modality"),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription"),
        "body_part_examined": _text(ds, "BodyPartExamined"),
        "series_date": normalize_date(_text(ds, "SeriesDate")),
        "series_time": normalize_time(_text(ds, "SeriesTime")),
        "pps_start_date": normalize_date(_text(ds, "PerformedProcedureStepStartDate")),
        "pps_start_time": normalize_time(_text(ds, "PerformedProcedureStepStartTime")),
    }
    instance = {
        "sop_instance_uid": sop_uid,
        "sop_class_uid": sop_class,
        "instance_number": _int(ds, "InstanceNumber"),
        "transfer_syntax_uid": ts,
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "number_of_frames": frames or (1 if pixel else None),
        "bits_allocated": _int(ds, "BitsAllocated"),
    }
    return ParsedInstance(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=ts,
        study=study,
        series=series,
        instance=instance,
        study_attrs=study_attrs,
        series_attrs=series_attrs,
        metadata=metadata,
        bulk=bulk,
        pixel=pixel,
    )


def _pixel_layout(
    ds: Dataset,
    fp: Any,
    elements: dict[int, layout.Element],
    tsu: PydicomUID,
    frames: int,
    sop_class: str,
    sop_uid: str,
) -> dict[str, object] | None:
    element = elements.get(layout.PIXEL_DATA)
    if element is None:
        for other in (layout.FLOAT_PIXEL_DATA, layout.DOUBLE_PIXEL_DATA):
            element = elements.get(other)
            if element is not None:
                break
    if element is None:
        return None
    try:
        if element.length == 0xFFFFFFFF:
            _dimensions(ds, frames, sop_class, sop_uid)
            extended = None
            if layout.EXTENDED_OFFSET_TABLE in elements:
                extended = _read_extended(fp, elements, tsu.is_little_endian)
            frame_layout = layout.encapsulated_frames(fp, element, frames, extended)
        else:
            if tsu.is_compressed:
                raise layout.LayoutError("Pixel Data has a defined length in a compressed transfer syntax")
            pixel_bits = _native_size(ds, element.length, frames, sop_class, sop_uid)
            if pixel_bits % 8:  # BitsAllocated is 1
                # 1-bit frames that do not end on a byte boundary (PS3.5 8.1.1): served by unpacking bits.
                return {"bits": [element.value_offset, pixel_bits, frames]}
            frame_layout = layout.native_frames(element, pixel_bits // 8, frames)
    except layout.LayoutError as exc:
        raise InstanceRejected(DATASET_MISMATCH, f"Pixel Data: {exc}", sop_class, sop_uid) from None
    return frame_layout.to_json()


def _dimensions(ds: Dataset, frames: int, sop_class: str, sop_uid: str) -> tuple[int, int, int, int]:
    """Rows, Columns, BitsAllocated and SamplesPerPixel of an image: present and positive (PS3.3 C.7.6.3)."""
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if _int(ds, k) is None]
    if missing:
        raise InstanceRejected(DATASET_MISMATCH, f"Pixel Data without {', '.join(missing)}", sop_class, sop_uid)
    rows, cols, bits = _int(ds, "Rows") or 0, _int(ds, "Columns") or 0, _int(ds, "BitsAllocated") or 0
    samples = _int(ds, "SamplesPerPixel") or 1
    if rows <= 0 or cols <= 0 or bits <= 0 or frames <= 0 or samples <= 0:
        raise InstanceRejected(
            DATASET_MISMATCH,
            "Rows, Columns, BitsAllocated, NumberOfFrames must be positive",
            sop_class,
            sop_uid,
        )
    return rows, cols, bits, samples


def _native_size(ds: Dataset, length: int, frames: int, sop_class: str, sop_uid: str) -> int:
    """Bits per frame of native Pixel Data, whose length must be what Rows x Columns x SamplesPerPixel x
    BitsAllocated x NumberOfFrames needs (PS3.5 8.1.1, 8.2), plus less than a frame of padding: with more, each
    toolkit would count the frames differently (from NumberOfFrames, or from the length)."""
    rows, cols, bits, samples = _dimensions(ds, frames, sop_class, sop_uid)
    if bits != 1 and bits % 8:
        raise InstanceRejected(
            DATASET_MISMATCH, f"BitsAllocated is {bits}: it must be 1 or a multiple of 8", sop_class, sop_uid
        )
    photometric = _text(ds, "PhotometricInterpretation") or ""
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


def _read_extended(
    fp: Any, elements: dict[int, layout.Element], little: bool
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    e = "<" if little else ">"
    out = []
    for tag in (layout.EXTENDED_OFFSET_TABLE, layout.EXTENDED_OFFSET_TABLE_LENGTHS):
        el = elements.get(tag)
        if el is None or el.length % 8:
            raise layout.LayoutError("Extended Offset Table without matching lengths")
        fp.seek(el.value_offset)
        raw = fp.read(el.length)
        out.append(tuple(int(x) for x in struct.unpack(e + f"{el.length // 8}Q", raw)))
    return out[0], out[1]
