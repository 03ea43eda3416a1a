"""FHIR access as an attacker tries it: a search entry of a batch or transaction Bundle sees exactly what the same
search sent directly sees, included and chained resources each decided on their own type and patient (for
every `_include` / `_revinclude` the type table allows, for several identities, with the read of each included
resource as the oracle); vread and `_history` decided on the patient and modalities each version was filed under
(a report moved from P5 to P1, an ImagingStudy that lost its MG series), directly and in bundles; and the audit
record of a search entry is the one of the same search sent directly. Real server, real PostgreSQL, fhirpy and
httpx as the clients."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError

from authz.tokens import issue_token
from fhir.repository import FhirRepository, Filing
from fhir.search.index import PARAMS
from fhir.search.query import CONTROL
from fhir.types import TYPES
from tests.conftest import LiveServer, bearer
from tests.fhir.test_fhir_search import seed

FHIR_JSON = "application/fhir+json"
EVERY_STUDY = {f"ImagingStudy/s{i}" for i in range(1, 6)}


@pytest.fixture
def archive(server: LiveServer) -> LiveServer:
    """tests/fhir/test_fhir_search.py's resources: Endpoint `dicomweb` (every study's), Patients pat1..pat3 (P1..P3),
    ImagingStudy s1 (P1 CT), s2 (P2 MR), s3 (P3 MR), s4 (P1 MG), s5 (P2 CT), reports r1..r4 (r4 on s4)."""
    seed(server.dsn)
    return server


@dataclass
class Client:
    """One identity on the server: direct requests, and the same requests as bundle entries."""

    server: LiveServer
    token: str

    @property
    def fhirpy(self) -> SyncFHIRClient:
        return SyncFHIRClient(f"{self.server.url}/fhir", authorization=f"Bearer {self.token}")

    def get(self, url: str) -> httpx.Response:
        return httpx.get(f"{self.server.url}/fhir/{url}", headers=bearer(self.token), timeout=60)

    def bundle(self, kind: str, *urls: str) -> httpx.Response:
        body = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [{"request": {"method": "GET", "url": u}} for u in urls],
        }
        headers = {**bearer(self.token), "Content-Type": FHIR_JSON}
        return httpx.post(f"{self.server.url}/fhir", content=json.dumps(body).encode(), headers=headers, timeout=60)

    def entries(self, kind: str, *urls: str) -> list[dict[str, Any]]:
        """The response entries of a batch or transaction of GETs (which must answer 200)."""
        response = self.bundle(kind, *urls)
        assert response.status_code == 200, response.text
        Bundle.model_validate(response.json())
        answers: list[dict[str, Any]] = response.json()["entry"]
        return answers


def client(server: LiveServer, sub: str, roles: tuple[str, ...], scopes: tuple[str, ...] = (), **claims: Any) -> Client:
    return Client(server, issue_token(server.settings, sub=sub, roles=roles, scopes=scopes, **claims))


def kept(bundle: dict[str, Any], mode: str = "include") -> set[str]:
    """`Type/id` of a searchset's entries of one search mode."""
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") == mode
    }


def status_of(entry: dict[str, Any]) -> int:
    return int(str(entry["response"]["status"]).split(" ", 1)[0])


# --- included resources in bundles: the issue's scenarios ---------------------------------------------------------


def test_endpoint_revinclude_in_a_batch_stays_with_the_tokens_patient(archive: LiveServer) -> None:
    """A patient-context token (patient/*.rs, patient P1): the direct search includes only P1's studies, and so
    does the same search as a batch or a transaction entry (not every ImagingStudy of the archive)."""
    app = client(archive, "app", ("radiologist",), ("patient/*.rs",), patient="P1")
    direct = app.fhirpy.resources("Endpoint").revinclude("ImagingStudy", "endpoint").fetch_raw()
    assert kept(direct, "match") == {"Endpoint/dicomweb"}
    assert kept(direct) == {"ImagingStudy/s1", "ImagingStudy/s4"}
    url = "Endpoint?_revinclude=ImagingStudy:endpoint"
    batch = app.fhirpy.execute("", method="post", data=bundle_of("batch", url))
    assert [e["response"]["status"] for e in batch["entry"]] == ["200 OK"]
    assert kept(batch["entry"][0]["resource"]) == {"ImagingStudy/s1", "ImagingStudy/s4"}
    transaction = app.entries("transaction", url)
    assert kept(transaction[0]["resource"]) == {"ImagingStudy/s1", "ImagingStudy/s4"}


def test_patient_revinclude_in_a_batch_leaves_out_mg_for_roles_without_it(archive: LiveServer) -> None:
    """MG is restricted to radiologists and admins (authz/policies/data.json): an EHR's Patient search includes
    no MG study (s4), directly, in a batch or in a transaction; a radiologist's includes it (control)."""
    ehr = client(archive, "ehr-1", ("ehr",))
    visible = EVERY_STUDY - {"ImagingStudy/s4"}
    direct = ehr.fhirpy.resources("Patient").revinclude("ImagingStudy", "patient").fetch_raw()
    assert kept(direct, "match") == {"Patient/pat1", "Patient/pat2", "Patient/pat3"}
    assert kept(direct) == visible
    url = "Patient?_revinclude=ImagingStudy:patient"
    batch = ehr.fhirpy.execute("", method="post", data=bundle_of("batch", url))
    assert kept(batch["entry"][0]["resource"]) == visible
    assert kept(ehr.entries("transaction", url)[0]["resource"]) == visible
    # the other way round: a report's imaging study (r4 -> s4), and a chain through the study's modality
    report_url = "DiagnosticReport?_include=DiagnosticReport:imaging-study"
    for answer in (ehr.fhirpy.resources("DiagnosticReport").include("DiagnosticReport", "imaging-study").fetch_raw(),
                   ehr.entries("batch", report_url)[0]["resource"]):  # fmt: skip
        assert "DiagnosticReport/r4" in kept(answer, "match") and kept(answer) == visible - {"ImagingStudy/s5"}
    chain = "DiagnosticReport?imaging-study.modality=MG"
    assert kept(ehr.get(chain).json(), "match") == set()  # the chain cannot probe what the study may not show
    assert kept(ehr.entries("batch", chain)[0]["resource"], "match") == set()
    radiologist = client(archive, "rad", ("radiologist",))
    assert kept(radiologist.entries("batch", url)[0]["resource"]) == EVERY_STUDY
    assert kept(radiologist.get(chain).json(), "match") == {"DiagnosticReport/r4"}


def bundle_of(kind: str, *urls: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": [{"request": {"method": "GET", "url": u}} for u in urls]}


def test_iterate_is_not_followed(archive: LiveServer) -> None:
    """`_include:iterate` is not supported: ignored with a warning (a 400 under strict handling), so it can
    include nothing at all."""
    ehr = client(archive, "ehr-1", ("ehr",))
    url = "DiagnosticReport?_include=DiagnosticReport:patient&_include:iterate=ImagingStudy:patient"
    for answer in (ehr.get(url).json(), ehr.entries("batch", url)[0]["resource"]):
        assert kept(answer) == {"Patient/pat1", "Patient/pat2", "Patient/pat3"}
        assert any(e["search"]["mode"] == "outcome" for e in answer["entry"])
    strict = httpx.get(
        f"{archive.url}/fhir/{url}", headers={**bearer(ehr.token), "Prefer": "handling=strict"}, timeout=60
    )
    assert strict.status_code == 400


# --- every include the type table allows, for several identities --------------------------------------------------


def include_queries() -> Iterator[str]:
    """Every `_include` and `_revinclude` between types this server serves, with and without the target type,
    generated from the search parameters (fhir.search.index.PARAMS) and the type table (fhir.types.TYPES)."""
    assert "_include" in CONTROL and "_revinclude" in CONTROL
    for source, params in sorted(PARAMS.items()):
        for name, spec in sorted(params.items()):
            for target in (t for t in spec.targets if t in PARAMS and t in TYPES):
                for named in (f"{source}:{name}:{target}", f"{source}:{name}"):
                    yield f"{source}?" + urlencode({"_include": named}, safe=":")
                    yield f"{target}?" + urlencode({"_revinclude": named}, safe=":")


IDENTITIES: dict[str, dict[str, Any]] = {
    "patient-context P1": dict(sub="app", roles=("radiologist",), scopes=("patient/*.rs",), patient="P1"),
    "referring dr-who": dict(sub="dr-who", roles=("referring",)),  # care list P1, P2; no MG
    "ehr": dict(sub="ehr-1", roles=("ehr",)),  # every patient; no MG
    "researcher": dict(sub="res", roles=("researcher",)),  # P3 opted out; no MG; no Patient resources
    "radiologist": dict(sub="rad", roles=("radiologist",)),  # everything
}


@pytest.mark.parametrize("identity", sorted(IDENTITIES))
def test_every_include_is_decided_on_its_own_type(archive: LiveServer, identity: str) -> None:
    """For each include the type table allows: the batch entry, the transaction entry and the direct search
    agree, and every included resource is one this identity may read directly."""
    who = client(archive, **IDENTITIES[identity])
    readable: dict[str, bool] = {}
    queries = list(include_queries())
    assert len(queries) >= 28  # ImagingStudy, DiagnosticReport, Patient and Endpoint refer to each other
    batch = who.entries("batch", *queries)
    for query, entry in zip(queries, batch, strict=True):
        direct = who.get(query)
        assert status_of(entry) == direct.status_code, (query, entry)
        if direct.status_code != 200:
            assert direct.status_code == 403 and who.bundle("transaction", query).status_code == 403
            continue
        included = kept(direct.json())
        assert kept(entry["resource"]) == included, query
        assert kept(entry["resource"], "match") == kept(direct.json(), "match"), query
        assert kept(who.entries("transaction", query)[0]["resource"]) == included, query
        for ref in included - readable.keys():
            readable[ref] = who.get(ref).status_code == 200
        assert all(readable[ref] for ref in included), (query, {r for r in included if not readable[r]})
    assert readable, "no include returned anything: the data set does not exercise the check"


# --- versions: vread and _history on each version's own filing -----------------------------------------------------


def _versions(server: LiveServer, rid: str, *filings: tuple[dict[str, Any], Filing]) -> None:
    """One ImagingStudy with these versions (content, filing), written as the sync job writes them."""

    async def run() -> None:
        conn = await asyncpg.connect(server.dsn)
        repo = FhirRepository()
        try:
            async with conn.transaction():
                (first, filing), *rest = filings
                await repo.create(conn, "ImagingStudy", first, filing, rid=rid)
                for content, later in rest:
                    await repo.update(conn, "ImagingStudy", rid, content, later)
        finally:
            await conn.close()

    asyncio.run(run())


def _moved_report(archive: LiveServer) -> str:
    """A report written for P5, then moved to P1 (its subject corrected) by a radiologist: version 1 is P5's."""
    _patient(archive, "pat5", "P5")
    admin = httpx.Client(base_url=f"{archive.url}/fhir", headers={**archive.headers, "Content-Type": FHIR_JSON})
    with admin:
        body: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "status": "preliminary",
            "code": {"text": "CT chest"},
            "subject": {"reference": "Patient/pat5"},
            "conclusion": "P5: nodule in the right upper lobe.",
        }
        created = admin.post("/DiagnosticReport", content=json.dumps(body))
        assert created.status_code == 201, created.text
        rid = str(created.json()["id"])
        moved = {**body, "id": rid, "status": "final", "subject": {"reference": "Patient/pat1"}, "conclusion": "P1"}
        updated = admin.put(f"/DiagnosticReport/{rid}", content=json.dumps(moved))
        assert updated.status_code == 200 and updated.headers["etag"] == 'W/"2"', updated.text
    return rid


def _patient(server: LiveServer, rid: str, key: str) -> None:
    """A Patient resource of DICOM Patient ID `key`, as the sync job writes it."""
    content = {"resourceType": "Patient", "identifier": [{"value": key}]}

    async def run() -> None:
        conn = await asyncpg.connect(server.dsn)
        try:
            async with conn.transaction():
                await FhirRepository().create(conn, "Patient", content, Filing(key, (), f"|{key}"), rid=rid)
        finally:
            await conn.close()

    asyncio.run(run())


def test_vread_and_history_of_a_report_moved_from_p5_to_p1(archive: LiveServer) -> None:
    """P1's clinician (dr-who: care list P1, P2) reads the report as it is now, never its P5 version: vread of
    version 1 is 403 (directly and in a batch; a transaction fails), the history holds version 2 only and its
    total says 1. P5's data stays P5's."""
    rid = _moved_report(archive)
    who = client(archive, "dr-who", ("referring",))
    assert who.get(f"DiagnosticReport/{rid}").json()["conclusion"] == "P1"
    assert who.get(f"DiagnosticReport/{rid}/_history/2").status_code == 200
    denied = who.get(f"DiagnosticReport/{rid}/_history/1")
    assert denied.status_code == 403 and denied.json()["issue"][0]["code"] == "forbidden"
    assert "P5: nodule" not in denied.text
    assert who.get(f"DiagnosticReport/{rid}/_history/3").status_code == 404
    history = who.fhirpy.execute(f"DiagnosticReport/{rid}/_history", method="get")
    Bundle.model_validate(dict(history))
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2"] and history["total"] == 1
    assert "P5: nodule" not in json.dumps(history)

    urls = (f"DiagnosticReport/{rid}/_history/1", f"DiagnosticReport/{rid}/_history", f"DiagnosticReport/{rid}")
    vread, hist, read = who.entries("batch", *urls)
    assert status_of(vread) == 403 and "resource" not in vread and status_of(read) == 200
    assert [e["resource"]["meta"]["versionId"] for e in hist["resource"]["entry"]] == ["2"]
    assert hist["resource"]["total"] == 1
    with pytest.raises(ForbiddenError):
        who.fhirpy.execute("", method="post", data=bundle_of("transaction", urls[0]))
    assert who.bundle("transaction", urls[0]).status_code == 403
    assert "P5: nodule" not in json.dumps(who.entries("transaction", *urls[1:]))

    # control: the admin sees both versions; a P5 clinician sees version 1 but not the report as it is now
    admin = Client(archive, archive.token())
    assert admin.get(f"DiagnosticReport/{rid}/_history").json()["total"] == 2
    p5 = client(archive, "app-5", ("radiologist",), ("patient/*.rs",), patient="P5")
    assert p5.get(f"DiagnosticReport/{rid}/_history/1").json()["conclusion"].startswith("P5")
    assert p5.get(f"DiagnosticReport/{rid}").status_code == 403


def test_versions_with_mg_stay_hidden_from_roles_without_it(archive: LiveServer) -> None:
    """An ImagingStudy whose MG series was deleted: an EHR (no MG) reads it as it is now, but not the version
    that still had MG, directly or in a bundle; a radiologist reads every version."""
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": "Patient/pat1"},
    }
    with_mg = {**study, "modality": [{"code": "CT"}, {"code": "MG"}], "description": "with MG"}
    _versions(
        archive,
        "s9",
        (with_mg, Filing("P1", ("CT", "MG"))),
        ({**study, "modality": [{"code": "CT"}]}, Filing("P1", ("CT",))),
    )
    ehr = client(archive, "ehr-1", ("ehr",))
    assert ehr.get("ImagingStudy/s9").status_code == 200
    assert ehr.get("ImagingStudy/s9/_history/1").status_code == 403
    history = ehr.get("ImagingStudy/s9/_history").json()
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2"] and history["total"] == 1
    vread, hist = ehr.entries("batch", "ImagingStudy/s9/_history/1", "ImagingStudy/s9/_history")
    assert status_of(vread) == 403 and "with MG" not in json.dumps(hist)
    radiologist = client(archive, "rad", ("radiologist",))
    assert radiologist.get("ImagingStudy/s9/_history/1").json()["description"] == "with MG"
    assert radiologist.get("ImagingStudy/s9/_history").json()["total"] == 2


# --- the audit trail --------------------------------------------------------------------------------------------


def _records(server: LiveServer) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(server.dsn)
        try:
            rows = await conn.fetch("SELECT record::text AS record FROM audit_log ORDER BY seq")
            return [json.loads(r["record"]) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def test_a_search_entry_is_recorded_as_the_direct_search(archive: LiveServer) -> None:
    """The batch entry's audit record is the one of the direct search: a search (E, search-type) of the searched
    type with the query that names the includes, decided by the search decision (not an included type's); the
    break-glass flag is set when a session allowed the included resources, for both."""
    who = client(archive, "dr-who", ("referring",))
    url = "Endpoint?_revinclude=ImagingStudy:endpoint"
    direct = who.get(url)
    assert direct.status_code == 200
    assert status_of(who.entries("batch", url)[0]) == 200

    def searches() -> list[dict[str, Any]]:
        return [
            r
            for r in _records(archive)
            if r.get("http", {}).get("path") == "/fhir/Endpoint" and r["agent"].get("sub") == "dr-who"
        ]

    plain, entry = searches()
    for record in (plain, entry):
        assert record["action"] == "E" and record["outcome"] == "0" and record["subtype"][0]["code"] == "search-type"
        assert base64.b64decode(record["entity"]["query"]).decode() == "_revinclude=ImagingStudy:endpoint"
        assert "patient_id" not in record["entity"] and not record.get("policy", {}).get("break_glass")

    # a break-glass session lifts dr-who's limits for P3: the included studies of P3 are seen because of it, and
    # both records say so even though the Endpoint search itself needed no session
    reason = {"reason": "unconscious patient, prior imaging needed", "patient_id": "P3"}
    started = httpx.post(f"{archive.url}/break-glass", json=reason, headers=bearer(who.token), timeout=60)
    assert started.status_code == 201, started.text
    assert "ImagingStudy/s3" in kept(who.get(url).json())
    assert "ImagingStudy/s3" in kept(who.entries("batch", url)[0]["resource"])
    flagged = searches()[2:]
    assert [r.get("policy", {}).get("break_glass", False) for r in flagged] == [True, True]


def test_migration_files_earlier_versions(archive: LiveServer) -> None:
    """migrations/0013: versions written before the history kept filings get them from their own content (the
    subject Patient's DICOM Patient ID, an ImagingStudy's modalities, a report's studies' modalities), the
    current version the current filing, a deletion that of the version it deleted."""
    rid = _moved_report(archive)
    study: dict[str, Any] = {"resourceType": "ImagingStudy", "status": "available"}
    _versions(
        archive,
        "s9",
        ({**study, "subject": {"reference": "Patient/pat1"}, "modality": [{"code": "MG"}]}, Filing("P1", ("MG",))),
        ({**study, "subject": {"reference": "Patient/pat2"}, "modality": [{"code": "CT"}]}, Filing("P2", ("CT",))),
    )
    with_study = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "MG"},
        "subject": {"reference": "Patient/pat1"},
        "imagingStudy": [{"reference": "ImagingStudy/s4"}],
    }
    admin = httpx.Client(base_url=f"{archive.url}/fhir", headers={**archive.headers, "Content-Type": FHIR_JSON})
    with admin:
        assert admin.put("/DiagnosticReport/mg", content=json.dumps({**with_study, "id": "mg"})).status_code == 201
        assert admin.delete("/DiagnosticReport/mg").status_code == 204
        moved = {**with_study, "id": "mg", "subject": {"reference": "Patient/pat2"}, "imagingStudy": []}
        assert admin.put("/DiagnosticReport/mg", content=json.dumps(moved)).status_code in (200, 201)
    migration = (Path(__file__).parents[2] / "migrations" / "0013_fhir_history_filing.sql").read_text()
    backfill = migration.split("DEFAULT '{}';", 1)[1]  # what follows the ALTER TABLE

    async def run() -> dict[tuple[str, int], tuple[str | None, list[str]]]:
        conn = await asyncpg.connect(archive.dsn)
        try:
            sql = "SELECT id, version, patient_key, modalities FROM fhir_history WHERE id = ANY($1::text[])"
            written = {(r["id"], r["version"]): (r["patient_key"], list(r["modalities"])) for r in
                       await conn.fetch(sql, [rid, "s9", "mg"])}  # fmt: skip
            async with conn.transaction():
                await conn.execute("UPDATE fhir_history SET patient_key = NULL, modalities = '{}'")
                await conn.execute(backfill)
            again = {(r["id"], r["version"]): (r["patient_key"], list(r["modalities"])) for r in
                     await conn.fetch(sql, [rid, "s9", "mg"])}  # fmt: skip
            assert again == written  # the backfill files them as the writers did
            return again
        finally:
            await conn.close()

    filings = asyncio.run(run())
    assert filings[(rid, 1)] == ("P5", []) and filings[(rid, 2)] == ("P1", [])
    assert filings[("s9", 1)] == ("P1", ["MG"]) and filings[("s9", 2)] == ("P2", ["CT"])
    assert filings[("mg", 1)] == ("P1", ["MG"]) and filings[("mg", 2)] == ("P1", ["MG"])  # the deletion
    assert filings[("mg", 3)] == ("P2", [])
