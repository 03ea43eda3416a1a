"""STOW-RS ingests several parts of one request at once (dicomweb/routes/stow.py PIPELINE): the Store Instances
Response (PS3.18 10.5.3) still lists every part in request order, failures in their place, and every
acknowledged instance is in the index when the response arrives."""

from __future__ import annotations

from pydicom.uid import generate_uid

from dicomweb.routes.stow import PIPELINE
from tests.dicomweb.test_stow_errors import FAILED, REFERENCED, counts
from tests.support.factory import ct, multipart, part10, stow_headers

SOP_INSTANCE = "00081155"


def test_many_parts_answer_in_request_order(http, server) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = [ct(study, series, seed=i, InstanceNumber=i + 1) for i in range(3 * PIPELINE + 1)]
    parts = [part10(ds) for ds in datasets]
    bad_at = PIPELINE + 1
    parts.insert(bad_at, b"not DICOM")  # fails in its place, between instances ingested at once
    resp = http.post("/dicom-web/studies", content=multipart(parts), headers=stow_headers())
    assert resp.status_code == 202, resp.text
    body = resp.json()
    stored = [item[SOP_INSTANCE]["Value"][0] for item in body[REFERENCED]["Value"]]
    assert stored == [ds.SOPInstanceUID for ds in datasets]
    assert len(body[FAILED]["Value"]) == 1
    assert counts(server.dsn) == (1, 1, len(datasets))  # all committed before the answer
    listed = http.get(f"/dicom-web/studies/{study}/series/{series}/instances").json()
    assert len(listed) == len(datasets)
