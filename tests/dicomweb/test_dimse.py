"""The DICOM node: association security, C-ECHO, C-STORE and their audit, with dcmtk and pynetdicom as
real peers."""

from __future__ import annotations

import concurrent.futures
import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.data import sample
from tests.support.dimse_util import TITLE, dcmtk, dimse_audit, dimse_port, indexed, require_dcmtk, start
from tests.support.factory import ct, part10

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def node(make_server: Any) -> Any:
    require_dcmtk()
    return start(make_server)


def _write(folder: Path, datasets: list[pydicom.Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        path.write_bytes(part10(ds))
        paths.append(path)
    return paths


def _associate(server: Any, calling: str, contexts: list[Any] | None = None) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    contexts = contexts or [build_context(CTImageStorage, ExplicitVRLittleEndian)]
    return ae.associate("127.0.0.1", dimse_port(server), contexts=contexts, ae_title=TITLE)


def _send_raw(assoc: Any, ds: pydicom.Dataset, raw: bytes) -> Any:
    """A C-STORE-RQ whose data set is exactly `raw` (pynetdicom's send_c_store would decode and re-encode it)."""
    req = C_STORE()
    req.MessageID, req.Priority = 7, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    req.DataSet = io.BytesIO(raw)
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID)
    assert context.transfer_syntax[0] == ExplicitVRLittleEndian
    assoc._reactor_checkpoint.clear()  # as send_c_store does: the reactor leaves the response to us
    try:
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return rsp


def test_echo_and_only_configured_calling_ae_titles(node: Any) -> None:
    port = str(dimse_port(node))
    ok = dcmtk("echoscu", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", port)
    assert ok.returncode == 0, ok.stderr
    refused = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", TITLE, "127.0.0.1", port)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    # pynetdicom sees the A-ASSOCIATE-RJ fields: rejected-permanent (1), service-user (1), reason 3 (PS3.8 9.3.4)
    accepted_assoc = _associate(node, "CT1", [build_context(Verification)])
    assert accepted_assoc.is_established
    assert accepted_assoc.acceptor.maximum_length == 1_048_576  # HOUNSFIELD_DIMSE_MAX_PDU's default (A-ASSOCIATE-AC)
    accepted_assoc.release()
    assoc = _associate(node, "INTRUDER", [build_context(Verification)])
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)
    records = dimse_audit(node.dsn)
    logins = [r for r in records if r["type"]["code"] == "110114"]
    accepted = [r for r in logins if r["outcome"] == "0" and r["agent"]["ae_title"] == "CT1"]
    rejected = [r for r in logins if r["outcome"] == "4"]
    assert accepted and accepted[0]["agent"]["sub"] == "CT1" and accepted[0]["agent"]["roles"] == ["technologist"]
    assert {r["agent"]["ae_title"] for r in rejected} == {"INTRUDER"}
    assert all("not recognized" in r["outcome_desc"] for r in rejected)
    assert any(r["subtype"][0]["code"] == "110123" for r in logins)  # the released association: Logout


def test_cstore_with_storescu_is_visible_over_qido_and_wado(node: Any, http: Any, tmp_path: Path) -> None:
    http.headers.update(node.headers)
    study, series = generate_uid(), generate_uid()
    datasets = [ct(study, series, seed=i, InstanceNumber=i + 1, PatientID="P7") for i in range(3)]
    files = _write(tmp_path / "in", datasets)
    run = dcmtk("storescu", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", str(dimse_port(node)), *files)
    assert run.returncode == 0, run.stdout + run.stderr
    indexed(node)  # acknowledged once durable, indexed just after (HOUNSFIELD_DIMSE_EARLY_ACK)
    found = http.get(f"{node.url}/dicom-web/studies", params={"StudyInstanceUID": study}).json()
    assert len(found) == 1 and found[0]["00201208"]["Value"] == [3]
    instance = datasets[1]
    meta = http.get(
        f"{node.url}/dicom-web/studies/{study}/series/{series}/instances/{instance.SOPInstanceUID}/metadata"
    ).json()
    assert meta[0]["00100020"]["Value"] == ["P7"]
    frame = http.get(
        f"{node.url}/dicom-web/studies/{study}/series/{series}/instances/{instance.SOPInstanceUID}/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
    )
    assert frame.status_code == 200 and instance.PixelData in frame.content
    stores = dimse_audit(node.dsn, "C-STORE")
    assert len(stores) == 3
    assert {r["entity"]["instance_uid"] for r in stores} == {d.SOPInstanceUID for d in datasets}
    assert all(r["type"]["code"] == "110104" and r["action"] == "C" and r["outcome"] == "0" for r in stores)
    assert all(r["agent"]["ae_title"] == "CT1" and r["entity"]["patient_id"] == "P7" for r in stores)


COMPRESSED = [
    ("JPEG2000.dcm", "-xw"),  # JPEG 2000 (lossy)
    ("emri_small_jpeg_2k_lossless.dcm", "-xv"),  # JPEG 2000 lossless
    ("SC_rgb_rle.dcm", "-xr"),  # RLE
    ("JPEG-lossy.dcm", "-xx"),  # JPEG extended (12 bit)
    ("MR_small_bigendian.dcm", "-xb"),  # explicit VR big endian (retired, still received)
]


def test_cstore_keeps_the_transfer_syntax(node: Any, http: Any) -> None:
    http.headers.update(node.headers)
    for name, propose in COMPRESSED:
        path = sample(name)
        original = pydicom.dcmread(path)
        # -R with the file's syntax proposed: the bytes arrive (and are stored) as they are in the file
        run = dcmtk("storescu", propose, "-R", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", str(dimse_port(node)), path)
        assert run.returncode == 0, run.stdout + run.stderr
        indexed(node)
        study, series = original.StudyInstanceUID, original.SeriesInstanceUID
        meta = http.get(
            f"{node.url}/dicom-web/studies/{study}/series/{series}/instances/{original.SOPInstanceUID}/metadata"
        ).json()
        assert meta[0]["00083002"]["Value"] == [original.file_meta.TransferSyntaxUID], name


def test_bad_input_gets_the_right_status_and_stores_nothing(node: Any, http: Any, tmp_path: Path) -> None:
    http.headers.update(node.headers)
    # a data set without a Study Instance UID: A900 (data set does not match SOP class)
    broken = ct(PatientID="P1")
    del broken.StudyInstanceUID
    assoc = _associate(node, "CT1")
    assert assoc.is_established
    rsp = assoc.send_c_store(broken)
    assert rsp.Status == 0xA900 and "StudyInstanceUID" in rsp.ErrorComment
    # a corrupt data set (an element length running past the end): C000 cannot understand
    head = ct()
    del head.PixelData
    raw = encode(head, False, True) + b"\xe0\x7f\x10\x00OB\x00\x00\x00\x00\x10\x00" + bytes(8)  # runs past the end
    rsp = _send_raw(assoc, head, raw)
    assert rsp.Status == 0xC000
    assoc.release()
    # a SOP class the server does not know: the presentation context is refused (abstract syntax not supported)
    unknown = "1.2.826.0.1.3680043.10.1.999"
    assoc = _associate(node, "CT1", [build_context(unknown), build_context(CTImageStorage)])
    assert assoc.is_established
    assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [unknown]
    assert assoc.rejected_contexts[0].result == 0x03
    odd = ct()
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = unknown
    with pytest.raises(ValueError):
        assoc.send_c_store(odd)
    # the policy decides: a referring physician may not store (0124 Refused: Not Authorized)
    assoc.release()
    assoc = _associate(node, "REF")
    denied = ct(PatientID="P1")
    rsp = assoc.send_c_store(denied)
    assert rsp.Status == 0x0124
    assoc.release()
    assert http.get(f"{node.url}/dicom-web/instances").json() == []
    refused = [r for r in dimse_audit(node.dsn, "C-STORE") if r["outcome"] == "4"]
    assert {r["http"]["status"] for r in refused} == {0xA900, 0xC000, 0x0124}
    # the server is unharmed
    assert dcmtk("echoscu", "-aet", "CT1", "-aec", TITLE, "127.0.0.1", str(dimse_port(node))).returncode == 0


def test_ten_associations_at_once(node: Any, http: Any) -> None:
    http.headers.update(node.headers)
    study = generate_uid()

    def one(i: int) -> list[int]:
        assoc = _associate(node, "CT1")
        assert assoc.is_established
        try:
            series = generate_uid()
            return [int(assoc.send_c_store(ct(study, series, seed=i * 10 + k)).Status) for k in range(3)]
        finally:
            assoc.release()

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        statuses = [s for result in pool.map(one, range(10)) for s in result]
    assert statuses == [0] * 30
    indexed(node)
    found = http.get(f"{node.url}/dicom-web/studies", params={"StudyInstanceUID": study}).json()
    assert found[0]["00201206"]["Value"] == [10] and found[0]["00201208"]["Value"] == [30]
