"""What a resource contributes to the search index (`fhir_search`): one `SearchEntry` per value of each search
parameter the server supports (R4 3.1.1.4). Pure: a resource in, entries out.

PLACEHOLDER owned by the search helper: `entries` is filled in with the parameters of ImagingStudy, Patient,
Endpoint and DiagnosticReport.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


@dataclass(frozen=True, slots=True)
class SearchEntry:
    param: str
    system: str | None = None
    code: str | None = None
    text_value: str | None = None
    low: dt.datetime | None = None
    high: dt.datetime | None = None
    number: Decimal | None = None


def entries(resource_type: str, content: Mapping[str, Any]) -> list[SearchEntry]:
    """The search index rows of one resource's current version."""
    return []
