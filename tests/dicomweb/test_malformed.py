"""Malformed and ambiguous files through STOW-RS and C-STORE: a refusal naming the problem (C000, A900), never a
5xx, a dropped connection or an A700; and nothing stored from a file other toolkits would read differently."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import asyncpg
import httpx
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context

from tests.support import malformed as m
from tests.support.dimse_util import TITLE, dimse_port, require_dcmtk, send_raw, start
from tests.support.factory import multipart, stow_headers

pytestmark = pytest.mark.timeout(180)

FAILED = "00081198"
FAILURE_REASON = "00081197"
ERROR_COMMENT = "00000902"


def instance_uids(dsn: str) -> set[str]:
    async def run() -> set[str]:
        conn = await asyncpg.connect(dsn)
        try:
            return {r["sop_instance_uid"] for r in await conn.fetch("SELECT sop_instance_uid FROM instances")}
        finally:
            await conn.close()

    return asyncio.run(run())


def stow(http: httpx.Client, data: bytes) -> httpx.Response:
    return http.post("/dicom-web/studies", content=multipart([data]), headers=stow_headers())


def refusal(resp: httpx.Response) -> tuple[int, str]:
    assert resp.status_code == 409, (resp.status_code, resp.text)
    item = resp.json()[FAILED]["Value"][0]
    return item[FAILURE_REASON]["Value"][0], item[ERROR_COMMENT]["Value"][0]


def _undefined_depth_500() -> bytes:
    return m.nested_file(1, 500)


def _cut_in_group_length() -> bytes:
    return m.base_file(2)[:142]


def _uh_in_meta() -> bytes:
    data = m.base_file(3)
    e = m.find(m.meta(data), 0x00020010)
    return data[: e.start + 4] + b"UH" + data[e.start + 6 :]


def _study_twice() -> bytes:
    """StudyInstanceUID twice: pydicom reads the second, dcmtk the first."""
    data = m.base_file(4)
    e = m.find(m.top(data), 0x0020000D)
    return data[: e.start] + m.explicit(0x0020000D, b"UI", b"1.2.826.0.1.3680043.10.1400.4.99\0") + data[e.start :]


def _frames_zero() -> bytes:
    data = m.base_file(5, NumberOfFrames=1)
    return m.replace_value(data, m.find(m.top(data), 0x00280008), b"0 ")


def _huge_group_length() -> bytes:
    data = m.base_file(6)
    return data[:140] + struct.pack("<I", 0x7FFFFFFF) + data[144:]


def _frames_for_three() -> bytes:
    data = m.base_file(7, frames=3)
    return m.replace_value(data, m.find(m.top(data), 0x00280008), b"1 ")


def _nul_in_name() -> bytes:
    data = m.base_file(8)
    return m.replace_value(data, m.find(m.top(data), 0x00100010), b"Test\0Patient")


def _sop_uid_with_line_feed() -> bytes:
    """A SOP Instance UID padded with a line feed instead of a NUL (pydicom strips it, dcmtk keeps it), in the
    meta group and the data set."""
    sop = m.uid(9, 3)
    assert len(sop) % 2  # padded
    return m.with_uid_bytes(m.base_file(9), sop + "\0", sop.encode() + b"\n")


ISSUE_CASES = {
    "cut inside the meta group length": (_cut_in_group_length, 0xC000, "(0002,0000)"),
    "500 nested undefined-length sequences": (_undefined_depth_500, 0xC000, "nested more than 64"),
    "VR UH in the meta group": (_uh_in_meta, 0xC000, "Unknown Value Representation 'UH'"),
    "StudyInstanceUID twice": (_study_twice, 0xC000, "(0020,000D) appears twice"),
    "NumberOfFrames 0": (_frames_zero, 0xA900, "NumberOfFrames is 0"),
    "meta group length 0x7FFFFFFF": (_huge_group_length, 0xC000, "group length 2147483647"),
    "3 frames of pixels, NumberOfFrames 1": (_frames_for_three, 0xA900, "Pixel Data is"),
    "NUL inside PatientName": (_nul_in_name, 0xA900, "(0010,0010) holds a NUL"),
    "SOPInstanceUID ending in a line feed": (_sop_uid_with_line_feed, 0xA900, "not a valid UID"),
}


@pytest.mark.parametrize("name", list(ISSUE_CASES))
def test_stow_refuses_with_the_reason(http: httpx.Client, server: Any, name: str) -> None:
    make, reason, comment = ISSUE_CASES[name]
    resp = stow(http, make())
    got, text = refusal(resp)
    assert got == reason, (hex(got), text)
    assert comment in resp.headers["Warning"], resp.headers["Warning"]
    assert instance_uids(server.dsn) == set()


def test_control_character_in_a_uid_gets_a_valid_warning_header(http: httpx.Client, server: Any) -> None:
    """The UID is echoed escaped (RFC 7230 quoted-string of printable ASCII): the connection is not dropped."""
    data = m.with_uid_bytes(m.base_file(10), m.uid(10, 3), m.uid(10, 3)[:-1].encode() + b"\x01")
    resp = stow(http, data)
    reason, _ = refusal(resp)
    assert reason == 0xA900
    warning = resp.headers["Warning"]
    assert all(" " <= c <= "~" for c in warning), warning
    assert "\\\\x01" in warning  # a quoted-pair backslash, then the escape
    # The failed item names no SOP Instance UID that is not one.
    assert "Value" not in resp.json()[FAILED]["Value"][0]["00081155"]
    # The same connection answers the next request.
    assert http.get("/dicom-web/studies").status_code == 200


def test_allowed_nesting_padding_and_encodings_are_stored(http: httpx.Client, server: Any) -> None:
    """64 nested levels (the most allowed), trailing padding shorter than a frame, implicit VR and deflated."""
    files = m.controls()
    resp = http.post("/dicom-web/studies", content=multipart(files), headers=stow_headers())
    assert resp.status_code == 200, resp.text
    assert instance_uids(server.dsn) == {m.read_uids(f)[2] for f in files}


CSTORE_CASES = {
    "500 nested undefined-length sequences": (_undefined_depth_500, 0xC000, "nested more than 64"),
    "StudyInstanceUID twice": (_study_twice, 0xC000, "(0020,000D) appears twice"),
    "NumberOfFrames 0": (_frames_zero, 0xA900, "NumberOfFrames is 0"),
    "NUL inside PatientName": (_nul_in_name, 0xA900, "(0010,0010) holds a NUL"),
    "SOPInstanceUID ending in a line feed": (_sop_uid_with_line_feed, 0xA900, "not a valid UID"),
    "control character in the StudyInstanceUID": (
        lambda: m.with_uid_bytes(m.base_file(11), m.uid(11, 1), m.uid(11, 1)[:-1].encode() + b"\x01"),
        0xA900,
        "StudyInstanceUID is not a valid UID",
    ),
}


def test_cstore_refuses_with_the_reason(make_server: Any) -> None:
    require_dcmtk()
    node = start(make_server)
    ae = AE(ae_title="CT1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate(
        "127.0.0.1", dimse_port(node), contexts=[build_context(CTImageStorage, ExplicitVRLittleEndian)], ae_title=TITLE
    )
    assert assoc.is_established
    try:
        for i, (name, (make, reason, comment)) in enumerate(CSTORE_CASES.items()):
            data = make()
            rsp = send_raw(assoc, CTImageStorage, _sop_of(data), data[m.meta_end(data) :], message_id=i + 1)
            assert rsp is not None and assoc.is_established, name
            assert rsp.Status == reason, (name, hex(rsp.Status), rsp.ErrorComment)
            assert comment[:40] in str(rsp.ErrorComment), (name, rsp.ErrorComment)
    finally:
        assoc.release()
    assert instance_uids(node.dsn) == set()


def _sop_of(data: bytes) -> str:
    """The Affected SOP Instance UID for a C-STORE of the file: its Media Storage SOP Instance UID when valid."""
    e = m.find(m.meta(data), 0x00020003)
    text = data[e.value : e.end].rstrip(b"\0").decode("latin-1")
    return text if text.replace(".", "").isdigit() else "1.2.826.0.1.3680043.10.1400.0.0"
