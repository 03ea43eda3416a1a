"""Results as DICOM and FHIR: pure builders, no I/O.

- DICOM Segmentation (PS3.3 A.51) built with highdicom: a new series in the source study, referencing its source
  images (Referenced Series Sequence, Derivation Image Sequence), with the algorithm identification (PS3.3
  C.8.20.2: name, version, family) on every segment, Segment Algorithm Type AUTOMATIC, Content Qualification
  RESEARCH (PS3.3 C.7.6.23: not a product result) and a Series Description saying it is AI-generated and not for
  diagnostic use, as IHE AI Results (AIR) asks of AI results.
  A SEG of images without a patient coordinate system (a CR or DX: no Plane Orientation functional group) carries
  Patient Orientation, the General Image module's Type 2C attribute for that case (PS3.3 C.7.6.1), copied
  from the source (the mask's rows and columns are the source's) or empty when the source has none.
- FHIR R4 DiagnosticReport (status preliminary), subject the study's Patient, imagingStudy the ImagingStudy,
  conclusion, and the measurements as contained Observations in `result` (this server does not host
  Observation). Tagged AIAST ("artificial intelligence asserted", HL7 v3 ObservationValue) in meta.security.
  An Observation's code carries the measurement's name as text and, where the SR has a standard concept for it
  (`inference.codes.concepts`: SNOMED CT Volume, DCM Probability), that concept as a Coding, so the report and the
  SR say the same.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.models import Algorithm, ImageInput, Prediction
from inference.registry import Model

NOT_FOR_DIAGNOSIS = "AI-generated; not for diagnostic use"

SEG_SERIES_NUMBER = 9001
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "artificial intelligence asserted",
}
RADIOLOGY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
IMAGING_CATEGORY = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
IMAGING_REPORT = {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
UCUM = "http://unitsofmeasure.org"
CODE_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
}
"""FHIR code system URIs of DICOM Coding Scheme Designators (PS3.16 Table 8-1)."""
UNITS = {"fraction": ("1", "1"), "mm2": ("mm2", "mm2"), "probability": ("1", "1"), "ml": ("mL", "mL")}


def result_uids(series_uid: str, model: Model) -> tuple[str, str]:
    """The output series and instance UIDs of one (series, model, version): the same on every retry, so that a
    retried run finds what an earlier attempt stored instead of storing it twice."""
    seed = [series_uid, model.name, model.version]
    return generate_uid(entropy_srcs=[*seed, "series"]), generate_uid(entropy_srcs=[*seed, "instance"])


def valid_spacing(ds: Dataset) -> tuple[float, float] | None:
    """Pixel Spacing (or Imager Pixel Spacing) when it states a positive spacing; `0\\0` (as in some CR files)
    and malformed values mean unknown."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col):
            return row, col
    return None


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """A multi-valued decimal attribute of `count` finite values, else None (absent or malformed)."""
    try:
        values = tuple(float(v) for v in ds.get(keyword) or ())
    except (TypeError, ValueError):
        return None
    return values if len(values) == count and all(math.isfinite(v) for v in values) else None


def image_input(ds: Dataset) -> ImageInput:
    return ImageInput(
        sop_instance_uid=str(ds.SOPInstanceUID),
        pixels=ds.pixel_array,
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        pixel_spacing=valid_spacing(ds),
        position=_position(ds),
        orientation=_orientation(ds),
    )


def _position(ds: Dataset) -> tuple[float, float, float] | None:
    found = _floats(ds, "ImagePositionPatient", 3)
    return None if found is None else (found[0], found[1], found[2])


def _orientation(ds: Dataset) -> tuple[float, float, float, float, float, float] | None:
    found = _floats(ds, "ImageOrientationPatient", 6)
    return None if found is None else (found[0], found[1], found[2], found[3], found[4], found[5])


def _source(ds: Dataset) -> Dataset:
    """The source as highdicom should see it: a bogus spacing is dropped rather than copied into the SEG."""
    if valid_spacing(ds) is None and ("PixelSpacing" in ds or "ImagerPixelSpacing" in ds):
        ds = ds.copy()
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            if keyword in ds:
                delattr(ds, keyword)
    return ds


def segmentation(
    sources: Sequence[Dataset], prediction: Prediction, algorithm: Algorithm, model: Model, series_uid: str
) -> bytes:
    """The prediction's segments as one binary DICOM SEG instance (Part 10 bytes)."""
    import highdicom as hd  # on first use: ~20 MiB a server that publishes no SEG never needs

    out_series, out_instance = result_uids(series_uid, model)
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=algorithm.family, version=algorithm.version, source="Hounsfield"
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=segment.label,
            segmented_property_category=segment.category,
            segmented_property_type=segment.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        for i, segment in enumerate(prediction.segments)
    ]
    # frames x rows x columns x segments
    pixels = np.stack(
        [np.stack([s.masks[i] for s in prediction.segments], axis=-1) for i in range(len(sources))]
    ).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=[_source(ds) for ds in sources],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=out_series,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=out_instance,
        instance_number=1,
        manufacturer="Hounsfield",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        device_serial_number=f"{model.name}/{model.version}"[:64],
        content_description=NOT_FOR_DIAGNOSIS[:64],
        content_label="AI_RESULT",
        content_creator_name="Hounsfield^AI",
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        series_description=f"AI {model.name} {model.version}: {NOT_FOR_DIAGNOSIS}"[:64],
    )
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" not in shared and "PatientOrientation" not in seg:
        seg.PatientOrientation = sources[0].get("PatientOrientation") or ""
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _quantity(name: str, value: float) -> dict[str, Any]:
    unit = next((u for suffix, u in UNITS.items() if name.endswith(suffix)), None)
    quantity: dict[str, Any] = {"value": round(float(value), 6)}
    if unit is not None:
        quantity.update({"unit": unit[0], "system": UCUM, "code": unit[1]})
    return quantity


def _code(name: str) -> dict[str, Any]:
    """An Observation's code: the measurement's name, and the SR's standard concept for it where there is one."""
    from inference.codes import concepts  # pydicom's SR modules load with the first report

    known = concepts().get(name)
    if known is None or known[0].scheme_designator not in CODE_SYSTEMS:
        return {"text": name}
    concept = known[0]
    coding = {"system": CODE_SYSTEMS[concept.scheme_designator], "code": concept.value, "display": concept.meaning}
    return {"coding": [coding], "text": name}


def diagnostic_report(
    prediction: Prediction,
    algorithm: Algorithm,
    model: Model,
    *,
    patient: str,
    imaging_study: str,
    series_uid: str,
    issued: str,
) -> dict[str, Any]:
    """A preliminary DiagnosticReport of one result (FHIR R4 DiagnosticReport; Observations contained)."""
    device = f"{algorithm.name} {algorithm.version} (model {model.name}/{model.version})"
    observations = [
        {
            "resourceType": "Observation",
            "id": f"m{i}",
            "status": "preliminary",
            "category": [{"coding": [IMAGING_CATEGORY]}],
            "code": _code(name),
            "subject": {"reference": patient},
            "valueQuantity": _quantity(name, value),
            "note": [{"text": f"{NOT_FOR_DIAGNOSIS}; by {device}"}],
        }
        for i, (name, value) in enumerate(sorted(prediction.measurements.items()))
    ]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": {"security": [AIAST]},
        "identifier": [{"system": "urn:hounsfield:inference", "value": f"{series_uid}|{model.name}|{model.version}"}],
        "status": "preliminary",
        "category": [{"coding": [RADIOLOGY]}],
        "code": {"coding": [IMAGING_REPORT], "text": f"AI: {model.task}"},
        "subject": {"reference": patient},
        "imagingStudy": [{"reference": imaging_study}],
        "issued": issued,
        "performer": [{"display": f"Hounsfield AI service: {device}"}],
        "conclusion": prediction.conclusion or NOT_FOR_DIAGNOSIS,
    }
    if observations:
        report["contained"] = observations
        report["result"] = [{"reference": f"#{o['id']}"} for o in observations]
    return report
