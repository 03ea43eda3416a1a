"""DIMSE latency regressions: a C-FIND round trip on an open association must not wait for a delayed
ACK (the server's sockets have Nagle off), and accepting an association must not deep-copy ~170 presentation
contexts with 45 transfer syntaxes each (tens of ms of CPU per association). Both measured against a real
server with a pynetdicom SCU whose own socket has Nagle off too, so only the server's behaviour is timed."""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification  # type: ignore[attr-defined]

from dicomweb.dimse.tcp import NODELAY_HANDLERS
from tests.support.dimse_util import TITLE, dimse_port, start
from tests.support.factory import ct, multipart, part10, stow_headers

pytestmark = pytest.mark.timeout(120)

FIND = StudyRootQueryRetrieveInformationModelFind


@pytest.fixture
def node(make_server: Any) -> Any:
    server = start(make_server)
    study = generate_uid()
    parts = [part10(ct(study, PatientID="LAT1", seed=i)) for i in range(2)]
    with httpx.Client(timeout=60, headers=server.headers) as http:
        rsp = http.post(f"{server.url}/dicom-web/studies", content=multipart(parts), headers=stow_headers())
    assert rsp.status_code == 200, rsp.text
    return server


def _quartile(times: list[float]) -> float:
    return statistics.quantiles(times, n=4)[0]


def _ae() -> AE:
    ae = AE(ae_title="RAD")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def test_cfind_round_trips_on_one_association_take_milliseconds(node: Any) -> None:
    assoc = _ae().associate(
        "127.0.0.1", dimse_port(node), contexts=[build_context(FIND)], ae_title=TITLE, evt_handlers=NODELAY_HANDLERS
    )
    assert assoc.is_established
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    sock = assoc.dul.socket.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # the SCU side, so only the server is timed
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", "LAT1", ""
    times = []
    try:
        for _ in range(20):
            start_ = time.perf_counter()
            statuses = [int(s.Status) for s, _ in assoc.send_c_find(query, FIND)]
            times.append(time.perf_counter() - start_)
            assert statuses == [0xFF00, 0x0000]
    finally:
        assoc.release()
    # With Nagle on in the server every round trip waited ~40 ms or more for the client's delayed ACK (20 queries:
    # over a second); now one is a few ms of work. The lower quartile ignores a busy machine's spikes.
    assert _quartile(times) < 0.020, times


def test_associations_are_accepted_quickly(node: Any) -> None:
    ae = _ae()
    times = []
    for _ in range(10):
        start_ = time.perf_counter()
        assoc = ae.associate(
            "127.0.0.1",
            dimse_port(node),
            contexts=[build_context(Verification)],
            ae_title=TITLE,
            evt_handlers=NODELAY_HANDLERS,
        )
        times.append(time.perf_counter() - start_)
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
    # Deep-copying the supported contexts cost 40-60 ms of CPU per association (more on a busy machine).
    assert _quartile(times) < 0.025, times
