"""Which attributes belong to the patient/study and series levels of the index (PS3.3 C.7.1.1, C.7.2.1,
C.7.3.1; PS3.18 10.6.3.3), and the columns QIDO-RS matches on."""

from __future__ import annotations

from pydicom.datadict import tag_for_keyword

STUDY_KEYWORDS = (
    # Patient module (PS3.3 C.7.1.1) and Patient Study module (C.7.2.2)
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientBreedDescription",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "AdmittingDiagnosesDescription",
    "Occupation",
    "AdditionalPatientHistory",
    # General Study module (C.7.2.1)
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingService",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "SpecificCharacterSet",
    "TimezoneOffsetFromUTC",
)

SERIES_KEYWORDS = (
    # General Series module (C.7.3.1) and General Equipment (C.7.5.1)
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "Laterality",
    "SeriesDate",
    "SeriesTime",
    "PerformingPhysicianName",
    "ProtocolName",
    "SeriesDescription",
    "SeriesDescriptionCodeSequence",
    "OperatorsName",
    "BodyPartExamined",
    "PatientPosition",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "RequestAttributesSequence",
    "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepDescription",
    "PerformedProtocolCodeSequence",
    "AnatomicalOrientationType",
    "FrameOfReferenceUID",
    "Manufacturer",
    "InstitutionName",
    "StationName",
    "ManufacturerModelName",
    "InstitutionalDepartmentName",
    "SpecificCharacterSet",
    "TimezoneOffsetFromUTC",
)


def _tags(keywords: tuple[str, ...]) -> frozenset[str]:
    out = set()
    for kw in keywords:
        tag = tag_for_keyword(kw)
        if tag is None:
            raise ValueError(f"unknown keyword {kw}")
        out.add(f"{tag:08X}")
    return frozenset(out)


STUDY_TAGS = _tags(STUDY_KEYWORDS)
SERIES_TAGS = _tags(SERIES_KEYWORDS)
