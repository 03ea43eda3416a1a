"""The DIMSE transfer syntax negotiation matrix: C-MOVE, auto-routing and C-GET of instances stored in seven
transfer syntaxes, to peers that accept only Implicit VR Little Endian, only Explicit VR Little Endian, only the
stored syntax, or several; the peers are dcmtk (storescp, getscu) and pynetdicom.

A row is one peer, a column one stored syntax (a pydicom test file, moved into one patient's study); a cell is
the transfer syntax the peer received the instance in, or `-` when it was refused. Every instance received must
have exactly the pixels pydicom decodes from the original (a cell reads `... (pixels differ)` otherwise). The
expected tables are the specification; the conformance statement shows them, and
`test_statement_shows_the_matrix` keeps it so (`python -m tests.dicomweb.test_dimse_negotiation` rewrites it).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.conftest import free_port
from tests.support.data import sample
from tests.support.dimse_util import TITLE, dcmtk, dimse_port, require_dcmtk, start
from tests.support.factory import multipart, stow_headers

pytestmark = pytest.mark.timeout(240)
MOVE = StudyRootQueryRetrieveInformationModelMove
GET = StudyRootQueryRetrieveInformationModelGet
STATEMENT = Path(__file__).parents[2] / "conformance" / "dicom-conformance-statement.md"
CALLING = "RAD"  # a configured peer (tests.support.dimse_util.PEERS) whose role may read every study


@dataclass(frozen=True)
class Source:
    code: str
    name: str
    file: str
    syntax: str


SOURCES = (
    Source("IMPL", "Implicit VR LE", "MR_small_implicit.dcm", ImplicitVRLittleEndian),
    Source("EXPL", "Explicit VR LE", "CT_small.dcm", ExplicitVRLittleEndian),
    Source("JPEG", "JPEG baseline (lossy)", "SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
    Source("JPLL", "JPEG lossless", "SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70"),
    Source("J2KR", "JPEG 2000 lossless", "MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    Source("J2KI", "JPEG 2000 (lossy)", "JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    Source("RLE", "RLE lossless", "MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
)
CODES = {s.syntax: s.code for s in SOURCES}
DIAGONAL = " ".join(s.code for s in SOURCES)


def _all(code: str) -> str:
    return " ".join([code] * len(SOURCES))


@dataclass(frozen=True)
class Row:
    key: str
    peer: str
    """What the peer is and what it accepts, for the statement."""
    cells: str
    """The expected cells, one code per source in SOURCES' order (`-`: refused)."""
    status: str = "0000"
    """The final status of the C-MOVE/C-GET (hex), or the routing jobs' state."""


SEND_ROWS = (
    Row("DCMTK_IMPL", "dcmtk storescp +xi (Implicit VR LE only)", _all("IMPL")),
    Row("PY_EXPL", "pynetdicom, Explicit VR LE only", _all("EXPL")),
    Row("ONLY", "pynetdicom, only the stored syntax (one peer per column)", DIAGONAL),
    Row("DCMTK_DEF", "dcmtk storescp, default options (uncompressed)", _all("EXPL")),
    Row("DCMTK_ALL", "dcmtk storescp +xa (all syntaxes)", "EXPL EXPL JPEG JPLL J2KR J2KI RLE"),
    Row("PY_ALL", "pynetdicom, all syntaxes (Implicit VR LE first)", "IMPL IMPL JPEG JPLL J2KR J2KI RLE"),
)
ROUTE_ROWS = tuple(Row(r.key, r.peer, r.cells, "done") for r in SEND_ROWS)
GET_ROWS = (
    Row("getscu", "dcmtk getscu, default options (uncompressed)", _all("EXPL")),
    Row("getscu +xv", "dcmtk getscu +xv (JPEG 2000 lossless, then uncompressed, one context)", _all("EXPL")),
    Row("getscu +xt", "dcmtk getscu +xt (JPEG-LS lossless, then uncompressed, one context)", _all("EXPL")),
    Row("PY_IMPL", "pynetdicom, Implicit VR LE only", _all("IMPL")),
    Row("PY_EXPL", "pynetdicom, Explicit VR LE only", _all("EXPL")),
    Row("PY_MIXED", "pynetdicom, [JPEG 2000 lossless, Explicit, Implicit] in one context", _all("EXPL")),
    Row("PY_ONLY", "pynetdicom, only the stored syntax (one C-GET per column)", DIAGONAL),
    Row("PY_SEPARATE", "pynetdicom, each syntax in a context of its own", DIAGONAL),
    Row("PY_J2KR", "pynetdicom, JPEG 2000 lossless only", "J2KR J2KR - J2KR J2KR - J2KR", "B000"),
)
GENERIC_DESTINATIONS = ("DCMTK_IMPL", "PY_EXPL", "DCMTK_DEF", "DCMTK_ALL", "PY_ALL")
STORESCP_OPTIONS = {"DCMTK_IMPL": ["+xi"], "DCMTK_DEF": [], "DCMTK_ALL": ["+xa"]}
PYNETDICOM_SYNTAXES = {
    "PY_EXPL": [ExplicitVRLittleEndian],
    "PY_ALL": list(ALL_TRANSFER_SYNTAXES),
    **{f"ONLY_{s.code}": [s.syntax] for s in SOURCES},
}


# ------------------------------------------------------------------------------------------------- the instances


@dataclass
class Instance:
    source: Source
    data: bytes
    sop_class: str
    sop_instance: str
    series: str
    pixels: np.ndarray[Any, Any]


@dataclass
class Corpus:
    study: str
    instances: list[Instance]

    def cells(self, received: dict[str, Dataset]) -> str:
        """The row's cells for what a peer received (keyed by SOP Instance UID)."""
        out = []
        for inst in self.instances:
            ds = received.get(inst.sop_instance)
            if ds is None:
                out.append("-")
                continue
            syntax = str(ds.file_meta.TransferSyntaxUID)
            cell = CODES.get(syntax, syntax)
            if not np.array_equal(np.asarray(ds.pixel_array), inst.pixels):
                cell += " (pixels differ)"
            out.append(cell)
        return " ".join(out)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    """The seven files moved into one patient's study (new series and instance UIDs; patient attributes equal),
    their encoded pixel data untouched."""
    study = generate_uid()
    instances = []
    for number, source in enumerate(SOURCES, start=1):
        ds = pydicom.dcmread(sample(source.file))
        assert ds.file_meta.TransferSyntaxUID == source.syntax
        pixels = np.asarray(ds.pixel_array)
        for keyword in ("PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDs", "IssuerOfPatientID"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.PatientID, ds.PatientName = "NEGOTIATION", "Negotiation^Matrix"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = generate_uid(), number, source.code
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        instances.append(
            Instance(source, buf.getvalue(), str(ds.SOPClassUID), ds.SOPInstanceUID, ds.SeriesInstanceUID, pixels)
        )
    return Corpus(study, instances)


def _stow(server: Any, corpus: Corpus) -> None:
    with httpx.Client(timeout=60, headers=server.headers) as http:
        body = multipart([i.data for i in corpus.instances])
        answer = http.post(f"{server.url}/dicom-web/studies", content=body, headers=stow_headers())
    assert answer.status_code == 200, answer.text


# ------------------------------------------------------------------------------------------ the destination peers


@dataclass
class Peers:
    """dcmtk storescp processes and pynetdicom storage SCPs on free ports, each under its own AE title."""

    ports: dict[str, int]
    folders: dict[str, Path]
    got: dict[str, dict[str, Dataset]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def destinations(self) -> str:
        return ",".join(f"{title}@127.0.0.1:{port}" for title, port in self.ports.items())

    def clear(self) -> None:
        with self.lock:
            self.got.clear()
        for folder in self.folders.values():
            for path in folder.iterdir():
                path.unlink()

    def received(self, title: str) -> dict[str, Dataset]:
        if title in self.folders:
            datasets = [pydicom.dcmread(p) for p in sorted(self.folders[title].iterdir())]
            return {str(ds.SOPInstanceUID): ds for ds in datasets}
        with self.lock:
            return dict(self.got.get(title, {}))

    def on_store(self, event: Any, title: str) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.got.setdefault(title, {})[str(ds.SOPInstanceUID)] = ds
        return 0x0000


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    require_dcmtk()
    root = tmp_path_factory.mktemp("peers")
    ports: dict[str, int] = {}
    folders = {title: root / title for title in STORESCP_OPTIONS}
    result = Peers(ports, folders)
    procs: list[subprocess.Popen[bytes]] = []
    ae = AE(ae_title="PEERS")
    ae.maximum_associations = 50
    try:
        # The in-process peers bind port 0 and report the port the kernel gave them; storescp needs a number, so
        # a port taken between free_port() and storescp's bind (by any outgoing connection) means another try.
        for title, syntaxes in PYNETDICOM_SYNTAXES.items():
            contexts = [build_context(cx.abstract_syntax, syntaxes) for cx in AllStoragePresentationContexts]
            handlers = [(evt.EVT_C_STORE, result.on_store, [title])]
            server = ae.start_server(("127.0.0.1", 0), block=False, contexts=contexts, evt_handlers=handlers)
            ports[title] = int(server.server_address[1])
        for title, options in STORESCP_OPTIONS.items():
            folders[title].mkdir()
            for _attempt in range(5):
                ports[title] = free_port()
                command = ["storescp", *options, "-aet", title, "-od", str(folders[title]), str(ports[title])]
                proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(proc)
                deadline = time.monotonic() + 10
                echo = ["echoscu", "-aec", title, "127.0.0.1", str(ports[title])]
                while proc.poll() is None and dcmtk(*echo).returncode:
                    assert time.monotonic() < deadline, f"storescp {title} did not start"
                    time.sleep(0.05)
                if proc.poll() is None:
                    break
            else:
                raise AssertionError(f"storescp {title} could not bind a port in 5 tries")
        yield result
    finally:
        ae.shutdown()
        for proc in procs:
            proc.terminate()
            proc.wait(10)


# ------------------------------------------------------------------------------------------------ the operations


def _query(level: str, **keys: Any) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return query


def _requestor() -> AE:
    ae = AE(ae_title=CALLING)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _move(server: Any, destination: str, query: Dataset) -> int:
    assoc = _requestor().associate("127.0.0.1", dimse_port(server), contexts=[build_context(MOVE)], ae_title=TITLE)
    assert assoc.is_established
    try:
        statuses = [status for status, _ in assoc.send_c_move(query, destination, MOVE)]
    finally:
        assoc.release()
    return int(statuses[-1].Status)


def _get(server: Any, query: Dataset, storage: dict[str, list[list[str]]]) -> tuple[int, dict[str, Dataset]]:
    """C-GET with pynetdicom, proposing for each SOP class of `storage` one context per syntax list."""
    received: dict[str, Dataset] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    contexts = [build_context(GET)]
    contexts += [build_context(sop, syntaxes) for sop, lists in storage.items() for syntaxes in lists]
    assoc = _requestor().associate(
        "127.0.0.1",
        dimse_port(server),
        contexts=contexts,
        ae_title=TITLE,
        ext_neg=[build_role(sop, scp_role=True) for sop in storage],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        statuses = [status for status, _ in assoc.send_c_get(query, GET)]
    finally:
        assoc.release()
    return int(statuses[-1].Status), received


def _getscu(server: Any, corpus: Corpus, options: list[str], folder: Path) -> tuple[int, dict[str, Dataset]]:
    folder.mkdir()
    run = dcmtk(
        "getscu", "-d", "-S", *options, "-aet", CALLING, "-aec", TITLE, "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={corpus.study}", "-od", folder, "127.0.0.1", str(dimse_port(server)),
    )  # fmt: skip
    finals = re.findall(r"C-GET RSP.*?DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})", run.stdout + run.stderr, re.S)
    assert finals, run.stdout + run.stderr
    datasets = [pydicom.dcmread(p) for p in folder.iterdir()]
    return int(finals[-1], 16), {str(ds.SOPInstanceUID): ds for ds in datasets}


def _table(rows: tuple[Row, ...], got: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    expected = {row.key: (row.status, row.cells) for row in rows}
    assert got == expected, "\n".join(f"{k}: got {got.get(k)}, expected {v}" for k, v in expected.items())
    return got


def _hex(status: int) -> str:
    return f"{status:04X}"


# ----------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("compression", ["none", "htj2k"])
def test_cmove_matrix(make_server: Any, peers: Peers, corpus: Corpus, compression: str) -> None:
    """With storage compression, the two native instances are kept as HTJ2K: peers get what they got without."""
    server = start(make_server, destinations=peers.destinations(), store_compression=compression)
    _stow(server, corpus)
    with httpx.Client(timeout=60, headers=server.headers) as http:
        metadata = http.get(f"{server.url}/dicom-web/studies/{corpus.study}/metadata").json()
    kept = sorted(str(m.get("00083002", {}).get("Value", ["-"])[0]) for m in metadata)
    assert kept.count("1.2.840.10008.1.2.4.202") == (2 if compression == "htj2k" else 0), kept
    peers.clear()
    got: dict[str, tuple[str, str]] = {}
    for row in SEND_ROWS:
        if row.key == "ONLY":  # one IMAGE-level C-MOVE per instance, each to the peer accepting its syntax only
            statuses, received = set(), {}
            for inst in corpus.instances:
                query = _query(
                    "IMAGE", StudyInstanceUID=corpus.study, SeriesInstanceUID=inst.series,
                    SOPInstanceUID=inst.sop_instance,
                )  # fmt: skip
                statuses.add(_hex(_move(server, f"ONLY_{inst.source.code}", query)))
                received.update(peers.received(f"ONLY_{inst.source.code}"))
            got[row.key] = ("/".join(sorted(statuses)), corpus.cells(received))
            continue
        status = _move(server, row.key, _query("STUDY", StudyInstanceUID=corpus.study))
        got[row.key] = (_hex(status), corpus.cells(peers.received(row.key)))
    _table(SEND_ROWS, got)


def _jobs(dsn: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT state, payload::text AS payload, last_error FROM jobs WHERE kind = 'dimse.route'"
            )
        finally:
            await conn.close()
        return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]

    return asyncio.run(read())


def test_routing_matrix(make_server: Any, peers: Peers, corpus: Corpus) -> None:
    rules = [{"name": f"all to {title}", "destination": title} for title in GENERIC_DESTINATIONS]
    rules += [
        {"name": f"{s.code} only", "destination": f"ONLY_{s.code}", "attributes": {"SeriesDescription": s.code}}
        for s in SOURCES
    ]
    server = start(make_server, destinations=peers.destinations(), routes=json.dumps(rules))
    peers.clear()
    _stow(server, corpus)
    expected_jobs = len(SOURCES) * len(GENERIC_DESTINATIONS) + len(SOURCES)
    deadline = time.monotonic() + 120
    while True:
        jobs = _jobs(server.dsn)
        if len(jobs) == expected_jobs and all(j["state"] in ("done", "failed") for j in jobs):
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.2)
    got: dict[str, tuple[str, str]] = {}
    for row in ROUTE_ROWS:
        titles = [f"ONLY_{s.code}" for s in SOURCES] if row.key == "ONLY" else [row.key]
        states = sorted({j["state"] for j in jobs if j["payload"]["destination"] in titles})
        received: dict[str, Dataset] = {}
        for title in titles:
            received.update(peers.received(title))
        got[row.key] = ("/".join(states), corpus.cells(received))
    _table(ROUTE_ROWS, got)


def test_cget_matrix(make_server: Any, corpus: Corpus, tmp_path: Path) -> None:
    require_dcmtk()
    server = start(make_server)
    _stow(server, corpus)
    study = _query("STUDY", StudyInstanceUID=corpus.study)
    classes = list(dict.fromkeys(i.sop_class for i in corpus.instances))
    j2k = "1.2.840.10008.1.2.4.90"
    mixed = [j2k, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    got: dict[str, tuple[str, str]] = {}
    for row in GET_ROWS:
        if row.key.startswith("getscu"):
            options = row.key.split()[1:]
            status, received = _getscu(server, corpus, options, tmp_path / row.key.replace(" ", "_"))
        elif row.key == "PY_ONLY":  # one IMAGE-level C-GET per instance, proposing its stored syntax only
            statuses, received = set(), {}
            for inst in corpus.instances:
                query = _query(
                    "IMAGE", StudyInstanceUID=corpus.study, SeriesInstanceUID=inst.series,
                    SOPInstanceUID=inst.sop_instance,
                )  # fmt: skip
                one_status, one = _get(server, query, {inst.sop_class: [[inst.source.syntax]]})
                statuses.add(_hex(one_status))
                received.update(one)
            got[row.key] = ("/".join(sorted(statuses)), corpus.cells(received))
            continue
        else:
            storage = {
                "PY_IMPL": {sop: [[ImplicitVRLittleEndian]] for sop in classes},
                "PY_EXPL": {sop: [[ExplicitVRLittleEndian]] for sop in classes},
                "PY_MIXED": {sop: [mixed] for sop in classes},
                "PY_SEPARATE": {sop: [[s.syntax] for s in SOURCES] for sop in classes},
                "PY_J2KR": {sop: [[j2k]] for sop in classes},
            }[row.key]
            status, received = _get(server, study, storage)
        got[row.key] = (_hex(status), corpus.cells(received))
    _table(GET_ROWS, got)


# ------------------------------------------------------------------------------------------------ the statement

_NAMES = {s.code: s.name for s in SOURCES}


def render() -> str:
    """The statement's matrix section, from the expected tables (which the tests above hold the code to)."""
    names = " | ".join(s.name for s in SOURCES)
    dashes = " | ".join("---" for _ in SOURCES)

    def cells(row: Row) -> str:
        out = []
        for source, code in zip(SOURCES, row.cells.split(), strict=True):
            if code == "-":
                out.append("not sent")
            else:
                out.append("as stored" if code == source.code else _NAMES[code].removesuffix(" (lossy)"))
        return " | ".join(out)

    routed = {row.key: row.status for row in ROUTE_ROWS}
    lines = ["C-MOVE and auto-routing (the same peers as Move Destination and as routing destination):", ""]
    lines += [f"| Peer (what it accepts) | C-MOVE | Routing | {names} |", f"| --- | --- | --- | {dashes} |"]
    lines += [f"| {row.peer} | {row.status} | {routed[row.key]} | {cells(row)} |" for row in SEND_ROWS]
    lines += ["", "C-GET (the peer is the requester):", ""]
    lines += [f"| Peer (what it proposes) | C-GET | {names} |", f"| --- | --- | {dashes} |"]
    lines += [f"| {row.peer} | {row.status} | {cells(row)} |" for row in GET_ROWS]
    return "\n".join(lines)


_SECTION = re.compile(r"(<!-- dimse-negotiation:begin -->\n)(.*?)(\n<!-- dimse-negotiation:end -->)", re.S)


def test_statement_shows_the_matrix() -> None:
    match = _SECTION.search(STATEMENT.read_text(encoding="utf-8"))
    assert match is not None, "no dimse-negotiation section in the conformance statement"
    assert match.group(2) == render(), "run `python -m tests.dicomweb.test_dimse_negotiation` to rewrite the section"


def write_statement() -> None:
    text = STATEMENT.read_text(encoding="utf-8")
    new, count = _SECTION.subn(lambda m: m.group(1) + render() + m.group(3), text)
    if count != 1:
        sys.exit("no dimse-negotiation section in the conformance statement")
    STATEMENT.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    write_statement()
