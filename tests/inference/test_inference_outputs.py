"""The result builders against what DICOM and FHIR ask of them: a SEG of a chest CR carries Patient Orientation
(General Image, Type 2C when there is no Plane Orientation); an SR using the private scheme `99HOUNSFIELD`
declares it in the Coding Scheme Identification Sequence; a DiagnosticReport's Observations carry the standard
codes the SR uses (SNOMED CT Volume for the intracranial volume, DCM Probability for the tumour probability)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from fhir.validation import check_resource
from inference.models import Algorithm, Prediction, Segment
from inference.outputs import diagnostic_report, segmentation
from inference.registry import parse_model
from inference.sr import PRIVATE, measurement_report
from tests.inference.test_inference_e2e import CHEST, LUNGS
from tests.support.data import sample

ALGORITHM = Algorithm("test-algorithm", "1", codes.cid7162.ArtificialIntelligence)
MODEL = parse_model(LUNGS, ["chest-xray-lung-fields"])


def chest() -> Dataset:
    return pydicom.dcmread(sample(CHEST))


def test_seg_of_a_radiograph_has_patient_orientation() -> None:
    source = chest()
    assert "ImageOrientationPatient" not in source
    mask = np.zeros((source.Rows, source.Columns), dtype=bool)
    mask[10:50, 10:50] = True
    lungs = Segment("Lung fields", codes.SCT.Organ, codes.SCT.Lung, (mask,))
    data = segmentation([source], Prediction(segments=(lungs,)), ALGORITHM, MODEL, source.SeriesInstanceUID)
    seg = pydicom.dcmread(io.BytesIO(data))
    assert "PlaneOrientationSequence" not in seg.SharedFunctionalGroupsSequence[0]
    assert "PatientOrientation" in seg
    assert seg.PatientOrientation == (source.get("PatientOrientation") or "")


def test_sr_declares_its_private_coding_scheme() -> None:
    source = chest()
    prediction = Prediction(
        measurements={"tumor_probability": 0.25, "custom_score": 3.0},
        findings={"predicted class": "glioma"},
        finding_images=(0,),
    )
    sr = pydicom.dcmread(io.BytesIO(measurement_report([source], prediction, ALGORITHM, MODEL, "1.2.3")))
    used = set()

    def walk(ds: Dataset) -> None:
        for element in ds:
            if element.keyword == "CodingSchemeDesignator":
                used.add(str(element.value))
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)

    walk(sr)
    assert PRIVATE in used
    [declared] = [d for d in sr.CodingSchemeIdentificationSequence if d.CodingSchemeDesignator == PRIVATE]
    assert declared.CodingSchemeName and declared.CodingSchemeResponsibleOrganization == "Hounsfield"
    # a report with standard codes only declares nothing private
    plain = Prediction(measurements={"tumor_probability": 0.25})
    sr = pydicom.dcmread(io.BytesIO(measurement_report([source], plain, ALGORITHM, MODEL, "1.2.3")))
    assert all(d.CodingSchemeDesignator != PRIVATE for d in sr.get("CodingSchemeIdentificationSequence", []))


def test_report_observations_carry_standard_codes() -> None:
    prediction = Prediction(
        measurements={"total_intracranial_volume_ml": 1450.0, "tumor_probability": 0.2, "lung_area_fraction": 0.3}
    )
    report = diagnostic_report(
        prediction,
        ALGORITHM,
        MODEL,
        patient="Patient/p1",
        imaging_study="ImagingStudy/s1",
        series_uid="1.2.3",
        issued="2026-01-01T00:00:00Z",
    )
    check_resource("DiagnosticReport", report)
    by_name = {o["code"]["text"]: o for o in report["contained"]}
    [volume] = by_name["total_intracranial_volume_ml"]["code"]["coding"]
    assert (volume["system"], volume["code"]) == ("http://snomed.info/sct", "118565006")
    assert by_name["total_intracranial_volume_ml"]["valueQuantity"]["code"] == "mL"
    [probability] = by_name["tumor_probability"]["code"]["coding"]
    assert (probability["system"], probability["code"]) == ("http://dicom.nema.org/resources/ontology/DCM", "122157")
    assert "coding" not in by_name["lung_area_fraction"]["code"]  # no standard concept: the name only
