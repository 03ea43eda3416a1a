"""The deterministic synthetic CT data set of benchmarks/compare.py: 512 x 512 16-bit Explicit VR Little
Endian slices of a smooth phantom with noise (so it compresses like CT), realistic patient, study and series
attributes spread over patients and dates, generated once into a cache folder named by its parameters.

Layout: studies of 200 instances (series of 100, 60 and 40 slices), one patient per study, study dates one week
apart from 2019-01-07; the first study's first series is the 100-instance series the benchmark times. A separate
study (patient `CSTORE`) holds the files sent with C-STORE. UIDs derive from the parameters (`2.25.` + a hash), so
every run sends the very same bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

VERSION = 1
SERIES_SIZES = (100, 60, 40)
SURNAMES = ("SMITH", "JONES", "GARCIA", "MILLER", "DAVIS", "MARTIN", "BROWN", "WILSON", "MOORE", "TAYLOR")
GIVEN = ("ANN", "JOHN", "MARIA", "PETER", "LINDA", "JAMES", "SARA", "DAVID", "EMMA", "PAUL")


def uid(*parts: object) -> str:
    """A deterministic UID under the 2.25 root (PS3.5 B.2: a UUID as an integer)."""
    digest = hashlib.sha256(repr(("hounsfield-compare", VERSION, *parts)).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def phantom(rows: int, columns: int, z: int, seed: int) -> bytes:
    """A 16-bit signed CT-like slice: an elliptical body, an organ whose centre drifts with z, noise."""
    y, x = np.mgrid[0:rows, 0:columns]
    body = 1000.0 * (((x - columns / 2) ** 2 / (0.42 * columns) ** 2 + (y - rows / 2) ** 2 / (0.35 * rows) ** 2) < 1)
    cx, cy = (0.5 + 0.15 * np.sin(z / 17)) * columns, (0.45 + 0.1 * np.cos(z / 23)) * rows
    organ = 300.0 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.01 * rows * columns))
    noise = np.random.default_rng(seed).normal(0, 12, (rows, columns))
    return bytes(np.clip(body + organ + noise - 1000, -1024, 3071).astype(np.int16).tobytes())


def slice_dataset(study: int, series: int, number: int, rows: int, *, patient: str, seed: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid("sop", rows, patient, study, series, number)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = uid("study", rows, patient, study)
    ds.SeriesInstanceUID = uid("series", rows, patient, study, series)
    ds.PatientName = f"{SURNAMES[study % 10]}^{GIVEN[(study // 10) % 10]}{study}"
    ds.PatientID = patient
    ds.PatientBirthDate = f"{1940 + study % 50}0{1 + study % 9}15"
    ds.PatientSex = "FM"[study % 2]
    when = datetime.date(2019, 1, 7) + datetime.timedelta(weeks=study)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime, ds.SeriesTime = "093000", f"09{31 + series:02d}00"
    ds.AccessionNumber = f"ACC{100000 + study}"
    ds.StudyID = str(study + 1)
    ds.StudyDescription = "CT CHEST ABDOMEN PELVIS W CONTRAST"
    ds.SeriesDescription = ("AXIAL 1.25MM", "AXIAL 5MM", "CORONAL MPR")[series % 3]
    ds.ReferringPhysicianName = "WELBY^MARCUS"
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "CT", "CHEST", "SYNTHETIC"
    ds.SeriesNumber, ds.InstanceNumber = series + 1, number + 1
    ds.ImagePositionPatient = [-250.0, -250.0, -1.25 * number]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness, ds.PixelSpacing = 1.25, [0.9765625, 0.9765625]
    ds.FrameOfReferenceUID = uid("for", rows, patient, study)
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth, ds.KVP = 40, 400, 120
    ds.PixelData = phantom(rows, rows, number, seed)
    return ds


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class DataSet:
    """Paths of the generated files: `stow` (sent with STOW-RS), `cstore` (sent with C-STORE), and the UIDs of the
    100-instance series."""

    folder: Path
    stow: list[Path] = field(default_factory=list)
    cstore: list[Path] = field(default_factory=list)
    study: str = ""
    series: str = ""
    patient: str = ""
    patient_name: str = ""
    first_date: str = ""


def generate(root: Path, instances: int, cstore: int, rows: int = 512) -> DataSet:
    """Make (or reuse) the data set in `root/compare-<key>`; the key changes with every parameter."""
    params = {"version": VERSION, "instances": instances, "cstore": cstore, "rows": rows, "series": SERIES_SIZES}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    folder = root / f"compare-{key}"
    plan: list[tuple[str, int, int, int, str]] = []  # (part, study, series, number, patient)
    per_study = sum(SERIES_SIZES)
    for i in range(instances):
        study, offset = divmod(i, per_study)
        series = 0
        while offset >= SERIES_SIZES[series]:
            offset -= SERIES_SIZES[series]
            series += 1
        plan.append(("stow", study, series, offset, f"PAT{study:05d}"))
    plan += [("cstore", 0, 0, n, "CSTORE") for n in range(cstore)]
    out = DataSet(folder)
    done = (folder / "done.json").exists() and json.loads((folder / "done.json").read_text()) == params
    folder.mkdir(parents=True, exist_ok=True)
    for seq, (part, study, series, number, patient) in enumerate(plan):
        path = folder / part / f"{study:04d}-{series}-{number:04d}.dcm"
        if not done:
            path.parent.mkdir(exist_ok=True)
            ds = slice_dataset(study, series, number, rows, patient=patient, seed=seq)
            path.write_bytes(part10(ds))
        (out.stow if part == "stow" else out.cstore).append(path)
    (folder / "done.json").write_text(json.dumps(params))
    first = pydicom.dcmread(out.stow[0], stop_before_pixels=True)
    out.study, out.series, out.patient = first.StudyInstanceUID, first.SeriesInstanceUID, first.PatientID
    out.patient_name, out.first_date = str(first.PatientName), first.StudyDate
    return out
