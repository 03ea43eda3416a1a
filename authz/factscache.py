"""The guard's per-process cache of study facts (patient, modalities), so that a viewer's requests about one
study cost no database round trip for the facts the policy decides on.

Facts change rarely (a new series brings a modality; a study is stored, moved or deleted) and each such change
notifies `hounsfield_study_facts` with the study's UID (migrations/0024_study_facts_notify.sql): every server
process then drops that study. The cache is only trusted while this process listens (`ChannelListener`); a
generation counter keeps a read that raced with a notification from being cached. Whether a UID is stored at all
is cached too (a new study is notified on insert)."""

from __future__ import annotations

from authz.facts import FactsSource, StudyFacts
from server.platform.db import Connection
from server.platform.notified import NotifiedCache

CHANNEL = "hounsfield_study_facts"
MAX_ENTRIES = 100_000
"""Studies remembered at most; beyond that the cache starts afresh (memory stays bounded)."""


class FactsCache(NotifiedCache[str, StudyFacts | None]):
    """A `FactsSource` in front of another (the index's): `peek` answers from memory when it can, `study_facts`
    asks the source on a miss and remembers the answer. A notification names the study to drop."""

    def __init__(self, dsn: str, source: FactsSource, *, retry_seconds: float = 5.0) -> None:
        super().__init__(
            dsn, CHANNEL, key_of=lambda uid: uid or None, max_entries=MAX_ENTRIES, retry_seconds=retry_seconds
        )
        self.source = source

    def peek(self, study_uid: str) -> tuple[bool, StudyFacts | None]:
        """(known, facts): known is False when the index must be asked."""
        if not self.active or study_uid not in self.entries:
            return False, None
        return True, self.entries[study_uid]

    async def study_facts(self, conn: Connection, study_uid: str) -> StudyFacts | None:
        known, facts = self.peek(study_uid)
        if known:
            return facts
        generation = self.generation
        facts = await self.source.study_facts(conn, study_uid)
        self.fetched(study_uid, facts, generation)
        return facts
