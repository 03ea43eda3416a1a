"""The public corpus of the corpus test (tests/dicomweb/test_corpus.py): every file pydicom's test data and pydicom-data
ship (`pydicom.data.get_testdata_files()`), what pydicom itself makes of each, and the judging and tabulating of
what the server returns for it.

Each file is stored as shipped except for its Study, Series and SOP Instance UIDs, which are replaced by UIDs of
the same length (`unique_uids`): many files are one instance in several transfer syntaxes, or share a study
under different patients, and the archive rightly refuses such duplicates (0111H) and conflicts; with the same
length no other byte of the file moves.

Pure helpers: no HTTP here, the test does the requests. pydicom warns about much of this corpus (it is meant to
be odd): the test runs these helpers with warnings ignored, set once for all its threads.
"""

from __future__ import annotations

import hashlib
import io
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from dicomweb.pixels import encode
from dicomweb.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

AS_STORED = "*"
NATIVE_TARGETS = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
)
PSNR_BOUND = 25.0
"""Lossy results must be at least this close to pydicom's decode of the original: PSNR in dB whose peak is the
reference's own range of values, or 255 if that is smaller (the nominal peak of the bit depth would flatter a
16-bit image that uses a few hundred values; its range alone would hold an image of 30 values to a far stricter
bound than an 8-bit one)."""
MAX_INSTANCE_PIXELS = 32 * 1024 * 1024
"""Bytes of decoded pixels above which a whole instance is retrieved only as stored and in the native syntaxes;
its compressed targets are tried on its frames (one such file: a 120-frame color cine, whose whole-instance
encodes would take minutes). The table lists those pairs as not tried."""
MAX_SAMPLED_FRAMES = 3
"""Frames asked of a multi-frame image in each target: all of them up to this many, else the first, the middle
and the last."""

EXACT = "exact"
WITHIN = "within bound"
REFUSED = "refused"
FAILED = "failed"
NOT_TRIED = "not tried"

NAMES = {
    AS_STORED: "as stored",
    EXPLICIT_VR_LITTLE_ENDIAN: "Explicit VR LE",
    IMPLICIT_VR_LITTLE_ENDIAN: "Implicit VR LE",
    EXPLICIT_VR_BIG_ENDIAN: "Explicit VR BE",
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: "Deflated",
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.51": "JPEG extended",
    "1.2.840.10008.1.2.4.57": "JPEG lossless",
    "1.2.840.10008.1.2.4.70": "JPEG lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS",
    "1.2.840.10008.1.2.4.81": "JPEG-LS near",
    "1.2.840.10008.1.2.4.90": "J2K lossless",
    "1.2.840.10008.1.2.4.91": "J2K",
    "1.2.840.10008.1.2.4.201": "HTJ2K lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.5": "RLE",
    "": "no file meta",
}


def name_of(syntax: str) -> str:
    return NAMES.get(syntax, syntax)


def compressed_targets() -> list[str]:
    """The compressed transfer syntaxes the server encodes into here (`dicomweb.pixels.encode`, installed plugins):
    what the conformance statement's WADO-RS table advertises."""
    return [ts for ts in encode.CODECS if encode.can_encode(ts)]


def instance_targets() -> list[str]:
    return [AS_STORED, *NATIVE_TARGETS, *compressed_targets()]


def frame_targets() -> list[str]:
    """`application/octet-stream` as stored (`*`) and decoded (Explicit VR Little Endian), and each encoder."""
    return [AS_STORED, EXPLICIT_VR_LITTLE_ENDIAN, *compressed_targets()]


# ---------------------------------------------------------------------------------------------- the files


@dataclass
class Source:
    """One file of the corpus and what pydicom makes of it."""

    name: str
    """Package-relative path: `pydicom/<path>` or `pydicom-data/<path>`."""
    path: Path
    dicom: bool
    data: bytes = b""
    syntax: str = ""
    frames: int = 0
    photometric: str = ""
    reference: np.ndarray[Any, Any] | None = None
    """pydicom's decode of the original (as `Dataset.pixel_array` gives it: YBR converted to RGB)."""
    no_reference: str | None = None
    """Why there is no reference: no Pixel Data, or pydicom cannot decode it (the reason)."""
    fragments: list[bytes] = field(default_factory=list)
    """Encapsulated Pixel Data: each frame's stored codestream."""
    original: Dataset | None = None

    pixel_bytes: int = 0

    @property
    def has_pixels(self) -> bool:
        return self.reference is not None or self.pixel_bytes > 0

    @property
    def over_budget(self) -> bool:
        return self.pixel_bytes > MAX_INSTANCE_PIXELS

    def sample(self) -> list[int]:
        """1-based frame numbers asked of each frame target."""
        if self.frames <= MAX_SAMPLED_FRAMES:
            return list(range(1, self.frames + 1))
        return sorted({1, (self.frames + 1) // 2, self.frames})


def corpus_files() -> list[tuple[str, Path]]:
    """Every regular file `get_testdata_files()` lists, named by package, in a stable order."""
    import data_store
    from pydicom.data import get_testdata_files

    roots = {
        Path(pydicom.__file__).parent.resolve(): "pydicom",
        Path(data_store.__file__).parent.resolve(): "pydicom-data",
    }
    out: dict[str, Path] = {}
    for text in get_testdata_files():
        path = Path(text).resolve()
        if not path.is_file():
            continue
        for root, package in roots.items():
            if path.is_relative_to(root):
                out[f"{package}/{path.relative_to(root)}"] = path
                break
        else:
            out[str(path)] = path
    return sorted(out.items())


def is_dicom_file(path: Path) -> bool:
    """A Part 10 file (DICM at offset 128), a file named `.dcm`, or a file without a suffix (DICOMDIR trees)
    that pydicom reads as a data set with identifying attributes: the test data also hold text, JSON, ICC
    profiles, a gzip file and a README in a DICOMDIR tree, which are not DICOM."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM" or path.suffix == ".dcm":
        return True
    if path.suffix:
        return False
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return any(element.tag.group == 0x0008 for element in ds)
    except Exception:  # not something pydicom can read at all
        return False


def load(name: str, path: Path) -> Source:
    if not is_dicom_file(path):
        return Source(name, path, dicom=False)
    data = unique_uids(path.read_bytes(), name)
    source = Source(name, path, dicom=True, data=data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        source.original = ds
        source.syntax = str(ds.file_meta.get("TransferSyntaxUID") or "")
        if "PixelData" not in ds:
            source.no_reference = "no Pixel Data"
            return source
        source.frames = int(ds.get("NumberOfFrames") or 1)
        source.photometric = str(ds.get("PhotometricInterpretation") or "")
        source.reference = np.asarray(ds.pixel_array)
        source.pixel_bytes = int(source.reference.nbytes)
        if UID(source.syntax).is_compressed:
            source.fragments = list(generate_frames(ds.PixelData, number_of_frames=source.frames))
    except Exception as exc:  # pydicom and its plugins raise many kinds of errors
        source.reference = None
        source.no_reference = f"pydicom cannot decode it: {_short(exc)}"
    return source


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:110]}"


# ---------------------------------------------------------------------------------------------- unique UIDs

_UID_TAGS = (b"\x20\x00\x0d\x00", b"\x20\x00\x0e\x00", b"\x08\x00\x18\x00", b"\x02\x00\x03\x00")
_VALID_UID = re.compile(rb"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def unique_uids(data: bytes, key: str) -> bytes:
    """`data` with its Study, Series and SOP Instance UIDs (and the file meta's copy) replaced, wherever they occur,
    by `2.25.` UIDs of the same length derived from `key` (deterministic, so the table is too). UIDs too short for
    that, and files pydicom cannot read, are left alone. Deflated data sets are inflated and deflated again."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    except Exception:  # unreadable files are stored as they are (and judged so)
        return data
    olds: list[bytes] = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = ds.get(keyword)
        if isinstance(value, str) and value:
            olds.append(value.encode("ascii", "replace"))
    meta = getattr(ds, "file_meta", None)
    if meta is not None and isinstance(meta.get("MediaStorageSOPInstanceUID"), str):
        olds.append(str(meta.MediaStorageSOPInstanceUID).encode("ascii", "replace"))
    replacements = {old: _same_length_uid(old, key) for old in dict.fromkeys(olds) if _VALID_UID.match(old)}
    replacements = {old: new for old, new in replacements.items() if new is not None}
    if str(getattr(meta, "TransferSyntaxUID", "")) == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return _replace_deflated(data, replacements)
    return _replace(data, replacements)


def _same_length_uid(old: bytes, key: str) -> bytes | None:
    digits = len(old) - len(b"2.25.")
    if digits < 8:
        return None
    number = int.from_bytes(hashlib.sha256(key.encode() + b"\0" + old).digest() * 4, "big")
    text = str(number)[:digits]
    return b"2.25." + (text if text[0] != "0" else "1" + text[1:]).encode()


def _replace(data: bytes, replacements: dict[bytes, bytes]) -> bytes:
    """Replace whole element values only: an occurrence counts when the bytes before it are the element's value
    length (its padded length, in 2 or 4 bytes, either byte order), as they are for any encoding of a UI value."""
    out = bytearray(data)
    for old, new in replacements.items():
        padded = len(old) + len(old) % 2
        lengths = {padded.to_bytes(n, order) for n in (2, 4) for order in ("little", "big")}
        for match in re.finditer(re.escape(old), data):
            start = match.start()
            if any(data[max(0, start - len(field)) : start] == field for field in lengths):
                out[start : start + len(old)] = new
    return bytes(out)


def _replace_deflated(data: bytes, replacements: dict[bytes, bytes]) -> bytes:
    """The file meta (group 0002, never deflated) is kept; the rest is raw deflate (PS3.5 A.5)."""
    start = 132 + 12 + int.from_bytes(data[140:144], "little")  # preamble, DICM, group length element
    head = _replace(data[:start], replacements)
    body = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return head + packer.compress(_replace(body, replacements)) + packer.flush()


# ---------------------------------------------------------------------------------------------- judging


@dataclass(frozen=True, slots=True)
class Result:
    kind: str
    """"instance" or "frames"."""
    source: str
    target: str
    outcome: str
    detail: str = ""
    """The refusal's reason, the failure, or the PSNR of a result within bound."""


def psnr(got: np.ndarray[Any, Any], reference: np.ndarray[Any, Any]) -> float:
    a = got.astype(np.float64)
    b = reference.astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return float("inf")
    peak = max(float(b.max() - b.min()), 255.0)
    return float(10 * np.log10(peak**2 / mse))


def compare(got: np.ndarray[Any, Any], reference: np.ndarray[Any, Any], *, may_lose: bool) -> tuple[str, str]:
    """(outcome, detail) of decoded pixels against the reference: exact, within the PSNR bound where the
    representation may lose information (`may_lose`), or failed."""
    if got.shape != reference.shape:
        return FAILED, f"shape {got.shape} instead of {reference.shape}"
    if np.array_equal(got, reference):
        return EXACT, ""
    value = psnr(got, reference)
    if may_lose and value >= PSNR_BOUND:
        return WITHIN, f"PSNR {value:.1f} dB"
    return FAILED, f"pixels differ (PSNR {value:.1f} dB{'' if may_lose else ', lossless target'})"


def decode_instance(body: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(body))


def instance_pixels(ds: Dataset) -> np.ndarray[Any, Any]:
    return np.asarray(ds.pixel_array)


def frame_pixels(body: bytes, syntax: str, meta: Dataset) -> np.ndarray[Any, Any]:
    """One frame as the frames resource sent it, read the way a client must: with the instance's metadata (its
    Image Pixel module) and the transfer syntax the part's Content-Type names; YBR converted to RGB as pydicom's
    `pixel_array` does, to compare with the reference."""
    options: dict[str, Any] = {
        "rows": int(meta.Rows),
        "columns": int(meta.Columns),
        "samples_per_pixel": int(meta.get("SamplesPerPixel") or 1),
        "bits_allocated": int(meta.BitsAllocated),
        "bits_stored": int(meta.get("BitsStored") or meta.BitsAllocated),
        "pixel_representation": int(meta.get("PixelRepresentation") or 0),
        "photometric_interpretation": str(meta.PhotometricInterpretation),
        "planar_configuration": int(meta.get("PlanarConfiguration") or 0),
        "number_of_frames": 1,
    }
    uid = UID(syntax)
    if uid.is_compressed:  # the codestream says how components are laid out (PS3.5 8.2: "irrelevant", 0)
        options["planar_configuration"] = 0
    if uid.is_compressed:
        arr, _ = get_decoder(uid).as_array(encapsulate([body]), **options)
    else:
        arr, _ = get_decoder(UID(EXPLICIT_VR_LITTLE_ENDIAN)).as_array(body, pixel_keyword="PixelData", **options)
    return np.asarray(arr)


def reference_frame(source: Source, number: int) -> np.ndarray[Any, Any]:
    assert source.reference is not None
    return source.reference[number - 1] if source.frames > 1 else source.reference


# ---------------------------------------------------------------------------------------------- the table


def _cell(counts: Counter[str]) -> str:
    if not counts:
        return ""
    marks = ((EXACT, "="), (WITHIN, "≈"), (REFUSED, "R"), (FAILED, "F"), (NOT_TRIED, "N"))
    if set(counts) == {EXACT}:
        return str(counts[EXACT])
    return " ".join(f"{counts[o]}{m}" for o, m in marks if counts[o])


def matrix(results: Iterable[Result], kind: str, sources: dict[str, Source], targets: Sequence[str]) -> list[str]:
    """Markdown rows: one per source transfer syntax (with its number of files), one column per target."""
    cells: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    files: dict[str, set[str]] = defaultdict(set)
    for result in results:
        if result.kind != kind:
            continue
        source = sources[result.source]
        row = name_of(source.syntax)
        if not source.has_pixels:
            row += ", no Pixel Data" if source.no_reference == "no Pixel Data" else ", pydicom cannot decode"
        cells[(row, result.target)][result.outcome] += 1
        files[row].add(result.source)
    header = "| Source (files) | " + " | ".join(name_of(t) for t in targets) + " |"
    lines = [header, "|---|" + "---|" * len(targets)]
    for row in sorted(files):
        cols = [f"{row} ({len(files[row])})"] + [_cell(cells[(row, t)]) for t in targets]
        lines.append("| " + " | ".join(cols) + " |")
    return lines


_SYNTAX_UID = re.compile(r"1\.2\.840\.10008\.1\.2(?:\.[0-9]+)*")


def reason_of(detail: str) -> str:
    """A refusal's reason as a template: transfer syntaxes as `TS` and the list of representations a 406 offers
    left out, so that one reason given for many syntaxes is one row."""
    text, sep, _offered = detail.partition(" can be sent as: ")
    return _SYNTAX_UID.sub("TS", text) + (" can be sent as: (its list)" if sep else "")


def lowest_psnr(results: Sequence[Result]) -> dict[str, float]:
    lowest: dict[str, float] = {}
    for result in results:
        match = re.search(r"PSNR (-?[0-9.]+) dB", result.detail)
        if result.outcome == WITHIN and match:
            lowest[result.target] = min(lowest.get(result.target, float("inf")), float(match.group(1)))
    return dict(sorted(lowest.items(), key=lambda kv: name_of(kv[0])))


def totals(results: Sequence[Result]) -> Counter[str]:
    return Counter(r.outcome for r in results)


def tried(results: Sequence[Result]) -> list[Result]:
    """The pairs (resource, target) actually asked for; metadata checks are not pairs."""
    return [r for r in results if r.outcome != NOT_TRIED and r.kind != "metadata"]


def render(sources: Sequence[Source], ingest: dict[str, str], results: Sequence[Result]) -> str:
    """The generated section of the conformance statement (between the corpus markers)."""
    by_name = {s.name: s for s in sources}
    dicom = [s for s in sources if s.dicom]
    stored = [s for s in dicom if s.name not in ingest]
    pairs = tried(results)
    count = totals(pairs)
    lines = [
        "<!-- Generated by tests/dicomweb/test_corpus.py: do not edit by hand (see the paragraph above). -->",
        "",
        f"Files: {len(sources)} in `get_testdata_files()` "
        f"({sum(1 for s in sources if s.name.startswith('pydicom/'))} from pydicom, "
        f"{sum(1 for s in sources if s.name.startswith('pydicom-data/'))} from pydicom-data); "
        f"{len(dicom)} DICOM files, {len(stored)} stored, {len(ingest)} refused on ingest; "
        f"{sum(1 for s in stored if s.has_pixels)} stored images pydicom decodes. "
        f"Pairs tried: {len(pairs)}: {count[EXACT]} exact, {count[WITHIN]} within bound, "
        f"{count[REFUSED]} refused with a reason, {count[FAILED]} failed.",
        "",
        "Whole instances (`application/dicom`), files by source transfer syntax; a cell counts files: a bare number "
        "= all exact, otherwise `n=` exact, `n≈` within bound, `nR` refused (406, reason below), `nF` failed, `nN` not "
        "tried (the instance is over the test's size budget; its frames are tried).",
        "",
        *matrix(results, "instance", by_name, instance_targets()),
        "",
        f"Frames (`application/octet-stream` as stored or decoded, the compressed media types encoded; at most "
        f"{MAX_SAMPLED_FRAMES} frames a file: all, or the first, middle and last):",
        "",
        *matrix(results, "frames", by_name, frame_targets()),
        "",
        "Lowest PSNR of the lossy targets (dB, peak as above), instances and frames: "
        + ", ".join(f"{name_of(t)} {v:.1f}" for t, v in lowest_psnr(pairs).items())
        + ".",
        "",
        "Refusals (406) by reason:",
        "",
        "| Reason (TS: a transfer syntax) | Targets | Pairs |",
        "|---|---|---|",
    ]
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for r in pairs:
        if r.outcome == REFUSED:
            reasons[reason_of(r.detail)][name_of(r.target)] += 1
    for reason, where in sorted(reasons.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])):
        lines.append(f"| {_md(reason)} | {', '.join(sorted(where))} | {sum(where.values())} |")
    failed = [r for r in pairs if r.outcome == FAILED]
    if failed:
        lines += ["", "Failed:", "", "| File | Resource | Target | What |", "|---|---|---|---|"]
        lines += [f"| {r.source} | {r.kind} | {name_of(r.target)} | {_md(r.detail)} |" for r in failed]
    lines += ["", "Files refused on ingest (STOW-RS failure reason):", "", "| File | Reason |", "|---|---|"]
    lines += [f"| {name} | {_md(reason)} |" for name, reason in sorted(ingest.items())]
    unjudged = [s for s in stored if not s.has_pixels and s.no_reference != "no Pixel Data"]
    lines += [
        "",
        "Stored files pydicom itself cannot decode (stored and retrieved as stored, byte for byte; pixels not "
        "compared):",
        "",
        "| File | Reason |",
        "|---|---|",
    ]
    lines += [f"| {s.name} | {_md(s.no_reference or '')} |" for s in unjudged]
    over = sorted({r.source for r in results if r.outcome == NOT_TRIED})
    lines += [
        "",
        f"Instances over the budget of {MAX_INSTANCE_PIXELS // 2**20} MiB of pixels: {', '.join(over) or 'none'}.",
    ]
    no_pixels = sorted(s.name for s in stored if s.no_reference == "no Pixel Data")
    lines += ["", f"Stored files without Pixel Data (metadata and as-stored retrieval only): {len(no_pixels)}."]
    others = sorted(s.name for s in sources if not s.dicom)
    lines += ["", f"Not DICOM files (not stored): {', '.join(others) or 'none'}.", ""]
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
