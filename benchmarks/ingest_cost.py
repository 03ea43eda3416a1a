"""What ingest costs: STOW-RS (10 instances a request, 4 at once) and C-STORE (storescu, one
association) of benchmarks/compare.py's data set into one Hounsfield server (authentication, policy and audit
on), reporting instances/s and the CPU milliseconds per instance spent by the server process (and, of that, its
event-loop thread), by PostgreSQL and by this client (from /proc and os.times, user + system). A server whose
total CPU is near one core while its loop is not busy is bound by the GIL, not the loop. With `--py-spy FILE`
the server is profiled under the STOW (or `--spy-on cstore`: C-STORE) load and the jobs it queued (speedscope
JSON); `--gil` samples only the thread holding the GIL, which is where a GIL-bound server's time goes.

`--settle` times what compare.py's "ingest settled" row times (from the last STOW-RS answer until the job queue
is drained) and splits it by job kind from the jobs table: how many, when the first and the last of each were
queued and finished, seconds after the last answer, and the CPU seconds the server and PostgreSQL spent meanwhile
(C-STORE is skipped).

    .venv/bin/python benchmarks/ingest_cost.py [--instances 400] [--cstore 200] [--py-spy var/ingest.json [--gil]]
    .venv/bin/python benchmarks/ingest_cost.py --settle [--instances 400]

No Orthanc here, so no network namespace; run on demand (not part of `make test`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare import Target, hounsfield_port, stow  # noqa: E402
from benchmarks.compare_data import generate  # noqa: E402
from benchmarks.cstore import start_hounsfield, store  # noqa: E402
from benchmarks.harness import admin_token, stop_started, wait_ready  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu(pids: list[int], stat: str = "/proc/{pid}/stat") -> float:
    """CPU seconds (user + system) of the processes (or, with `stat="/proc/{pid}/task/{pid}/stat"`, of their
    main threads: the event loop's)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(stat.format(pid=pid)).read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / TICK


LOOP = "/proc/{pid}/task/{pid}/stat"


def tree(pid: int) -> list[int]:
    """The process and its descendants (whatever the server starts: its CPU counts too)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [p for c in children for p in tree(int(c))]


def postgres_pids(folder: Path) -> list[int]:
    """The embedded PostgreSQL of this run (the postmaster whose command line names its data folder) and its
    backends."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(folder) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                if (proc / "comm").read_text().strip().startswith("postgres"):
                    pid = int(proc.name)
                    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                    return [pid, *map(int, children)]
        except OSError:
            continue
    return []


async def drain(dsn: str) -> None:
    """Wait until the jobs the ingest queued (renditions, FHIR sync) have run."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        pending = "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running') AND run_at <= now() + interval '5 s'"
        while await conn.fetchval(pending):  # noqa: ASYNC110 - polling work done by another process
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


PENDING = "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running') AND run_at <= now() + interval '5 s'"
"""compare.py's `settle` condition: no job due within 5 s left to run."""
SPLIT = """
SELECT kind, count(*) AS n,
       extract(epoch FROM min(created_at) - $1) AS first_queued,
       extract(epoch FROM max(created_at) - $1) AS last_queued,
       extract(epoch FROM min(finished_at) - $1) AS first_done,
       extract(epoch FROM max(finished_at) - $1) AS last_done
FROM jobs WHERE created_at > $2 GROUP BY kind ORDER BY kind
"""


async def settle_split(dsn: str, since: Any) -> dict[str, Any]:
    """Seconds from now (the last STOW-RS answer) until no job is due (compare.py's `settle`), and per job kind
    queued after `since` (database time): count, first/last queued and finished, seconds after the answer."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        t0 = time.perf_counter()
        answered = await conn.fetchval("SELECT clock_timestamp()")
        while await conn.fetchval(PENDING):  # noqa: ASYNC110 - polling work done by another process
            await asyncio.sleep(0.05)
        settled = time.perf_counter() - t0
        rows = await conn.fetch(SPLIT, answered, since)
    finally:
        await conn.close()
    split = {
        r["kind"]: {k: (round(float(r[k]), 2) if r[k] is not None else None) for k in r.keys() if k != "kind"}
        for r in rows
    }
    return {"settled_s": round(settled, 2), "kinds": split}


async def database_now(dsn: str) -> Any:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT clock_timestamp()")
    finally:
        await conn.close()


def measured(label: str, count: int, server: int, pgdata: Path, dsn: str, work: Any) -> dict[str, float]:
    """Rate of `work`; CPU per instance of the server and PostgreSQL during it (+1 s), and of the server until
    the jobs it queued have run. PostgreSQL's backends are listed again after the work: the server's pool opens
    connections under load, and a backend started during the work counts whole."""
    pg = postgres_pids(pgdata)
    s0, p0, m0, t0 = cpu(tree(server)), cpu(pg), cpu(tree(server), LOOP), time.perf_counter()
    c0 = time.process_time()  # this client's own CPU (with its child processes: storescu)
    ch0 = os.times().children_user + os.times().children_system
    rate = work()
    client = time.process_time() - c0 + os.times().children_user + os.times().children_system - ch0
    time.sleep(1.0)  # hooks and group commits that finish just after the last answer
    s1, p1, m1 = cpu(tree(server)), cpu(postgres_pids(pgdata)), cpu(tree(server), LOOP)
    asyncio.run(drain(dsn))
    s2 = cpu(tree(server))
    row = {
        "per_s": round(rate, 1),
        "server_cpu_ms": round(1000 * (s1 - s0) / count, 2),
        "event_loop_cpu_ms": round(1000 * (m1 - m0) / count, 2),
        "postgres_cpu_ms": round(1000 * (p1 - p0) / count, 2),
        "client_cpu_ms": round(1000 * client / count, 2),
        "server_cpu_ms_with_jobs": round(1000 * (s2 - s0) / count, 2),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(f"{label:10} {row}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--cstore", type=int, default=200)
    parser.add_argument("--py-spy", type=Path, help="record the server under the load into this file")
    parser.add_argument("--spy-on", choices=("stow", "cstore"), default="stow", help="which load --py-spy records")
    parser.add_argument("--gil", action="store_true", help="--py-spy samples only the thread holding the GIL")
    parser.add_argument("--settle", action="store_true", help="time and split the job queue's drain after STOW-RS")
    args = parser.parse_args()
    os.environ.setdefault("HOUNSFIELD_INFERENCE", "false")
    os.environ["TCP_NODELAY"] = "1"
    data = generate(ROOT / "var" / "bench-cache", args.instances, args.cstore)
    folder = Path(tempfile.mkdtemp(prefix="hounsfield-ingest-"))
    procs: list[subprocess.Popen[bytes]] = []
    embedded = None
    spy = None
    try:
        dimse, embedded = start_hounsfield(folder, procs)
        server = procs[-1].pid
        dsn = os.environ.get("DATABASE_URL") or embedded.get_uri()
        env = dict(os.environ, HOUNSFIELD_DATA=str(folder / "data"))
        token = admin_token(env)
        base = f"http://127.0.0.1:{hounsfield_port(server)}/dicom-web"
        wait_ready(base.removesuffix("/dicom-web"))
        asyncio.run(drain(dsn))  # start-up jobs

        def spy_start() -> subprocess.Popen[bytes]:
            spy_cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-o", str(args.py_spy), "-f",
                       "speedscope", "-r", "200", *(["--gil"] if args.gil else []), "-p", str(server)]  # fmt: skip
            started = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            return started

        def spy_stop() -> None:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)

        async def stow_all() -> float:
            target = Target("hounsfield", base, {"Authorization": f"Bearer {token}"}, dimse, "HOUNSFIELD", server)
            try:
                return await stow(target, data.stow)
            finally:
                target.memory.stop()
                await target.http.aclose()

        spy = spy_start() if args.py_spy and args.spy_on == "stow" else None
        if args.settle:
            since = asyncio.run(database_now(dsn))
            rate = asyncio.run(stow_all())
            pg = postgres_pids(folder / "pg")
            s0, p0 = cpu(tree(server)), cpu(pg)
            split = asyncio.run(settle_split(dsn, since))
            used = {"server_cpu_s": round(cpu(tree(server)) - s0, 2), "postgres_cpu_s": round(cpu(pg) - p0, 2)}
            spy_stop()
            print(json.dumps({"stow_per_s": round(rate, 1), **split, **used}))
            return 0
        measured("STOW-RS", len(data.stow), server, folder / "pg", dsn, lambda: asyncio.run(stow_all()))
        spy_stop()
        spy = spy_start() if args.py_spy and args.spy_on == "cstore" else None
        measured(
            "C-STORE",
            len(data.cstore),
            server,
            folder / "pg",
            dsn,
            lambda: store(dimse, "HOUNSFIELD", data.cstore),
        )
        spy_stop()
        return 0
    finally:
        stop_started(procs, embedded, folder)


if __name__ == "__main__":
    raise SystemExit(main())
