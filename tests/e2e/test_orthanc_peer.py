"""Orthanc as a peer, both ways: Debian's `orthanc` with its `orthanc-dicomweb` plugin (`make test` installs them;
missing is a failure, never a skip) against a Hounsfield server, both in one loopback-only network namespace
(Orthanc binds every interface: `tests/support/netns.py`).

Orthanc as the client:
- its DICOMweb client (REST `/dicom-web/servers/hounsfield/...`, the Hounsfield token in the server entry's
  `HttpHeaders`) stores into Hounsfield with STOW-RS (its 73-character multipart boundary), queries it with
  QIDO-RS and retrieves a study with WADO-RS;
- over DIMSE it stores into Hounsfield (C-STORE, `/modalities/hounsfield/store`), queries it (C-FIND) and moves
  a study to itself (C-MOVE with Orthanc as the move destination).
Hounsfield as the source, Orthanc as the server:
- auto-routing forwards a newly stored instance to Orthanc's DICOM port (C-STORE);
- DICOMweb: what Hounsfield serves (WADO-RS, dicomweb-client) is stored into Orthanc's DICOMweb server
  (STOW-RS), found there (QIDO-RS) and read back (WADO-RS) unchanged. Hounsfield has no DICOMweb client of its
  own; dicomweb-client is the client on its side.
Pixel data is compared at each arrival.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from benchmarks.orthanc import BINARY, DICOMWEB_PLUGIN, Orthanc
from tests.conftest import LiveServer, free_port
from tests.support.data import sample
from tests.support.dimse_util import TITLE, start
from tests.support.factory import ct, part10
from tests.support.netns import loopback_namespace

pytestmark = pytest.mark.timeout(150)

ORTHANC_AET = "ORTHANC"


def require_orthanc() -> None:
    missing = [p for p in (BINARY, DICOMWEB_PLUGIN) if not Path(p).exists()]
    if missing:
        pytest.fail(
            f"Orthanc is missing ({', '.join(missing)}): apt-get install orthanc orthanc-dicomweb, or `make test`"
        )


@pytest.fixture
def netns(pg_uri: str) -> Iterator[None]:
    """The test in its own loopback-only network (the session's PostgreSQL is started before, outside it)."""
    require_orthanc()
    with loopback_namespace():
        yield


class Peer:
    """Orthanc's REST API (no authentication: nothing outside the namespace reaches it)."""

    def __init__(self, orthanc: Orthanc) -> None:
        self.orthanc = orthanc
        self.dicomweb = orthanc.url + "/dicom-web"

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.orthanc.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                payload = answer.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Orthanc {method} {path}: {exc.code} {exc.read()[:2000]!r}") from None
        return json.loads(payload) if payload[:1] in (b"{", b"[") else payload

    def upload(self, ds: Dataset) -> str:
        """POST /instances: the Orthanc id of the stored instance."""
        return str(self.call("POST", "/instances", raw=part10(ds))["ID"])

    def instance(self, sop_uid: str) -> str | None:
        found = self.call("POST", "/tools/lookup", raw=sop_uid.encode())
        ids = [item["ID"] for item in found if item["Type"] == "Instance"]
        return ids[0] if ids else None

    def dataset(self, sop_uid: str) -> Dataset:
        oid = self.instance(sop_uid)
        assert oid is not None, f"Orthanc has no instance {sop_uid}"
        return pydicom.dcmread(io.BytesIO(self.call("GET", f"/instances/{oid}/file")))


def as_file(ds: Dataset) -> Dataset:
    """A generated data set as read from its PS3.10 file (with the preamble dicomweb-client writes out)."""
    return pydicom.dcmread(io.BytesIO(part10(ds)))


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no Orthanc log)"
    return "Orthanc log, last lines:\n" + "\n".join(text.splitlines()[-lines:])


def wait_for(check: Callable[[], Any], what: str, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def same_pixels(a: Dataset, b: Dataset) -> None:
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert np.array_equal(a.pixel_array, b.pixel_array)


def mr(patient: str) -> Dataset:
    """pydicom's MR_small (a real scanner's file, big-endian origins aside: it is Explicit VR LE here), renamed."""
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    ds.PatientID, ds.PatientName = patient, f"{patient}^Test"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_orthanc_both_ways(netns: None, make_server: Any, tmp_path: Path) -> None:
    started = time.monotonic()
    orthanc_dicom = free_port()
    route = json.dumps([{"name": "to-orthanc", "destination": ORTHANC_AET, "attributes": {"PatientID": "ROUTE*"}}])
    server: LiveServer = start(
        make_server,
        peers=f"{ORTHANC_AET}=technologist+radiologist,RAD=radiologist",
        destinations=f"{ORTHANC_AET}@127.0.0.1:{orthanc_dicom}",
        routes=route,
    )
    token = server.token(sub="orthanc", roles=["technologist", "radiologist"], scopes=[])
    orthanc = Orthanc(
        tmp_path / "orthanc",
        aet=ORTHANC_AET,
        peers={TITLE: ("127.0.0.1", int(server.settings.dimse_port))},
        dicomweb_servers={
            "hounsfield": {"Url": server.dicomweb + "/", "HttpHeaders": {"Authorization": f"Bearer {token}"}}
        },
    )
    orthanc.dicom_port = orthanc_dicom  # Hounsfield's destination was configured with it
    try:
        orthanc.start(timeout=60)
    except SystemExit as exc:  # the harness's way to give up
        pytest.fail(f"{exc}\n{_tail(tmp_path / 'orthanc' / 'orthanc.log')}")
    try:
        peer = Peer(orthanc)
        hounsfield = DICOMwebClient(server.dicomweb, headers=server.headers)
        _orthanc_dicomweb_client(peer, hounsfield)
        _orthanc_dimse(peer, hounsfield)
        _hounsfield_to_orthanc(peer, hounsfield)
    except BaseException:
        print(_tail(tmp_path / "orthanc" / "orthanc.log"))  # shown with the failure
        raise
    finally:
        orthanc.stop()
    assert time.monotonic() - started < 90, "the Orthanc round trip must stay under 90 s"


def _orthanc_dicomweb_client(peer: Peer, hounsfield: DICOMwebClient) -> None:
    """Orthanc's DICOMweb client: STOW-RS into Hounsfield, QIDO-RS on it, WADO-RS from it."""
    # STOW-RS: a study uploaded to Orthanc, sent to Hounsfield by Orthanc.
    study = generate_uid()
    sent = [ct(study, PatientID="ORT-STOW", PatientName="Stow^Orthanc", seed=n, InstanceNumber=n + 1) for n in range(2)]
    oids = [peer.upload(ds) for ds in sent]
    job = peer.call("POST", "/dicom-web/servers/hounsfield/stow", {"Resources": oids, "Synchronous": True})
    assert isinstance(job, dict), job
    stored = hounsfield.search_for_instances(study_instance_uid=study)
    assert sorted(i["00080018"]["Value"][0] for i in stored) == sorted(ds.SOPInstanceUID for ds in sent)
    for ds in sent:
        back = hounsfield.retrieve_instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        same_pixels(ds, back)

    # QIDO-RS: Orthanc queries Hounsfield for a study only Hounsfield has.
    only = mr("HF-ONLY")
    hounsfield.store_instances([only])
    found = peer.call(
        "POST",
        "/dicom-web/servers/hounsfield/qido",
        {"Uri": "/studies", "Arguments": {"PatientID": "HF-ONLY", "includefield": "PatientName"}},
    )
    # Orthanc reformats the answer: {tag: {"Name", "Value" (text), "vr", ...}}
    assert [s["0020000D"]["Value"] for s in found] == [only.StudyInstanceUID], found
    assert found[0]["00100010"]["Value"] == "HF-ONLY^Test", found

    # WADO-RS: Orthanc retrieves that study from Hounsfield.
    assert peer.instance(only.SOPInstanceUID) is None
    peer.call(
        "POST",
        "/dicom-web/servers/hounsfield/retrieve",
        {"Resources": [{"Study": only.StudyInstanceUID}], "Synchronous": True},
    )
    same_pixels(only, peer.dataset(only.SOPInstanceUID))


def _orthanc_dimse(peer: Peer, hounsfield: DICOMwebClient) -> None:
    """Orthanc over DIMSE: C-STORE into Hounsfield, C-FIND on it, C-MOVE from it to Orthanc."""
    pushed = ct(PatientID="ORT-CSTORE", PatientName="Store^Orthanc", seed=7)
    oid = peer.upload(pushed)
    peer.call("POST", "/modalities/hounsfield/store", {"Resources": [oid], "Synchronous": True})
    uids = (pushed.StudyInstanceUID, pushed.SeriesInstanceUID)
    found = wait_for(  # answered once durable, indexed just after (HOUNSFIELD_DIMSE_EARLY_ACK)
        lambda: hounsfield.search_for_instances(*uids, search_filters={"SOPInstanceUID": pushed.SOPInstanceUID}),
        "the C-STORE indexed",
        5,
    )
    assert len(found) == 1
    back = hounsfield.retrieve_instance(*uids, pushed.SOPInstanceUID)
    same_pixels(pushed, back)

    kept = ct(PatientID="HF-MOVE", PatientName="Move^Hounsfield", seed=8)
    hounsfield.store_instances([as_file(kept)])
    query = peer.call("POST", "/modalities/hounsfield/query", {"Level": "Study", "Query": {"PatientID": "HF-MOVE"}})
    answers = peer.call("GET", f"/queries/{query['ID']}/answers?expand")
    assert [a["0020,000d"]["Value"] for a in answers] == [kept.StudyInstanceUID], answers
    assert peer.instance(kept.SOPInstanceUID) is None
    peer.call(
        "POST",
        "/modalities/hounsfield/move",
        {
            "Level": "Study",
            "Resources": [{"StudyInstanceUID": kept.StudyInstanceUID}],
            "TargetAet": ORTHANC_AET,
            "Synchronous": True,
        },
    )
    same_pixels(kept, peer.dataset(kept.SOPInstanceUID))


def _hounsfield_to_orthanc(peer: Peer, hounsfield: DICOMwebClient) -> None:
    """Hounsfield's side: auto-routing to Orthanc's DICOM port; its WADO-RS output stored into Orthanc's DICOMweb
    server with dicomweb-client, found there and read back."""
    routed = ct(PatientID="ROUTE-1", PatientName="Route^Hounsfield", seed=9)
    hounsfield.store_instances([as_file(routed)])
    wait_for(lambda: peer.instance(routed.SOPInstanceUID), "the routed instance in Orthanc")
    same_pixels(routed, peer.dataset(routed.SOPInstanceUID))

    source = mr("HF-DW")
    hounsfield.store_instances([source])
    served = hounsfield.retrieve_instance(source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    other = DICOMwebClient(peer.dicomweb)
    result = other.store_instances([served])
    assert not result.get("FailedSOPSequence"), result  # Orthanc sends it empty
    assert [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence] == [source.SOPInstanceUID]
    found = other.search_for_studies(search_filters={"PatientID": "HF-DW"})
    assert [s["0020000D"]["Value"][0] for s in found] == [source.StudyInstanceUID]
    back = other.retrieve_instance(source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    same_pixels(source, back)
