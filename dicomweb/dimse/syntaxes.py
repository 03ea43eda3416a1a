"""Transfer syntaxes of the instances this AE sends (C-MOVE and C-GET sub-operations, auto-routing): what to
propose, what to accept for a C-GET's storage sub-operations, and what to send each instance in once the peer
has chosen.

Proposing (PS3.8 9.3.2.2, at most 128 presentation contexts): for each SOP class one context with Explicit and
Implicit VR Little Endian, which can carry any instance we can decode, and for each stored syntax other than
those a context of its own, so that a peer accepting it gets the stored encoding unchanged. A peer chooses one
transfer syntax per context (PS3.8 9.3.3.2), so one context offering [stored, Explicit, Implicit] would leave
us with whichever it preferred; separate contexts let us send what is stored whenever the peer takes it.

Accepting, as the storage SCU of a C-GET (PS3.4 C.4.3, PS3.7 D.3.3.4): the requester proposes the storage
contexts before it names any instance, so for each context we accept the syntax every instance can be
delivered in, Explicit VR Little Endian, else Implicit VR Little Endian, else pynetdicom's order. A requester
that wants the stored compressed bytes proposes that syntax in a context of its own (as for C-MOVE above).

Sending: the stored syntax when the peer accepted it; else an accepted native syntax, decoding compressed Pixel
Data (exact for lossless syntaxes; a lossy-compressed image is decoded to the pixels its codestream holds and
keeps Lossy Image Compression 01, PS3.3 C.7.6.1.1.5); else, for an image stored without loss, an accepted
lossless compressed syntax we can encode (`dicomweb.pixels.encode`). Never into a lossy syntax, and never a lossy
image re-encoded as if it were lossless: such an instance is not sent (the sub-operation fails).

Conversions are blocking (decoding a large image takes seconds): callers run in pynetdicom's association
threads or a worker thread.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext

from dicomweb.pixels import encode
from dicomweb.pixels.decode import transcode_instance
from dicomweb.pixels.native import TranscodeError, can_decode, is_compressed
from dicomweb.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128
"""Presentation contexts one association may propose (odd context IDs 1-255, PS3.8 9.3.2.2)."""
FALLBACK = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
"""The syntaxes proposed for every SOP class: any decodable instance can be sent in them."""
NATIVE_PREFERENCE = (*FALLBACK, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
LOSSLESS_COMPRESSED = frozenset(
    {
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Process 14
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Process 14, Selection Value 1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component (Lossless Only)
        "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
        "1.2.840.10008.1.2.4.201",  # HTJ2K (Lossless Only)
        "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL Options (Lossless Only)
        "1.2.840.10008.1.2.5",  # RLE Lossless
    }
)
"""Compressed syntaxes that lose nothing (PS3.5 A.4); every other compressed syntax counts as lossy (JPEG
baseline and extended, JPEG-LS near-lossless, JPEG 2000 and HTJ2K that allow loss, MPEG, HEVC, JPEG XL)."""


class NotSendable(Exception):
    """No transfer syntax the peer accepted can carry this instance faithfully (or it could not be converted)."""


def is_lossy(transfer_syntax: str) -> bool:
    return is_compressed(transfer_syntax) and transfer_syntax not in LOSSLESS_COMPRESSED


def proposals(items: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """The presentation contexts for sending instances of these (SOP class, stored transfer syntax) pairs: the
    fallback context of each SOP class first (they keep every instance sendable when there are too many), then
    one context per other stored syntax, at most `MAX_CONTEXTS` in all."""
    pairs = list(dict.fromkeys(items))
    contexts = [build_context(sop_class, list(FALLBACK)) for sop_class in dict.fromkeys(s for s, _ in pairs)]
    contexts += [build_context(sop_class, ts) for sop_class, ts in pairs if ts not in FALLBACK]
    return contexts[:MAX_CONTEXTS]


def choose(stored: str, accepted: Sequence[str]) -> str:
    """The transfer syntax to send an instance stored in `stored` in, among those the peer `accepted` for its
    SOP class; raises NotSendable with the reason when none will do."""
    if stored in accepted:
        return stored
    if not accepted:
        raise NotSendable("the peer accepted no presentation context for its SOP class")
    if not can_decode(stored):
        raise NotSendable(f"the peer did not accept {stored} and no decoder is installed for it")
    for ts in NATIVE_PREFERENCE:
        if ts in accepted:
            return ts
    if is_lossy(stored):
        raise NotSendable(
            f"a lossy {stored} image is sent only as stored or decoded to a native syntax, and the peer accepted "
            f"only {', '.join(accepted)}"
        )
    for ts in accepted:
        if not is_lossy(ts) and encode.can_encode(ts):
            return ts
    raise NotSendable(f"the peer accepted only {', '.join(accepted)}: none can carry the image without loss")


def as_syntax(data: bytes, target: str) -> Dataset:
    """The Part 10 file `data` as a data set for pynetdicom to send on a context that accepted `target`.
    pynetdicom picks the context by the file meta's Transfer Syntax UID, which must agree with how the data set
    was read, and encodes the data set in the context's syntax: it converts between Explicit and Implicit VR
    Little Endian itself; every other change is made here. Raises TranscodeError."""
    ds = pydicom.dcmread(io.BytesIO(data))
    source = str(ds.file_meta.get("TransferSyntaxUID") or "")
    if source == target or (source in FALLBACK and target in FALLBACK):
        return ds
    if "PixelData" not in ds and is_compressed(target) and not is_compressed(source):
        # Without Pixel Data, a compressed syntax encodes the data set as Explicit VR Little Endian (PS3.5 A.4)
        if source != EXPLICIT_VR_LITTLE_ENDIAN:
            ds = pydicom.dcmread(io.BytesIO(transcode_instance(data, EXPLICIT_VR_LITTLE_ENDIAN)))
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(target)
        return ds
    return pydicom.dcmread(io.BytesIO(transcode_instance(data, target)))


def outgoing(data: bytes, stored: str, accepted: Sequence[str]) -> Dataset:
    """The stored file `data` (received in `stored`; the file itself may be in another, lossless syntax when
    storage compression re-encoded it) as the data set to send to a peer that accepted `accepted` for its SOP
    class. Raises NotSendable."""
    target = choose(stored, accepted)
    try:
        return as_syntax(data, target)
    except TranscodeError as exc:
        raise NotSendable(f"the instance could not be converted to {target}: {exc}") from exc


def accepted_syntaxes(assoc: Any, sop_class: str) -> list[str]:
    """The transfer syntaxes of the contexts `assoc` may send `sop_class` instances on (our role: SCU)."""
    return [
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.as_scu and cx.transfer_syntax
    ]


def prefer_native_for_retrieve(event: Any) -> None:
    """EVT_REQUESTED: for the storage SOP classes in which the requester takes the SCP role (the storage
    sub-operations of a C-GET), accept Explicit VR Little Endian when proposed, else Implicit VR Little Endian,
    before any other syntax: every instance can be delivered in them. The acceptor's supported contexts are
    this association's own copies (pynetdicom copies them per association), so reordering them changes only
    this negotiation."""
    assoc = event.assoc
    roles = assoc.requestor.role_selection
    retrieving = {uid for uid, item in roles.items() if item.scp_role}
    if not retrieving:
        return
    for cx in assoc.acceptor.supported_contexts:
        if cx.abstract_syntax in retrieving:
            syntaxes = cx._transfer_syntax  # the list itself: the property setter would re-validate each UID
            native = [have for ts in FALLBACK for have in syntaxes if have == ts]
            cx._transfer_syntax = native + [have for have in syntaxes if have not in FALLBACK]
