"""The authorization matrix: every identity of `tests.support.matrix_oracle.IDENTITIES` requests every data-reading
route of the application's route table, in every shape (`tests.support.matrix_requests`,
`tests.support.matrix_fhir`), against one data set of several patients and modalities (`tests.support.matrix_data`);
the patients each answer reveals (`tests.support.matrix_extract`) must be ones the oracle lets that identity see
(`tests.support.matrix_judge`). New routes join automatically: a route the generators cannot fill fails the matrix
until it gets a filler or is listed as not a data read. The same over DIMSE for configured peers
(`tests.support.matrix_dimse`).

Run with `-s` to see the matrix's size; it is also recorded as a property of the test (JUnit XML)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from authz.tokens import issue_token
from dicomweb.dimse.config import dimse_config
from server.app import create_app
from server.settings import Settings
from tests.conftest import _Thread, app_dsn, bearer, cloned_database, free_port
from tests.support import matrix_data, matrix_dimse, matrix_oracle
from tests.support.matrix_data import DataSet
from tests.support.matrix_dimse import DESTINATION, PEERS, MoveDestination, peers_setting
from tests.support.matrix_extract import Answer
from tests.support.matrix_fhir import FHIR_JSON, bundle_body
from tests.support.matrix_judge import Failure, Finding, Report, judge, judge_dimse, summarize, target_allowed
from tests.support.matrix_oracle import IDENTITIES, Identity
from tests.support.matrix_probes import Probe, Route, routes
from tests.support.matrix_requests import generate

pytestmark = pytest.mark.timeout(600)
HOOK = "http://127.0.0.1:9/hooks"


@dataclass(repr=False)
class Matrix:
    url: str
    settings: Settings
    app: Any
    data: DataSet
    destination: MoveDestination

    def __repr__(self) -> str:
        return f"Matrix({self.url})"

    def token(self, identity: Identity) -> str:
        return issue_token(self.settings, **identity.claims())


@pytest.fixture(scope="module")
def matrix_dsn(pg_uri: str, template_db: str) -> Iterator[str]:
    """One migrated database for the module's server (cloned from the template)."""
    with cloned_database(pg_uri, template_db, "t_matrix") as url:
        yield url


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
        inference_plugins=("tests.support.inference_plugins",),
        dimse_enabled=True,
        dimse_port=free_port(),
        dimse=dimse_config(peers_setting(), f"{DESTINATION}@127.0.0.1:{destination.port}", ""),
        dimse_timeout_seconds=10,
    )
    app = create_app(settings, dsn=app_dsn(matrix_dsn))
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

        async def load() -> DataSet:
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


def test_every_route_is_requested_or_listed(matrix: Matrix) -> None:
    """A route the generators cannot fill is a failure naming it, never a silent gap; so is a list entry that
    names no route."""
    novel = Route("GET", "/dicom-web/novel/{thing:str}", "read", "study")
    gone = Route("GET", "/healthz", None, None)
    table = [r for r in routes(matrix.app) if r.key != gone.key]
    unfilled = generate([*table, novel], matrix.data).unfilled
    assert unfilled == [
        "the matrix names a route the app does not have: GET /healthz",
        "add a filler for GET /dicom-web/novel/{thing:str}",
    ]
    assert generate(routes(matrix.app), matrix.data).unfilled == []


def test_http_matrix(matrix: Matrix, record_property: Any) -> None:
    generated = generate(routes(matrix.app), matrix.data)
    if generated.unfilled:
        pytest.fail("\n".join(generated.unfilled), pytrace=False)
    failures: list[Failure] = []
    denied: list[Failure] = []  # single reads the oracle allows that were refused: printed, not a failure
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
                    and target_allowed(identity, probe, matrix.data)
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
