"""A CT series and a DICOM SEG that segments it, for the OHIF overlay test: the SEG is built with highdicom the
way the AI outputs are (inference/outputs.py): one binary segment ("Bone", the phantom's bright disk) on every
slice, referencing the CT instances by SOP Instance UID and sharing their Frame of Reference (PS3.3 A.51)."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from tests.ohif_data import ct_series, phantom

SEGMENT_LABEL = "Bone"


def ct_with_seg(count: int = 10, size: int = 256) -> tuple[list[Dataset], Dataset]:
    series = ct_series(count, size)
    for ds in series:
        ds.PatientBirthDate, ds.PatientSex, ds.StudyID, ds.ReferringPhysicianName = "19700101", "O", "1", ""
        ds.SeriesDescription = "Axial phantom, segmented"
    masks = np.stack([phantom(i, count, size) > 1024 + 600 for i in range(count)]).astype(np.uint8)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Bone,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=series,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Hounsfield tests",
        manufacturer_model_name="ohif-seg",
        software_versions="1",
        device_serial_number="1",
        series_description="SEG of the phantom",
    )
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return series, pydicom.dcmread(io.BytesIO(buffer.getvalue()))
