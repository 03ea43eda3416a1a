"""Read and validate one spooled Part 10 file, and compute everything the index keeps about it.

`parse_instance` runs in a worker thread (it does blocking file reads); it never loads bulk values into
memory: element values larger than the bulk data threshold, and Pixel Data, are located by offset
(`dicomweb.pixels.layout`) and left on disk. Its result holds the index columns, the DICOM JSON metadata with
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

from dicomweb.ingest import wellformed
from dicomweb.ingest.checks import (
    check_identity,
    check_storable,
    dimensions,
    native_size,
    number_of_frames,
    read_structure,
)
from dicomweb.ingest.columns import int_value, name_groups, name_search, normalize_date, normalize_time, text_value
from dicomweb.ingest.reasons import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    TRANSFER_SYNTAX_NOT_SUPPORTED,
    WARNING_COERCION,
    InstanceRejected,
)
from dicomweb.pixels import layout
from dicomweb.search.levels import SERIES_TAGS, STUDY_TAGS
from dicomweb.uids import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN

BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
BULK_PREFIX = "studies/"
_TS_TAG = "00083002"  # Available Transfer Syntax UID, added to metadata so clients know the stored syntax


@dataclass(slots=True)
class ParsedInstance:
    """One instance as the index files it: the columns of its study, series and instance rows, its DICOM JSON
    metadata (bulk values as BulkDataURIs, PS3.18 F.2.6), and where its frames and bulk values lie in the file."""

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


def _parse(path: Path, bulk_threshold: int) -> ParsedInstance:
    size = os.path.getsize(path)
    with open(path, "rb") as fp:
        structure = read_structure(fp, size)
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
            check_identity(ds, sop_class, sop_uid)
            frames = number_of_frames(structure, sop_class, sop_uid)
            parsed = _build(ds, fp, size, structure, frames, bulk_threshold)
            for w in caught:
                parsed.warnings.append((WARNING_COERCION, f"value coerced for indexing: {str(w.message)[:200]}"))
    check_storable(
        parsed.metadata,
        (parsed.study, parsed.series, parsed.instance),
        parsed.sop_class_uid,
        parsed.sop_instance_uid,
    )
    return parsed


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
            native_size(ds, length, frames or 1, sop_class, sop_uid)
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

    patient_name = text_value(ds, "PatientName")
    referring = text_value(ds, "ReferringPhysicianName")
    study = {
        "study_uid": study_uid,
        "patient_id": text_value(ds, "PatientID"),
        "issuer_of_patient_id": text_value(ds, "IssuerOfPatientID"),
        "patient_name": patient_name,
        "patient_name_search": name_search(patient_name),
        "patient_birth_date": normalize_date(text_value(ds, "PatientBirthDate")),
        "patient_sex": text_value(ds, "PatientSex"),
        "study_date": normalize_date(text_value(ds, "StudyDate")),
        "study_time": normalize_time(text_value(ds, "StudyTime")),
        "accession_number": text_value(ds, "AccessionNumber"),
        "study_id": text_value(ds, "StudyID"),
        "study_description": text_value(ds, "StudyDescription"),
        "referring_physician_name": referring,
        "referring_physician_search": name_search(referring),
        "patient_name_groups": name_groups(patient_name),
        "referring_physician_groups": name_groups(referring),
    }
    series = {
        "series_uid": series_uid,
        "modality": text_value(ds, "Modality"),
        "series_number": int_value(ds, "SeriesNumber"),
        "series_description": text_value(ds, "SeriesDescription"),
        "body_part_examined": text_value(ds, "BodyPartExamined"),
        "series_date": normalize_date(text_value(ds, "SeriesDate")),
        "series_time": normalize_time(text_value(ds, "SeriesTime")),
        "pps_start_date": normalize_date(text_value(ds, "PerformedProcedureStepStartDate")),
        "pps_start_time": normalize_time(text_value(ds, "PerformedProcedureStepStartTime")),
    }
    instance = {
        "sop_instance_uid": sop_uid,
        "sop_class_uid": sop_class,
        "instance_number": int_value(ds, "InstanceNumber"),
        "transfer_syntax_uid": ts,
        "rows": int_value(ds, "Rows"),
        "columns": int_value(ds, "Columns"),
        "number_of_frames": frames or (1 if pixel else None),
        "bits_allocated": int_value(ds, "BitsAllocated"),
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
            dimensions(ds, frames, sop_class, sop_uid)
            extended = None
            if layout.EXTENDED_OFFSET_TABLE in elements:
                extended = _read_extended(fp, elements, tsu.is_little_endian)
            frame_layout = layout.encapsulated_frames(fp, element, frames, extended)
        else:
            if tsu.is_compressed:
                raise layout.LayoutError("Pixel Data has a defined length in a compressed transfer syntax")
            pixel_bits = native_size(ds, element.length, frames, sop_class, sop_uid)
            if pixel_bits % 8:  # BitsAllocated is 1
                # 1-bit frames that do not end on a byte boundary (PS3.5 8.1.1): served by unpacking bits.
                return {"bits": [element.value_offset, pixel_bits, frames]}
            frame_layout = layout.native_frames(element, pixel_bits // 8, frames)
    except layout.LayoutError as exc:
        raise InstanceRejected(DATASET_MISMATCH, f"Pixel Data: {exc}", sop_class, sop_uid) from None
    return frame_layout.to_json()


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
