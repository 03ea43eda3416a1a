"""C-FIND: Study Root and Patient Root at every level through the QIDO-RS engine, with findscu and
pynetdicom; the policy's constraints, denials, cancel and the Query audit events."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.support.dimse_util import TITLE, dcmtk, dimse_audit, dimse_port, require_dcmtk, start
from tests.support.factory import ct, multipart, part10, stow_headers

pytestmark = pytest.mark.timeout(120)

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind


def stow(http: Any, url: str, datasets: list[Dataset]) -> None:
    rsp = http.post(
        f"{url}/dicom-web/studies", content=multipart([part10(d) for d in datasets]), headers=stow_headers()
    )
    assert rsp.status_code == 200, rsp.text


@pytest.fixture
def archive(make_server: Any) -> Any:
    """P1: a CT study (2 series, 3 instances) and an MR study; P2: a CT study; P3: an MG study."""
    require_dcmtk()
    server = start(make_server)
    import httpx

    s1, s2, s3, s4 = (generate_uid() for _ in range(4))
    a, b = generate_uid(), generate_uid()
    data = [
        ct(s1, a, PatientID="P1", PatientName="Doe^John", StudyDate="20240105", AccessionNumber="A1", seed=1),
        ct(s1, a, PatientID="P1", PatientName="Doe^John", StudyDate="20240105", AccessionNumber="A1", seed=2),
        ct(s1, b, PatientID="P1", PatientName="Doe^John", StudyDate="20240105", AccessionNumber="A1", SeriesNumber=2),
        ct(s2, PatientID="P1", PatientName="Doe^John", StudyDate="20230301", Modality="MR"),
        ct(s3, PatientID="P2", PatientName="Roe^Jane", StudyDate="20240610"),
        ct(s4, PatientID="P3", PatientName="Poe^Ann", StudyDate="20240704", Modality="MG"),
    ]
    with httpx.Client(timeout=60, headers=server.headers) as http:
        stow(http, server.url, data)
    server.studies = (s1, s2, s3, s4)
    server.series = (a, b)
    return server


def _associate(server: Any, calling: str, model: str = STUDY_ROOT) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", dimse_port(server), contexts=[build_context(model)], ae_title=TITLE)
    assert assoc.is_established
    return assoc


def find(server: Any, calling: str, model: str = STUDY_ROOT, **keys: Any) -> tuple[list[Dataset], list[int]]:
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    assoc = _associate(server, calling, model)
    matches, statuses = [], []
    try:
        for status, identifier in assoc.send_c_find(query, model):
            statuses.append(int(status.Status))
            if identifier is not None and status.Status in (0xFF00, 0xFF01):
                matches.append(identifier)
    finally:
        assoc.release()
    return matches, statuses


def test_study_root_levels(archive: Any) -> None:
    s1, s2, s3, _s4 = archive.studies
    a, b = archive.series
    # STUDY: wild card on a name, a date range, return keys including computed ones
    found, statuses = find(
        archive,
        "RAD",
        QueryRetrieveLevel="STUDY",
        PatientName="doe*",
        StudyDate="20240101-20241231",
        StudyInstanceUID="",
        ModalitiesInStudy="",
        NumberOfStudyRelatedInstances="",
        AccessionNumber="",
    )
    assert statuses == [0xFF00, 0x0000]
    (study,) = found
    assert study.StudyInstanceUID == s1 and study.NumberOfStudyRelatedInstances == 3
    assert study.QueryRetrieveLevel == "STUDY" and study.RetrieveAETitle == TITLE and study.AccessionNumber == "A1"
    assert "PatientName" in study and "StudyDescription" not in study  # only the requested keys come back
    # UID list matching
    found, _ = find(archive, "RAD", QueryRetrieveLevel="STUDY", StudyInstanceUID=[s2, s3], PatientID="")
    assert sorted(d.PatientID for d in found) == ["P1", "P2"]
    # SERIES within a study
    found, _ = find(
        archive,
        "RAD",
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=s1,
        SeriesInstanceUID="",
        Modality="CT",
        NumberOfSeriesRelatedInstances="",
        SeriesNumber="",
    )
    assert {(d.SeriesInstanceUID, d.NumberOfSeriesRelatedInstances) for d in found} == {(a, 2), (b, 1)}
    # IMAGE within a series
    found, _ = find(
        archive,
        "RAD",
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=s1,
        SeriesInstanceUID=a,
        SOPInstanceUID="",
        SOPClassUID="",
    )
    assert len(found) == 2 and all(d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for d in found)
    # a sequence matching key is not supported: matches continue with FF01 (optional keys not supported)
    item = Dataset()
    item.CodeValue = "X"
    found, statuses = find(
        archive, "RAD", QueryRetrieveLevel="STUDY", StudyInstanceUID=s3, ProcedureCodeSequence=[item]
    )
    assert statuses == [0xFF01, 0x0000] and len(found) == 1


def test_patient_root_patient_level(archive: Any) -> None:
    found, statuses = find(
        archive,
        "RAD",
        PATIENT_ROOT,
        QueryRetrieveLevel="PATIENT",
        PatientID="P*",
        PatientName="",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedInstances="",
    )
    by_id = {d.PatientID: d for d in found}
    assert set(by_id) == {"P1", "P2", "P3"} and statuses[-1] == 0
    assert by_id["P1"].NumberOfPatientRelatedStudies == 2 and by_id["P1"].NumberOfPatientRelatedInstances == 4
    assert str(by_id["P2"].PatientName) == "Roe^Jane"
    # STUDY level under a patient (Patient Root)
    found, _ = find(archive, "RAD", PATIENT_ROOT, QueryRetrieveLevel="STUDY", PatientID="P1", StudyInstanceUID="")
    assert len(found) == 2
    # PATIENT level is not part of the Study Root model
    _, statuses = find(archive, "RAD", QueryRetrieveLevel="PATIENT", PatientID="P1")
    assert statuses == [0xA900]


def test_findscu(archive: Any, tmp_path: Path) -> None:
    out = tmp_path / "rsp"
    out.mkdir()
    run = dcmtk(
        "findscu",
        "-S",
        "-aet",
        "RAD",
        "-aec",
        TITLE,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientID=P1",
        "-k",
        "StudyInstanceUID",
        "-k",
        "StudyDate",
        "-X",
        "-od",
        out,
        "127.0.0.1",
        str(dimse_port(archive)),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    found = [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]
    assert sorted(d.StudyDate for d in found) == ["20230301", "20240105"]
    bad = dcmtk(
        "findscu",
        "-v",
        "-S",
        "-aet",
        "RAD",
        "-aec",
        TITLE,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyDate=2024",
        "127.0.0.1",
        str(dimse_port(archive)),
    )
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in bad.stdout + bad.stderr


def test_policy_constraints_denial_and_audit(archive: Any) -> None:
    # referring dr-who's care list is P1, P2: the same SQL constraints as QIDO-RS, so P3 never shows
    found, _ = find(archive, "REF", QueryRetrieveLevel="STUDY", PatientID="", StudyInstanceUID="")
    assert sorted(d.PatientID for d in found) == ["P1", "P1", "P2"]
    found, _ = find(archive, "REF", PATIENT_ROOT, QueryRetrieveLevel="PATIENT", PatientID="")
    assert sorted(d.PatientID for d in found) == ["P1", "P2"]
    # an auditor may not search images
    found, statuses = find(archive, "AUD", QueryRetrieveLevel="STUDY", PatientID="")
    assert found == [] and statuses == [0x0124]
    records = dimse_audit(archive.dsn, "C-FIND")
    assert all(r["type"]["code"] == "110112" and r["action"] == "E" for r in records)
    denied = [r for r in records if r["agent"]["ae_title"] == "AUD"]
    assert denied and denied[0]["outcome"] == "4" and "auditor" in denied[0]["outcome_desc"]
    query = json.loads(base64.b64decode(records[0]["entity"]["query"]))
    assert query["00080052"]["Value"] == ["STUDY"]
