"""Data for the OHIF tests: a 20-slice 512x512 16-bit CT series (tests/support/factory.py `ct`) whose slices differ
visibly, and one other study."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.factory import ct


@dataclass(frozen=True)
class Studies:
    ct_study: str
    ct_series: str
    ct_instances: tuple[str, ...]
    other_study: str


CT_PATIENT = ("Phantom^Ohif", "HF-OHIF-1", "ACC-OHIF-CT")
OTHER_PATIENT = ("Second^Study", "HF-OHIF-2", "ACC-OHIF-2")


def phantom(index: int, count: int, size: int = 512) -> np.ndarray:
    """A CT-like slice (stored values, rescale intercept -1024): air, a water ellipse, and a bone disk that moves
    and grows with the slice index, so each slice renders differently; with CT-like noise, so that a lossless
    HTJ2K frame is larger than the 64 KiB first stage of a progressive (byte range) load."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.full((size, size), 24, dtype=np.float32)  # -1000 HU
    body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.33) ** 2 <= 1
    image[body] = 1024 + 40 + 30 * np.sin(12 * x[body]) * np.cos(9 * y[body])
    t = index / max(count - 1, 1)
    cx, cy, r = 0.25 + 0.5 * t, 0.5 + 0.15 * math.sin(2 * math.pi * t), 0.04 + 0.06 * t
    image[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = 1024 + 1200
    image += np.random.default_rng(index).normal(0, 12, image.shape)
    return np.clip(image, 0, 4095).astype(np.uint16)


def ct_series(count: int = 20, size: int = 512) -> list[Dataset]:
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    name, patient_id, accession = CT_PATIENT
    out = []
    for i in range(count):
        ds = ct(study, series, rows=size, columns=size, seed=i)
        ds.PixelData = phantom(i, count, size).tobytes()
        ds.PatientName, ds.PatientID, ds.AccessionNumber = name, patient_id, accession
        ds.StudyDescription, ds.SeriesDescription = "OHIF phantom", "Axial phantom"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-250.0, -250.0, -100.0 + 5.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [500.0 / size, 500.0 / size]
        ds.SliceThickness = 5.0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.FrameOfReferenceUID = frame_of_reference
        out.append(ds)
    return out


def other_study() -> Dataset:
    name, patient_id, accession = OTHER_PATIENT
    ds = ct(rows=64, columns=64, seed=99)
    ds.PatientName, ds.PatientID, ds.AccessionNumber = name, patient_id, accession
    ds.StudyDescription = "Second study"
    return ds


def iter_chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
