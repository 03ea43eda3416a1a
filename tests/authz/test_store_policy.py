"""Every channel asks the policy about each instance it files, on the values the ingest parsed
(dicomweb.ingest.admission): a STOW-RS body is decided per instance, not only by the route's guard; a C-STORE is
decided on the data set as the index files it (each value of a multi-valued Modality), not on another decoding of
it. The shipped policy restricts MG to radiologists and admins, so a technologist's MG is refused (0124H) while its
CT in the same request is stored; the response names only the decision, the audit record the reasons."""

from __future__ import annotations

from typing import Any

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from tests.conftest import LiveServer, bearer
from tests.support.dimse_util import TITLE, audit_records, dimse_audit, dimse_port, start
from tests.support.factory import ct, multipart, part10, stow_headers

NOT_AUTHORIZED = 0x0124
FAILURE_REASON, FAILED_SOP, REFERENCED_SOP, SOP_INSTANCE = "00081197", "00081198", "00081199", "00081155"


def _instances(body: dict[str, Any], tag: str) -> dict[str, dict[str, Any]]:
    items = body.get(tag, {}).get("Value", [])
    return {item[SOP_INSTANCE]["Value"][0]: item for item in items}


def test_stow_decides_each_instance_of_the_body(server: LiveServer) -> None:
    technologist = bearer(server.token(sub="tech-1", roles=["technologist"], scopes=[]))
    study = ct(PatientID="P7").StudyInstanceUID
    allowed = ct(study, PatientID="P7", Modality="CT")
    refused = ct(study, PatientID="P7", Modality="MG")
    response = httpx.post(
        server.dicomweb + "/studies",
        content=multipart([part10(allowed), part10(refused)]),
        headers={**stow_headers(), **technologist},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(_instances(body, REFERENCED_SOP)) == {allowed.SOPInstanceUID}
    failed = _instances(body, FAILED_SOP)[refused.SOPInstanceUID]
    assert failed[FAILURE_REASON]["Value"] == [NOT_AUTHORIZED]
    assert "MG" not in response.text and "restricted" not in response.text  # the reasons: audit record only
    missing = httpx.get(f"{server.dicomweb}/studies/{study}/series/{refused.SeriesInstanceUID}", headers=server.headers)
    assert missing.status_code == 404
    [record] = [
        r
        for r in audit_records(server.dsn)
        if r.get("entity", {}).get("instance_uid") == refused.SOPInstanceUID and r["outcome"] != "0"
    ]
    assert "MG" in record["outcome_desc"] and record["policy"]["decision_id"]


def _send(server: Any, ds: Dataset, calling: str) -> int:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", dimse_port(server), ae_title=TITLE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status)


def test_cstore_decides_on_the_instance_as_the_index_files_it(make_server: Any) -> None:
    server = start(make_server)
    plain_mg = ct(PatientID="P8", Modality="MG")
    assert _send(server, plain_mg, "CT1") == NOT_AUTHORIZED
    # Modality is VM 1; a second value must not hide the first from the policy (the index files "MG\CT").
    two = ct(PatientID="P8")
    two.Modality = ["MG", "CT"]
    assert _send(server, two, "CT1") == NOT_AUTHORIZED
    assert _send(server, ct(PatientID="P8", Modality="CT"), "CT1") == 0x0000
    assert _send(server, ct(PatientID="P8", Modality="MG"), "ADMIN") == 0x0000  # MG is for admins (and readers)
    found = httpx.get(server.dicomweb + "/instances", params={"PatientID": "P8"}, headers=server.headers)
    assert plain_mg.SOPInstanceUID not in found.text and two.SOPInstanceUID not in found.text
    refused = [r for r in dimse_audit(server.dsn, "C-STORE") if r["outcome"] != "0"]
    assert {r["entity"]["instance_uid"] for r in refused} == {plain_mg.SOPInstanceUID, two.SOPInstanceUID}
    assert all("MG" in r["outcome_desc"] and r["policy"]["decision_id"] for r in refused)
