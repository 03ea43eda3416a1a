"""Which representation to send: media type and transfer syntax from the Accept ranges (PS3.18 8.7).

Pure functions (house style 1). The route hands in the parsed Accept ranges (`dicomweb.codecs.mediatypes`, the
`accept` query parameter already preferred over the header, PS3.18 8.3.3.1), and the stored transfer syntax;
out comes what to send, or `NotAcceptable`.

Rules, in the order of the client's preference (q-values, then order; PS3.18 8.7.8):

* A range that names a DICOM media type may carry `transfer-syntax` (PS3.18 8.7.3.5.2): `*` lets us send the
  stored form; a UID asks for that syntax; no parameter means the media type's default, which is Explicit VR
  Little Endian for `application/dicom` and `application/octet-stream` (PS3.18 8.7.3.4).
* `*/*` (and `application/*`, `multipart/*`) matches the resource's default media type (PS3.18 8.7.7).
* Ranges, parameters and values we do not understand are ignored (PS3.18 8.7.7); if nothing is left we
  answer 406 Not Acceptable.
* Instances can be sent in the stored syntax, in any native syntax (by decoding when needed), or encoded into
  a compressed syntax that has an encoder (`dicomweb.pixels.encode`). Frames and pixel bulk data can be sent as stored
  (their compressed media type, or `application/octet-stream` with the stored syntax), decoded to native
  little-endian bytes, or encoded: a compressed media type without a `transfer-syntax` parameter means the
  stored syntax when it carries it, otherwise its default below (`_MEDIA_DEFAULT`).
* `image/jhc` is taken as `image/jphc` (Cornerstone3D/OHIF send it); both mean HTJ2K, and when encoding we send
  the RPCL form (1.2.840.10008.1.2.4.202, a conforming HTJ2K lossless stream whose prefixes decode to lower
  resolutions). The media type asked for is echoed in Content-Type, with the `transfer-syntax` sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dicomweb.codecs.mediatypes import DICOM, DICOM_JSON, JSON, MULTIPART_RELATED, OCTET_STREAM, MediaType
from dicomweb.errors import NotAcceptable
from dicomweb.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    is_valid_uid,
)

ANY_SYNTAX = "*"
DEFAULT_SYNTAX = EXPLICIT_VR_LITTLE_ENDIAN
NATIVE = frozenset(
    {EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN}
)
_NATIVE_LITTLE = frozenset({EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN})

# Media types of compressed pixel data and the transfer syntaxes each carries (PS3.18 8.7.3.3.2, Table 8.7.3-5).
_COMPRESSED_MEDIA: dict[str, tuple[str, ...]] = {
    "image/jpeg": (
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
    ),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/x-jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
    "image/jhc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
    "image/jxl": ("1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112"),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
    "image/x-dicom-rle": ("1.2.840.10008.1.2.5",),
    "video/mpeg2": ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101"),
    "video/mp4": (
        "1.2.840.10008.1.2.4.102",
        "1.2.840.10008.1.2.4.103",
        "1.2.840.10008.1.2.4.104",
        "1.2.840.10008.1.2.4.105",
        "1.2.840.10008.1.2.4.106",
    ),
    "video/h265": ("1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108"),
}

_ALIASES = {"image/x-jls": "image/jls", "image/x-dicom-rle": "image/dicom-rle", "image/jhc": "image/jphc"}
"""Media types clients send for the registered ones (PS3.18 8.7.4 legacy `x-` names; Cornerstone's `jhc`)."""

_MEDIA_DEFAULT = {
    "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.202",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
}
"""The syntax we encode into for a compressed media type asked without `transfer-syntax` when the stored syntax is
another (PS3.18 Table 8.7.3-5 defaults; HTJ2K: the RPCL form, see the module docstring)."""


def media_type_of_syntax(transfer_syntax: str) -> str | None:
    """The single-frame media type that carries frames of a compressed transfer syntax, if there is one."""
    for media, syntaxes in _COMPRESSED_MEDIA.items():
        if transfer_syntax in syntaxes and media not in _ALIASES:
            return media
    return None


def is_encapsulated(transfer_syntax: str) -> bool:
    return transfer_syntax not in NATIVE


@dataclass(frozen=True, slots=True)
class Offer:
    """One representation the client accepts: a part media type, its transfer-syntax parameter (a UID, `*`,
    or None for the default) and whether it asked for the multipart/related wrapper."""

    media_type: str
    transfer_syntax: str | None
    multipart: bool
    wildcard: bool = False
    """Expanded from `image/*`: satisfied by the stored form only (a wildcard never asks us to encode)."""


@dataclass(frozen=True, slots=True)
class Choice:
    """What we send: the part (or whole body) media type, the transfer syntax of its bytes, multipart or not."""

    media_type: str
    transfer_syntax: str
    multipart: bool

    @property
    def content_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


def _syntax_param(rng: MediaType) -> tuple[bool, str | None]:
    """(usable, value) of a range's transfer-syntax parameter; an invalid value makes the range unusable."""
    value = rng.param("transfer-syntax")
    if value is None or value == ANY_SYNTAX:
        return True, value
    return is_valid_uid(value), value


def offers(ranges: list[MediaType], default_media_type: str) -> list[Offer]:
    """The client's acceptable representations for a resource whose default part media type is
    `default_media_type` (`application/dicom` for instances, `application/octet-stream` for frames and bulk
    data), most preferred first. Wildcards stand for the default (PS3.18 8.7.7)."""
    out: list[Offer] = []
    for rng in ranges:
        usable, syntax = _syntax_param(rng)
        if not usable:
            continue
        if rng.essence == MULTIPART_RELATED or (rng.type == "multipart" and rng.subtype == "*"):
            part = rng.param("type")
            if not part:
                out.append(Offer(default_media_type, syntax, True))
                continue
            kind, slash, sub = part.partition("/")
            if not slash or not kind or not sub:
                continue
            wild = sub == "*" and kind != "*"
            out.extend(Offer(m, syntax, True, wild) for m in _expand(MediaType(kind, sub), default_media_type))
        elif rng.type == "*" or rng.subtype == "*":
            wild = rng.type != "*"
            out.extend(Offer(m, syntax, True, wild) for m in _expand(rng, default_media_type))
        else:
            out.append(Offer(rng.essence, syntax, False))
    return out


def _expand(rng: MediaType, default_media_type: str) -> list[str]:
    """A part media range to concrete media types: `*/*` is the default; `image/*` any compressed image type."""
    if rng.type == "*":
        return [default_media_type]
    if rng.subtype != "*":
        return [rng.essence]
    if rng.matches(default_media_type):
        return [default_media_type]
    return [m for m in _COMPRESSED_MEDIA if rng.matches(m) and m not in _ALIASES]


# ---------------------------------------------------------------------------------------------- instances


def instance_syntax(offer: Offer, stored: str, can_transcode: Callable[[str, str], bool]) -> str | None:
    """The transfer syntax to send one stored instance in for `offer`, or None when we cannot."""
    if offer.media_type != DICOM:
        return None
    if offer.transfer_syntax == ANY_SYNTAX:
        return stored
    wanted = offer.transfer_syntax or DEFAULT_SYNTAX
    return wanted if can_transcode(stored, wanted) else None


def choose_instance(
    choices: list[Offer],
    stored: str,
    can_transcode: Callable[[str, str], bool],
    *,
    single_part_ok: bool,
) -> Choice | None:
    """The first offer we can satisfy for one instance. A bare `application/dicom` is sent single part where
    the resource is one instance (`single_part_ok`) and as multipart/related otherwise."""
    for offer in choices:
        syntax = instance_syntax(offer, stored, can_transcode)
        if syntax is not None:
            return Choice(DICOM, syntax, offer.multipart or not single_part_ok)
    return None


def choose_instances(
    choices: list[Offer],
    stored: list[str],
    can_transcode: Callable[[str, str], bool],
    *,
    single_part_ok: bool = False,
    per_instance: list[Callable[[str, str], bool]] | None = None,
) -> list[Choice]:
    """One choice per instance (PS3.18 8.7.8.2 Note 1: the syntax may differ from part to part); 406 when any
    instance cannot be sent in an acceptable syntax. All choices share the multipart flag of the first.
    `per_instance`, when given, replaces `can_transcode` instance by instance (e.g. JPEG baseline only for
    8-bit images)."""
    if not any(o.media_type == DICOM for o in choices):
        raise NotAcceptable(
            'this resource is available as multipart/related; type="application/dicom" only',
            offered=(f'{MULTIPART_RELATED}; type="{DICOM}"',),
        )
    out: list[Choice] = []
    for i, syntax in enumerate(stored):
        check = per_instance[i] if per_instance is not None else can_transcode
        choice = choose_instance(choices, syntax, check, single_part_ok=single_part_ok and len(stored) == 1)
        if choice is None:
            asked = ", ".join(sorted({o.transfer_syntax or DEFAULT_SYNTAX for o in choices if o.media_type == DICOM}))
            raise NotAcceptable(
                f"an instance stored as {syntax} cannot be sent in the transfer syntaxes asked for ({asked}): "
                "no encoder for that syntax, or not for this image",
                offered=(syntax, DEFAULT_SYNTAX),
            )
        out.append(choice)
    return out


# ---------------------------------------------------------------------------------------------- frames, bulk


def pixel_syntax(
    offer: Offer, stored: str, can_decode: Callable[[str], bool], can_encode: Callable[[str], bool] = lambda _: False
) -> Choice | None:
    """How to send frames (or pixel bulk data) stored in `stored` for one offer, or None.

    `application/octet-stream`: `*` sends compressed frames as stored and native frames as little-endian bytes;
    no parameter means Explicit VR Little Endian (decoding compressed frames); a UID is honoured when it is the
    stored syntax, a little-endian native one we can produce, or a compressed one we can encode into. A
    compressed media type (`image/jp2`) is satisfied by stored frames of a syntax it carries, or by encoding
    into the syntax its `transfer-syntax` parameter names (default: `_MEDIA_DEFAULT`)."""
    syntax = offer.transfer_syntax
    decodable = not is_encapsulated(stored) or can_decode(stored)
    if offer.media_type == OCTET_STREAM:
        if syntax == ANY_SYNTAX:
            chosen = stored if is_encapsulated(stored) else DEFAULT_SYNTAX
        elif syntax is None:
            chosen = DEFAULT_SYNTAX
        elif syntax == stored and syntax != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            chosen = stored
        elif syntax in _NATIVE_LITTLE:
            chosen = syntax
        elif syntax not in NATIVE and decodable and can_encode(syntax):
            chosen = syntax
        else:
            return None
        if chosen in _NATIVE_LITTLE and not decodable:
            return None
        return Choice(OCTET_STREAM, chosen, offer.multipart)
    media = _ALIASES.get(offer.media_type, offer.media_type)
    carried = _COMPRESSED_MEDIA.get(media)
    if carried is None:
        return None
    if stored in carried and syntax in (None, ANY_SYNTAX, stored):
        return Choice(offer.media_type, stored, offer.multipart)
    if offer.wildcard:
        return None
    target = syntax if syntax in carried else _MEDIA_DEFAULT.get(media) if syntax in (None, ANY_SYNTAX) else None
    if target is None or not decodable or not can_encode(target):
        return None
    return Choice(offer.media_type, target, offer.multipart)


def choose_pixels(
    choices: list[Offer],
    stored: str,
    can_decode: Callable[[str], bool],
    *,
    single_part_ok: bool,
    can_encode: Callable[[str], bool] = lambda _: False,
) -> Choice:
    """The representation for frames or pixel bulk data: the first offer we can satisfy. A single-part media
    type is honoured only where one item is asked for (`single_part_ok`); otherwise it means the multipart
    form. 406 when nothing fits."""
    for offer in choices:
        choice = pixel_syntax(offer, stored, can_decode, can_encode)
        if choice is not None:
            if not choice.multipart and not single_part_ok:
                choice = Choice(choice.media_type, choice.transfer_syntax, True)
            return choice
    own = media_type_of_syntax(stored)
    offered = [f'{MULTIPART_RELATED}; type="{OCTET_STREAM}"; transfer-syntax={DEFAULT_SYNTAX}']
    if own:
        offered.append(f'{MULTIPART_RELATED}; type="{own}"; transfer-syntax={stored}')
    if not is_encapsulated(stored) or can_decode(stored):
        offered += [
            f'{MULTIPART_RELATED}; type="{media}"; transfer-syntax={ts}'
            for media, ts in _MEDIA_DEFAULT.items()
            if media != own and can_encode(ts)
        ]
    raise NotAcceptable(f"pixel data stored as {stored} can be sent as: " + ", ".join(offered), offered=tuple(offered))


def choose_bulk(choices: list[Offer], stored: str) -> Choice:
    """Non-pixel bulk data (LUTs, overlays, waveforms, private blobs): always native bytes. Little endian unless
    the client asks for the stored big-endian syntax (PS3.18 8.7.3.3.1)."""
    native = stored if stored == EXPLICIT_VR_BIG_ENDIAN else EXPLICIT_VR_LITTLE_ENDIAN
    return choose_pixels(choices, native, lambda _ts: True, single_part_ok=True)


# ---------------------------------------------------------------------------------------------- metadata


def choose_metadata(ranges: list[MediaType]) -> str:
    """`application/dicom+json` (or `application/json` when that is what the client names first); the XML
    metadata representation (PS3.19) is not offered."""
    for rng in ranges:
        if rng.essence == JSON:
            return JSON
        if rng.matches(DICOM_JSON):
            return DICOM_JSON
    raise NotAcceptable("metadata is available as application/dicom+json only", offered=(DICOM_JSON,))
