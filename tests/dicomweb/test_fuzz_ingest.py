"""A fuzz corpus through STOW-RS (httpx on a live server) and C-STORE (pynetdicom sending raw data sets): 0 crashes,
0 5xx, 0 dropped connections or aborted associations, nothing stored from an invalid file.

Two halves: a generated table of hand-made malformations (`tests/support/malformed.py`: truncations, bad lengths, deep
nesting, duplicate and out-of-order tags, control characters in UIDs, unknown VRs, stray delimiters, frame counts,
bad multipart framing), each with the failure reasons allowed; and hypothesis mutations (byte flips, cuts,
insertions, deletions, repeats, biased towards element headers) of well-formed files and multipart bodies,
derandomized so that every run tries the same inputs. A mutation may leave a well-formed file: the property then is
that whatever the server stores, dcmtk reads with the same Study, Series and SOP Instance UIDs.

Run with `-s` to see the counts per kind and the statuses seen.
"""

from __future__ import annotations

import asyncio
import collections
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context

from tests.support import malformed as m
from tests.support.dimse_util import TITLE, dimse_port, indexed, require_dcmtk, send_raw, start
from tests.support.factory import multipart, stow_headers

pytestmark = pytest.mark.timeout(300)

FAILED = "00081198"
REFERENCED = "00081199"
FAILURE_REASON = "00081197"
ERROR_COMMENT = "00000902"
DROPPED = (httpx.TransportError,)
"""What a connection the server closed without an answer looks like to httpx (RemoteProtocolError, ReadError...)."""

DERANDOMIZED = settings(
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


def rows(dsn: str) -> list[dict[str, str]]:
    """Every indexed instance with its UIDs and blob key."""

    async def run() -> list[dict[str, str]]:
        conn = await asyncpg.connect(dsn)
        try:
            found = await conn.fetch(
                "SELECT i.sop_instance_uid, i.blob_key, st.study_uid, se.series_uid FROM instances i"
                " JOIN studies st USING (study_pk) JOIN series se USING (series_pk)"
            )
            return [dict(r) for r in found]
        finally:
            await conn.close()

    return asyncio.run(run())


def dcmtk_uids(path: Path) -> tuple[str, str, str] | None:
    """Study, Series and SOP Instance UIDs at the top level as dcmtk's dcmdump reads them (None if it cannot)."""
    run = subprocess.run(
        ["dcmdump", "-q", "+P", "0020,000d", "+P", "0020,000e", "+P", "0008,0018", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=30,
        check=False,
    )
    if run.returncode != 0:
        return None
    found: dict[str, str] = {}
    for line in run.stdout.splitlines():
        if line.startswith("(") and "[" in line:  # top level only: nested lines are indented
            found.setdefault(line[1:10].lower(), line[line.index("[") + 1 : line.rindex("]")])
    return found.get("0020,000d", ""), found.get("0020,000e", ""), found.get("0008,0018", "")


def check_index_agrees_with_dcmtk(server: Any) -> int:
    """Every stored instance reads the same to dcmtk as the index says. Returns how many were checked."""
    indexed = rows(server.dsn)
    for row in indexed:
        path = server.settings.blob_dir / row["blob_key"]
        assert dcmtk_uids(path) == (row["study_uid"], row["series_uid"], row["sop_instance_uid"]), row
    return len(indexed)


def report(title: str, seen: dict[str, collections.Counter[str]]) -> None:
    print(f"\n{title}: {sum(sum(c.values()) for c in seen.values())} cases")
    for kind, counter in sorted(seen.items()):
        print(f"  {kind:18} {sum(counter.values()):5}  " + ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())))


def stow(http: httpx.Client, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.post("/dicom-web/studies", content=body, headers=headers or stow_headers())


def outcome(resp: httpx.Response) -> tuple[str, list[int], list[str]]:
    """`HTTP 409 C000` style label, the failure reasons and the error comments (with the Warning header)."""
    reasons: list[int] = []
    comments: list[str] = [resp.headers.get("Warning", "")]
    if resp.headers.get("content-type", "").startswith("application/dicom+json"):
        for item in resp.json().get(FAILED, {}).get("Value", []):
            reasons.append(item[FAILURE_REASON]["Value"][0])
            comments.append(item.get(ERROR_COMMENT, {}).get("Value", [""])[0])
    label = f"HTTP {resp.status_code}" + "".join(f" {r:04X}" for r in reasons)
    return label, reasons, comments


@pytest.fixture
def dimse_server(make_server: Any) -> Any:
    require_dcmtk()
    return start(make_server)


def _associate(server: Any) -> Any:
    ae = AE(ae_title="CT1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    contexts = [build_context(CTImageStorage, ExplicitVRLittleEndian)]
    assoc = ae.associate("127.0.0.1", dimse_port(server), contexts=contexts, ae_title=TITLE)
    assert assoc.is_established
    return assoc


class CStore:
    """C-STOREs of raw data sets on one association, re-opened if the server ever aborts it (counted)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.assoc = _associate(server)
        self.aborted = 0
        self.message_id = 0

    def send(self, data_set: bytes, sop: str) -> int | None:
        self.message_id = self.message_id % 65535 + 1
        rsp = send_raw(self.assoc, CTImageStorage, sop, data_set, self.message_id)
        if rsp is None or not self.assoc.is_established or getattr(rsp, "Status", None) is None:
            self.aborted += 1
            self.assoc = _associate(self.server)
            return None
        return int(rsp.Status)

    def close(self) -> None:
        self.assoc.release()


def affected_sop(data: bytes) -> str:
    """The Affected SOP Instance UID for a C-STORE of a Part 10 file: its Media Storage SOP Instance UID when
    that is a UID pynetdicom accepts, else a fixed one."""
    e = m.find(m.meta(data), 0x00020003)
    text = data[e.value : e.end].rstrip(b"\0").decode("latin-1")
    return text if text and text.replace(".", "").isdigit() else f"{m.UID_ROOT}.0.0"


# The hand-made table ----------------------------------------------------------------------------------------------


def test_hand_made_corpus_through_stow(http: httpx.Client, server: Any) -> None:
    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    wrong: list[tuple[str, str, str]] = []
    for case in m.CASES:
        try:
            resp = stow(http, multipart([case.data]))
        except DROPPED as exc:
            seen[case.kind]["dropped"] += 1
            wrong.append((case.kind, case.name, f"dropped: {exc!r}"))
            continue
        label, reasons, comments = outcome(resp)
        seen[case.kind][label] += 1
        if resp.status_code != 409 or len(reasons) != 1 or reasons[0] not in case.reasons:
            wrong.append((case.kind, case.name, label))
        elif case.comment and not any(case.comment in c for c in comments):
            wrong.append((case.kind, case.name, f"comment without {case.comment!r}: {comments}"))
    controls = m.controls()
    resp = stow(http, multipart(controls))
    seen["controls"][outcome(resp)[0]] += len(controls)
    report("hand-made corpus, STOW-RS", seen)
    assert not wrong, wrong
    assert resp.status_code == 200, resp.text
    assert {r["sop_instance_uid"] for r in rows(server.dsn)} == {m.read_uids(c)[2] for c in controls}
    assert check_index_agrees_with_dcmtk(server) == len(controls)


def test_hand_made_corpus_through_cstore(dimse_server: Any) -> None:
    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    wrong: list[tuple[str, str, str]] = []
    sender = CStore(dimse_server)
    try:
        for case in m.CASES:
            if not case.in_data_set:
                continue
            status = sender.send(case.data[m.meta_end(case.data) :], affected_sop(case.data))
            label = "aborted" if status is None else f"{status:04X}"
            seen[case.kind][label] += 1
            if status not in case.reasons:
                wrong.append((case.kind, case.name, label))
        # The controls in explicit VR little endian: the one presentation context the association uses.
        controls = [c for c in m.controls() if ExplicitVRLittleEndian.encode() + b"\0" in c[: m.meta_end(c)]]
        for data in controls:
            status = sender.send(data[m.meta_end(data) :], affected_sop(data))
            seen["controls"][f"{status or 0:04X}"] += 1
            assert status == 0, status
    finally:
        sender.close()
    report("hand-made corpus, C-STORE", seen)
    assert not wrong, wrong
    assert sender.aborted == 0
    indexed(dimse_server)  # acknowledged early: indexed just after the answer
    assert {r["sop_instance_uid"] for r in rows(dimse_server.dsn)} == {m.read_uids(c)[2] for c in controls}
    assert check_index_agrees_with_dcmtk(dimse_server) == len(controls)


def framing_cases() -> Iterator[tuple[str, bytes, dict[str, Any], set[int]]]:
    """(name, body, headers, statuses allowed): request-level damage to the multipart/related body."""
    good = m.base_file(7001)
    broken = good[:-300]
    ct = 'multipart/related; type="application/dicom"; boundary='
    head = "--b\r\nContent-Type: application/dicom\r\n\r\n"
    plain = {"Content-Type": ct + "b", "Accept": "application/dicom+json"}
    body = multipart([good], boundary="b")
    yield "no closing delimiter", body[: -len(b"--b--\r\n") - 2], plain, {400}
    yield "cut inside the part", body[:200], plain, {400}
    yield "empty body", b"", plain, {400}
    yield "only the closing delimiter", b"--b--\r\n", plain, {400}
    yield "no boundary parameter", body, {"Content-Type": 'multipart/related; type="application/dicom"'}, {400}
    yield "another boundary", body, {"Content-Type": ct + "other"}, {400}
    yield "boundary of 71 characters", body, {"Content-Type": ct + "x" * 71}, {400}
    yield "non-ASCII boundary", body, {"Content-Type": (ct + "b").encode() + b"\xe9"}, {400}
    yield (
        "part headers not ASCII",
        (head[:-4] + "\r\nX-Name: \xe9\r\n\r\n").encode("latin-1") + good + b"\r\n--b--\r\n",
        plain,
        {400},
    )
    yield (
        "header line without a colon",
        (head[:-2] + "garbage\r\n\r\n").encode() + good + b"\r\n--b--\r\n",
        plain,
        {400},
    )
    yield (
        "part headers of 20000 bytes",
        (head[:-2] + "X: " + "a" * 20000 + "\r\n\r\n").encode() + good + b"\r\n--b--\r\n",
        plain,
        {413},
    )
    yield "garbage after the delimiter", b"--bXYZ\r\n" + head.encode()[5:] + good + b"\r\n--b--\r\n", plain, {400}
    yield "part of another type", multipart([good], boundary="b", content_type="text/plain"), plain, {409}
    yield (
        "root type application/dicom+json",
        body,
        {"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=b'},
        {415},
    )
    yield "not multipart", good, {"Content-Type": "application/dicom"}, {415}
    yield "no content type", body, {}, {415}
    yield "a truncated part then a good one", multipart([broken, m.base_file(7002)], boundary="b"), plain, {202}
    cut = multipart([m.base_file(7003), broken], boundary="b")
    yield "a good part then a cut one", cut[:-200], plain, {202}
    yield "a multipart as the part", multipart([body], boundary="c"), {"Content-Type": ct + "c"}, {409}
    yield (
        "headers without a blank line",
        b"--b\r\nContent-Type: application/dicom\r\n" + good + b"\r\n--b--\r\n",
        plain,
        {400, 409, 413},
    )
    yield (
        "preamble and epilogue",
        b"preamble\r\n" + multipart([m.base_file(7004)], boundary="b") + b"epilogue",
        plain,
        {200},
    )
    pixels = m.find(m.top(good), 0x7FE00010)
    inside = m.replace_value(good, pixels, b"\r\n--inside\r\n" + good[pixels.value + 12 : pixels.end])
    yield (
        "the delimiter inside the data",
        multipart([inside], boundary="inside"),
        {"Content-Type": ct + "inside"},
        {409},
    )


STORED_BY_FRAMING = {m.read_uids(m.base_file(n))[2] for n in (7002, 7003, 7004)}


def test_multipart_framing(http: httpx.Client, server: Any) -> None:
    seen: collections.Counter[str] = collections.Counter()
    wrong = []
    for name, body, headers, allowed in framing_cases():
        try:
            resp = http.post(
                "/dicom-web/studies", content=body, headers={"Accept": "application/dicom+json", **headers}
            )
        except DROPPED as exc:
            seen["dropped"] += 1
            wrong.append((name, repr(exc)))
            continue
        seen[f"HTTP {resp.status_code}"] += 1
        if resp.status_code not in allowed:
            wrong.append((name, resp.status_code, resp.text[:200]))
    # A body streamed one byte at a time, with a malformed part among good ones.
    parts = [m.base_file(7005), m.base_file(7006)[:-50], m.base_file(7007)]
    body = multipart(parts)
    resp = http.post("/dicom-web/studies", content=(body[i : i + 1] for i in range(len(body))), headers=stow_headers())
    seen[f"HTTP {resp.status_code} (1-byte chunks)"] += 1
    assert resp.status_code == 202, resp.text
    report("multipart framing, STOW-RS", {"framing": seen})
    assert not wrong, wrong
    stored = STORED_BY_FRAMING | {m.read_uids(parts[0])[2], m.read_uids(parts[2])[2]}
    assert {r["sop_instance_uid"] for r in rows(server.dsn)} == stored


# Hypothesis mutations ---------------------------------------------------------------------------------------------

MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 11), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**20), st.integers(0, 11), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.integers(0, 11), st.integers(0, 2**31)),
    st.tuples(st.just("delete"), st.integers(0, 2**20), st.integers(0, 11), st.integers(1, 16)),
    st.tuples(st.just("repeat"), st.integers(0, 2**20), st.integers(0, 11), st.integers(1, 64)),
)
"""(kind, which element header (modulo their number) or byte, offset in it, argument)."""


def element_starts(data: bytes, *, implicit: bool = False) -> list[int]:
    """Where each File Meta and top-level element starts, and each nested item and element of the sequence."""
    starts = [e.start for e in m.meta(data)] + [e.start for e in m.top(data, implicit=implicit)]
    seq = m.find(m.top(data, implicit=implicit), 0x00081140)
    starts += [seq.value] + [e.start for e in m.elements(data, seq.value + 8, seq.end, implicit=implicit)]
    return sorted(starts)


def mutate(data: bytes, mutations: list[tuple[str, int, int, int]], starts: list[int], on_headers: bool) -> bytes:
    out = bytearray(data)
    for kind, where, offset, arg in mutations:
        if not out:
            break
        pos = (starts[where % len(starts)] + offset if on_headers else where) % len(out)
        if kind == "flip":
            out[pos] = arg if on_headers else out[pos] ^ (1 << (arg % 8))
        elif kind == "cut":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = struct.pack("<I", arg)
        elif kind == "delete":
            del out[pos : pos + arg]
        else:
            out[pos:pos] = out[pos : pos + arg]
    return bytes(out)


def kind_of(mutations: list[tuple[str, int, int, int]]) -> str:
    """The kind of a mutation list for the counts: its one kind, or "mixed"."""
    kinds = {kind for kind, *_ in mutations}
    return kinds.pop() if len(kinds) == 1 else "mixed"


class Counter:
    def __init__(self) -> None:
        self.n = 10000

    def next(self) -> int:
        self.n += 1
        return self.n


def test_hypothesis_mutations_through_stow(http: httpx.Client, server: Any) -> None:
    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    numbers = Counter()

    @settings(DERANDOMIZED, max_examples=300)
    @given(
        implicit=st.booleans(),
        on_headers=st.booleans(),
        mutations=st.lists(MUTATION, min_size=1, max_size=3),
    )
    def one(implicit: bool, on_headers: bool, mutations: list[tuple[str, int, int, int]]) -> None:
        data = m.base_file(numbers.next(), implicit=implicit)
        mutated = mutate(data, mutations, element_starts(data, implicit=implicit), on_headers)
        kind = kind_of(mutations)
        try:
            resp = stow(http, multipart([mutated]))
        except DROPPED:
            seen[kind]["dropped"] += 1
            raise
        label, _, _ = outcome(resp)
        seen[kind][label] += 1
        assert resp.status_code in (200, 202, 409), (resp.status_code, resp.text)

    one()
    report("hypothesis mutations, STOW-RS", seen)
    checked = check_index_agrees_with_dcmtk(server)
    print(f"  stored and read alike by dcmtk: {checked}")


def test_hypothesis_mutations_through_cstore(dimse_server: Any) -> None:
    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    numbers = Counter()
    sender = CStore(dimse_server)

    @settings(DERANDOMIZED, max_examples=200)
    @given(on_headers=st.booleans(), mutations=st.lists(MUTATION, min_size=1, max_size=3))
    def one(on_headers: bool, mutations: list[tuple[str, int, int, int]]) -> None:
        n = numbers.next()
        data = m.base_file(n)
        start_of_data_set = m.meta_end(data)
        starts = [s - start_of_data_set for s in element_starts(data) if s >= start_of_data_set]
        mutated = mutate(data[start_of_data_set:], mutations, starts, on_headers)
        assume(mutated)  # an empty data set cannot be sent: the peer would wait for its fragments
        kind = kind_of(mutations)
        status = sender.send(mutated, m.uid(n, 3))
        seen[kind]["aborted" if status is None else f"{status:04X}"] += 1
        assert status is not None
        assert status in (0x0000, 0xB000, 0xC000, 0xA900, 0x0111), hex(status)

    try:
        one()
    finally:
        sender.close()
    report("hypothesis mutations, C-STORE", seen)
    assert sender.aborted == 0
    checked = check_index_agrees_with_dcmtk(dimse_server)
    print(f"  stored and read alike by dcmtk: {checked}")


def test_hypothesis_mutations_of_multipart_framing(http: httpx.Client, server: Any) -> None:
    seen: collections.Counter[str] = collections.Counter()
    numbers = Counter()

    @settings(DERANDOMIZED, max_examples=150)
    @given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
    def one(mutations: list[tuple[str, int, int, int]]) -> None:
        body = multipart([m.base_file(numbers.next()), m.base_file(numbers.next())], boundary="bnd")
        marks = [i for i in range(len(body)) if body.startswith(b"--bnd", i) or body.startswith(b"\r\n", i)]
        mutated = mutate(body, mutations, marks, on_headers=True)
        try:
            resp = stow(http, mutated, stow_headers("bnd"))
        except DROPPED:
            seen["dropped"] += 1
            raise
        seen[outcome(resp)[0]] += 1
        assert resp.status_code < 500, (resp.status_code, resp.text)

    one()
    report("hypothesis mutations of multipart framing, STOW-RS", {"framing": seen})
    checked = check_index_agrees_with_dcmtk(server)
    print(f"  stored and read alike by dcmtk: {checked}")
