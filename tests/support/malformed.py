"""Malformed Part 10 files made by hand from well-formed ones, for the ingest's refusal tests and fuzz corpus.

Each `Case` is a file that breaks PS3.10 / PS3.5 in one known way, with the failure reasons the server may answer
(never "stored"). The element splitter here is independent of the server's own walker (`dicomweb.ingest.wellformed`): it
only reads the well-formed files made by `base_file`, whose sequences all have defined lengths.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.support.factory import ct, part10

C000 = 0xC000
A900 = 0xA900
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UID_ROOT = "1.2.826.0.1.3680043.10.1400"


@dataclass(frozen=True, slots=True)
class Element:
    tag: int
    start: int
    value: int
    """Offset of the value (after the header)."""
    end: int
    vr: bytes


@dataclass(frozen=True, slots=True)
class Case:
    kind: str
    name: str
    data: bytes
    reasons: frozenset[int]
    """The failure reasons the server may give; the file is never stored."""
    comment: str = ""
    """A text the reason's comment contains."""
    in_data_set: bool = True
    """The damage is in the data set (after an intact File Meta group): the case can be sent by C-STORE."""


def uid(n: int, part: int) -> str:
    return f"{UID_ROOT}.{n}.{part}"


def base_dataset(n: int, *, frames: int = 1, **attrs: object) -> Dataset:
    """A small well-formed CT image with UIDs made from `n` (so every case has its own), a nested sequence, and
    UIDs of equal length (so a case can swap bytes in place)."""
    ds = ct(uid(n, 1), uid(n, 2), uid(n, 3), frames=frames, seed=n, rows=8, columns=8, **attrs)
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = uid(n, 4)
    ds.ReferencedImageSequence = Sequence([item])
    return ds


def base_file(n: int, *, implicit: bool = False, frames: int = 1, **attrs: object) -> bytes:
    ds = base_dataset(n, frames=frames, **attrs)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return part10(ds)


def meta_end(data: bytes) -> int:
    """Where the data set starts: after the File Meta group, whose length its first element gives."""
    assert data[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    return 144 + struct.unpack("<I", data[140:144])[0]


def elements(data: bytes, start: int, end: int, *, implicit: bool = False) -> list[Element]:
    """The elements of one data set level between `start` and `end` (defined lengths only)."""
    out = []
    pos = start
    while pos < end:
        group, elem = struct.unpack("<HH", data[pos : pos + 4])
        if implicit:
            vr, length = b"", struct.unpack("<I", data[pos + 4 : pos + 8])[0]
            header = 8
        elif data[pos + 4 : pos + 6] in LONG_VRS:
            vr, length, header = data[pos + 4 : pos + 6], struct.unpack("<I", data[pos + 8 : pos + 12])[0], 12
        else:
            vr, length, header = data[pos + 4 : pos + 6], struct.unpack("<H", data[pos + 6 : pos + 8])[0], 8
        assert length != 0xFFFFFFFF, "base files have defined lengths only"
        out.append(Element(group << 16 | elem, pos, pos + header, pos + header + length, vr))
        pos += header + length
    return out


def top(data: bytes, *, implicit: bool = False) -> list[Element]:
    return elements(data, meta_end(data), len(data), implicit=implicit)


def meta(data: bytes) -> list[Element]:
    return elements(data, 132, meta_end(data))


def find(items: list[Element], tag: int) -> Element:
    return next(e for e in items if e.tag == tag)


def replace_value(data: bytes, element: Element, value: bytes, *, implicit: bool = False) -> bytes:
    """`element` with a new value (and the length to match)."""
    header = bytearray(data[element.start : element.value])
    if implicit or element.vr in LONG_VRS:
        header[-4:] = struct.pack("<I", len(value))
    else:
        header[-2:] = struct.pack("<H", len(value))
    return data[: element.start] + bytes(header) + value + data[element.end :]


def explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in LONG_VRS:
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def nest(depth: int, *, undefined: bool = True, tag: int = 0x0040A730) -> bytes:
    """`depth` sequences, each the only element of an item of the one above; the innermost item holds one text."""
    inner = explicit(0x0040A160, b"UT", b"deep")
    for _ in range(depth):
        if undefined:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            inner = (
                struct.pack("<HH", tag >> 16, tag & 0xFFFF)
                + b"SQ\0\0\xff\xff\xff\xff"
                + item
                + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
            )
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = explicit(tag, b"SQ", item)
    return inner


def insert_top(data: bytes, raw: bytes, *, before: int = 0x7FE00010) -> bytes:
    """`raw` spliced into the top-level data set before the element `before`."""
    at = find(top(data), before).start
    return data[:at] + raw + data[at:]


def nested_file(n: int, depth: int, *, undefined: bool = True) -> bytes:
    return insert_top(base_file(n), nest(depth, undefined=undefined))


def with_uid_bytes(data: bytes, old: str, new: bytes) -> bytes:
    """Every occurrence of the UID `old` replaced by `new` bytes of the same length."""
    raw = old.encode()
    assert len(new) == len(raw) and raw in data
    return data.replace(raw, new)


def deflated_file(n: int) -> bytes:
    ds = base_dataset(n)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return part10(ds)


def _cases() -> Iterator[Case]:
    n = 0

    def nxt() -> int:
        nonlocal n
        n += 1
        return n

    # Not Part 10 at all.
    for name, data in [
        ("empty", b""),
        ("preamble only", bytes(128)),
        ("no DICM prefix", bytes(132) + base_file(nxt())[132:]),
        ("text", b"this is not DICOM at all" * 10),
    ]:
        yield Case("not part 10", name, data, frozenset({C000}), "Part 10", in_data_set=False)

    # Truncations: inside the File Meta group (every byte) and inside each top-level element (never at a
    # boundary, where the shorter file could be a well-formed one).
    base = base_file(nxt())
    for cut in range(133, meta_end(base)):
        if cut not in {e.start for e in meta(base)}:
            yield Case("truncation", f"meta cut at {cut}", base[:cut], frozenset({C000}), in_data_set=False)
    for e in top(base):
        for cut in sorted({e.start + 1, e.start + 6, e.value - 1, (e.value + e.end) // 2, e.end - 1}):
            if e.start < cut < e.end:
                yield Case("truncation", f"cut at {cut} in ({e.tag:08X})", base[:cut], frozenset({C000}))

    # Bad lengths: the group length, and each top-level element's length.
    for value in (0, 2, 0x7FFFFFFF, 0xFFFFFFFF):
        data = base_file(nxt())
        declared = meta_end(data) - 144
        if value != declared:
            bad = data[:140] + struct.pack("<I", value) + data[144:]
            yield Case("bad length", f"meta group length {value:#x}", bad, frozenset({C000}), "group length", False)
    for shift in (-2, 2):
        data = base_file(nxt())
        bad = data[:140] + struct.pack("<I", meta_end(data) - 144 + shift) + data[144:]
        yield Case("bad length", f"meta group length off by {shift}", bad, frozenset({C000}), "group length", False)
    base = base_file(nxt())
    for e in top(base):
        long = e.vr in LONG_VRS
        at = e.value - (4 if long else 2)
        for value in (0xFFFFFFFF, len(base)) if long else (0xFFFF,):
            if not long and e.value + value <= len(base):
                continue
            bad = base[:at] + struct.pack("<I" if long else "<H", value) + base[e.value :]
            yield Case("bad length", f"({e.tag:08X}) length {value:#x}", bad, frozenset({C000}))

    # Deep nesting: beyond the 64 levels allowed, with undefined and defined lengths.
    for depth in (65, 100, 500, 5000):
        yield Case("deep nesting", f"{depth} undefined-length levels", nested_file(nxt(), depth), frozenset({C000}))
    for depth in (65, 300):
        data = nested_file(nxt(), depth, undefined=False)
        yield Case("deep nesting", f"{depth} defined-length levels", data, frozenset({C000}), "nested")

    # Duplicate and out-of-order tags, at the top level, in the meta group and inside an item.
    for tag in (0x0020000D, 0x0020000E, 0x00080018, 0x00100010, 0x00280010):
        data = base_file(nxt())
        e = find(top(data), tag)
        again = data[e.start : e.end]
        if tag == 0x0020000D:  # another study: pydicom would read the second, dcmtk the first
            again = explicit(tag, b"UI", f"{UID_ROOT}.999.9\0".encode())
        for where, at in (("after", e.end), ("before", e.start)):
            twice = data[:at] + again + data[at:]
            yield Case("duplicate tag", f"({tag:08X}) again {where}", twice, frozenset({C000}), "twice")
    data = base_file(nxt())
    items = top(data)
    for i in (2, 8):
        a, b = items[i], items[i + 1]
        swapped = data[: a.start] + data[b.start : b.end] + data[a.start : a.end] + data[b.end :]
        yield Case("duplicate tag", f"({a.tag:08X}) and ({b.tag:08X}) swapped", swapped, frozenset({C000}), "ascend")
    data = base_file(nxt())
    e = find(meta(data), 0x00020010)
    doubled = data[: e.end] + data[e.start : e.end] + data[e.end :]
    doubled = doubled[:140] + struct.pack("<I", meta_end(data) - 144 + e.end - e.start) + doubled[144:]
    yield Case("duplicate tag", "TransferSyntaxUID twice", doubled, frozenset({C000}), "twice", False)
    data = base_file(nxt())
    seq = find(top(data), 0x00081140)
    item_value = seq.value + 8
    inner = elements(data, item_value, seq.end)
    twice = data[inner[-1].start : inner[-1].end]
    grown = data[: inner[-1].end] + twice + data[inner[-1].end :]
    grown = replace_value(grown, seq, _item(grown[item_value : inner[-1].end + len(twice)]))
    yield Case("duplicate tag", "an item's element twice", grown, frozenset({C000}), "twice")

    # Control characters and other bytes that are not a UID, in identifying UIDs (same length, in place).
    for part, what in ((1, "StudyInstanceUID"), (2, "SeriesInstanceUID"), (3, "SOPInstanceUID")):
        for bad in (b"\x01", b"\n", b"\x7f", b"\x00", b"\xe9", b" "):
            k = nxt()
            old = uid(k, part)
            new = old[:-1].encode() + bad if bad not in (b" ",) else b" " + old[1:].encode()
            if bad == b"\x00":
                new = old[:5].encode() + b"\x00" + old[6:].encode()  # a NUL inside, not padding
            data = with_uid_bytes(base_file(k), old, new)
            yield Case("control character", f"{what} with {bad!r}", data, frozenset({A900}), "not a valid UID")
    data = base_file(nxt())
    syntax = find(meta(data), 0x00020010)
    bad_syntax = data[: syntax.value] + b"1.2.840.10008.1.2.1\x01" + data[syntax.end :]
    yield Case("control character", "TransferSyntaxUID with \\x01", bad_syntax, frozenset({C000}), "not a valid", False)

    # Unknown VRs, in the meta group and in the data set.
    for vr in (b"UH", b"ZZ", b"\x00\x00", b"ab"):
        data = base_file(nxt())
        e = find(meta(data), 0x00020010)
        bad = data[: e.start + 4] + vr + data[e.start + 6 :]
        yield Case("bad VR", f"TransferSyntaxUID VR {vr!r}", bad, frozenset({C000}), in_data_set=False)
        data = base_file(nxt())
        e = find(top(data), 0x00100010)
        bad = data[: e.start + 4] + vr + data[e.start + 6 :]
        yield Case("bad VR", f"PatientName VR {vr!r}", bad, frozenset({C000}))

    # Delimiters and items where they do not belong; File Meta elements in the data set.
    for name, raw in [
        ("Item Delimitation Item at the top level", struct.pack("<HHI", 0xFFFE, 0xE00D, 0)),
        ("Sequence Delimitation Item at the top level", struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)),
        ("Item at the top level", struct.pack("<HHI", 0xFFFE, 0xE000, 0)),
    ]:
        yield Case("delimiters", name, insert_top(base_file(nxt()), raw), frozenset({C000}))
    data = base_file(nxt())
    at = find(top(data), 0x00080016).start
    stray = data[:at] + explicit(0x00020016, b"AE", b"X ") + data[at:]
    yield Case("delimiters", "a File Meta element in the data set", stray, frozenset({C000}), "File Meta")

    # Frames and pixels the index would count differently from other readers.
    for value in (b"0 ", b"-1", b"x ", b"1\\2 "):
        data = base_file(nxt(), NumberOfFrames=1)
        bad = replace_value(data, find(top(data), 0x00280008), value)
        yield Case("frames", f"NumberOfFrames {value!r}", bad, frozenset({A900}), "NumberOfFrames")
    data = base_file(nxt(), frames=2)
    bad = replace_value(data, find(top(data), 0x00280008), b"3 ")
    yield Case("frames", "NumberOfFrames 3, 2 frames of pixels", bad, frozenset({A900}), "Pixel Data")
    data = base_file(nxt(), frames=3)
    bad = replace_value(data, find(top(data), 0x00280008), b"1 ")
    yield Case("frames", "NumberOfFrames 1, 3 frames of pixels", bad, frozenset({A900}), "Pixel Data")
    data = base_file(nxt())
    bad = replace_value(data, find(top(data), 0x00280100), struct.pack("<H", 12))
    yield Case("frames", "BitsAllocated 12", bad, frozenset({A900}), "BitsAllocated")
    data = base_file(nxt())
    bad = replace_value(data, find(top(data), 0x00280010), struct.pack("<H", 0))
    yield Case("frames", "Rows 0", bad, frozenset({A900}))

    # Text the index cannot keep, and a deflated data set that does not inflate.
    data = base_file(nxt())
    bad = replace_value(data, find(top(data), 0x00100010), b"Test\x00Patient ")
    yield Case("text", "PatientName with a NUL inside", bad, frozenset({A900}), "NUL")
    data = deflated_file(nxt())
    start = meta_end(data)
    broken = data[:start] + bytes(b ^ 0x5A for b in data[start : start + 40]) + data[start + 40 :]
    yield Case("deflate", "a corrupt deflated data set", broken, frozenset({C000}), in_data_set=False)
    yield Case("deflate", "a deflated data set cut short", data[:-30], frozenset({C000}), "truncated", False)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    garbage = deflater.compress(b"\x10\x00\x10\x00PN\x04\x00ABCD" + bytes(1024)) + deflater.flush()
    yield Case("deflate", "a deflated data set of garbage", data[:start] + garbage, frozenset({C000}), "", False)


def _item(content: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


CASES: list[Case] = list(_cases())


def controls() -> list[bytes]:
    """Well-formed files made the same way, which must be stored: 64 nested levels (the most allowed), implicit
    VR, deflated, and trailing padding shorter than a frame."""
    out = [nested_file(9001, 64), nested_file(9002, 64, undefined=False), base_file(9003, implicit=True)]
    out.append(deflated_file(9004))
    padded = base_file(9005)
    pixels = find(top(padded), 0x7FE00010)
    out.append(replace_value(padded, pixels, padded[pixels.value : pixels.end] + bytes(6)))
    return out


def read_uids(data: bytes) -> tuple[str, str, str]:
    """Study, series and SOP instance UIDs as pydicom reads a well-formed file."""
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
