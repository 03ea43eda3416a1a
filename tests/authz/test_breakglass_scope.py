"""Break-glass is scoped to one patient (and optionally one study), through the public interface: a referring
clinician who breaks the glass for P5 reads P5's studies (MG included) and finds them in QIDO-RS and FHIR
searches, but nothing else changes (other patients outside the care list, opted-out patients and the MG studies
of other patients stay denied). A start needs a patient; one subject has one open session (concurrent starts
open one; another patient is a 409); a reason must show 10 characters; nobody closes their own session."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from tests.authz.test_breakglass import sql as fetch
from tests.conftest import LiveServer, bearer
from tests.support.factory import ct, multipart, part10, stow_headers

REASON = "unconscious trauma patient in ED, prior imaging needed"
CARE_LIST = {"dr-who": ("P1", "P2")}  # the shipped example data (authz/policies/data.json); P3 opted out
ARCHIVE = (("P1", "CT"), ("P1", "MG"), ("P2", "CT"), ("P3", "MR"), ("P5", "CT"), ("P5", "MG"), ("P6", "CT"))


def store(server: LiveServer) -> dict[tuple[str, str], str]:
    """One study per (patient, modality) of ARCHIVE; returns the study UIDs."""
    studies, parts = {}, []
    for patient, modality in ARCHIVE:
        ds = ct(PatientID=patient, Modality=modality)
        studies[(patient, modality)] = ds.StudyInstanceUID
        parts.append(part10(ds))
    response = httpx.post(
        server.dicomweb + "/studies", content=multipart(parts), headers={**stow_headers(), **server.headers}
    )
    assert response.status_code == 200, response.text
    return studies


def found(response: httpx.Response) -> list[tuple[str, str]]:
    """(patient, study UID) of each QIDO-RS match."""
    assert response.status_code == 200, response.text
    return sorted((m["00100020"]["Value"][0], m["0020000D"]["Value"][0]) for m in response.json())


def audit_records(dsn: str) -> list[dict[str, Any]]:
    return [json.loads(r["record"]) for r in fetch(dsn, "SELECT record::text AS record FROM audit_log ORDER BY seq")]


def sessions(dsn: str) -> int:
    return int(fetch(dsn, "SELECT count(*) AS n FROM break_glass_sessions")[0]["n"])


def start(server: LiveServer, headers: dict[str, str], **body: Any) -> httpx.Response:
    return httpx.post(server.url + "/break-glass", json={"reason": REASON, **body}, headers=headers, timeout=60)


def image_studies(server: LiveServer, headers: dict[str, str]) -> set[str]:
    """Study UIDs of the FHIR ImagingStudy search (identifier urn:oid:<uid>)."""
    response = httpx.get(f"{server.url}/fhir/ImagingStudy", params={"_count": "100"}, headers=headers)
    assert response.status_code == 200, response.text
    return {
        i["value"].removeprefix("urn:oid:")
        for e in response.json().get("entry", [])
        for i in e["resource"].get("identifier", [])
        if i.get("system") == "urn:dicom:uid"
    }


def wait_for_imaging_studies(server: LiveServer, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(image_studies(server, server.headers)) < count:
        assert time.monotonic() < deadline, "ImagingStudy resources were not made"
        time.sleep(0.2)


def test_a_session_opens_one_patient_and_nothing_else(make_server: Any) -> None:
    server: LiveServer = make_server(fhir_sync_delay_seconds=0.1)
    studies = store(server)
    wait_for_imaging_studies(server, len(ARCHIVE))
    dr = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))

    def read(patient: str, modality: str) -> int:
        uid = studies[(patient, modality)]
        return httpx.get(f"{server.dicomweb}/studies/{uid}/metadata", headers=dr).status_code

    normal = [("P1", studies[("P1", "CT")]), ("P2", studies[("P2", "CT")])]
    assert found(httpx.get(server.dicomweb + "/studies", headers=dr)) == sorted(normal)
    assert read("P5", "MG") == read("P5", "CT") == 403

    started = start(server, dr, patient_id="P5")
    assert started.status_code == 201, started.text
    session = started.json()
    assert (session["patient_id"], session["study_uid"]) == ("P5", None)

    # The session's patient: every study, MG included.
    assert read("P5", "MG") == read("P5", "CT") == 200
    # Nothing else changes: other patients outside the care list, the opted-out P3, other patients' MG.
    assert read("P6", "CT") == read("P3", "MR") == read("P1", "MG") == 403
    assert read("P1", "CT") == 200
    p5 = [("P5", studies[("P5", "CT")]), ("P5", studies[("P5", "MG")])]
    for level in ("studies", "series", "instances"):
        assert found(httpx.get(f"{server.dicomweb}/{level}", headers=dr)) == sorted(normal + p5), level
    mg = httpx.get(server.dicomweb + "/series", params={"Modality": "MG"}, headers=dr)
    assert found(mg) == [("P5", studies[("P5", "MG")])]
    assert found(httpx.get(server.dicomweb + "/studies", params={"PatientID": "P6"}, headers=dr)) == []
    expected = {uid for _, uid in normal + p5}
    assert image_studies(server, dr) == expected  # FHIR searches: the same rows

    # Only what the session allowed is flagged in the audit trail.
    records = audit_records(server.dsn)
    reads = {
        r["http"]["path"].split("/")[3]: r.get("policy", {}).get("break_glass", False)
        for r in records
        if r.get("http", {}).get("status") == 200 and r["http"]["path"].endswith("/metadata")
    }
    assert reads == {studies[("P5", "MG")]: True, studies[("P5", "CT")]: True, studies[("P1", "CT")]: False}

    # One session per subject: the same patient gives it back, another patient is a conflict.
    again = start(server, dr, patient_id="P5")
    assert again.status_code == 200 and again.json()["id"] == session["id"]
    assert start(server, dr, patient_id="P6").status_code == 409
    assert start(server, dr, study_uid=studies[("P6", "CT")]).status_code == 409
    assert sessions(server.dsn) == 1


def test_a_session_for_one_study_and_for_an_opted_out_patient(make_server: Any) -> None:
    server: LiveServer = make_server(fhir_sync_delay_seconds=0.1)
    studies = store(server)
    wait_for_imaging_studies(server, len(ARCHIVE))
    nobody = bearer(server.token(sub="dr-nobody", roles=["referring"], scopes=[]))  # an empty care list
    assert found(httpx.get(server.dicomweb + "/studies", headers=nobody)) == []

    # A stored study names its patient; a study of another patient than the one named is refused.
    mismatch = start(server, nobody, patient_id="P5", study_uid=studies[("P6", "CT")])
    assert mismatch.status_code == 400
    unknown = start(server, nobody, study_uid="1.2.3.4.5.6.7.8.9")
    assert unknown.status_code == 400
    started = start(server, nobody, study_uid=studies[("P5", "CT")])
    assert started.status_code == 201, started.text
    assert (started.json()["patient_id"], started.json()["study_uid"]) == ("P5", studies[("P5", "CT")])

    ct5, mg5 = studies[("P5", "CT")], studies[("P5", "MG")]
    assert httpx.get(f"{server.dicomweb}/studies/{ct5}/metadata", headers=nobody).status_code == 200
    assert httpx.get(f"{server.dicomweb}/studies/{mg5}/metadata", headers=nobody).status_code == 403
    assert found(httpx.get(server.dicomweb + "/studies", headers=nobody)) == [("P5", ct5)]
    assert found(httpx.get(server.dicomweb + "/instances", headers=nobody)) == [("P5", ct5)]
    assert image_studies(server, nobody) == {ct5}
    # A session for the whole patient is another session: a conflict while this one is open.
    assert start(server, nobody, patient_id="P5").status_code == 409

    # The opted-out P3: reachable only by a session for P3.
    house = bearer(server.token(sub="dr-house", roles=["referring"], scopes=[]))
    p3 = f"{server.dicomweb}/studies/{studies[('P3', 'MR')]}/metadata"
    assert httpx.get(p3, headers=house).status_code == 403
    assert start(server, house, patient_id="P3").status_code == 201
    assert httpx.get(p3, headers=house).status_code == 200
    assert ("P3", studies[("P3", "MR")]) in found(httpx.get(server.dicomweb + "/studies", headers=house))


def test_a_start_needs_a_patient_and_a_reason_that_shows(make_server: Any) -> None:
    server: LiveServer = make_server()
    studies = store(server)
    dr = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[]))
    assert start(server, dr).status_code == 400  # the whole archive: no such thing
    for reason in (
        "\u200b" * 40,  # zero-width spaces
        "\u00a0" * 40,  # no-break spaces
        "\u202e\u200b\u2060\ufeffabc\u00a0\u2028\u3000def\u202c",  # an override and format characters: 6 show
        "\t\r\n\x0b\x1b" * 10,
    ):
        response = start(server, dr, patient_id="P5", reason=reason)
        assert response.status_code == 400, (reason, response.text)
    # The header of a BTG token obeys the same rule, and needs a request about a patient.
    btg = bearer(server.token(sub="dr-who", roles=["referring"], scopes=[], purpose_of_use=["BTG"]))
    metadata = f"{server.dicomweb}/studies/{studies[('P5', 'MG')]}/metadata"
    zero_width: dict[str, Any] = {**btg, "X-Break-Glass-Reason": ("\u200b" * 40).encode("utf-8")}
    assert httpx.get(metadata, headers=zero_width).status_code == 400
    search = httpx.get(server.dicomweb + "/studies", headers={**btg, "X-Break-Glass-Reason": REASON})
    assert search.status_code == 400
    assert sessions(server.dsn) == 0

    # A BTG read starts a session for that study's patient (and study); another patient's is then a conflict.
    assert httpx.get(metadata, headers={**btg, "X-Break-Glass-Reason": REASON}).status_code == 200
    other = f"{server.dicomweb}/studies/{studies[('P6', 'CT')]}/metadata"
    assert httpx.get(other, headers={**btg, "X-Break-Glass-Reason": REASON}).status_code == 409
    assert httpx.get(other, headers=btg).status_code == 403
    (row,) = fetch(server.dsn, "SELECT patient_id, study_uid FROM break_glass_sessions")
    assert (row["patient_id"], row["study_uid"]) == ("P5", studies[("P5", "MG")])


def test_a_token_bound_to_a_patient_breaks_the_glass_for_it_only(make_server: Any) -> None:
    server: LiveServer = make_server()
    studies = store(server)
    bound = bearer(server.token(sub="app", roles=["referring"], scopes=[], patient="P5"))
    assert start(server, bound, patient_id="P6").status_code == 403
    assert sessions(server.dsn) == 0
    assert start(server, bound, patient_id="P5").status_code == 201
    assert found(httpx.get(server.dicomweb + "/studies", headers=bound)) == sorted(
        ("P5", studies[("P5", m)]) for m in ("CT", "MG")
    )


def test_concurrent_starts_open_one_session(make_server: Any) -> None:
    """16 starts at once, through two servers on one database (two pools: the database's lock, not only the
    process's, must keep them apart): one session, one Emergency Override Started record, every caller gets it."""
    servers: list[LiveServer] = [make_server(), make_server()]
    dr = bearer(servers[0].token(sub="dr-who", roles=["referring"], scopes=[]))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            go = asyncio.Event()

            async def one(server: LiveServer) -> httpx.Response:
                await go.wait()
                body = {"reason": REASON, "patient_id": "P5"}
                return await client.post(server.url + "/break-glass", json=body, headers=dr)

            tasks = [asyncio.create_task(one(servers[n % 2])) for n in range(16)]
            await asyncio.sleep(0.05)
            go.set()
            return await asyncio.gather(*tasks)

    responses = asyncio.run(burst())
    assert sorted(r.status_code for r in responses) == [200] * 15 + [201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sessions(servers[0].dsn) == 1
    records = audit_records(servers[0].dsn)
    assert len([r for r in records if any(s.get("code") == "110127" for s in r.get("subtype", []))]) == 1

    # Starts of many subjects at once (more than the pool has connections) all go through.
    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        servers[0].url + "/break-glass",
                        json={"reason": REASON, "patient_id": "P5"},
                        headers=bearer(servers[0].token(sub=f"dr-{n}", roles=["radiologist"], scopes=[])),
                    )
                    for n in range(3 * servers[0].settings.db_pool_max)
                )
            )

    assert {r.status_code for r in asyncio.run(many())} == {201}
    assert sessions(servers[0].dsn) == 1 + 3 * servers[0].settings.db_pool_max


def test_nobody_reviews_their_own_session(make_server: Any) -> None:
    server: LiveServer = make_server()
    both = bearer(server.token(sub="dr-both", roles=["radiologist", "auditor"], scopes=[]))
    session = start(server, both, patient_id="P5").json()
    close = f"{server.url}/break-glass/{session['id']}/close"
    denied = httpx.post(close, json={"comment": "looked fine to me"}, headers=both)
    assert denied.status_code == 403, denied.text
    # The same name from another issuer is another subject (and an admin is bound by the rule too).
    admin_self = bearer(server.token(sub="dr-both", roles=["admin"], scopes=[]))
    assert httpx.post(close, json={"comment": "looked fine to me"}, headers=admin_self).status_code == 403
    assert fetch(server.dsn, "SELECT closed_at FROM break_glass_sessions")[0]["closed_at"] is None
    auditor = bearer(server.token(sub="sec", roles=["auditor"], scopes=[]))
    closed = httpx.post(close, json={"comment": "reviewed with the ED lead"}, headers=auditor)
    assert closed.status_code == 200 and closed.json()["closed_by"] == "sec"
