"""The coded concepts of AI results shared by the DICOM SR (`inference.sr`) and the FHIR DiagnosticReport
(`inference.outputs`): a measurement's name -> its SNOMED CT / DCM concept and UCUM unit, so that both reports
code the same measurement alike. Imported when the first report is built (pydicom's SR modules stay out of a
server that publishes no AI result)."""

from __future__ import annotations

import functools

from pydicom.sr.coding import Code

MILLILITER = Code("ml", "UCUM", "milliliter")
PROBABILITY_UNIT = Code("1", "UCUM", "no units")


@functools.cache
def concepts() -> dict[str, tuple[Code, Code]]:
    """Measurement name -> (concept name, unit)."""
    from pydicom.sr.codedict import codes

    return {
        "total_intracranial_volume_ml": (codes.SCT.Volume, MILLILITER),
        "tumor_probability": (codes.DCM.Probability, PROBABILITY_UNIT),
    }
