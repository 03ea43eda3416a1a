"""The authorization matrix: every identity of `tests.matrix_oracle.IDENTITIES` requests every data-reading
route of the application's route table, in every shape (`tests.matrix_requests`), against one data set of
several patients and modalities (`tests.matrix_data`); the patients each response reveals
(`tests.matrix_extract`) must be ones the oracle lets that identity see. New routes join automatically: a route
the generators cannot fill fails the test until it gets a filler or is listed as not a data read.

Also over DIMSE: C-FIND, C-GET and C-MOVE from configured peers, each mapped to a role."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from authz.tokens import issue_token
from dicomweb.dimse.config import dimse_config
from server.app import create_app
from server.settings import Settings
from tests import matrix_data, matrix_dimse, matrix_oracle
from tests.conftest import _Thread, _with_db, bearer, free_port
from tests.matrix_data import DataSet
from tests.matrix_dimse import (
    DESTINATION,
    PEERS,
    SUCCESS_OR_PENDING,
    DimseProbe,
    MoveDestination,
    Outcome,
    peers_setting,
)
from tests.matrix_extract import Answer, Disclosure, disclosures
from tests.matrix_oracle import IDENTITIES, Identity, allows
from tests.matrix_requests import FHIR_JSON, Probe, bundle_body, generate

pytestmark = pytest.mark.timeout(600)
_counter = itertools.count()
HOOK = "http://127.0.0.1:9/hooks"


@dataclass(repr=False)
class Matrix:
    url: str
    settings: Settings
    app: Any
    data: matrix_data.DataSet
    destination: MoveDestination

    def __repr__(self) -> str:
        return f"Matrix({self.url})"

    def token(self, identity: matrix_oracle.Identity) -> str:
        return issue_token(self.settings, **identity.claims())


@pytest.fixture(scope="module")
def matrix_dsn(pg_uri: str, template_db: str) -> Iterator[str]:
    """One migrated database for the module's server (cloned from the template)."""
    name = f"t_matrix_{os.getpid()}_{next(_counter)}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_uri)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE DATABASE {name} TEMPLATE {template_db}"))
    yield _with_db(pg_uri, name)
    asyncio.run(run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="module")
def matrix(matrix_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    """One server (HTTP and DIMSE) and one data set for the whole module."""
    folder = tmp_path_factory.mktemp("matrix")
    policy_data = folder / "policy-data.json"
    policy_data.write_text(json.dumps(matrix_oracle.policy_data()))
    port = free_port()
    destination = MoveDestination(free_port())
    settings = Settings.from_env({}).with_overrides(
        data_dir=folder / "data",
        port=port,
        worker_poll_seconds=0.1,
        db_pool_min=1,
        db_pool_max=8,
        policy_data_file=policy_data,
        fhir_sync_delay_seconds=0.0,
        fhir_subscription_endpoints=(HOOK,),
        renditions=(),
        inference_max_attempts=1,
        inference_plugins=("tests.inference_plugins",),
        dimse_enabled=True,
        dimse_port=free_port(),
        dimse=dimse_config(peers_setting(), f"{DESTINATION}@127.0.0.1:{destination.port}", ""),
        dimse_timeout_seconds=10,
    )
    app = create_app(settings, dsn=matrix_dsn)
    runner = _Thread(app, port)
    runner.start()
    try:
        url = f"http://127.0.0.1:{port}"
        admin = next(i for i in matrix_oracle.IDENTITIES if "admin" in i.roles)
        glass = {
            i.break_glass: issue_token(settings, **i.claims())
            for i in matrix_oracle.IDENTITIES
            if i.break_glass is not None and i.patient is None
        }

        async def load() -> matrix_data.DataSet:
            headers = bearer(issue_token(settings, **admin.claims()))
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
                return await matrix_data.build(http, glass, HOOK + "/matrix")

        yield Matrix(url, settings, app, asyncio.run(load()), destination)
    finally:
        runner.stop()
        destination.close()


# --- running the HTTP matrix --------------------------------------------------------------------------------

CONCURRENCY = 6
BUNDLE_CONCURRENCY = 2
"""Bundles at once, kept well below the server's pool (`db_pool_max`): a Bundle request holds a pooled
connection while its entries' audit records wait for another one."""
BATCH_ENTRIES = 40


def _answer(response: httpx.Response) -> Answer:
    return Answer(response.status_code, list(response.headers.items()), response.content)


def _entry_answer(entry: dict[str, Any]) -> Answer:
    status = int(str(entry.get("response", {}).get("status", "0")).split(" ", 1)[0])
    return Answer(status, parsed=entry)


async def _bundle(http: httpx.AsyncClient, token: str, kind: str, probes: list[Probe]) -> list[Answer]:
    headers = {**bearer(token), "Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    response = await http.post("/fhir", json=bundle_body(kind, probes), headers=headers)
    if response.status_code != 200:
        return [_answer(response)] * len(probes)
    entries = response.json().get("entry", [])
    assert len(entries) == len(probes), f"{kind} answered {len(entries)} entries for {len(probes)}"
    return [_entry_answer(e) for e in entries]


async def _run(matrix: Matrix, identity: Identity, probes: list[Probe]) -> list[tuple[Probe, Answer]]:
    """Every probe as `identity`: direct requests, one transaction per entry, batches of BATCH_ENTRIES."""
    token = matrix.token(identity)
    limit = asyncio.Semaphore(CONCURRENCY)
    bundle_limit = asyncio.Semaphore(BUNDLE_CONCURRENCY)
    results: list[tuple[Probe, Answer]] = []

    async def one(http: httpx.AsyncClient, probe: Probe) -> None:
        async with limit:
            if probe.shape.startswith("transaction: "):
                async with bundle_limit:
                    [answer] = await _bundle(http, token, "transaction", [probe])
            else:
                headers = {**dict(probe.headers), **bearer(token)}
                answer = _answer(await http.request(probe.method, probe.url, headers=headers, content=probe.body))
        results.append((probe, answer))

    async def batch(http: httpx.AsyncClient, chunk: list[Probe]) -> None:
        async with limit, bundle_limit:
            answers = await _bundle(http, token, "batch", chunk)
        results.extend(zip(chunk, answers, strict=True))

    batched = [p for p in probes if p.shape.startswith("batch: ")]
    single = [p for p in probes if not p.shape.startswith("batch: ")]
    chunks = [batched[i : i + BATCH_ENTRIES] for i in range(0, len(batched), BATCH_ENTRIES)]
    async with httpx.AsyncClient(base_url=matrix.url, timeout=60) as http:
        await asyncio.gather(*(one(http, p) for p in single), *(batch(http, c) for c in chunks))
    return results


# --- judging a cell -----------------------------------------------------------------------------------------


def _permitted(identity: Identity, probe: Probe, d: Disclosure, data: DataSet) -> bool:
    action = probe.action if d.group == probe.group else "search"
    if d.group == "imaging" and d.study is not None:
        return allows(identity, "imaging", action, d.patient, data.modality(d.study))
    if d.group == "imaging":  # a patient named without a study: some study of theirs must be visible
        studies = data.studies_of(d.patient) or {None}
        return any(allows(identity, "imaging", action, d.patient, data.modality(s)) for s in studies)
    return allows(identity, d.group, action, d.patient)


def _describe(d: Disclosure, data: DataSet) -> str:
    modality = f" {data.modality(d.study)}" if d.group == "imaging" and d.study else ""
    return f"{d.patient} {d.group}{modality}"


@dataclass(frozen=True, order=True)
class Finding:
    """What is wrong with one cell: `kind` with the status, and the patients concerned."""

    kind: str
    status: int
    patients: tuple[str, ...] = ()


def _target_allowed(identity: Identity, probe: Probe, data: DataSet) -> bool:
    assert probe.target is not None
    patient, study = probe.target
    return allows(identity, probe.group, probe.action, patient, data.modality(study))


def judge(identity: Identity, probe: Probe, answer: Answer, data: DataSet) -> list[Finding]:
    """Every rule one cell breaks: no 5xx; nothing revealed that the oracle does not permit; a denial names no
    patient; a single read of a resource the identity may not see answers 403 or 404 (or, for a request with
    duplicated or empty identifiers, 400)."""
    status = answer.status
    if status >= 500:
        return [Finding("server error", status)]
    found = disclosures(answer, probe, data)
    findings = []
    if status == 403 and found:
        findings.append(Finding("the denial names", status, tuple(sorted({d.patient for d in found}))))
    leaked = sorted({_describe(d, data) for d in found if not _permitted(identity, probe, d, data)})
    if leaked and status != 403:
        findings.append(Finding("reveals", status, tuple(leaked)))
    if probe.target is not None and not _target_allowed(identity, probe, data):
        if status not in probe.allowed_statuses and not leaked:
            findings.append(Finding("answers a read it may not make with", status, (probe.target[0] or "-",)))
    if "admin" in identity.roles and probe.allowed_statuses == (403, 404) and not 200 <= status < 300:
        findings.append(Finding("the admin's request failed (a filler or the data set is wrong)", status))
    return findings


@dataclass
class Report:
    identities: int
    routes: int
    excluded: int
    shapes: int
    cells: int
    requests: int
    failing: int
    lines: list[str]

    def size(self) -> str:
        return (
            f"authorization matrix: {self.identities} identities x {self.routes} routes "
            f"({self.excluded} more are not data reads) x {self.shapes} shapes: {self.cells} cells, "
            f"{self.requests} HTTP requests; {self.failing} failing cells"
        )


Failure = tuple[str, str, str, str, Finding]
"""(identity, route, shape, label, finding)."""


def summarize(failures: list[Failure]) -> list[str]:
    """Failing cells, compactly: one line per (identity, route, shape, kind of failure), with the patients
    concerned and how many requests (labels) failed so."""
    grouped: dict[tuple[str, str, str, str], tuple[set[str], set[str]]] = {}
    for identity, route, shape, label, finding in failures:
        key = (identity, route, shape, f"{finding.kind} {finding.status}")
        patients, labels = grouped.setdefault(key, (set(), set()))
        patients.update(finding.patients)
        labels.add(label)
    return [
        f"{identity} | {route} | {shape} | {kind}: {', '.join(sorted(patients))} | {len(labels)} requests"
        for (identity, route, shape, kind), (patients, labels) in sorted(grouped.items())
    ]


def test_http_matrix(matrix: Matrix, record_property: Any) -> None:
    generated = generate(matrix.app, matrix.data)
    if generated.unfilled:
        pytest.fail("\n".join(generated.unfilled), pytrace=False)
    failures: list[Failure] = []
    denied: list[Failure] = []
    """Single reads the oracle allows that were refused: not a leak, printed for whoever changes the policy."""
    cells = 0

    async def run_all() -> None:
        nonlocal cells
        for identity in IDENTITIES:
            for probe, answer in await _run(matrix, identity, generated.probes):
                cells += 1
                for finding in judge(identity, probe, answer, matrix.data):
                    failures.append((identity.name, probe.route, probe.shape, probe.label, finding))
                if (
                    probe.target is not None
                    and answer.status == 403
                    and probe.allowed_statuses == (403, 404)
                    and _target_allowed(identity, probe, matrix.data)
                ):
                    denied.append((identity.name, probe.route, probe.shape, probe.label, Finding("denied", 403)))

    asyncio.run(run_all())
    batched = sum(1 for p in generated.probes if p.shape.startswith("batch: "))
    per_identity = len(generated.probes) - batched + -(-batched // BATCH_ENTRIES)
    shapes = {p.shape.split(": ", 1)[-1] for p in generated.probes} | {"batch", "transaction"}
    report = Report(
        identities=len(IDENTITIES),
        routes=len(generated.routes),
        excluded=len(generated.excluded),
        shapes=len(shapes),
        cells=cells,
        requests=per_identity * len(IDENTITIES),
        failing=len({(i, r, s, lab) for i, r, s, lab, _ in failures}),
        lines=summarize(failures),
    )
    record_property("authorization_matrix", report.size())
    print("\n" + report.size())
    print("\n".join(["reads the oracle allows that were denied:", *summarize(denied)]))
    if report.lines:
        pytest.fail(report.size() + "\n" + "\n".join(report.lines), pytrace=False)


# --- the DIMSE matrix ---------------------------------------------------------------------------------------


def judge_dimse(identity: Identity, probe: DimseProbe, outcome: Outcome, data: DataSet) -> list[Finding]:
    """The HTTP rules in DIMSE terms: nothing revealed that the oracle does not permit, a refusal's error comment
    names no patient, a retrieve of a study the peer may not see does not succeed."""
    found = matrix_dimse.disclosures(probe, outcome, data)
    findings = []
    named = sorted({d.patient for d in found if d.via == "error comment"})
    if named:
        findings.append(Finding("the refusal names", outcome.final, tuple(named)))
    leaked = sorted(
        {
            _describe(d, data)
            for d in found
            if d.via != "error comment" and not _dimse_permitted(identity, probe, d, data)
        }
    )
    if leaked:
        findings.append(Finding("reveals", outcome.final, tuple(leaked)))
    if probe.target is not None:
        patient, study = probe.target
        if not allows(identity, "imaging", "read", patient, data.modality(study)):
            if not leaked and outcome.final in SUCCESS_OR_PENDING:
                findings.append(Finding("a retrieve it may not make succeeds", outcome.final, (patient,)))
        elif "radiologist" in identity.roles and (outcome.final != 0x0000 or not outcome.identifiers):
            findings.append(Finding("a radiologist's retrieve failed (probe or data set wrong)", outcome.final))
    return findings


def _dimse_permitted(identity: Identity, probe: DimseProbe, d: Disclosure, data: DataSet) -> bool:
    studies = {d.study} if d.study is not None else data.studies_of(d.patient)
    return any(allows(identity, "imaging", probe.action, d.patient, data.modality(s)) for s in studies)


def test_dimse_matrix(matrix: Matrix, record_property: Any) -> None:
    items = matrix_dimse.probes(matrix.data)
    failures: list[Failure] = []
    cells = 0
    port = int(matrix.settings.dimse_port)
    with ThreadPoolExecutor(len(PEERS)) as pool:
        runs = {t: pool.submit(matrix_dimse.run, port, t, items, matrix.destination) for t in PEERS}
    for title, identity in PEERS.items():
        for probe, outcome in runs[title].result():
            cells += 1
            for finding in judge_dimse(identity, probe, outcome, matrix.data):
                failures.append((identity.name, probe.route, probe.shape, probe.label, finding))
    size = (
        f"DIMSE matrix: {len(PEERS)} peers x {len({p.route for p in items})} operations x "
        f"{len({p.shape for p in items})} shapes: {cells} cells"
    )
    record_property("dimse_matrix", size)
    print("\n" + size)
    lines = summarize(failures)
    if lines:
        pytest.fail(size + f"; {len(failures)} failing cells\n" + "\n".join(lines), pytrace=False)
