"""STOW-RS request and response codecs (PS3.18 10.5): which request bodies are acceptable, and the Store
Instances Response Module (PS3.18 Table 10.5.3-1) as DICOM JSON. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dicomweb.codecs import mediatypes, multipart
from dicomweb.errors import BadRequest, UnsupportedMediaType
from dicomweb.ingest.outcome import Outcome

RETRIEVE_URL = "00081190"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_CLASS = "00081150"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
ERROR_COMMENT = "00000902"


def check_request_type(content_type: str | None) -> bytes:
    """Validate a STOW-RS Content-Type and return its boundary. 415 for anything but multipart/related with
    application/dicom parts; 400 when the multipart header itself is unusable."""
    if not content_type:
        raise UnsupportedMediaType('STOW-RS needs Content-Type: multipart/related; type="application/dicom"', None)
    media = mediatypes.parse_media_type(content_type)
    if media.essence != mediatypes.MULTIPART_RELATED:
        raise UnsupportedMediaType(
            f'STOW-RS accepts multipart/related; type="application/dicom", not {media.essence}', media.essence
        )
    part_type = media.param("type")
    # Only the essence counts: some senders put the parts' parameters in it (`type="application/dicom;
    # transfer-syntax=..."`). RFC 2387 3.1 requires `type`, but a request without it is read all the same:
    # each part's own Content-Type decides (`part_is_dicom`).
    if part_type is not None and part_type.partition(";")[0].strip() != mediatypes.DICOM:
        raise UnsupportedMediaType(
            f"STOW-RS here accepts application/dicom parts; type={part_type!r} is not supported",
            str(media),
        )
    boundary = media.param("boundary")
    if not boundary:
        raise BadRequest("multipart/related Content-Type has no boundary parameter")
    try:
        raw = boundary.encode("ascii")
    except UnicodeEncodeError:
        raise BadRequest("multipart boundary must be ASCII") from None
    multipart.check_boundary(raw)
    return raw


def part_is_dicom(headers: dict[str, str]) -> bool:
    """A part without Content-Type takes the root type (RFC 2387); otherwise it must be application/dicom."""
    value = headers.get("content-type")
    if value is None:
        return True
    try:
        return mediatypes.parse_media_type(value).essence == mediatypes.DICOM
    except BadRequest:
        return False


def _item(outcome: Outcome) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if outcome.sop_class_uid:
        item[REFERENCED_SOP_CLASS] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
    else:
        item[REFERENCED_SOP_CLASS] = {"vr": "UI"}
    if outcome.sop_instance_uid:
        item[REFERENCED_SOP_INSTANCE] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
    else:
        item[REFERENCED_SOP_INSTANCE] = {"vr": "UI"}
    return item


def store_response(outcomes: Sequence[Outcome], base_url: str, study_uid: str | None) -> tuple[int, dict[str, Any]]:
    """HTTP status and body: 200 all stored, 202 some failed or warnings, 409 none stored (PS3.18 10.5.3)."""
    body: dict[str, Any] = {}
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    studies = {o.study_uid for o in outcomes if o.ok and o.study_uid}
    target = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    if target:
        body[RETRIEVE_URL] = {"vr": "UR", "Value": [f"{base_url}/studies/{target}"]}
    for o in outcomes:
        item = _item(o)
        if o.ok:
            item[RETRIEVE_URL] = {
                "vr": "UR",
                "Value": [f"{base_url}/studies/{o.study_uid}/series/{o.series_uid}/instances/{o.sop_instance_uid}"],
            }
            if o.warnings:
                item[WARNING_REASON] = {"vr": "US", "Value": [o.warnings[0][0]]}
                item[ERROR_COMMENT] = {"vr": "LO", "Value": ["; ".join(w[1] for w in o.warnings)[:64]]}
            referenced.append(dict(sorted(item.items())))
        else:
            item[FAILURE_REASON] = {"vr": "US", "Value": [o.failure]}
            if o.comment:
                item[ERROR_COMMENT] = {"vr": "LO", "Value": [o.comment[:64]]}
            failed.append(dict(sorted(item.items())))
    if failed:
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    if referenced:
        body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": referenced}
    body = dict(sorted(body.items()))
    if not referenced:
        return 409, body
    if failed or any(o.warnings for o in outcomes if o.ok):
        return 202, body
    return 200, body


def readable_reasons(outcomes: Sequence[Outcome]) -> list[str]:
    """Full-length reasons for the HTTP Warning header (LO values are limited to 64 characters)."""
    out = []
    for o in outcomes:
        if o.comment:
            out.append(f"{o.sop_instance_uid or 'part'}: {o.comment}")
        for _code, text in o.warnings:
            out.append(f"{o.sop_instance_uid}: {text}")
    return out
