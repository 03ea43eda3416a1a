"""A 3D T1 MR series for the brain models' tests, made from the MNI152 (ICBM 2009a symmetric) T1 template that
nilearn's wheel ships (nothing downloads): NIfTI voxels and affine -> one MR Image Storage instance per axial slice
(PS3.3 A.4), 16-bit unsigned, with Image Position/Orientation (Patient) and Pixel Spacing from the affine.

NIfTI's affine maps voxels to RAS+ millimetres; DICOM's patient coordinates are LPS+ (PS3.3 C.7.6.2.1.1), so the
first two axes change sign. Slice k holds voxels [:, :, k]: its columns run along the volume's first axis and its
rows along the second (a DICOM pixel (r, c) is voxel (c, r, k)).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

MNI_T1 = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def mni_volume(step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The template as uint16 voxels (scaled to 0..4095) and its LPS affine; `step` > 1 keeps every step-th voxel
    along each axis (a coarser volume for faster tests)."""
    image = nib.load(MNI_T1)
    assert isinstance(image, nib.Nifti1Image)
    data = np.asarray(image.get_fdata(dtype=np.float32))[::step, ::step, ::step]
    affine = RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)
    affine[:3, :3] = affine[:3, :3] * step
    high = float(data.max()) or 1.0
    voxels = np.clip(np.round(data / high * 4095), 0, 4095).astype(np.uint16)
    return voxels, affine


def _base(study: str, series: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID = "MNI152^Template", patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "MR", 1, "T1 MPRAGE (MNI152 template)"
    ds.BodyPartExamined = "HEAD"
    ds.Manufacturer = "Hounsfield tests"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series, "frame"])
    ds.PositionReferenceIndicator = ""
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "3D"
    ds.EchoTrainLength = 1
    ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def mr_series(
    step: int = 2, *, study: str | None = None, series: str | None = None, patient_id: str = "MNI152"
) -> list[Dataset]:
    """The template as an axial MR series (one instance per slice, Instance Number from 1)."""
    voxels, affine = mni_volume(step)
    study, series = study or generate_uid(), series or generate_uid()
    row_dir = affine[:3, 0] / np.linalg.norm(affine[:3, 0])  # along a row: the volume's first axis
    col_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    spacing = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0]))]  # row, column spacing
    thickness = float(np.linalg.norm(affine[:3, 2]))
    out = []
    for k in range(voxels.shape[2]):
        ds = _base(study, series, patient_id)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series, str(k)])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in affine @ np.array([0.0, 0.0, k, 1.0])][:3]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = spacing
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = thickness
        ds.SliceLocation = ds.ImagePositionPatient[2]
        pixels = np.ascontiguousarray(voxels[:, :, k].T)
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out
