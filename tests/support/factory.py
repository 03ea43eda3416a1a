"""Generated instances for tests: small CT-like images with chosen UIDs and attributes."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct(
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    *,
    rows: int = 16,
    columns: int = 16,
    frames: int = 1,
    seed: int = 0,
    **attrs: object,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P1"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, size=(frames, rows, columns), dtype=np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def part10(ds: Dataset, *, enforce: bool = True) -> bytes:
    """Part 10 bytes; `enforce=False` keeps the file meta exactly as set (to write inconsistent files)."""
    buf = io.BytesIO()
    if not enforce:
        ds.preamble = b"\0" * 128
    pydicom.dcmwrite(buf, ds, enforce_file_format=enforce)
    return buf.getvalue()


def multipart(parts: list[bytes], boundary: str = "hfboundary", content_type: str = "application/dicom") -> bytes:
    out = b""
    for p in parts:
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def stow_headers(boundary: str = "hfboundary") -> dict[str, str]:
    return {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
