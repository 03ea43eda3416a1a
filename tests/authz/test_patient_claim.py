"""A token's `patient` claim binds it to that patient, with or without SMART scopes (authz/policies/scopes.rego):
through the public interface, a radiologist token issued with `patient=P1` and no scopes sees P1 only in
QIDO-RS (studies, series, instances), WADO-RS, FHIR search and read (ImagingStudy, DiagnosticReport, Patient)
and the inference results; a `user/` scope covering the action lifts the binding (SMART's EHR launch)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from typing import Any

import asyncpg
import httpx

from authz.tokens import issue_token
from server.cli import main
from tests.conftest import LiveServer, bearer
from tests.fhir.test_fhir_search import Fhir, seed
from tests.support.factory import ct, multipart, part10, stow_headers


def store(server: LiveServer) -> dict[str, tuple[str, str]]:
    """One CT study of P1, P2 and P3: (study UID, series UID) by patient."""
    found, parts = {}, []
    for patient in ("P1", "P2", "P3"):
        ds = ct(PatientID=patient)
        found[patient] = (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        parts.append(part10(ds))
    response = httpx.post(
        server.dicomweb + "/studies", content=multipart(parts), headers={**stow_headers(), **server.headers}
    )
    assert response.status_code == 200, response.text
    return found


def patients(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {m["00100020"]["Value"][0] for m in response.json()}


def bound_to(server: LiveServer, patient: str, *scopes: str) -> dict[str, str]:
    """The token `hounsfield token --sub app --role radiologist --patient <patient> [--scope ...]` prints: what
    its help promises is what is tested."""
    args = ["token", "--sub", "app", "--role", "radiologist", "--patient", patient]
    args += [a for scope in scopes for a in ("--scope", scope)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--data", str(server.settings.data_dir)]) == 0
    return bearer(out.getvalue().strip())


def test_patient_claim_without_scopes_binds_dicomweb(make_server: Any) -> None:
    server: LiveServer = make_server()
    studies = store(server)
    url = server.dicomweb
    p1 = bound_to(server, "P1")
    for level in ("studies", "series", "instances"):
        assert patients(httpx.get(f"{url}/{level}", headers=p1)) == {"P1"}, level
    # A filter naming another patient finds nothing rather than that patient.
    assert patients(httpx.get(f"{url}/studies", params={"PatientID": "P2"}, headers=p1)) == set()

    own_study, own_series = studies["P1"]
    assert httpx.get(f"{url}/studies/{own_study}/metadata", headers=p1).status_code == 200
    assert httpx.get(f"{url}/studies/{own_study}/series/{own_series}/metadata", headers=p1).status_code == 200
    other_study, other_series = studies["P2"]
    for path in (
        f"/studies/{other_study}",
        f"/studies/{other_study}/metadata",
        f"/studies/{other_study}/series/{other_series}",
        f"/studies/{other_study}/series/{other_series}/metadata",
    ):
        assert httpx.get(url + path, headers=p1).status_code == 403, path
    # Searches within the other patient's study find nothing.
    assert patients(httpx.get(f"{url}/studies/{other_study}/series", headers=p1)) == set()
    assert patients(httpx.get(f"{url}/studies/{other_study}/instances", headers=p1)) == set()

    # A user/ scope covering the action: the claim is launch context only.
    user = bound_to(server, "P1", "user/ImagingStudy.rs")
    assert patients(httpx.get(f"{url}/studies", headers=user)) == {"P1", "P2", "P3"}
    assert httpx.get(f"{url}/studies/{other_study}/metadata", headers=user).status_code == 200


def test_patient_claim_without_scopes_binds_fhir(make_server: Any) -> None:
    server: LiveServer = make_server()
    seed(server.dsn)  # pat1..pat3 are P1..P3; studies s1, s4 (MG) of P1, s2, s5 of P2, s3 of P3; reports r1..r4
    p2 = Fhir(server, bound_to(server, "P2"))
    assert p2.ids("ImagingStudy") == {"s2", "s5"}
    assert p2.ids("DiagnosticReport") == {"r2"}
    assert p2.ids("Patient") == {"pat2"}
    assert p2.ids("ImagingStudy", {"patient": "pat1"}) == set()
    for path, status in (
        ("ImagingStudy/s2", 200),
        ("DiagnosticReport/r2", 200),
        ("Patient/pat2", 200),
        ("ImagingStudy/s1", 403),
        ("DiagnosticReport/r1", 403),
        ("Patient/pat3", 403),
    ):
        response = httpx.get(f"{server.url}/fhir/{path}", headers=p2.headers)
        assert response.status_code == status, (path, response.text)

    broad = Fhir(server, bound_to(server, "P2", "user/*.rs"))
    assert broad.ids("ImagingStudy") == {"s1", "s2", "s3", "s4", "s5"}


def sql(dsn: str, statement: str, *args: Any) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement, *args)
        finally:
            await conn.close()

    asyncio.run(run())


def test_patient_claim_without_scopes_binds_inference_results(make_server: Any) -> None:
    server: LiveServer = make_server()
    studies = store(server)
    sql(server.dsn, "INSERT INTO inference_models (name, version, task, status) VALUES ('m', '1', 't', 'retired')")
    for study, series in studies.values():
        sql(
            server.dsn,
            "INSERT INTO inference_results (study_uid, series_uid, model_name, model_version, state)"
            " VALUES ($1, $2, 'm', '1', 'succeeded')",
            study,
            series,
        )

    def results(headers: dict[str, str]) -> set[str]:
        response = httpx.get(server.url + "/inference-results", headers=headers)
        assert response.status_code == 200, response.text
        return {r["study"] for r in response.json()["results"]}

    assert results(bound_to(server, "P3")) == {studies["P3"][0]}
    claim_only = issue_token(server.settings, sub="app", roles=("radiologist",), patient="P2")
    assert results(bearer(claim_only)) == {studies["P2"][0]}
    assert results(bearer(server.token(sub="rad", roles=["radiologist"], scopes=[]))) == {
        study for study, _ in studies.values()
    }
