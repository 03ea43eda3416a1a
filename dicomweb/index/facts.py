"""The index's answer to what authorization asks about a study (`authz.facts.FactsSource`): its patient and its
series' modalities, one indexed lookup."""

from __future__ import annotations

from pathlib import Path

from authz.facts import StudyFacts
from server.platform.db import Connection, Queries

SQL = Queries(Path(__file__).with_name("facts.sql"))


class IndexFacts:
    async def study_facts(self, conn: Connection, study_uid: str) -> StudyFacts | None:
        row = await conn.fetchrow(SQL["study_facts"], study_uid)
        if row is None:
            return None
        return StudyFacts(row["patient_id"], tuple(row["modalities"]))
