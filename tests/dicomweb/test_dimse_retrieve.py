"""C-MOVE and C-GET: a STOW'd study moved to dcmtk's storescp and fetched by getscu; sub-operation
counts, cancel, unknown destination, bad identifiers and policy denials."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.conftest import free_port
from tests.support.dimse_util import TITLE, dcmtk, dimse_audit, dimse_port, require_dcmtk, start
from tests.support.factory import ct, multipart, part10, stow_headers

pytestmark = pytest.mark.timeout(120)
MOVE = StudyRootQueryRetrieveInformationModelMove
GET = StudyRootQueryRetrieveInformationModelGet


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    require_dcmtk()
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "+xa", "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while dcmtk("echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "storescp did not start"
            time.sleep(0.05)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def archive(make_server: Any, storescp: tuple[int, Path]) -> Any:
    server = start(make_server, destinations=f"STORESCP@127.0.0.1:{storescp[0]}")
    study, series = generate_uid(), generate_uid()
    data = [ct(study, series, seed=i, InstanceNumber=i + 1, PatientID="P1") for i in range(3)]
    other = ct(PatientID="P3", Modality="MG")
    with httpx.Client(timeout=60, headers=server.headers) as http:
        body = multipart([part10(d) for d in [*data, other]])
        assert http.post(f"{server.url}/dicom-web/studies", content=body, headers=stow_headers()).status_code == 200
    server.study, server.series, server.instances, server.mg_study = study, series, data, other.StudyInstanceUID
    return server


def _move(server: Any, calling: str, destination: str, **keys: Any) -> list[Dataset]:
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", dimse_port(server), contexts=[build_context(MOVE)], ae_title=TITLE)
    assert assoc.is_established
    try:
        return [status for status, _ in assoc.send_c_move(query, destination, MOVE)]
    finally:
        assoc.release()


def test_cmove_to_storescp(archive: Any, storescp: tuple[int, Path], tmp_path: Path) -> None:
    _, received = storescp
    run = dcmtk(
        "movescu", "-S", "-aet", "RAD", "-aec", TITLE, "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={archive.study}", "127.0.0.1", str(dimse_port(archive)),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    got = {pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir()}
    assert got == {d.SOPInstanceUID for d in archive.instances}
    # pynetdicom sees the sub-operation counts (PS3.4 C.4.2.1.4-6): pending with remaining 2, 1, 0, then success
    statuses = _move(
        archive, "RAD", "STORESCP", QueryRetrieveLevel="IMAGE", StudyInstanceUID=archive.study,
        SeriesInstanceUID=archive.series, SOPInstanceUID=[d.SOPInstanceUID for d in archive.instances[:2]],
    )  # fmt: skip
    assert [s.Status for s in statuses] == [0xFF00, 0xFF00, 0x0000]
    assert [s.NumberOfRemainingSuboperations for s in statuses[:2]] == [1, 0]
    final = statuses[-1]
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 0)
    records = dimse_audit(archive.dsn, "C-MOVE")
    assert {r["type"]["code"] for r in records} == {"110102", "110104"}
    assert all(r["entity"]["study_uid"] == archive.study and "STORESCP" in r["outcome_desc"] for r in records)


def test_cmove_refusals(archive: Any, storescp: tuple[int, Path]) -> None:
    _, received = storescp
    unknown = dcmtk(
        "movescu", "-v", "-S", "-aet", "RAD", "-aec", TITLE, "-aem", "NOWHERE", "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={archive.study}", "127.0.0.1", str(dimse_port(archive)),
    )  # fmt: skip
    assert "MoveDestinationUnknown" in unknown.stdout + unknown.stderr
    (status,) = _move(archive, "RAD", "NOWHERE", QueryRetrieveLevel="STUDY", StudyInstanceUID=archive.study)
    assert status.Status == 0xA801
    # the identifier lacks the level's unique key
    (status,) = _move(archive, "RAD", "STORESCP", QueryRetrieveLevel="SERIES", StudyInstanceUID=archive.study)
    assert status.Status == 0xA900
    # the policy: an auditor may not read images; MG is restricted to radiologists (referring dr-who has P1, P2)
    (status,) = _move(archive, "AUD", "STORESCP", QueryRetrieveLevel="STUDY", StudyInstanceUID=archive.study)
    assert status.Status == 0x0124
    (status,) = _move(archive, "REF", "STORESCP", QueryRetrieveLevel="STUDY", StudyInstanceUID=archive.mg_study)
    assert status.Status == 0x0124
    assert list(received.iterdir()) == []
    refused = [r for r in dimse_audit(archive.dsn, "C-MOVE") if r["outcome"] == "4"]
    assert {r["http"]["status"] for r in refused} == {0xA801, 0xA900, 0x0124}


def test_cget_with_getscu(archive: Any, tmp_path: Path) -> None:
    out = tmp_path / "got"
    out.mkdir()
    run = dcmtk(
        "getscu", "-S", "-aet", "REF", "-aec", TITLE, "-k", "QueryRetrieveLevel=SERIES",
        "-k", f"StudyInstanceUID={archive.study}", "-k", f"SeriesInstanceUID={archive.series}", "-od", out,
        "127.0.0.1", str(dimse_port(archive)),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    got = [pydicom.dcmread(p) for p in out.iterdir()]
    assert {d.SOPInstanceUID for d in got} == {d.SOPInstanceUID for d in archive.instances}
    assert got[0].PixelData in {d.PixelData for d in archive.instances}


def test_cget_cancel_and_counts(archive: Any) -> None:
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset.SOPInstanceUID)
        if len(received) == 1:  # cancel while the first sub-operation is still open: the rest must not come
            event.assoc.send_c_cancel(11, get_context.context_id)
        return 0x0000

    ae = AE(ae_title="RAD")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    contexts = [build_context(GET), build_context(CTImageStorage)]
    assoc = ae.associate(
        "127.0.0.1",
        dimse_port(archive),
        contexts=contexts,
        ae_title=TITLE,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    get_context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == GET)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = archive.study
    try:
        statuses = [s for s, _ in assoc.send_c_get(query, GET, msg_id=11)]
    finally:
        assoc.release()
    final = statuses[-1]
    assert final.Status == 0xFE00 and len(received) == 1
    assert final.NumberOfCompletedSuboperations == 1 and final.NumberOfRemainingSuboperations == 2
