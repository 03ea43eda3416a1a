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
from server.platform.notified import ChannelListener

CHANNEL = "hounsfield_study_facts"
MAX_ENTRIES = 100_000
"""Studies remembered at most; beyond that the cache starts afresh (memory stays bounded)."""


class FactsCache:
    """A `FactsSource` in front of another (the index's): `peek` answers from memory when it can, `study_facts`
    asks the source on a miss and remembers the answer."""

    def __init__(self, dsn: str, source: FactsSource, *, retry_seconds: float = 5.0) -> None:
        self.source = source
        self._entries: dict[str, StudyFacts | None] = {}
        self._generation = 0
        self._listener = ChannelListener(dsn, CHANNEL, self.forget, self.clear, retry_seconds=retry_seconds)

    @property
    def active(self) -> bool:
        return self._listener.active

    def peek(self, study_uid: str) -> tuple[bool, StudyFacts | None]:
        """(known, facts): known is False when the index must be asked."""
        if not self.active or study_uid not in self._entries:
            return False, None
        return True, self._entries[study_uid]

    async def study_facts(self, conn: Connection, study_uid: str) -> StudyFacts | None:
        known, facts = self.peek(study_uid)
        if known:
            return facts
        generation = self._generation
        facts = await self.source.study_facts(conn, study_uid)
        if self.active and generation == self._generation:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[study_uid] = facts
        return facts

    def forget(self, study_uid: str) -> None:
        """A notification: that study changed (an empty payload: any may have)."""
        self._generation += 1
        if study_uid:
            self._entries.pop(study_uid, None)
        else:
            self._entries.clear()

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    async def start(self) -> None:
        await self._listener.start()

    async def close(self) -> None:
        await self._listener.close()
