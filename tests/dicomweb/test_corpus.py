"""The corpus test: every file pydicom's test data and pydicom-data ship, stored (STOW-RS) in one live server and
retrieved in every transfer syntax the conformance statement advertises, as whole instances and as frames; the
pixels decoded and compared with pydicom's own decode of the original (exact for lossless targets, a PSNR bound
for lossy ones); the metadata read back with pydicom's `Dataset.from_json`.

The (source syntax x target syntax) table this produces is part of the conformance statement, between the
`corpus` markers: the test fails when the committed table differs from what the run produced. After a change
that alters it, regenerate it with `HOUNSFIELD_CORPUS_WRITE=1 make test ARGS=tests/dicomweb/test_corpus.py` and review
the diff. A failed pair (wrong pixels, a server error, a malformed answer) fails the test whatever the table.

The server runs as a child process (its codecs on one core, the test's decoding on the other); files are
processed by a few threads at once. See `tests/support/corpus.py` for the files and how each is judged.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomweb.codecs import negotiate
from dicomweb.pixels import encode
from tests.support import corpus
from tests.support.corpus import AS_STORED, EXACT, FAILED, REFUSED, Result, Source
from tests.support.procs import serve

STATEMENT = Path(__file__).resolve().parents[2] / "conformance" / "dicom-conformance-statement.md"
BEGIN, END = "<!-- corpus:begin -->", "<!-- corpus:end -->"
WRITE = os.environ.get("HOUNSFIELD_CORPUS_WRITE") == "1"
THREADS = 4
OCTET = "application/octet-stream"


def test_corpus(dsn: str, tmp_path: Path) -> None:
    files = corpus.corpus_files()
    assert len(files) > 200, "pydicom's and pydicom-data's test files are dependencies"
    env = {"HOUNSFIELD_WORKER": "0", "HOUNSFIELD_RENDITIONS": "", "HOUNSFIELD_INFERENCE": "0"}
    with warnings.catch_warnings(), serve(dsn, tmp_path / "data", **env) as server:
        warnings.simplefilter("ignore")  # the corpus is meant to be odd; set once, for every thread
        with ThreadPoolExecutor(THREADS) as pool:
            done = list(pool.map(lambda item: _run(server.url, server.headers, *item), files))
    sources = [source for source, _reason, _results in done]
    ingest = {source.name: reason for source, reason, _results in done if reason is not None}
    results = [r for _source, _reason, rs in done for r in rs]
    table = corpus.render(sources, ingest, results)
    failed = [r for r in results if r.outcome == FAILED]
    text = STATEMENT.read_text(encoding="utf-8")
    before, _, rest = text.partition(BEGIN)
    committed, _, after = rest.partition(END)
    assert _, f"no {END} marker in {STATEMENT.name}"
    if WRITE:
        STATEMENT.write_text(f"{before}{BEGIN}\n{table}{END}{after}", encoding="utf-8")
    assert not failed, "\n".join(f"{r.source} {r.kind} {r.target}: {r.detail}" for r in failed)
    if committed.strip() != table.strip():
        diff = difflib.unified_diff(committed.strip().splitlines(), table.strip().splitlines(), lineterm="", n=0)
        pytest.fail(
            "the corpus table differs from the conformance statement's; review and regenerate it with "
            "HOUNSFIELD_CORPUS_WRITE=1 make test ARGS=tests/dicomweb/test_corpus.py\n" + "\n".join(list(diff)[:40])
        )


# ---------------------------------------------------------------------------------------------- one file


def _run(url: str, headers: dict[str, str], name: str, path: Path) -> tuple[Source, str | None, list[Result]]:
    source = corpus.load(name, path)
    if not source.dicom:
        return source, None, []
    # No keep-alive: a thread may decode for longer than uvicorn keeps an idle connection (5 s), and a request
    # sent as the server closes it would fail for no fault of either.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, headers=headers, timeout=120, limits=limits) as http:
        reason = _store(http, source)
        if reason is not None:
            return source, reason, []
        results = list(_retrieve(http, source))
    source.reference = None  # the pixels are judged: keep the memory of 250 files low
    return source, None, results


def _store(http: httpx.Client, source: Source) -> str | None:
    """STOW-RS of the file: None when stored, else the failure reason (and comment) the server gave."""
    boundary = "corpus-boundary-7d1f"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + source.data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    response = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
    if response.status_code in (200, 202):
        return None
    assert response.status_code in (400, 409, 413, 415), (source.name, response.status_code, response.text[:300])
    try:
        item = response.json()["00081198"]["Value"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return f"{response.status_code}: {response.text[:120]}"
    code = item.get("00081197", {}).get("Value", [0])[0]
    comment = (item.get("00000902", {}).get("Value") or [""])[0]
    return f"{code:04X}H {comment}".strip()


def _path(source: Source, suffix: str = "") -> str:
    ds = source.original
    assert ds is not None
    return (
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}{suffix}"
    )


def _retrieve(http: httpx.Client, source: Source) -> Iterator[Result]:
    yield from _metadata(http, source)
    judged = source.has_pixels or source.no_reference == "no Pixel Data"
    for target in corpus.instance_targets() if judged else [AS_STORED]:
        if source.over_budget and target not in (AS_STORED, *corpus.NATIVE_TARGETS):
            yield Result("instance", source.name, target, corpus.NOT_TRIED, "over the per-instance budget")
            continue
        yield _instance(http, source, target)
    if source.has_pixels:
        meta = _described(http, source)
        for target in corpus.frame_targets():
            yield _frames(http, source, target, meta)


def _described(http: httpx.Client, source: Source) -> Dataset:
    [item] = http.get(_path(source, "/metadata")).json()
    return Dataset.from_json(item, bulk_data_uri_handler=lambda _tag, _vr, _uri: None)


def _metadata(http: httpx.Client, source: Source) -> Iterator[Result]:
    """The instance's metadata read by `Dataset.from_json`: it must hold the original's attributes (top level, values
    as pydicom reads them; bulk data and group 0002 aside). Not a pair: a failure only."""
    response = http.get(_path(source, "/metadata"))
    if response.status_code != 200:
        yield Result("metadata", source.name, "", FAILED, f"metadata: HTTP {response.status_code}")
        return
    try:
        got = Dataset.from_json(response.json()[0], bulk_data_uri_handler=lambda _tag, _vr, _uri: None)
    except Exception as exc:  # pydicom raises many kinds of errors
        yield Result("metadata", source.name, "", FAILED, f"from_json: {exc}"[:200])
        return
    differs = _differences(source.original, got)
    if differs:
        yield Result("metadata", source.name, "", FAILED, f"metadata differs: {differs}"[:300])


_BINARY = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"})
_NUMBERS = frozenset({"DS", "IS", "FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"})


def _differences(original: Dataset | None, got: Dataset, *, private: bool = True) -> str:
    """The top-level attributes of `original` that `got` lacks or holds with another value (group 0002, binary
    values and sequences aside). Numbers compare as numbers: DICOM JSON carries DS and IS as JSON numbers
    (PS3.18 F.2.3), so `19` may come back as `19.0`; an empty value equals none. `private=False` leaves private
    elements out: in Implicit VR Little Endian their VR is lost (PS3.5 7.1.3), a reader sees bytes."""
    if original is None:
        return ""
    out = []
    for element in original:
        if element.tag.group == 0x0002 or element.VR in _BINARY or (element.tag.is_private and not private):
            continue
        if element.tag not in got:
            if not _empty(element.value):
                out.append(f"{element.tag} missing")
            continue
        mine, theirs = element.value, got[element.tag].value
        if _empty(mine) and _empty(theirs):
            continue
        same = _same_numbers(mine, theirs) if element.VR in _NUMBERS else str(mine) == str(theirs)
        if not same:
            out.append(f"{element.tag} {str(mine)[:30]!r} -> {str(theirs)[:30]!r}")
    return "; ".join(out[:4])


def _empty(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, (list, pydicom.multival.MultiValue)) and not value)


def _same_numbers(a: Any, b: Any) -> bool:
    left = list(a) if isinstance(a, (list, pydicom.multival.MultiValue)) else [a]
    right = list(b) if isinstance(b, (list, pydicom.multival.MultiValue)) else [b]
    try:
        return len(left) == len(right) and all(
            float(x) == float(y) or abs(float(x) - float(y)) <= 1e-9 * max(abs(float(x)), 1.0)
            for x, y in zip(left, right, strict=True)
        )
    except (TypeError, ValueError):
        return str(a) == str(b)


# ---------------------------------------------------------------------------------------------- instances


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related response (RFC 2046), read here independently of
    the server's own multipart code."""
    content_type = response.headers["content-type"]
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    assert match, content_type
    delimiter = b"--" + match.group(1).encode()
    out = []
    for chunk in response.content.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk.partition(b"\r\n\r\n")
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in head.decode("latin-1").split("\r\n") if ":" in line)
        )
        out.append((headers.get("content-type", ""), body[:-2] if body.endswith(b"\r\n") else body))
    return out


def _refused(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)[:300]
    except ValueError:
        return response.text[:300]


def _instance(http: httpx.Client, source: Source, target: str) -> Result:
    def result(outcome: str, detail: str = "") -> Result:
        return Result("instance", source.name, target, outcome, detail)

    accept = f'multipart/related; type="application/dicom"; transfer-syntax={target}'
    response = http.get(_path(source), headers={"Accept": accept})
    if response.status_code == 406:
        return result(REFUSED, _refused(response))
    if response.status_code != 200:
        return result(FAILED, f"HTTP {response.status_code}: {response.text[:120]}")
    parts = _parts(response)
    if len(parts) != 1:
        return result(FAILED, f"{len(parts)} parts")
    content_type, body = parts[0]
    if target == AS_STORED:
        return result(EXACT) if body == source.data else result(FAILED, "not the stored bytes")
    if content_type != f"application/dicom; transfer-syntax={target}":
        return result(FAILED, f"Content-Type {content_type}")
    try:
        ds = corpus.decode_instance(body)
        if ds.file_meta.TransferSyntaxUID != target or ds.SOPInstanceUID != source.original.SOPInstanceUID:  # type: ignore[union-attr]
            return result(
                FAILED, f"file meta says {ds.file_meta.TransferSyntaxUID}, SOP Instance UID {ds.SOPInstanceUID}"
            )
        if source.reference is None:  # no Pixel Data: the data set itself must come back
            differs = _differences(source.original, ds, private=target != corpus.IMPLICIT_VR_LITTLE_ENDIAN)
            return result(FAILED, differs) if differs else result(EXACT)
        got = corpus.instance_pixels(ds)
    except Exception as exc:  # a client's decoder failing on what we sent is our failure
        return result(FAILED, f"pydicom cannot read the answer: {type(exc).__name__}: {exc}"[:200])
    return result(*corpus.compare(got, source.reference, may_lose=encode.is_lossy(target)))


# ---------------------------------------------------------------------------------------------- frames


def _frames(http: httpx.Client, source: Source, target: str, meta: Dataset) -> Result:
    def result(outcome: str, detail: str = "") -> Result:
        return Result("frames", source.name, target, outcome, detail)

    numbers = source.sample()
    if target in (AS_STORED, corpus.EXPLICIT_VR_LITTLE_ENDIAN):
        media = OCTET
    else:
        media = negotiate.media_type_of_syntax(target) or OCTET
    accept = f'multipart/related; type="{media}"; transfer-syntax={target}'
    response = http.get(_path(source, "/frames/" + ",".join(map(str, numbers))), headers={"Accept": accept})
    if response.status_code == 406:
        return result(REFUSED, _refused(response))
    if response.status_code != 200:
        return result(FAILED, f"HTTP {response.status_code}: {response.text[:120]}")
    parts = _parts(response)
    if len(parts) != len(numbers):
        return result(FAILED, f"{len(parts)} parts for {len(numbers)} frames")
    outcomes = []
    for number, (content_type, body) in zip(numbers, parts, strict=True):
        sent = content_type.partition("transfer-syntax=")[2].strip()
        outcomes.append(_frame(source, target, number, sent, body, meta))
    worst = max(outcomes, key=lambda o: [EXACT, corpus.WITHIN, FAILED].index(o[0]))
    return result(*worst)


def _frame(source: Source, target: str, number: int, sent: str, body: bytes, meta: Dataset) -> tuple[str, str]:
    stored_compressed = bool(source.fragments)
    if target == AS_STORED:
        expected = source.syntax if stored_compressed else corpus.EXPLICIT_VR_LITTLE_ENDIAN
        if sent != expected:
            return FAILED, f"frame {number} sent as {sent or '?'}"
        if stored_compressed:
            return (
                (EXACT, "")
                if body == source.fragments[number - 1]
                else (FAILED, f"frame {number}: not the stored fragment")
            )
    elif sent != target:
        return FAILED, f"frame {number} sent as {sent or '?'}"
    try:
        got = corpus.frame_pixels(body, sent, meta)
    except Exception as exc:  # a client's decoder failing on what we sent is our failure
        return FAILED, f"frame {number}: cannot decode it with the metadata: {type(exc).__name__}: {exc}"[:200]
    repacked = stored_compressed and source.photometric == "YBR_FULL_422" and sent == corpus.EXPLICIT_VR_LITTLE_ENDIAN
    outcome, detail = corpus.compare(
        got, corpus.reference_frame(source, number), may_lose=encode.is_lossy(sent) or repacked
    )
    return outcome, f"frame {number}: {detail}" if detail else ""


@pytest.fixture(autouse=True)
def _quiet_numpy() -> Iterator[None]:
    with np.errstate(all="ignore"):
        yield
