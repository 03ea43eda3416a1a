"""The structure of a Part 10 file, checked before any toolkit reads its values (PS3.10 7.1, PS3.5 7).

pydicom reads leniently by design: a tag that appears twice is read as its last occurrence, a stray Item
Delimitation Item at the top level silently ends the data set, a meta group length is not enforced, nested
sequences are followed by recursion without bound. Other toolkits (dcmtk) read such files differently, so an
archive that indexed what pydicom reads while serving the bytes to them would index one thing and serve another.
This walker reads every element header of the file, at every nesting level, without loading values (except the
few small top-level ones asked for), and refuses what PS3.5 does not allow and readers disagree on:

- the File Meta Information is explicit VR little endian, its elements in group 0002 and, when it has a group
  length (0002,0000), that length is exactly the bytes of the group's other elements (PS3.10 7.1);
- in every data set and item, Data Element Tags strictly ascend (PS3.5 7.1: "ordered by increasing Data Element
  Tag Number ... shall occur at most once"), so no tag appears twice;
- explicit VRs are the VRs of PS3.5 Table 6.2-1; lengths stay inside the file and their enclosing item or
  sequence; items, delimiters and encapsulated fragments appear only where PS3.5 7.5 and A.4 place them;
- sequences nest at most `MAX_DEPTH` deep (the walk is iterative: that limit is the only one).

Encoding detection follows pydicom's (and so what the index is built from): the first element of the data set
decides between explicit and implicit VR when it contradicts the transfer syntax, and an item of a sequence in
an explicit VR data set may be encoded in implicit VR (PS3.5 6.2.2).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from pydicom.datadict import dictionary_VR

MAX_DEPTH = 64
"""Sequences nested deeper than this are refused: real structured reports nest a few dozen levels at most, and
readers that recurse (pydicom, and ours) need a bound well below the interpreter's recursion limit."""

MAX_INFLATED_BYTES = 512 * 1024 * 1024
"""A deflated data set (1.2.840.10008.1.2.1.99) larger than this once inflated is refused (a small upload could
otherwise inflate to any size: pydicom inflates the whole data set in memory)."""

VALUE_BYTES = 1024
"""Top-level values longer than this are not returned (the values asked for are UIDs and short numbers)."""

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"

ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
META_GROUP_LENGTH = 0x00020000
TRANSFER_SYNTAX_UID = 0x00020010

VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
"""PS3.5 Table 6.2-1."""
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
"""VRs with a reserved field and a 32-bit length in explicit VR (PS3.5 7.1.2)."""


class Malformed(ValueError):
    """The file's structure breaks PS3.10 / PS3.5; the message says where and how (no values, no PHI)."""


@dataclass(frozen=True, slots=True)
class Structure:
    """What the walk found: where the data set starts, how it is encoded, and the raw values asked for."""

    data_set_start: int
    """Offset of the first data set byte in the file (after the File Meta Information)."""
    transfer_syntax: str
    implicit: bool
    """The top-level data set's encoding as found (pydicom's detection), which may contradict the syntax."""
    little: bool
    meta: dict[int, bytes]
    """The File Meta Information's values up to `VALUE_BYTES` long, raw."""
    values: dict[int, bytes]
    """Raw values of the requested top-level data set elements (those up to `VALUE_BYTES` long)."""
    lengths: dict[int, int] = field(default_factory=dict)
    """Value length of every top-level data set element (UNDEFINED for undefined length)."""
    depth: int = 0
    """The deepest sequence nesting found."""


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def uid_text(raw: bytes) -> str | None:
    """A UI value as its readers take it: trailing NUL and space padding removed (PS3.5 6.2, 9.1). None when
    it is not ASCII (a UID cannot be)."""
    try:
        return raw.decode("ascii").rstrip("\0 ")
    except UnicodeDecodeError:
        return None


def check_file(fp: BinaryIO, size: int, *, wanted: frozenset[int] = frozenset()) -> Structure:
    """Walk the whole Part 10 file in `fp` (`size` bytes, preamble and "DICM" prefix already checked); raise
    `Malformed` at the first structural fault."""
    start, meta = _meta(fp, size)
    raw_syntax = meta.get(TRANSFER_SYNTAX_UID)
    if raw_syntax is None:
        raise Malformed("File Meta Information has no TransferSyntaxUID")
    syntax = uid_text(raw_syntax) or ""
    little = syntax != EXPLICIT_BIG
    implicit = syntax == IMPLICIT_LITTLE
    if syntax == DEFLATED:
        fp.seek(start)
        body = _inflate(fp, size - start)
        walker = _Walker(io.BytesIO(body), 0, len(body), little=True, wanted=wanted)
    else:
        walker = _Walker(fp, start, size, little=little, wanted=wanted)
    found_implicit = walker.run(implicit)
    return Structure(start, syntax, found_implicit, little, meta, walker.values, walker.lengths, walker.depth)


def _inflate(fp: BinaryIO, remaining: int) -> bytes:
    """A deflated data set inflated (raw deflate, PS3.5 A.5), read in chunks; corrupt, truncated or oversized
    streams are refused. Bytes after the end of the stream are ignored, as every reader does (some writers
    append a CRC and length, gzip-style)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    body = bytearray()
    while remaining > 0 and not inflater.eof:
        chunk = fp.read(min(remaining, 1 << 20))
        if not chunk:
            break
        remaining -= len(chunk)
        try:
            body += inflater.decompress(chunk, MAX_INFLATED_BYTES + 1 - len(body))
        except zlib.error as exc:
            raise Malformed(f"deflated data set cannot be inflated: {exc}") from None
        if len(body) > MAX_INFLATED_BYTES or inflater.unconsumed_tail:
            raise Malformed(f"deflated data set inflates to more than {MAX_INFLATED_BYTES} bytes")
    if not inflater.eof:
        raise Malformed("deflated data set ends inside its deflate stream (truncated?)")
    return bytes(body)


def _read(fp: BinaryIO, n: int, what: str) -> bytes:
    data = fp.read(n)
    if len(data) != n:
        raise Malformed(f"file ends inside {what} (truncated?)")
    return data


def _meta(fp: BinaryIO, size: int) -> tuple[int, dict[int, bytes]]:
    """The File Meta Information group (PS3.10 7.1): explicit VR little endian elements of group 0002 from
    offset 132. Returns where the data set starts and the group's values."""
    pos = 132
    fp.seek(pos)
    values: dict[int, bytes] = {}
    last = -1
    declared: int | None = None
    counted_from = pos
    while pos + 8 <= size:
        head = _read(fp, 8, "a File Meta Information element header")
        group, element = struct.unpack("<HH", head[:4])
        if group != 0x0002:
            break
        tag = group << 16 | element
        vr = head[4:6]
        if vr not in VRS:
            raise Malformed(f"Unknown Value Representation {_shown(vr)} at {_tag(tag)}")
        if vr in LONG_VRS:
            length = struct.unpack("<I", _read(fp, 4, "a File Meta Information element header"))[0]
            header = 12
        else:
            length = struct.unpack("<H", head[6:8])[0]
            header = 8
        if length == UNDEFINED or vr == b"SQ":
            raise Malformed(f"File Meta element {_tag(tag)} is a sequence or has an undefined length")
        if tag <= last:
            raise Malformed(_order(tag, last, "the File Meta Information"))
        last = tag
        end = pos + header + length
        if end > size:
            raise Malformed(f"File Meta element {_tag(tag)} runs past the end of the file (truncated?)")
        if tag == META_GROUP_LENGTH:
            if vr != b"UL" or length != 4:
                raise Malformed("File Meta Information Group Length (0002,0000) is not one UL value")
            declared = struct.unpack("<I", fp.read(4))[0]
            counted_from = end
        elif length <= VALUE_BYTES:
            values[tag] = fp.read(length)
        pos = end
        fp.seek(pos)
    else:
        if pos < size:
            raise Malformed("file ends inside the File Meta Information (truncated?)")
    if last < 0:
        raise Malformed("no File Meta Information after the 'DICM' prefix")
    if declared is not None and declared != pos - counted_from:
        raise Malformed(f"File Meta group length {declared} differs from the group's {pos - counted_from} bytes")
    return pos, values


def _order(tag: int, last: int, where: str) -> str:
    if tag == last:
        return f"element {_tag(tag)} appears twice in {where}"
    return f"element {_tag(tag)} after {_tag(last)} in {where}: tags must ascend (PS3.5 7.1)"


def _shown(vr: bytes) -> str:
    return repr(vr.decode("latin-1"))


def _looks_explicit(vr: bytes) -> bool:
    """pydicom's test for an explicit VR at the start of a data set: two upper-case ASCII letters."""
    return len(vr) == 2 and 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B


@dataclass(slots=True)
class _Frame:
    kind: int
    end: int | None
    """Where a defined-length container ends; None for undefined length (ended by a delimiter)."""
    limit: int
    """The nearest defined end at or above this frame (the file's size at the top)."""
    implicit: bool
    last: int = -1
    top: bool = False


_DATA_SET, _SEQUENCE, _FRAGMENTS = range(3)


class _Walker:
    """An iterative walk over the data set: a stack of open data sets (items), sequences and fragment lists."""

    def __init__(self, fp: BinaryIO, start: int, size: int, *, little: bool, wanted: frozenset[int]) -> None:
        self.fp = fp
        self.start = start
        self.size = size
        self.e = "<" if little else ">"
        self.wanted = wanted
        self.values: dict[int, bytes] = {}
        self.lengths: dict[int, int] = {}
        self.depth = 0

    def run(self, implicit: bool) -> bool:
        fp = self.fp
        fp.seek(self.start)
        if self.size - self.start >= 6:
            head = fp.read(6)
            implicit = not _looks_explicit(head[4:6])
            fp.seek(self.start)
        stack = [_Frame(_DATA_SET, self.size, self.size, implicit, top=True)]
        sequences = 0
        pos = self.start
        while stack:
            frame = stack[-1]
            if frame.end is not None and pos == frame.end:
                stack.pop()
                sequences -= frame.kind == _SEQUENCE
                continue
            if pos + 8 > frame.limit:
                if frame.top and pos < frame.limit:
                    raise Malformed("trailing bytes after the last element (truncated?)")
                raise Malformed(f"{_WHAT[frame.kind]} runs past the end of its container or the file (truncated?)")
            tag, length = self._tag_and_length(fp.read(8))
            pos += 8
            if frame.kind == _SEQUENCE:
                if tag == SEQUENCE_END and frame.end is None:
                    stack.pop()
                    sequences -= 1
                    continue
                if tag != ITEM:
                    raise Malformed(f"expected an Item (FFFE,E000) in a sequence, found {_tag(tag)}")
                stack.append(self._item(frame, pos, length))
                continue
            if frame.kind == _FRAGMENTS:
                if tag == SEQUENCE_END:
                    stack.pop()
                    continue
                if tag != ITEM or length == UNDEFINED:
                    raise Malformed("malformed fragment item in encapsulated Pixel Data")
                pos = self._skip(pos, length, frame.limit, "an encapsulated fragment")
                continue
            # In a data set (the top level, or an item).
            if tag == ITEM_END:
                if frame.top or frame.end is not None:
                    raise Malformed("Item Delimitation Item outside an undefined-length item")
                stack.pop()
                continue
            if tag in (ITEM, SEQUENCE_END):
                raise Malformed(f"{_tag(tag)} delimiter or item tag in a data set, outside a sequence")
            if tag <= frame.last:
                raise Malformed(_order(tag, frame.last, "the data set" if frame.top else "a sequence item"))
            frame.last = tag
            if tag >> 16 == 0x0002:
                raise Malformed(f"File Meta element {_tag(tag)} in the data set")
            vr, length, pos = self._vr_and_length(tag, length, pos, frame.implicit)
            if frame.top:
                self.lengths[tag] = length
            if length == UNDEFINED:
                if vr in (b"SQ", b"UN") or (vr is None and tag != PIXEL_DATA):
                    sequences += 1
                    self._deeper(sequences)
                    stack.append(_Frame(_SEQUENCE, None, frame.limit, frame.implicit or vr == b"UN"))
                elif tag == PIXEL_DATA:
                    stack.append(_Frame(_FRAGMENTS, None, frame.limit, frame.implicit))
                else:
                    raise Malformed(f"element {_tag(tag)} of VR {_shown(vr or b'')} has an undefined length")
                continue
            if vr == b"SQ" or (vr is None and _dictionary_sq(tag)):
                if pos + length > frame.limit:
                    raise Malformed(f"sequence {_tag(tag)} runs past the end of its container or the file")
                sequences += 1
                self._deeper(sequences)
                stack.append(_Frame(_SEQUENCE, pos + length, pos + length, frame.implicit))
                continue
            if frame.top and tag in self.wanted and length <= VALUE_BYTES:
                value = fp.read(length)
                if len(value) != length:
                    raise Malformed(f"element {_tag(tag)} runs past the end of the file (truncated?)")
                self.values[tag] = value
                pos += length
                continue
            pos = self._skip(pos, length, frame.limit, f"element {_tag(tag)}")
        if pos != self.size:
            raise Malformed("trailing bytes after the last element (truncated?)")
        return implicit

    def _tag_and_length(self, head: bytes) -> tuple[int, int]:
        group, element, length = struct.unpack(self.e + "HHI", head)
        return group << 16 | element, length

    def _vr_and_length(self, tag: int, head_length: int, pos: int, implicit: bool) -> tuple[bytes | None, int, int]:
        """The element's VR (None in implicit VR) and value length; `pos` moves past the header."""
        if implicit:
            return None, head_length, pos
        raw = struct.pack(self.e + "I", head_length)
        vr = raw[:2]
        if vr not in VRS:
            raise Malformed(f"Unknown Value Representation {_shown(vr)} at {_tag(tag)}")
        if vr in LONG_VRS:  # the 2 reserved bytes are not checked: readers ignore them
            data = self.fp.read(4)
            if len(data) != 4:
                raise Malformed(f"file ends inside the header of element {_tag(tag)} (truncated?)")
            return vr, struct.unpack(self.e + "I", data)[0], pos + 4
        return vr, struct.unpack(self.e + "H", raw[2:4])[0], pos

    def _item(self, sequence: _Frame, pos: int, length: int) -> _Frame:
        """An item of `sequence` starting at `pos`; in explicit VR it may be encoded in implicit VR (pydicom
        decides from its first element, as PS3.5 6.2.2 allows for undefined-length sequences)."""
        implicit = sequence.implicit
        if not implicit and pos + 6 <= sequence.limit and (length == UNDEFINED or length >= 6):
            head = self.fp.read(6)
            self.fp.seek(pos)
            tag = struct.unpack(self.e + "HH", head[:4])
            if (tag[0] << 16 | tag[1]) != ITEM_END and not _looks_explicit(head[4:6]):
                implicit = True
        if length == UNDEFINED:
            return _Frame(_DATA_SET, None, sequence.limit, implicit)
        if pos + length > sequence.limit:
            raise Malformed("a sequence item runs past the end of its sequence or the file")
        return _Frame(_DATA_SET, pos + length, pos + length, implicit)

    def _skip(self, pos: int, length: int, limit: int, what: str) -> int:
        end = pos + length
        if end > limit:
            raise Malformed(f"{what} runs past the end of its container or the file (truncated?)")
        self.fp.seek(end)
        return end

    def _deeper(self, sequences: int) -> None:
        self.depth = max(self.depth, sequences)
        if sequences > MAX_DEPTH:
            raise Malformed(f"sequences nested more than {MAX_DEPTH} deep")


_WHAT = {_DATA_SET: "a data set or item", _SEQUENCE: "a sequence", _FRAGMENTS: "encapsulated Pixel Data"}


def _dictionary_sq(tag: int) -> bool:
    """In implicit VR, whether a defined-length element is a sequence (as pydicom reads it: by the dictionary)."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False
