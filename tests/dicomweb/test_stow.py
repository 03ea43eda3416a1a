"""STOW-RS through dicomweb-client and raw HTTP."""

from __future__ import annotations

import pydicom
import pytest

from tests.support.data import sample

FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "emri_small_jpeg_2k_lossless.dcm"]


def test_store_with_dicomweb_client(client, server) -> None:
    datasets = [pydicom.dcmread(sample(f)) for f in FILES]
    result = client.store_instances(datasets)
    refs = result.ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in refs} == {d.SOPInstanceUID for d in datasets}
    # dicomweb-client sends a Host header without the port; RetrieveURL follows the Host header.
    assert all("/dicom-web/studies/" + d.StudyInstanceUID in r.RetrieveURL for r, d in zip(refs, datasets, strict=True))
    assert "FailedSOPSequence" not in result


def test_same_instance_twice_is_idempotent(client) -> None:
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    client.store_instances([ds])
    result = client.store_instances([ds])
    assert result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("overwrite", [False, True])
def test_different_content_same_uid(make_server, overwrite: bool) -> None:
    from dicomweb_client.api import DICOMwebClient
    from requests import HTTPError

    srv = make_server(overwrite=overwrite)
    client = DICOMwebClient(srv.dicomweb, headers=srv.headers)
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    client.store_instances([ds])
    ds.PatientName = "Changed^Name"
    if overwrite:
        client.store_instances([ds])
    else:
        with pytest.raises(HTTPError) as info:
            client.store_instances([ds])
        assert info.value.response.status_code == 409


def test_coerced_values_are_stored_with_a_warning(http) -> None:
    """SC_rgb_jpeg.dcm encodes implicit VR under an explicit VR transfer syntax: stored, with WarningReason B000."""
    from tests.support.factory import multipart, stow_headers

    resp = http.post(
        "/dicom-web/studies", content=multipart([sample("SC_rgb_jpeg.dcm").read_bytes()]), headers=stow_headers()
    )
    assert resp.status_code == 202
    item = resp.json()["00081199"]["Value"][0]
    assert item["00081196"]["Value"] == [0xB000]
    assert "implicit VR" in resp.headers["Warning"]


def test_every_sample_file_is_stored_or_cleanly_refused(http) -> None:
    """All of pydicom's and pydicom-data's files, one request each: stored, or refused with a 409 and a reason."""
    from tests.support.data import all_samples
    from tests.support.factory import multipart, stow_headers

    statuses: dict[int, int] = {}
    reasons: dict[int, int] = {}
    for path in all_samples():
        resp = http.post("/dicom-web/studies", content=multipart([path.read_bytes()]), headers=stow_headers())
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code in (200, 202, 409), (path.name, resp.status_code, resp.text)
        if resp.status_code == 409:
            reason = resp.json()["00081198"]["Value"][0]["00081197"]["Value"][0]
            assert reason in (0xC000, 0xA900, 0x0111, 0xC122), (path.name, reason)
            reasons[reason] = reasons.get(reason, 0) + 1
    # Many sample files are the same instance in other transfer syntaxes (same SOP Instance UID, other bytes):
    # those are refused as duplicates (0111H). Everything readable is stored or is such a duplicate.
    assert statuses.get(200, 0) + statuses.get(202, 0) + reasons.get(0x0111, 0) >= 115, (statuses, reasons)
    assert reasons.get(0xC000, 0) + reasons.get(0xA900, 0) <= 30, reasons
