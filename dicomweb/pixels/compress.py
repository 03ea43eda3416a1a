"""Optional lossless storage compression at ingest (`HOUNSFIELD_STORE_COMPRESSION`).

An uncompressed image instance is re-encapsulated as a Part 10 file in a lossless syntax before it reaches the
blob store: HTJ2K lossless RPCL (1.2.840.10008.1.2.4.202, mode `htj2k`) or JPEG 2000 lossless
(1.2.840.10008.1.2.4.90, mode `j2k`); one fragment per frame with a Basic Offset Table (PS3.5 A.4), so the layout
walker (`dicomweb.pixels.layout`) records each frame's byte range and frame requests stay range reads.

Why `.4.202` and not `.4.201` for `htj2k`: both are lossless (PS3.5 A.4.11); `.4.202` streams use the RPCL
progression with a TLM marker and one tile-part per resolution (`dicomweb.pixels.encode`), which costs a few dozen bytes
per frame but makes the stored bytes their own progressive rendition (the default `HOUNSFIELD_RENDITIONS`): the
`rendition` job skips a syntax equal to the stored one, so no second copy of every frame is kept, and
byte-range requests for `image/jhc` read the stored blob directly.

What changes in the index: the transfer syntax, the metadata (Available Transfer Syntax UID, the Pixel Data
VR), the bulk data and frame offsets, the size and the SHA-256 (the ETag follows the stored bytes). The original
file's SHA-256 is kept in the frame layout document (`pixel.original_sha256`): re-storing the identical original
bytes is idempotent and different bytes for the same SOP Instance UID are still a duplicate (PS3.4 B.2.3, 0111H).

Every encoded instance is decoded again and compared with the original pixels before it is kept: an encoder
that is not bit-exact for some image leaves that instance stored as received. Images the encoders cannot take
(1-bit, float, 32-bit, bit-packed, deflated) are stored as received too. Blocking work runs in a worker thread.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
import pydicom

from dicomweb.ingest.parse import ParsedInstance, parse_instance
from dicomweb.ingest.reasons import InstanceRejected
from dicomweb.pixels import encode
from dicomweb.pixels.native import TranscodeError
from dicomweb.uids import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from server.platform import private

log = logging.getLogger(__name__)

MODES: dict[str, str | None] = {"none": None, "htj2k": encode.HTJ2K_RPCL, "j2k": encode.J2K_LOSSLESS}
"""`HOUNSFIELD_STORE_COMPRESSION` values and the transfer syntax each stores."""
_SOURCES = {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN}
ORIGINAL_SHA256 = "original_sha256"


class NotCompressed(Exception):
    """This instance stays as received (the reason is logged, never the data)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """What the store path indexes: the (re-)parsed instance and the size and SHA-256 of the bytes at `path`."""

    parsed: ParsedInstance
    size: int
    sha256: str


def original_sha256(row: Any) -> str:
    """The SHA-256 of the bytes a client sent for an index row (`find_instance`): the kept original's when the
    instance was compressed at ingest, else the stored bytes'."""
    return str(row["original_sha256"] or row["sha256"])


@dataclass(frozen=True, slots=True)
class Compressor:
    """Compresses image instances into `target` (None: off)."""

    target: str | None
    bulk_threshold: int

    @classmethod
    def of_mode(cls, mode: str, bulk_threshold: int) -> Compressor:
        return cls(MODES[mode], bulk_threshold)

    def wanted(self, parsed: ParsedInstance) -> bool:
        pixel = parsed.pixel
        return (
            self.target is not None
            and parsed.transfer_syntax_uid in _SOURCES
            and bool(pixel)
            and isinstance(pixel, dict)
            and "native" in pixel
            and encode.can_encode(self.target)
        )

    async def apply(self, path: Path, parsed: ParsedInstance, size: int, sha256: str) -> Stored:
        """Replace the file at `path` by its compressed form when wanted and possible; what to index."""
        if not self.wanted(parsed):
            return Stored(parsed, size, sha256)
        target = self.target
        assert target is not None
        try:
            return await anyio.to_thread.run_sync(self._compress, path, parsed, sha256, target)
        except NotCompressed as exc:
            log.info("instance stored as received (%s): %s", parsed.transfer_syntax_uid, exc)
            return Stored(parsed, size, sha256)

    def _compress(self, path: Path, parsed: ParsedInstance, sha256: str, target: str) -> Stored:
        data = path.read_bytes()
        encoded = compress_bytes(data, target)
        tmp = path.with_name(f"{uuid.uuid4().hex}.part")
        try:
            private.write_bytes(tmp, encoded)
            try:
                again = parse_instance(tmp, bulk_threshold=self.bulk_threshold)
            except InstanceRejected as exc:
                raise NotCompressed(f"the compressed form does not parse: {exc.comment}") from exc
            os.replace(tmp, path)  # the caller consumes `path` as before
        finally:
            tmp.unlink(missing_ok=True)
        assert again.pixel is not None
        again.pixel = {**again.pixel, ORIGINAL_SHA256: sha256, "original_syntax": parsed.transfer_syntax_uid}
        again.warnings = list(parsed.warnings)
        return Stored(again, len(encoded), hashlib.sha256(encoded).hexdigest())


def compress_bytes(data: bytes, target: str) -> bytes:
    """`data` (an uncompressed Part 10 image) encoded in the lossless `target`, verified bit-exact by decoding
    it again. Raises NotCompressed when the image cannot be encoded or does not round-trip."""
    try:
        encoded = encode.encode_instance(data, target)
    except TranscodeError as exc:
        raise NotCompressed(str(exc)) from exc
    try:
        before = _pixels(data)
        after = _pixels(encoded)
    except Exception as exc:  # pydicom and codec plugins raise many kinds of errors
        raise NotCompressed(f"cannot verify the compressed pixels: {exc}") from exc
    if before.shape != after.shape or not np.array_equal(before, after):
        raise NotCompressed(f"{target} did not reproduce the pixels bit-exactly")
    return encoded


def _pixels(data: bytes) -> np.ndarray[Any, Any]:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.pixel_array_options(as_rgb=False)
    return np.asarray(ds.pixel_array)
