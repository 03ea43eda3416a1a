"""A study belongs to one patient: an instance whose Patient ID (or Issuer of Patient ID) differs from that of its
study already in the archive is refused over STOW-RS and C-STORE, stores nothing, names no patient to the sender,
and is audited with both patients; of two concurrent first instances of a study, exactly one patient's is filed."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context

from dicomweb.index import repository
from dicomweb.ingest.parse import parse_instance
from tests.support.dimse_util import (
    TITLE,
    audit_records,
    dcmtk,
    dimse_audit,
    dimse_port,
    indexed,
    require_dcmtk,
    start,
)
from tests.support.factory import ct, multipart, part10, stow_headers

pytestmark = pytest.mark.timeout(180)

FAILED_SOP_SEQUENCE, FAILURE_REASON, ERROR_COMMENT = "00081198", "00081197", "00000902"
CANNOT_UNDERSTAND = 0xC000


def _stow(http: httpx.Client, *datasets: pydicom.Dataset) -> httpx.Response:
    return http.post("/dicom-web/studies", content=multipart([part10(d) for d in datasets]), headers=stow_headers())


def _blob_files(server: Any, sop_uid: str) -> list[Path]:
    return [p for p in Path(server.settings.blob_dir).rglob("*") if sop_uid in p.name]


def _instances(http: httpx.Client, study: str) -> list[str]:
    found = http.get("/dicom-web/instances", params={"StudyInstanceUID": study}).json()
    return sorted(m["00100020"]["Value"][0] for m in found)


def test_stow_refuses_an_instance_of_another_patient(server: Any, http: httpx.Client) -> None:
    study = generate_uid()
    assert _stow(http, ct(study, PatientID="P1")).status_code == 200
    intruder = ct(study, PatientID="P5", PatientName="Other^Patient")
    same_patient = ct(study, PatientID="P1")
    rsp = _stow(http, intruder, same_patient)
    assert rsp.status_code == 202, rsp.text  # the P1 instance is stored, the P5 one is not
    (failed,) = rsp.json()[FAILED_SOP_SEQUENCE]["Value"]
    assert failed["00081155"]["Value"] == [intruder.SOPInstanceUID]
    assert failed[FAILURE_REASON]["Value"] == [CANNOT_UNDERSTAND]
    comment = failed[ERROR_COMMENT]["Value"][0]
    assert "another patient" in comment
    # the sender learns nothing about the patient the study is filed under
    assert "P1" not in rsp.text and "P1" not in rsp.headers.get("Warning", "")
    assert _instances(http, study) == ["P1", "P1"]
    meta = http.get(f"/dicom-web/studies/{study}/series/{intruder.SeriesInstanceUID}/metadata")
    assert meta.status_code == 404
    assert _blob_files(server, intruder.SOPInstanceUID) == []  # its blob was removed with the rolled back rows
    refused = [
        r for r in audit_records(server.dsn) if r.get("entity", {}).get("instance_uid") == intruder.SOPInstanceUID
    ]
    assert len(refused) == 1
    (record,) = refused
    assert record["type"]["code"] == "110104" and record["action"] == "C" and record["outcome"] == "4"
    assert record["entity"]["patient_id"] == "P5" and record["entity"]["study_uid"] == study
    assert "'P1'" in record["outcome_desc"] and "'P5'" in record["outcome_desc"]
    assert record["agent"]["sub"] == "test-admin"


def test_the_issuer_of_patient_id_counts_and_only_refused_parts_fail(http: httpx.Client) -> None:
    study = generate_uid()
    assert _stow(http, ct(study, PatientID="P1", IssuerOfPatientID="HOSP-A")).status_code == 200
    other_issuer = ct(study, PatientID="P1", IssuerOfPatientID="HOSP-B")
    no_issuer = ct(study, PatientID="P1")
    rsp = _stow(http, other_issuer, no_issuer)
    assert rsp.status_code == 409, rsp.text  # none stored
    reasons = [f[FAILURE_REASON]["Value"][0] for f in rsp.json()[FAILED_SOP_SEQUENCE]["Value"]]
    assert reasons == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND]
    assert "HOSP-A" not in rsp.text
    assert _stow(http, ct(study, PatientID="P1", IssuerOfPatientID="HOSP-A")).status_code == 200
    assert len(_instances(http, study)) == 2


def test_a_series_of_another_study_is_refused(http: httpx.Client) -> None:
    series = generate_uid()
    first, other = generate_uid(), generate_uid()
    assert _stow(http, ct(first, series, PatientID="P1")).status_code == 200
    rsp = _stow(http, ct(other, series, PatientID="P1"))
    assert rsp.status_code == 409
    (failed,) = rsp.json()[FAILED_SOP_SEQUENCE]["Value"]
    assert failed[FAILURE_REASON]["Value"] == [0xA900]
    assert http.get("/dicom-web/studies", params={"StudyInstanceUID": other}).json() == []


def test_concurrent_first_instances_of_a_study_file_one_patient(server: Any) -> None:
    """Pairs of STOW-RS requests, each the first instance of a new study, one for P1 and one for P5, sent at once:
    in every pair exactly one is stored, and the study holds that patient's instance only."""
    pairs = [(generate_uid(), i) for i in range(12)]

    def send(args: tuple[str, str]) -> tuple[str, str, int]:
        study, patient = args
        with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as http:
            return study, patient, _stow(http, ct(study, PatientID=patient)).status_code

    jobs = [(study, patient) for study, _ in pairs for patient in ("P1", "P5")]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, jobs))
    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as http:
        for study, _ in pairs:
            statuses = {patient: status for s, patient, status in results if s == study}
            assert sorted(statuses.values()) == [200, 409], statuses
            winner = next(p for p, status in statuses.items() if status == 200)
            assert _instances(http, study) == [winner]


def test_racing_index_transactions_refuse_the_second_patient(dsn: str, tmp_path: Path) -> None:
    """The race itself, made deterministic: the first instance's index transaction has inserted the study and not
    committed when the second (another patient) runs; the second waits in ON CONFLICT and is refused once the
    first commits."""
    study = generate_uid()
    parsed = []
    for patient in ("P1", "P5"):
        path = tmp_path / f"{patient}.dcm"
        path.write_bytes(part10(ct(study, PatientID=patient)))
        parsed.append(parse_instance(path, bulk_threshold=1024))

    async def race() -> type[BaseException] | None:
        first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            tx1, tx2 = first.transaction(), second.transaction()
            await tx1.start()
            await tx2.start()
            await repository.index_instances(first, [(parsed[0], "k1", 1, "a" * 64)])
            waiting = asyncio.create_task(repository.index_instances(second, [(parsed[1], "k2", 1, "b" * 64)]))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # blocked on the first's uncommitted study row
            await tx1.commit()
            try:
                [indexed] = await waiting
            finally:
                await tx2.rollback()
            conflict = indexed.conflict
            if isinstance(conflict, repository.StudyOfAnotherPatient):
                assert (conflict.patient_id, conflict.issuer) == ("P1", None)
                assert indexed.instance_pk is None  # not inserted
            return type(conflict) if conflict is not None else None
        finally:
            await first.close()
            await second.close()

    assert asyncio.run(race()) is repository.StudyOfAnotherPatient


def test_cstore_refuses_an_instance_of_another_patient(make_server: Any, tmp_path: Path) -> None:
    require_dcmtk()
    node = start(make_server)
    study = generate_uid()
    first = tmp_path / "p1.dcm"
    first.write_bytes(part10(ct(study, PatientID="P1")))
    ok = dcmtk("storescu", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", str(dimse_port(node)), first)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    indexed(node)
    intruder = ct(study, PatientID="P5")
    path = tmp_path / "p5.dcm"
    path.write_bytes(part10(intruder))
    run = dcmtk("storescu", "-v", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", str(dimse_port(node)), path)
    output = run.stdout + run.stderr
    assert "Store Response (Error: CannotUnderstand)" in output, output
    # pynetdicom shows the response's Error Comment: no patient named
    ae = AE(ae_title="CT1")
    assoc = ae.associate("127.0.0.1", dimse_port(node), [build_context(CTImageStorage, ExplicitVRLittleEndian)], TITLE)
    assert assoc.is_established
    rsp = assoc.send_c_store(ct(study, PatientID="P5"))
    assoc.release()
    assert rsp.Status == CANNOT_UNDERSTAND and "another patient" in rsp.ErrorComment and "P1" not in rsp.ErrorComment
    with httpx.Client(base_url=node.url, timeout=60, headers=node.headers) as http:
        assert _instances(http, study) == ["P1"]
    assert _blob_files(node, intruder.SOPInstanceUID) == []
    stores = [r for r in dimse_audit(node.dsn, "C-STORE") if r["outcome"] == "4"]
    assert len(stores) == 2
    assert all("'P1'" in r["outcome_desc"] and "'P5'" in r["outcome_desc"] for r in stores)
    assert {r["entity"]["patient_id"] for r in stores} == {"P5"}
