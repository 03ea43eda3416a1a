"""Memory stays bounded under load: the policy engine evaluated thousands of times (in a fresh process that
imports the server first, as `hounsfield serve` does), and a live `hounsfield serve` answering thousands of
frame and metadata requests about many distinct instances, with the decision cache off and on. Resident size is
measured after a warm-up and again after the load; a leak of even a few kilobytes a request exceeds the bounds.

The long version (30 minutes of mixed QIDO, metadata, frames and STOW) is `benchmarks/soak.py`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from server.settings import Settings
from tests.conftest import admin_token, bearer
from tests.support.factory import ct, multipart, part10, stow_headers
from tests.support.procs import ServerProcess, serve

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20

ENGINE_LOOP = """
import datetime as dt, gc, json, sys
import psutil
import server.app  # the server's imports in the server's order: C++ extensions load before rego-cpp
from authz.engine_rego import RegoEngine
from authz.engines import SHIPPED_POLICIES
from authz.policy_input import dicomweb_resource, policy_input
from authz.principal import Principal

engine = RegoEngine(SHIPPED_POLICIES, SHIPPED_POLICIES / "data.json")
start = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)

def evaluate(i):
    who = Principal(sub=f"viewer-{i % 97}", issuer="hounsfield", roles=("radiologist",))
    uid = f"2.25.{i}"
    resource = dicomweb_resource("frames", patient_id=f"P{i % 50}", study_uid=uid, series_uid=uid + ".1",
                                 instance_uid=uid + ".1.1", modalities_in_study=["CT"])
    engine.evaluate(policy_input(who, "read", resource, "127.0.0.1", now=start + dt.timedelta(seconds=i)).to_dict())

warm, load = int(sys.argv[1]), int(sys.argv[2])
for i in range(warm):
    evaluate(i)
gc.collect()
before = psutil.Process().memory_info().rss
for i in range(warm, warm + load):
    evaluate(i)
gc.collect()
print(json.dumps({"before": before, "after": psutil.Process().memory_info().rss}))
"""

ENGINE_BOUND = 8 * MIB
"""For 3,000 evaluations: under 3 KB each (a leaking rego-cpp loses about ten times that per evaluation)."""
HTTP_BOUND = 12 * MIB
"""For 1,000 requests: under 12 KB each, with room for the decision cache filling towards its entries limit."""


def test_policy_evaluations_do_not_grow_memory(capsys: pytest.CaptureFixture[str]) -> None:
    answer = subprocess.run(
        [sys.executable, "-c", ENGINE_LOOP, "500", "3000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    rss = json.loads(answer.stdout.strip().splitlines()[-1])
    grown = rss["after"] - rss["before"]
    with capsys.disabled():
        print(f"\n3000 policy evaluations: resident size {grown / MIB:+.1f} MiB")
    assert grown < ENGINE_BOUND, f"3000 policy evaluations grew the resident size by {grown / MIB:.1f} MiB"


INSTANCES = 200
SUBJECTS = 40
CLIENTS = 8
WARM_UP = 400
LOAD = 1000
FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def _store(srv: ServerProcess) -> list[tuple[str, str, str]]:
    """INSTANCES small CT instances in 20 studies; their (study, series, instance) UIDs."""
    uids = [
        (f"2.25.{700 + i // 10}", f"2.25.{700 + i // 10}.1", f"2.25.{700 + i // 10}.1.{i}") for i in range(INSTANCES)
    ]
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120) as http:
        for first in range(0, INSTANCES, 50):
            parts = [part10(ct(*uid, seed=n)) for n, uid in enumerate(uids[first : first + 50], first)]
            answer = http.post("/dicom-web/studies", content=multipart(parts), headers=stow_headers())
            assert answer.status_code == 200, answer.text[:300]
    return uids


async def _requests(
    srv: ServerProcess, tokens: list[str], uids: list[tuple[str, str, str]], first: int, n: int
) -> None:
    """Requests first..first+n-1: request k asks for the frame or the metadata of one instance, as one subject.
    Every (subject, kind, instance) of a run is asked once: with the decision cache on, each is a new decision."""
    targets = [(kind, uid) for uid in uids for kind in ("frames", "metadata")]

    async def one(http: httpx.AsyncClient, k: int) -> None:
        kind, (study, series, instance) = targets[k % len(targets)]
        token = tokens[(k // len(targets)) % len(tokens)]
        path = f"/dicom-web/studies/{study}/series/{series}/instances/{instance}"
        if kind == "frames":
            answer = await http.get(path + "/frames/1", headers={"Accept": FRAMES, **bearer(token)})
        else:
            answer = await http.get(path + "/metadata", headers=bearer(token))
        assert answer.status_code == 200, (answer.status_code, answer.text[:300])

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:
            for k in range(first + c, first + n, CLIENTS):
                await one(http, k)

    await asyncio.gather(*(client(c) for c in range(CLIENTS)))


@pytest.mark.parametrize("cache_seconds", ["0", "5"], ids=["decision-cache-off", "decision-cache-on"])
async def test_server_memory_plateaus_under_load(
    dsn: str, tmp_path: Path, cache_seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    with serve(dsn, data, HOUNSFIELD_POLICY_CACHE_SECONDS=cache_seconds, HOUNSFIELD_DIMSE="false") as srv:
        uids = await asyncio.to_thread(_store, srv)
        settings = Settings.from_env({}).with_overrides(data_dir=data)
        tokens = [admin_token(settings, sub=f"viewer-{n}") for n in range(SUBJECTS)]
        process = psutil.Process(srv.proc.pid)
        await _requests(srv, tokens, uids, 0, WARM_UP)
        before = process.memory_info().rss
        await _requests(srv, tokens, uids, WARM_UP, LOAD)
        grown = process.memory_info().rss - before
    with capsys.disabled():
        print(f"\n{LOAD} requests (decision cache {cache_seconds} s): resident size {grown / MIB:+.1f} MiB")
    assert grown < HTTP_BOUND, f"{LOAD} requests grew the server's resident size by {grown / MIB:.1f} MiB"
