"""The stored DICOM JSON (dicomweb.ingest.dicomjson) is pydicom's: for every file of the corpus (what pydicom and
pydicom-data ship, as in test_corpus.py), the malformed inputs of test_malformed.py and files made here with odd
values, the document written by `dicomjson` equals, byte for byte, the one pydicom's `Dataset.to_json_dict`
gives and `json.dumps` writes; where pydicom raises (a value it cannot convert), `dicomjson` raises the same
error at the same step, and the warnings pydicom gives on the way are the same.

Each file is read as ingest reads it (an open file, pixels not read, large values deferred), once for each path."""

from __future__ import annotations

import json
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomweb.ingest import dicomjson
from dicomweb.ingest.checks import read_structure
from dicomweb.ingest.reasons import InstanceRejected
from tests.support import corpus, malformed
from tests.support.malformed import _item, base_file, elements, explicit, top

Outcome = tuple[str, str]
"""("ok", the document) or (the step that raised, the error)."""


def _read(path: Path, fp: Any) -> Dataset:
    return pydicom.dcmread(fp, stop_before_pixels=True, defer_size=1025)


def _pydicom(path: Path) -> tuple[Outcome, list[str]]:
    """The document as ingest built it with pydicom: the elements copied into a new data set, converted on the
    way; `to_json_dict`; `json.dumps` with sorted keys."""
    with open(path, "rb") as fp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = _read(path, fp)
        except Exception as exc:
            return ("read", repr(exc)), []
        step = "convert"
        try:
            copy = Dataset()
            copy.set_original_encoding(ds.is_implicit_VR, ds.is_little_endian, ds._character_set)
            for tag in ds.keys():
                copy[tag] = ds[tag]
            step = "json"
            doc = copy.to_json_dict(bulk_data_threshold=2**31)
            step = "dumps"
            text = json.dumps({k: doc[k] for k in sorted(doc)}, separators=(",", ":"), ensure_ascii=False)
        except Exception as exc:
            return (step, repr(exc)), [str(w.message) for w in caught]
    return ("ok", text), [str(w.message) for w in caught]


def _ours(path: Path) -> tuple[Outcome, list[str]]:
    """The same through `dicomjson`, as dicomweb.ingest.parse calls it."""
    with open(path, "rb") as fp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = _read(path, fp)
        except Exception as exc:
            return ("read", repr(exc)), []
        step = "convert"
        try:
            converted = [ds[tag] for tag in ds.keys()]
            step = "json"
            doc = dicomjson.from_elements(converted)
            step = "dumps"
            text = dicomjson.dumps({k: doc[k] for k in sorted(doc)})
        except Exception as exc:
            return (step, repr(exc)), [str(w.message) for w in caught]
    return ("ok", text), [str(w.message) for w in caught]


def _differences(files: list[tuple[str, Path]]) -> tuple[list[str], int, int]:
    """What differs, file by file; how many files gave a document, how many were refused (by both). Run in a
    thread of its own, as ingest parses: both paths recurse on nesting, and under pytest's deep stack pydicom's
    would reach the recursion limit at a depth the server allows."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_compare, files).result()


def _compare(files: list[tuple[str, Path]]) -> tuple[list[str], int, int]:
    out: list[str] = []
    documents = refused = 0
    for name, path in files:
        theirs, their_warnings = _pydicom(path)
        ours, our_warnings = _ours(path)
        if (theirs, their_warnings) != (ours, our_warnings) and _refused_before(path):
            continue  # ingest never builds this document (the 300-level nesting: pydicom's recursion fails)
        if theirs != ours:
            out.append(f"{name}: {_first_difference(theirs, ours)}")
        elif their_warnings != our_warnings:
            out.append(f"{name}: warnings {their_warnings[:3]} != {our_warnings[:3]}")
        elif ours[0] == "ok":
            documents += 1
        elif ours[0] != "read":
            refused += 1
    return out, documents, refused


def _refused_before(path: Path) -> bool:
    """Whether ingest refuses the file before it builds the document (its structure check)."""
    with open(path, "rb") as fp:
        try:
            read_structure(fp, path.stat().st_size)
        except InstanceRejected:
            return True
    return False


def _first_difference(theirs: Outcome, ours: Outcome) -> str:
    if theirs[0] != ours[0]:
        return f"pydicom {theirs[0]}: {theirs[1][:200]}; dicomjson {ours[0]}: {ours[1][:200]}"
    a, b = theirs[1], ours[1]
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"at {at}: pydicom ...{a[max(0, at - 60) : at + 60]!r} dicomjson ...{b[max(0, at - 60) : at + 60]!r}"


def test_corpus_documents_are_pydicoms() -> None:
    files = [(name, path) for name, path in corpus.corpus_files() if corpus.is_dicom_file(path)]
    assert len(files) > 200, "pydicom's and pydicom-data's test files are dependencies"
    differences, documents, _refused = _differences(files)
    assert not differences, "\n".join(differences[:20])
    assert documents > 200


def test_malformed_inputs_are_refused_alike(tmp_path: Path) -> None:
    files = []
    for i, data in enumerate([case.data for case in malformed.CASES] + malformed.controls()):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(data)
        files.append((f"malformed {i}", path))
    differences, documents, _refused = _differences(files)
    assert not differences, "\n".join(differences[:20])
    assert documents > 10


# ---------------------------------------------------------------------------------------------- odd values

CREATOR = explicit(0x00090010, b"LO", b"HOUNSFIELD TEST ")


def _private(element: int, vr: bytes, value: bytes) -> bytes:
    return explicit(0x00091000 | element, vr, value)


def _sequence(tag: int, *items: bytes) -> bytes:
    return explicit(tag, b"SQ", b"".join(_item(content) for content in items))


ODD: dict[str, bytes] = {
    "DS in exponent notation, tiny and huge": explicit(0x00200037, b"DS", b"1\\-2.0510349e-10\\0\\0\\1E+20\\-0.00001"),
    "DS NaN and infinity": explicit(0x00180088, b"DS", b"NaN\\inf\\-inf "),
    "DS with an empty value among others": explicit(0x00281050, b"DS", b"40\\\\-5.5"),
    "DS that is not a number": explicit(0x00180050, b"DS", b"abc "),
    "DS over its 16 characters": explicit(0x00180050, b"DS", b"3.14159265358979323846"),
    "IS with a fraction": explicit(0x00201041, b"DS", b"1.5 ") + explicit(0x00200019, b"IS", b"1.5 "),
    "IS beyond 64 bits": explicit(0x00200019, b"IS", b"123456789012345678901234"),
    "IS signed and padded": explicit(0x00200019, b"IS", b"+12\\ -7"),
    "PN with groups and several names": explicit(0x00101001, b"PN", b"A^B=C^D=E^F\\G^H==I\\=J"),
    "PN empty": explicit(0x00101001, b"PN", b""),
    "PN of an empty group only": explicit(0x00101001, b"PN", b"=="),
    "PN Latin-1 under ISO_IR 100": explicit(0x00080005, b"CS", b"ISO_IR 100")
    + explicit(0x00101001, b"PN", "Müller^Jörg".encode("latin-1")),
    "PN and LO in UTF-8": explicit(0x00080005, b"CS", b"ISO_IR 192")
    + explicit(0x00101001, b"PN", "山田^太郎=やまだ^たろう ".encode())
    + explicit(0x00081030, b"LO", "Étude \u2028 ☃".encode()),
    "non-ASCII bytes under the default character set": explicit(0x00081030, b"LO", b"caf\xe9 "),
    "AT one and several": explicit(0x00209165, b"AT", struct.pack("<HHHH", 0x0018, 0x1063, 0x0028, 0x0009))
    + explicit(0x00289001, b"AT", b""),
    "text with controls, quotes, backslashes": explicit(0x00204000, b"LT", b'a\tb\x01c"d\\e\x7f\r\n')
    + explicit(0x00400280, b"ST", b"\x1b$B 0\x00"),
    "empty values of every kind": b"".join(
        explicit(tag, vr, b"")
        for tag, vr in (
            (0x00081030, b"LO"),
            (0x00180050, b"DS"),
            (0x00200019, b"IS"),
            (0x00181150, b"IS"),
            (0x00280106, b"US"),
            (0x00189087, b"FD"),
            (0x0040A160, b"UT"),
            (0x00880200, b"SQ"),
            (0x00420011, b"OB"),
            (0x00660023, b"OF"),
            (0x00189219, b"UN"),
        )
    ),
    "numbers of every binary VR": CREATOR
    + _private(0x01, b"FD", struct.pack("<4d", 1e-300, float("nan"), float("-inf"), 0.1))
    + _private(0x02, b"FL", struct.pack("<3f", 0.3, 1e-7, 3.4e38))
    + _private(0x03, b"SV", struct.pack("<2q", -(2**63), 42))
    + _private(0x04, b"UV", struct.pack("<Q", 2**64 - 1))
    + _private(0x05, b"SS", struct.pack("<3h", -1, 0, 32767))
    + _private(0x06, b"SL", struct.pack("<l", -(2**31)))
    + _private(0x07, b"UL", struct.pack("<2L", 0, 2**32 - 1))
    + _private(0x08, b"US", struct.pack("<H", 65535)),
    "binary values inline": CREATOR
    + _private(0x10, b"OB", b"\x00\x01\x02\xff")
    + _private(0x11, b"OW", b"\x01\x02\x03\x04")
    + _private(0x12, b"OF", struct.pack("<2f", 1.5, -2))
    + _private(0x13, b"OD", struct.pack("<d", 1e100))
    + _private(0x14, b"OL", struct.pack("<L", 7))
    + _private(0x15, b"OV", struct.pack("<Q", 9))
    + _private(0x16, b"UN", b"raw bytes of unknown meaning")
    + _private(0x17, b"UC", b"up\\to\\unlimited ")
    + _private(0x18, b"UR", b"http://example.org/a b ")
    + _private(0x19, b"UT", b"unlimited text \\ with a backslash"),
    "UN of a known tag": explicit(0x00081030, b"UN", b"Known as LO "),
    "sequences nested, empty, with empty items": _sequence(
        0x00081115,
        _sequence(0x00081199, explicit(0x00081150, b"UI", b"1.2.3\x00"), b"") + explicit(0x00200013, b"IS", b"4 "),
        b"",
    )
    + _sequence(0x00089215),
    "LUT data, ambiguous VR, in a sequence": _sequence(
        0x00283010,
        explicit(0x00283002, b"US", struct.pack("<3H", 4, 0, 16))
        + explicit(0x00283006, b"OW", struct.pack("<4H", 0, 100, 200, 300)),
    ),
    "a large value read on demand": explicit(0x0040A160, b"UT", b"x" * 4000)
    + CREATOR
    + _private(0x20, b"OB", bytes(range(256)) * 8),
}


def _odd_file(n: int, raw: bytes) -> bytes:
    """A small CT with the elements `raw` put in tag order (replacing those of the same tag): a file ingest would
    parse, not one its structure check refuses."""
    data = base_file(n)
    for element in elements(raw, 0, len(raw)):
        value = raw[element.start : element.end]
        top_level = top(data)
        same = next((e for e in top_level if e.tag == element.tag), None)
        if same is not None:
            data = data[: same.start] + value + data[same.end :]
        else:
            after = next(e for e in top_level if e.tag > element.tag)
            data = data[: after.start] + value + data[after.start :]
    return data


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_values_are_written_as_pydicom_writes_them(tmp_path: Path, name: str) -> None:
    path = tmp_path / "odd.dcm"
    path.write_bytes(_odd_file(4700 + sorted(ODD).index(name), ODD[name]))
    assert not _refused_before(path)
    implicit = tmp_path / "odd-implicit.dcm"
    ds = pydicom.dcmread(path, force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rewriting invalid values as they are
        try:
            ds.save_as(implicit, implicit_vr=True, little_endian=True, enforce_file_format=True)
        except Exception:  # a value pydicom cannot write back: the explicit VR file is the case
            implicit.unlink(missing_ok=True)
    files = [(name, path)] + ([(f"{name}, implicit VR", implicit)] if implicit.exists() else [])
    differences, _documents, _refused = _differences(files)
    assert not differences, "\n".join(differences)


def test_refusals_are_pydicoms(tmp_path: Path) -> None:
    """The values pydicom cannot represent are refused by both, at the same step, with the same error."""
    for i, name in enumerate(("DS that is not a number", "DS with an empty value among others")):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(_odd_file(4790 + i, ODD[name]))
        theirs, _ = _pydicom(path)
        ours, _ = _ours(path)
        assert theirs[0] == "json", theirs
        assert ours == theirs


class _Text(str):
    """A str subclass, as pydicom's UID is."""


DOCUMENTS: dict[str, dict[str, Any]] = {
    "str subclass": {"00080018": {"vr": "UI", "Value": [_Text("1.2.3")]}},
    "bytes in a text value": {"00081030": {"vr": "LO", "Value": [b"bytes"]}},
    "a set in a text value": {"00081030": {"vr": "LO", "Value": [{"a"}]}},
    "lone surrogate": {"00081030": {"vr": "LO", "Value": ["\ud800"]}},
    "integers beyond 64 bits": {"00200019": {"vr": "IS", "Value": [2**70, -(2**70)]}},
    "floats of every magnitude": {
        "00180050": {"vr": "DS", "Value": [0.0, -0.0, 1e-4, 9.99e-5, 1e16, 9999999999999998.0, 5e-324, 1.7e308]}
    },
    "non-finite floats": {"00180050": {"vr": "FD", "Value": [float("nan"), float("inf"), float("-inf"), None]}},
    "floats in a sequence item": {"00081115": {"vr": "SQ", "Value": [{"00180050": {"vr": "DS", "Value": [1e-9]}}]}},
}


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_dumps_is_json_dumps(name: str) -> None:
    """Documents pydicom's values do not make but `dumps` must write (or refuse) as `json.dumps` does."""
    document = DOCUMENTS[name]
    try:
        expected: object = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    except Exception as exc:
        expected = repr(exc)
    try:
        got: object = dicomjson.dumps(document)
    except Exception as exc:
        got = repr(exc)
    assert got == expected
