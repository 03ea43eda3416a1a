"""A CT series and a DICOM SEG that segments it, for the OHIF overlay test. The SEG is made by the AI results'
own builder (`inference.outputs.segmentation`, the one every model's SEG goes through): one binary segment
("Bone", the phantom's bright disk) on every slice, referencing the CT instances by SOP Instance UID and sharing
their Frame of Reference (PS3.3 A.51), with the algorithm identification and the AI / not-for-diagnosis marking
of an AI result."""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.models import Algorithm, Prediction, Segment
from inference.outputs import segmentation
from inference.registry import parse_model
from tests.support.ohif_data import ct_series, phantom

SEGMENT_LABEL = "Bone"
ALGORITHM = Algorithm("phantom-bone", "1.0", codes.cid7162.ArtificialIntelligence)


def ct_with_seg(count: int = 10, size: int = 256) -> tuple[list[Dataset], Dataset]:
    series = ct_series(count, size)
    for ds in series:
        ds.PatientBirthDate, ds.PatientSex, ds.StudyID, ds.ReferringPhysicianName = "19700101", "O", "1", ""
        ds.SeriesDescription = "Axial phantom, segmented"
    masks = tuple(phantom(i, count, size) > 1024 + 600 for i in range(count))
    prediction = Prediction((Segment(SEGMENT_LABEL, codes.SCT.Tissue, codes.SCT.Bone, masks),))
    model = parse_model(
        {"name": "bone", "version": "1.0", "task": "phantom bone", "backend": {"adapter": "phantom-bone"}},
        ["phantom-bone"],
    )
    data = segmentation(series, prediction, ALGORITHM, model, str(series[0].SeriesInstanceUID))
    return series, pydicom.dcmread(io.BytesIO(data))
