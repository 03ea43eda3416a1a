"""Checked identifiers, made once at the edge (house style 2).

A UID is at most 64 characters of digits and dots, in components without leading zeros (PS3.5 9.1).
"""

from __future__ import annotations

import re

from dicomweb.errors import InvalidParameter

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


class UID(str):
    """A string known to be a syntactically valid DICOM UID."""

    __slots__ = ()

    def __new__(cls, value: str, *, what: str = "UID") -> UID:
        if not isinstance(value, str) or not is_valid_uid(value):
            shown = value[:80] if isinstance(value, str) else repr(value)
            raise InvalidParameter(what, f"not a valid DICOM UID: {shown!r}")
        return super().__new__(cls, value)


def study_uid(value: str) -> UID:
    return UID(value, what="StudyInstanceUID")


def series_uid(value: str) -> UID:
    return UID(value, what="SeriesInstanceUID")


def instance_uid(value: str) -> UID:
    return UID(value, what="SOPInstanceUID")
