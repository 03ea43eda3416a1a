"""STOW-RS through dicomweb-client and raw HTTP."""

from __future__ import annotations

import pydicom
import pytest

from tests.data import sample

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
    client = DICOMwebClient(srv.dicomweb)
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    client.store_instances([ds])
    ds.PatientName = "Changed^Name"
    if overwrite:
        client.store_instances([ds])
    else:
        with pytest.raises(HTTPError) as info:
            client.store_instances([ds])
        assert info.value.response.status_code == 409
