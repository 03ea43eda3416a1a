"""What the policy decides on about a stored study, as authorization asks for it: the archive's index answers
(`dicomweb.index.facts.IndexFacts`), so that authz reads none of the archive's tables itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.platform.db import Connection


@dataclass(frozen=True, slots=True)
class StudyFacts:
    patient_id: str | None
    """The patient the study is filed under (`Patient ID`, with its issuer when it has one)."""
    modalities: tuple[str, ...]
    """The modalities of its series, sorted."""


class FactsSource(Protocol):
    async def study_facts(self, conn: Connection, study_uid: str) -> StudyFacts | None:
        """The facts of a stored study; None for a study not stored."""
        ...
