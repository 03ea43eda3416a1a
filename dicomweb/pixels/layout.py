"""Where things lie inside a Part 10 file: a top-level element walk that records value offsets without
reading values, and the frame layout of Pixel Data (PS3.5 7.1, A.4).

The result is computed once at ingest and stored in the index, so that WADO-RS frame and bulk data requests
read exactly the byte ranges they need from the blob store (never the whole file).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008
DOUBLE_PIXEL_DATA = 0x7FE00009
EXTENDED_OFFSET_TABLE = 0x7FE00001
EXTENDED_OFFSET_TABLE_LENGTHS = 0x7FE00002


class LayoutError(ValueError):
    """The file's element structure is broken (truncated, bad lengths)."""


@dataclass(frozen=True, slots=True)
class Element:
    tag: int
    vr: str
    value_offset: int
    length: int  # _UNDEFINED for undefined length
    fragments: tuple[tuple[int, int], ...] = ()  # encapsulated: (offset, length) of each item after the BOT
    basic_offset_table: tuple[int, ...] = ()


class _Reader:
    def __init__(self, fp: BinaryIO, size: int, little: bool) -> None:
        self.fp = fp
        self.size = size
        self.e = "<" if little else ">"

    def read(self, n: int) -> bytes:
        data = self.fp.read(n)
        if len(data) != n:
            raise LayoutError("file ends inside an element header (truncated?)")
        return data

    def tell(self) -> int:
        return self.fp.tell()

    def skip(self, n: int) -> None:
        pos = self.fp.tell() + n
        if pos > self.size:
            raise LayoutError("an element's length runs past the end of the file (truncated?)")
        self.fp.seek(pos)

    def tag(self) -> int:
        group, elem = struct.unpack(self.e + "HH", self.read(4))
        return int((group << 16) | elem)

    def u32(self) -> int:
        return int(struct.unpack(self.e + "I", self.read(4))[0])


def walk(fp: BinaryIO, start: int, size: int, *, implicit: bool, little: bool) -> dict[int, Element]:
    """Walk the top-level data set from `start` and return its elements by tag, values unread."""
    r = _Reader(fp, size, little)
    fp.seek(start)
    out: dict[int, Element] = {}
    while r.tell() < size:
        if size - r.tell() < 8:
            raise LayoutError("trailing bytes after the last element (truncated?)")
        tag = r.tag()
        vr, length = _header(r, tag, implicit)
        offset = r.tell()
        if tag in (PIXEL_DATA,) and length == _UNDEFINED:
            bot, frags = _fragments(r)
            out[tag] = Element(tag, vr or "OB", offset, length, frags, bot)
            continue
        if length == _UNDEFINED:
            _skip_undefined(r, implicit)
        else:
            r.skip(length)
        out[tag] = Element(tag, vr, offset, length)
    return out


def _header(r: _Reader, tag: int, implicit: bool) -> tuple[str, int]:
    if tag in (_ITEM, _ITEM_END, _SEQ_END):
        return "", r.u32()
    if implicit:
        return "", r.u32()
    vr = r.read(2)
    if vr in _LONG_VRS:
        r.read(2)
        return vr.decode("ascii"), r.u32()
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise LayoutError(f"invalid VR bytes at tag {tag:08X}")
    return vr.decode("ascii"), int(struct.unpack(r.e + "H", r.read(2))[0])


def _skip_undefined(r: _Reader, implicit: bool) -> None:
    """Skip an undefined-length sequence: items until the sequence delimiter."""
    while True:
        tag = r.tag()
        length = r.u32()
        if tag == _SEQ_END:
            return
        if tag != _ITEM:
            raise LayoutError(f"expected an item in a sequence, found tag {tag:08X}")
        if length == _UNDEFINED:
            _skip_item(r, implicit)
        else:
            r.skip(length)


def _skip_item(r: _Reader, implicit: bool) -> None:
    while True:
        tag = r.tag()
        if tag == _ITEM_END:
            r.u32()
            return
        _vr, length = _header(r, tag, implicit)
        if length == _UNDEFINED:
            _skip_undefined(r, implicit)
        else:
            r.skip(length)


def _fragments(r: _Reader) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """Encapsulated Pixel Data: the Basic Offset Table then fragment items (PS3.5 A.4)."""
    tag = r.tag()
    length = r.u32()
    if tag != _ITEM:
        raise LayoutError("encapsulated Pixel Data does not start with the Basic Offset Table item")
    if length % 4:
        raise LayoutError("Basic Offset Table length is not a multiple of 4")
    raw = r.read(length)
    bot = struct.unpack(r.e + f"{length // 4}I", raw) if length else ()
    frags: list[tuple[int, int]] = []
    while True:
        tag = r.tag()
        length = r.u32()
        if tag == _SEQ_END:
            break
        if tag != _ITEM or length == _UNDEFINED:
            raise LayoutError("malformed fragment item in encapsulated Pixel Data")
        frags.append((r.tell(), length))
        r.skip(length)
    return tuple(int(x) for x in bot), tuple(frags)


@dataclass(frozen=True, slots=True)
class FrameLayout:
    """Byte ranges of each frame in the blob. Native data: one range each; encapsulated: its fragments."""

    encapsulated: bool
    frames: tuple[tuple[tuple[int, int], ...], ...]

    def to_json(self) -> dict[str, object]:
        if not self.encapsulated and self.frames:
            first = self.frames[0][0]
            step = self.frames[1][0][0] - first[0] if len(self.frames) > 1 else first[1]
            if all(f[0] == (first[0] + i * step, first[1]) for i, f in enumerate(self.frames)):
                return {"native": [first[0], first[1], step, len(self.frames)]}
        return {"frames": [[x for rng in frame for x in rng] for frame in self.frames]}

    @staticmethod
    def ranges_from_json(doc: dict[str, object], frame: int) -> list[tuple[int, int]] | None:
        """Ranges of 1-based `frame`, or None when it does not exist."""
        native = doc.get("native")
        if isinstance(native, list):
            offset, length, step, count = (int(v) for v in native)
            if not 1 <= frame <= count:
                return None
            return [(offset + (frame - 1) * step, length)]
        frames = doc.get("frames")
        if not isinstance(frames, list) or not 1 <= frame <= len(frames):
            return None
        flat = frames[frame - 1]
        return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    @staticmethod
    def count_from_json(doc: dict[str, object]) -> int:
        native = doc.get("native")
        if isinstance(native, list):
            return int(native[3])
        frames = doc.get("frames")
        return len(frames) if isinstance(frames, list) else 0


_START_MARKERS = (b"\xff\xd8", b"\xff\x4f")  # JPEG/JPEG-LS SOI, JPEG 2000/HTJ2K SOC


def encapsulated_frames(
    fp: BinaryIO,
    element: Element,
    number_of_frames: int,
    extended: tuple[tuple[int, ...], tuple[int, ...]] | None,
) -> FrameLayout:
    """Map fragments to frames: Extended Offset Table, Basic Offset Table, one fragment per frame, one frame
    of all fragments, or, as the last resort, codestream start markers (PS3.5 A.4)."""
    frags = element.fragments
    if not frags:
        raise LayoutError("encapsulated Pixel Data has no fragments")
    first_item = frags[0][0] - 8  # offsets in the tables count from the first fragment item's tag
    by_start = {off - 8 - first_item: i for i, (off, _len) in enumerate(frags)}
    starts: list[int] | None = None
    if extended is not None:
        offsets, lengths = extended
        if len(offsets) != number_of_frames or len(lengths) != number_of_frames:
            raise LayoutError("Extended Offset Table does not list every frame")
        if len(frags) != number_of_frames:
            raise LayoutError("Extended Offset Table with more than one fragment per frame")
        starts = list(range(number_of_frames))
    elif element.basic_offset_table:
        bot = element.basic_offset_table
        if len(bot) != number_of_frames:
            raise LayoutError(f"Basic Offset Table lists {len(bot)} frames, NumberOfFrames is {number_of_frames}")
        try:
            starts = [by_start[o] for o in bot]
        except KeyError:
            raise LayoutError("Basic Offset Table points between fragments") from None
    elif len(frags) == number_of_frames:
        starts = list(range(number_of_frames))
    elif number_of_frames == 1:
        starts = [0]
    else:
        marked = []
        for i, (off, length) in enumerate(frags):
            if length < 2:
                continue
            fp.seek(off)
            if fp.read(2) in _START_MARKERS:
                marked.append(i)
        if len(marked) == number_of_frames and marked[0] == 0:
            starts = marked
    if starts is None or len(starts) != number_of_frames or sorted(starts) != starts:
        raise LayoutError(f"cannot tell which of {len(frags)} fragments belong to each of {number_of_frames} frames")
    bounds = [*starts, len(frags)]
    frames = tuple(tuple(frags[bounds[i] : bounds[i + 1]]) for i in range(number_of_frames))
    if any(not f for f in frames):
        raise LayoutError("a frame has no fragments")
    return FrameLayout(True, frames)


def native_frames(element: Element, frame_bytes: int, number_of_frames: int) -> FrameLayout:
    return FrameLayout(
        False,
        tuple(((element.value_offset + i * frame_bytes, frame_bytes),) for i in range(number_of_frames)),
    )
