"""What the index keeps of an attribute's value: text and integers read leniently, dates, times and person names
normalized so that they sort and match (PS3.5 6.2; QIDO-RS and C-FIND matching, `dicomweb.index.search`)."""

from __future__ import annotations

import pydicom
from pydicom.dataset import Dataset


def text_value(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def int_value(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def normalize_date(value: str | None) -> str | None:
    """DA as YYYYMMDD; the ACR-NEMA form YYYY.MM.DD is accepted. Anything else is not indexed."""
    if not value:
        return None
    text = value.replace(".", "").strip()
    return text if len(text) == 8 and text.isdigit() else None


def normalize_time(value: str | None) -> str | None:
    """TM as HHMMSS.FFFFFF (shorter forms kept as they sort); the ACR-NEMA HH:MM:SS form is accepted."""
    if not value:
        return None
    text = value.replace(":", "").strip()
    head = text.split(".")[0]
    if not head.isdigit() or len(head) not in (2, 4, 6):
        return None
    return text


def name_search(value: str | None) -> str | None:
    """Person names for matching: upper case, components and groups separated by single spaces."""
    if not value:
        return None
    text = value.upper().replace("^", " ").replace("=", " ")
    return " ".join(text.split()) or None


def name_groups(value: str | None) -> list[str | None] | None:
    """A person name's component groups (alphabetic, ideographic, phonetic: PS3.5 6.2.1), each normalized as
    `name_search` normalizes a whole name, None for an empty group; None when every group is empty. QIDO-RS
    and C-FIND match each group on its own (`dicomweb.index.search`)."""
    if not value:
        return None
    groups = [name_search(group) for group in value.split("=")[:3]]
    groups += [None] * (3 - len(groups))
    return groups if any(groups) else None
