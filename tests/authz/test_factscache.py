"""The guard's cache of study facts: a viewer's requests about one study are decided without a facts query each,
and a change to the facts (a new series with a restricted modality, a study stored after it was asked about) is
seen at once by every decision after it commits, through the index's notifications."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from authz.facts import StudyFacts
from authz.factscache import FactsCache
from dicomweb.index.facts import IndexFacts
from tests.conftest import LiveServer, app_dsn, bearer
from tests.support.factory import ct, multipart, part10, stow_headers


def _status_until(url: str, headers: dict[str, str], wanted: int, seconds: float = 5.0) -> int:
    deadline = time.monotonic() + seconds
    while True:
        status = httpx.get(url, headers=headers).status_code
        if status == wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_a_new_restricted_series_is_decided_on_at_once(server: LiveServer) -> None:
    """A technologist may read a CT study; once an MG series joins it (the shipped policy restricts MG to
    radiologists), the cached facts of that study are dropped and the same request is refused."""
    technologist = bearer(server.token(sub="tech-9", roles=["technologist"], scopes=[]))
    first = ct(PatientID="P9", Modality="CT")
    study = first.StudyInstanceUID
    stored = httpx.post(
        server.dicomweb + "/studies", content=multipart([part10(first)]), headers={**stow_headers(), **server.headers}
    )
    assert stored.status_code == 200, stored.text
    url = f"{server.dicomweb}/studies/{study}/series/{first.SeriesInstanceUID}/metadata"
    for _ in range(3):  # decided on the cached facts after the first
        assert httpx.get(url, headers=technologist).status_code == 200
    mammogram = ct(study, PatientID="P9", Modality="MG")
    added = httpx.post(
        server.dicomweb + "/studies",
        content=multipart([part10(mammogram)]),
        headers={**stow_headers(), **server.headers},
    )
    assert added.status_code == 200, added.text
    assert _status_until(url, technologist, 403) == 403


def test_a_study_stored_after_it_was_asked_about(server: LiveServer) -> None:
    """An unknown study is cached as not stored (no patient: a token bound to a patient is refused it); storing
    it notifies, and the next decision sees its patient: the patient's own token may then read it."""
    own = bearer(server.token(sub="app-11", roles=["radiologist"], scopes=[], patient="P11"))
    ds = ct(PatientID="P11", Modality="CT")
    url = f"{server.dicomweb}/studies/{ds.StudyInstanceUID}/metadata"
    before = httpx.get(url, headers=own).status_code
    assert before in (403, 404)
    stored = httpx.post(
        server.dicomweb + "/studies", content=multipart([part10(ds)]), headers={**stow_headers(), **server.headers}
    )
    assert stored.status_code == 200, stored.text
    assert _status_until(url, own, 200) == 200


def test_the_cache_answers_from_memory_only_while_it_listens(dsn: str, tmp_path: Path) -> None:
    async def main() -> None:
        conn: Any = await asyncpg.connect(dsn)
        cache = FactsCache(app_dsn(dsn), IndexFacts(), retry_seconds=0.1)
        try:
            assert cache.peek("1.2.3") == (False, None)  # not listening yet: ask the index
            await cache.start()
            for _ in range(100):
                if cache.active:
                    break
                await asyncio.sleep(0.05)
            assert cache.active
            assert await cache.study_facts(conn, "1.2.3") is None
            assert cache.peek("1.2.3") == (True, None)
            await conn.execute("INSERT INTO studies (study_uid, patient_id, attrs) VALUES ('1.2.3', 'P1', '{}'::jsonb)")
            for _ in range(100):  # the insert's notification drops the cached "not stored"
                if cache.peek("1.2.3") == (False, None):
                    break
                await asyncio.sleep(0.02)
            assert cache.peek("1.2.3") == (False, None)
            assert await cache.study_facts(conn, "1.2.3") == StudyFacts("P1", ())
            assert cache.peek("1.2.3") == (True, StudyFacts("P1", ()))
        finally:
            await cache.close()
            await conn.close()
        assert not cache.active and cache.peek("1.2.3") == (False, None)

    asyncio.run(main())
