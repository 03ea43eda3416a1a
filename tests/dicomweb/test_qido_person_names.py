"""Person names are matched per component group (PS3.5 6.2.1; PS3.4 C.2.2.2.1 and C.2.2.2.4 apply to each
group): through QIDO-RS, C-FIND and FHIR Patient search, and through the index (EXPLAIN on 100,000 studies)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pydicom.uid import generate_uid

from dicomweb.index.search import build
from dicomweb.search.query import Level, parse_query
from server.platform import db
from tests.conftest import _with_db
from tests.dicomweb.test_dimse_query import find, stow
from tests.support.dimse_util import start
from tests.support.factory import ct

pytestmark = pytest.mark.timeout(180)

NAMES = {
    "ideo-only": "=山田^太郎=やまだ^たろう",  # no alphabetic group
    "all-three": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "korean": "Hong^Gildong=洪^吉洞=홍^길동",
    "latin": "Doe^John",
    "reversed": "Tarou^Yamada",
}

# (PatientName value, the names it finds)
CASES = [
    ("山田*", {"ideo-only", "all-three"}),  # a prefix of the ideographic group
    ("やまだ*", {"ideo-only", "all-three"}),  # ... of the phonetic group
    ("山田^太郎", {"ideo-only", "all-three"}),  # single value matching of one group
    ("やまだ^たろう", {"ideo-only", "all-three"}),
    ("홍^길동", {"korean"}),
    ("*太郎", {"ideo-only", "all-three"}),  # no literal prefix
    ("yamada*", {"all-three"}),  # case-insensitive, alphabetic group
    ("*ROU", {"all-three"}),
    ("Doe^John", {"latin"}),
    ("=山田*", {"ideo-only", "all-three"}),  # by position: the ideographic group only
    ("=やまだ*", set()),  # the phonetic group is not the ideographic one
    ("==やまだ^たろう", {"ideo-only", "all-three"}),
    ("Yamada*=山田*", {"all-three"}),  # every given group must match its own
    ("Yamada*=洪*", set()),
    ("*=*=홍*", {"korean"}),
    ("*Tarou^山田*", set()),  # one group never matches across two
    ("TAROU^YAMADA", {"reversed"}),
]


def _store(server: Any) -> dict[str, str]:
    studies = {key: str(generate_uid()) for key in NAMES}
    datasets = []
    for n, (key, name) in enumerate(NAMES.items()):
        datasets.append(
            ct(
                studies[key],
                PatientID=f"PN-{n}",
                PatientName=name,
                SpecificCharacterSet="ISO_IR 192",
                ReferringPhysicianName="=医師^一郎" if key == "ideo-only" else "Welby^Marcus",
                PerformingPhysicianName="=技師^花子" if key == "ideo-only" else "Doe^Jane",
            )
        )
    with httpx.Client(timeout=60, headers=server.headers) as http:
        stow(http, server.url, datasets)
    return studies


@pytest.fixture
def archive(make_server: Any) -> Any:
    server = start(make_server, fhir_sync_delay_seconds=0)
    server.studies = _store(server)
    return server


def _found(studies: dict[str, str], uids: list[str]) -> set[str]:
    by_uid = {uid: key for key, uid in studies.items()}
    return {by_uid[uid] for uid in uids}


def test_qido_matches_each_group(archive: Any) -> None:
    with httpx.Client(base_url=archive.dicomweb, timeout=60, headers=archive.headers) as http:
        for value, expected in CASES:
            rsp = http.get("/studies", params={"PatientName": value})
            assert rsp.status_code in (200, 204), (value, rsp.text)
            uids = [s["0020000D"]["Value"][0] for s in rsp.json()] if rsp.status_code == 200 else []
            assert _found(archive.studies, uids) == expected, value
        rsp = http.get("/studies", params={"ReferringPhysicianName": "医師*"})
        assert _found(archive.studies, [s["0020000D"]["Value"][0] for s in rsp.json()]) == {"ideo-only"}
        # A stored attribute without a column (single value matching by containment): any group too.
        rsp = http.get("/series", params={"PerformingPhysicianName": "技師^花子"})
        assert _found(archive.studies, [s["0020000D"]["Value"][0] for s in rsp.json()]) == {"ideo-only"}
        rsp = http.get("/series", params={"PerformingPhysicianName": "=技師^花子"})
        assert _found(archive.studies, [s["0020000D"]["Value"][0] for s in rsp.json()]) == {"ideo-only"}
        # A person name has three groups at most: a fourth is a malformed value.
        assert http.get("/studies", params={"PatientName": "a=b=c=d"}).status_code == 400


def test_c_find_matches_each_group(archive: Any) -> None:
    for value, expected in (("やまだ*", {"ideo-only", "all-three"}), ("山田^太郎", {"ideo-only", "all-three"})):
        matches, statuses = find(
            archive,
            "RAD",
            QueryRetrieveLevel="STUDY",
            SpecificCharacterSet="ISO_IR 192",
            PatientName=value,
            StudyInstanceUID="",
        )
        assert statuses[-1] == 0x0000
        assert _found(archive.studies, [m.StudyInstanceUID for m in matches]) == expected, value


def test_fhir_patient_name_search_reads_every_group(archive: Any) -> None:
    """FHIR Patient resources carry one HumanName per group, and `name` searches all of them (R4 string
    search: starts with, case-insensitive)."""
    with httpx.Client(base_url=archive.url + "/fhir", timeout=60, headers=archive.headers) as http:
        deadline = time.monotonic() + 30
        while True:
            bundle = http.get("/Patient", params={"name": "やまだ"}).json()
            ids = {e["resource"]["identifier"][0]["value"] for e in bundle.get("entry", [])}
            if len(ids) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ids == {"PN-0", "PN-1"}
        family = http.get("/Patient", params={"family": "山田"}).json()
        assert {e["resource"]["identifier"][0]["value"] for e in family.get("entry", [])} == {"PN-0", "PN-1"}


def _literal(value: object) -> str:
    """A parameter as an SQL literal, for EXECUTE (EXPLAIN takes no protocol-level parameters)."""
    if isinstance(value, int):
        return str(value)
    assert isinstance(value, str)
    return "'" + value.replace("'", "''") + "'"


def test_group_matching_is_index_backed(dsn: str) -> None:
    """On 100,000 studies, with generic plans (what a prepared statement settles on), exact and prefix values
    go through the btree of each group and patterns without a prefix through the trigram index: no query
    reads the whole studies table."""

    async def run() -> dict[str, str]:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                """INSERT INTO studies (study_uid, patient_id, patient_name, patient_name_search,
                       patient_name_groups, study_date, attrs)
                SELECT '2.25.' || s, 'P' || s, n.alpha || CASE WHEN s % 100 = 0 THEN '=山田^' || s ELSE '' END,
                       upper(replace(n.alpha, '^', ' ')),
                       ARRAY[upper(replace(n.alpha, '^', ' ')),
                             CASE WHEN s % 100 = 0 THEN '山田 ' || s END, NULL],
                       to_char(date '2015-01-01' + (s % 3650), 'YYYYMMDD'), '{}'
                FROM generate_series(1, 100000) s,
                     LATERAL (SELECT (ARRAY['SMITH','JONES','BROWN','TAYLOR'])[1 + s % 4] || '^ANN' || s
                              AS alpha) n"""
            )
            await conn.execute("ANALYZE studies")
            plans = {}
            for value in ("山田*", "JONES^ANN77", "=山田*", "*ANN123*", "Smi*=山田*"):
                sql, args = build(parse_query(Level.STUDY, [("PatientName", value)]))
                async with conn.transaction():
                    await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                    await conn.execute("PREPARE page AS " + sql)
                    rows = await conn.fetch(f"EXPLAIN EXECUTE page({', '.join(map(_literal, args))})")
                    await conn.execute("DEALLOCATE page")
                plans[value] = "\n".join(r[0] for r in rows)
            return plans
        finally:
            await conn.close()

    plans = asyncio.run(run())
    for value, plan in plans.items():
        assert "Seq Scan on studies" not in plan, (value, plan)
    for value in ("山田*", "JONES^ANN77"):  # a value of one group: any of the three
        for index in ("alphabetic", "ideographic", "phonetic"):
            assert f"studies_patient_name_{index}" in plans[value], (value, plans[value])
    assert "studies_patient_name_ideographic" in plans["=山田*"]
    assert "studies_patient_name_trgm" in plans["*ANN123*"]
    assert "studies_patient_name_alphabetic" in plans["Smi*=山田*"]


def test_migration_splits_names_already_indexed(pg_uri: str, tmp_path: Path) -> None:
    """Studies indexed before the groups existed get them from the migration: one-group names from their
    search column as ingest normalized it, names with groups split and normalized in SQL."""
    earlier = tmp_path / "migrations"
    earlier.mkdir()
    for path in db.migration_files():
        if path.name < "0022_":
            shutil.copy(path, earlier / path.name)
    name = f"pn_backfill_{int(time.time() * 1000)}"

    async def run() -> dict[str, list[str | None] | None]:
        admin = await asyncpg.connect(pg_uri)
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            conn = await asyncpg.connect(_with_db(pg_uri, name))
            try:
                await db.migrate(conn, earlier)
                await conn.executemany(
                    "INSERT INTO studies (study_uid, patient_name, patient_name_search, referring_physician_name,"
                    " referring_physician_search, attrs) VALUES ($1, $2, $3, $4, $5, '{}')",
                    [
                        ("1.1", "Müller^Jürgen", "MÜLLER JÜRGEN", None, None),
                        ("1.2", NAMES["all-three"], "YAMADA TAROU 山田 太郎 やまだ たろう", "=医師", "医師"),
                        ("1.3", "=山田\u3000花子", "山田 花子", None, None),
                        ("1.4", None, None, None, None),
                    ],
                )
                await db.migrate(conn)
                rows = await conn.fetch(
                    "SELECT study_uid, patient_name_groups, referring_physician_groups FROM studies ORDER BY 1"
                )
                return {r["study_uid"]: [r["patient_name_groups"], r["referring_physician_groups"]] for r in rows}
            finally:
                await conn.close()
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await admin.close()

    assert asyncio.run(run()) == {
        "1.1": [["MÜLLER JÜRGEN", None, None], None],
        "1.2": [["YAMADA TAROU", "山田 太郎", "やまだ たろう"], [None, "医師", None]],
        "1.3": [[None, "山田 花子", None], None],
        "1.4": [None, None],
    }
