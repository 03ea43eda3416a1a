"""Policy constraints narrow QIDO-RS in SQL: results, paging and computed counts only ever see permitted rows."""

from __future__ import annotations

import asyncio

import pytest

from dicomweb.search.access import AccessConstraints, Grant, UnknownConstraint
from dicomweb.search.query import Level, parse_query
from dicomweb.search.service import search
from server.platform import db
from tests.support.factory import ct, multipart, part10, stow_headers


def store_cohort(http) -> None:
    parts = []
    for patient, modality, n_series in (("P1", "CT", 2), ("P1", "MR", 1), ("P2", "CT", 1), ("P3", "MG", 1)):
        study = ct(PatientID=patient, Modality=modality).StudyInstanceUID
        for s in range(n_series):
            series = ct().SeriesInstanceUID
            for i in range(2):
                parts.append(
                    part10(
                        ct(
                            study=study,
                            series=series,
                            PatientID=patient,
                            Modality=modality,
                            InstanceNumber=i + 1,
                            SeriesNumber=s + 1,
                        )
                    )
                )
    resp = http.post("/dicom-web/studies", content=multipart(parts), headers=stow_headers())
    assert resp.status_code == 200, resp.text


def run_search(dsn: str, level: Level, access: AccessConstraints, pairs=()) -> list[dict]:
    async def go() -> list[dict]:
        pool = await db.create_pool(dsn, 1, 2)
        try:
            result = await search(pool, parse_query(level, list(pairs)), "http://x/dicom-web", access)
            return result.matches
        finally:
            await pool.close()

    return asyncio.run(go())


def patients(matches: list[dict]) -> list[str]:
    return sorted(m["00100020"]["Value"][0] for m in matches)


def test_constraints_filter_rows_counts_and_pages(http, server) -> None:
    store_cohort(http)
    everything = run_search(server.dsn, Level.STUDY, AccessConstraints())
    assert patients(everything) == ["P1", "P1", "P2", "P3"]

    only_p1 = run_search(server.dsn, Level.STUDY, AccessConstraints(patient_ids=("P1",)))
    assert patients(only_p1) == ["P1", "P1"]
    assert sorted(m["00201206"]["Value"][0] for m in only_p1) == [1, 2]  # NumberOfStudyRelatedSeries

    page = run_search(
        server.dsn, Level.STUDY, AccessConstraints(patient_ids=("P1",)), [("limit", "1"), ("offset", "1")]
    )
    assert patients(page) == ["P1"]
    beyond = run_search(server.dsn, Level.STUDY, AccessConstraints(patient_ids=("P1",)), [("offset", "2")])
    assert beyond == []

    no_mg = run_search(server.dsn, Level.SERIES, AccessConstraints(modalities_excluded=("MG",)))
    assert sorted({m["00080060"]["Value"][0] for m in no_mg}) == ["CT", "MR"]
    not_p1 = run_search(server.dsn, Level.INSTANCE, AccessConstraints(patient_ids_excluded=("P1",)))
    assert len(not_p1) == 4  # P2 and P3: one series of two instances each
    nothing = run_search(server.dsn, Level.STUDY, AccessConstraints(patient_ids=()))
    assert nothing == []


def test_a_grant_adds_one_patients_rows_at_every_level(http, server) -> None:
    """A break-glass grant: (the limits) OR (the granted patient's rows), so P3's MG study shows although MG is
    excluded, and nothing else of any other patient does; with a study, only that study is added."""
    store_cohort(http)
    granted = AccessConstraints(patient_ids=("P1",), modalities_excluded=("MG",), granted=Grant("P3"))
    assert patients(run_search(server.dsn, Level.STUDY, granted)) == ["P1", "P1", "P3"]
    assert sorted(patients(run_search(server.dsn, Level.SERIES, granted))) == ["P1"] * 3 + ["P3"]
    assert patients(run_search(server.dsn, Level.INSTANCE, granted)) == ["P1"] * 6 + ["P3"] * 2
    assert patients(run_search(server.dsn, Level.SERIES, granted, [("Modality", "MG")])) == ["P3"]
    # The grant never widens what a filter asks for.
    assert patients(run_search(server.dsn, Level.STUDY, granted, [("PatientID", "P2")])) == []

    studies = {
        m["0020000D"]["Value"][0]: m["00100020"]["Value"][0]
        for m in run_search(server.dsn, Level.STUDY, AccessConstraints())
    }
    p1_studies = sorted(uid for uid, patient in studies.items() if patient == "P1")
    one = AccessConstraints(patient_ids=("P2",), granted=Grant("P1", p1_studies[0]))
    assert {m["0020000D"]["Value"][0] for m in run_search(server.dsn, Level.STUDY, one)} == {
        p1_studies[0],
        *(uid for uid, patient in studies.items() if patient == "P2"),
    }
    assert {m["0020000D"]["Value"][0] for m in run_search(server.dsn, Level.INSTANCE, one)} >= {p1_studies[0]}
    wrong_patient = AccessConstraints(patient_ids=(), granted=Grant("P2", p1_studies[0]))
    assert run_search(server.dsn, Level.SERIES, wrong_patient) == []
    # Only a grant: nothing but the grant's rows.
    only_grant = AccessConstraints(patient_ids=(), granted=Grant("P3"))
    assert patients(run_search(server.dsn, Level.STUDY, only_grant)) == ["P3"]


def test_unknown_constraints_are_refused() -> None:
    with pytest.raises(UnknownConstraint):
        AccessConstraints.from_policy({"sites": ["A"]})
    with pytest.raises(UnknownConstraint):
        AccessConstraints.from_policy({"patient_ids": "P1"})
    assert AccessConstraints.from_policy({"patient_ids": ["P2", "P1"]}).patient_ids == ("P1", "P2")
    for bad in (
        {},
        {"patient_id": ""},
        {"patient_id": "P1", "site": "A"},
        ["P1"],
        {"patient_id": "P1", "study_uid": 3},
    ):
        with pytest.raises(UnknownConstraint):
            AccessConstraints.from_policy({"granted": bad})
    grant = AccessConstraints.from_policy({"patient_ids": [], "granted": {"patient_id": "P5", "study_uid": "1.2"}})
    assert grant.granted == Grant("P5", "1.2") and grant.patient_ids == ()
