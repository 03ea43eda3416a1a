"""AI on ingest under load, end to end through the server: `--series N` series stored at once (STOW-RS, one request
per series, all concurrent) across the three shipped models' inputs, timed until every model run has succeeded,
with the in-process backend and then with the Ray Serve backend, each in a fresh server.

Each server (`hounsfield serve`, its own embedded PostgreSQL and data folder) runs with AI on ingest, a short
quiet period (`--quiet`, `HOUNSFIELD_INFERENCE_QUIET_SECONDS`) and the shipped registrations
(`inference/registrations/*.json`) registered over `POST /models` as active, so runs publish their SEG, SR and
DiagnosticReport as in production. Series alternate between pydicom-data's RG1 chest CR (the lung fields model)
and the MNI152 template as a HEAD MR series (`--mr-step` mm; deepbet and detect-tumor both take it), each with its
own patient, study and series UIDs. A warm-up pair (one of each) runs first and is timed apart (`cold_start_s`:
model loading; for Ray also the local instance and the deployments), so the burst measures a running system.

Measured per backend, from the inference results API (`GET /inference-results`, polled every `--poll` s):
- `total_s`: first STOW-RS sent -> last run finished (includes the quiet period); `series_per_s`, `runs_per_s`;
- per run, p50/p95, overall and per model: `queue_wait` (`dispatched`, when its series' dispatch job ran after
  the quiet period -> started), `run` (started -> finished: reading the series, the model, publishing its
  outputs) and `to_result` (its series' STOW-RS answered -> finished); `model_p50_ms` is the backend call alone.
  A run's start is the result's `state_since` when a poll first sees it `running` (the moment it started); a run
  never seen running gets the last poll that saw it queued (`starts_estimated` counts those);
- `runs_at_once`: the runs' summed durations over the span from the first start to the last finish (1.0: one
  run at a time);
- Ray: `@serve.batch` sizes per deployment from Serve's own metrics (`ray_serve_actual_batch_size`, scraped from
  the local Ray instance's metrics export port, found through the server's Ray session folder): how many batches
  ran, their sizes (Serve's buckets: up to 1, 2, 4, 8 ...) and the mean (the calls the benchmark made / batches).
`left_after_sigterm` names the server's processes still running once it exited on SIGTERM (the benchmark ends
them). The lung fields registration pins its model in process (`backend.backend`), so under the Ray backend only deepbet
and detect-tumor go through Serve. `ray_vs_inprocess`: Ray against in-process, in percent (times: above 0 is
slower through Ray; throughput: above 0 is faster).

    .venv/bin/python benchmarks/inference_load.py [--series 6] [--backends inprocess,ray] [--timeout 300]
        [--quiet 2] [--poll 0.25] [--env NAME=VALUE ...] [--keep]
    .venv/bin/python benchmarks/inference_load.py --series 20      # the full load: 10 CR + 10 MR, 30 runs

Prints JSON, then a short table. Run on demand (not part of `make test`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from benchmarks import serve_metrics  # noqa: E402
from benchmarks.harness import admin_token, free_port, wait_ready  # noqa: E402
from inference import registry  # noqa: E402
from tests.support.data import sample  # noqa: E402
from tests.support.factory import multipart, stow_headers  # noqa: E402
from tests.support.mr_volume import mr_series  # noqa: E402

MODELS_OF = {"CR": ("chest-xray-lung-fields",), "MR": ("deepbet-brain-extraction", "detect-tumor")}


@dataclass
class Series:
    kind: str  # CR or MR
    uid: str
    body: bytes  # the STOW-RS request body: every instance of the series
    stored: float = 0.0  # the epoch second its STOW-RS was answered


@dataclass
class Run:
    """What the polls saw of one (series, model) result."""

    model: str
    stored: float  # when its series' STOW-RS was answered
    dispatched: float | None = None
    started: float | None = None
    exact_start: bool = False
    last_queued_poll: float | None = None
    finished: float | None = None
    state: str = "unseen"
    attempts: int = 0
    latency_ms: float | None = None
    error: str | None = None


@dataclass
class Burst:
    series: list[Series]
    runs: dict[tuple[str, str], Run] = field(default_factory=dict)
    t0: float = 0.0  # the epoch second the first STOW-RS was sent
    stow_s: float = 0.0
    complete: bool = False


def instances_bytes(datasets: list[pydicom.Dataset]) -> bytes:
    parts = []
    for ds in datasets:
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        parts.append(buf.getvalue())
    return multipart(parts)


def make_series(n: int, mr_step: int, tag: str) -> list[Series]:
    """`n` series alternating CR chest and MR head, each its own patient, study and series."""
    out = []
    for i in range(n):
        study, uid, patient = generate_uid(), generate_uid(), f"LOAD-{tag}-{i}"
        if i % 2 == 0:
            ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study, uid, patient
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            out.append(Series("CR", uid, instances_bytes([ds])))
        else:
            out.append(
                Series("MR", uid, instances_bytes(mr_series(mr_step, study=study, series=uid, patient_id=patient)))
            )
    return out


def seconds(value: str | None) -> float | None:
    return dt.datetime.fromisoformat(value).timestamp() if value else None


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    return {"p50_s": round(statistics.median(samples), 2), "p95_s": round(pct(samples, 0.95), 2)}


class Server:
    """`hounsfield serve` in a fresh data folder, with AI on ingest and the given backend."""

    def __init__(self, backend: str, quiet: int, folder: Path, extra: list[str]) -> None:
        self.folder = folder
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("HOUNSFIELD_RAY_ADDRESS", "RAY_ADDRESS")}
        env.update(
            HOUNSFIELD_DATA=str(folder / "data"),
            HOUNSFIELD_PORT=str(self.port),
            HOUNSFIELD_LOG_LEVEL="warning",
            HOUNSFIELD_DIMSE="false",
            HOUNSFIELD_INFERENCE="true",
            HOUNSFIELD_INFERENCE_QUIET_SECONDS=str(quiet),
            HOUNSFIELD_INFERENCE_BACKEND=backend,
            RAY_USAGE_STATS_ENABLED="0",
        )
        for item in extra:
            name, _, value = item.partition("=")
            env[name] = value
        self.env = env
        self.log = folder / "server.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.seen: dict[int, psutil.Process] = {}
        self.outlived: list[str] = []
        """The names of the server's processes still running after it exited on SIGTERM (ended by `stop`)."""

    def descendants(self) -> list[psutil.Process]:
        """The server's processes now (Ray's included); remembered so that `stop` can end what outlives it."""
        found: list[psutil.Process] = []
        try:
            found.extend(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        for p in found:
            self.seen.setdefault(p.pid, p)
        return found

    def ray_metrics_port(self) -> int | None:
        return serve_metrics.metrics_port(self.descendants())

    def stop(self) -> None:
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = [p for p in self.seen.values() if p.is_running()]  # is_running checks the start time too
        names = sorted({_name(p) for p in left})
        for p in left:
            p.terminate()
        _, alive = psutil.wait_procs(left, timeout=10)
        for p in alive:
            p.kill()
        if left:
            print(
                f"  {len(left)} process(es) outlived the server's SIGTERM, ended: {', '.join(names)}", file=sys.stderr
            )
        self.outlived = names


def _name(process: psutil.Process) -> str:
    try:
        return str(process.name())
    except psutil.Error:
        return "?"


def register_shipped(http: httpx.Client) -> dict[str, str]:
    """The shipped registrations, each active; the Serve deployment (`name@version`) of each model that runs
    through Ray (those pinned in process never do)."""
    served = {}
    for _, doc in registry.shipped_documents():
        answer = http.post("/models", json={**doc, "status": "active"})
        if answer.status_code != 201:
            raise SystemExit(f"registering {doc['name']}: {answer.status_code} {answer.text[:300]}")
        if doc.get("backend", {}).get("backend") != "in-process":
            served[doc["name"]] = f"{doc['name']}@{doc['version']}"
    return served


async def store_all(base: str, headers: dict[str, str], series: list[Series]) -> float:
    """Every series in its own STOW-RS request, all at once; the seconds until the last answer."""
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as http:

        async def one(s: Series) -> None:
            answer = await http.post("/dicom-web/studies", content=s.body, headers=stow_headers())
            if answer.status_code != 200:
                raise SystemExit(f"STOW-RS of a {s.kind} series: {answer.status_code} {answer.text[:300]}")
            s.stored = time.time()

        await asyncio.gather(*(one(s) for s in series))
    return time.perf_counter() - started


def poll(http: httpx.Client, burst: Burst, deadline: float, every: float) -> bool:
    """Follow the burst's runs until each has succeeded or failed for good (False: the deadline came first)."""
    wanted = {s.uid: s for s in burst.series}
    expected = sum(len(MODELS_OF[s.kind]) for s in burst.series)
    while time.monotonic() < deadline:
        now = time.time()
        rows = http.get("/inference-results", params={"limit": 1000}).json()["results"]
        for row in rows:
            if row["series"] not in wanted:
                continue
            key = (row["series"], row["model"])
            run = burst.runs.setdefault(key, Run(row["model"], wanted[row["series"]].stored))
            run.state, run.attempts, run.error = row["state"], row["attempts"], row["error"]
            run.dispatched = seconds(row.get("dispatched"))
            if row["state"] == "queued":
                run.last_queued_poll = now
            elif row["state"] == "running" and run.started is None:
                run.started, run.exact_start = seconds(row.get("state_since")), True
            elif row["state"] in ("succeeded", "failed"):
                run.finished, run.latency_ms = seconds(row["finished"]), row["latency_ms"]
                if run.started is None:
                    run.started = run.last_queued_poll or run.dispatched
        done = [r for r in burst.runs.values() if r.state in ("succeeded", "failed")]
        if len(done) >= expected:
            return True
        time.sleep(every)
    return False


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh server with `backend`: the shipped models active, the warm-up pair, then the burst."""
    print(f"[{backend}] preparing {args.series} series and starting a server", file=sys.stderr)
    warm = Burst(make_series(2, args.mr_step, f"{backend}-warm"))
    burst = Burst(make_series(args.series, args.mr_step, backend))
    folder = Path(tempfile.mkdtemp(prefix=f"hounsfield-load-{backend}-"))
    server = Server(backend, args.quiet, folder, args.env)
    try:
        wait_ready(server.base, server.proc, 180)
        headers = {"Authorization": f"Bearer {admin_token(server.env)}"}
        with httpx.Client(base_url=server.base, headers=headers, timeout=60) as http:
            served = register_shipped(http)
            cold = timed_burst(http, server, headers, warm, args)
            if not warm.complete or any(r.state != "succeeded" for r in warm.runs.values()):
                failed = {key[1]: r.error for key, r in warm.runs.items() if r.state != "succeeded"}
                raise SystemExit(f"[{backend}] the warm-up runs did not all succeed: {failed}; see {server.log}")
            print(f"[{backend}] warm ({cold:.1f} s); storing {args.series} series at once", file=sys.stderr)
            timed_burst(http, server, headers, burst, args)
        report = summarize(burst, cold, args)
        if backend == "ray":
            calls: dict[str, int] = {}
            for run in (*burst.runs.values(), *warm.runs.values()):
                if run.model in served:
                    calls[served[run.model]] = calls.get(served[run.model], 0) + run.attempts
            report["serve_batches"] = serve_metrics.batch_sizes(server.ray_metrics_port(), calls)
    finally:
        server.stop()
        if args.keep:
            print(f"[{backend}] kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report["left_after_sigterm"] = server.outlived
    return report


def timed_burst(
    http: httpx.Client, server: Server, headers: dict[str, str], burst: Burst, args: argparse.Namespace
) -> float:
    """Store the burst's series at once and follow its runs to the end; the seconds it took."""
    burst.t0 = time.time()
    started = time.monotonic()
    burst.stow_s = asyncio.run(store_all(server.base, headers, burst.series))
    burst.complete = poll(http, burst, started + args.timeout, args.poll)
    return time.monotonic() - started


def timings(runs: list[Run]) -> dict[str, Any]:
    """Queue wait (dispatched -> started), run (started -> finished) and time to result (its series stored ->
    finished) of finished runs, p50 and p95."""
    done = [r for r in runs if r.finished is not None and r.started is not None and r.dispatched is not None]
    return {
        "queue_wait": spread([r.started - r.dispatched for r in done]),  # type: ignore[operator]
        "run": spread([r.finished - r.started for r in done]),  # type: ignore[operator]
        "to_result": spread([r.finished - r.stored for r in done]),  # type: ignore[operator]
    }


def summarize(burst: Burst, cold: float, args: argparse.Namespace) -> dict[str, Any]:
    runs = list(burst.runs.values())
    ok = [r for r in runs if r.state == "succeeded" and r.finished is not None and r.started is not None]
    last = max((r.finished for r in ok if r.finished is not None), default=time.time())
    first = min((r.started for r in ok if r.started is not None), default=last)
    total = last - burst.t0
    busy = sum(r.finished - r.started for r in ok if r.finished is not None and r.started is not None)
    per_model: dict[str, Any] = {}
    for name in sorted({r.model for r in runs}):
        mine = [r for r in ok if r.model == name]
        latencies = [r.latency_ms for r in mine if r.latency_ms is not None]
        model_p50 = round(statistics.median(latencies), 1) if latencies else None
        per_model[name] = {"runs": len(mine), **timings(mine), "model_p50_ms": model_p50}
    return {
        "series": len(burst.series),
        "runs": sum(len(MODELS_OF[s.kind]) for s in burst.series),
        "succeeded": len(ok),
        "failed": sum(r.state == "failed" for r in runs),
        "retried": sum(r.attempts > 1 for r in runs),
        "complete": burst.complete,
        "cold_start_s": round(cold, 1),
        "stow_s": round(burst.stow_s, 2),
        "quiet_s": args.quiet,
        "total_s": round(total, 2),
        "series_per_s": round(len(burst.series) / total, 3),
        "runs_per_s": round(len(ok) / total, 3),
        **timings(ok),
        "runs_at_once": round(busy / (last - first), 2) if last > first else None,
        "starts_estimated": sum(not r.exact_start for r in ok),
        "per_model": per_model,
        "errors": sorted({r.error for r in runs if r.error})[:5],
    }


def compare(one: dict[str, Any], ray: dict[str, Any]) -> dict[str, Any]:
    def over(key: str, sub: str | None = None) -> float | None:
        a, b = (one.get(key), ray.get(key)) if sub is None else (one.get(key, {}).get(sub), ray.get(key, {}).get(sub))
        return round(100 * (b / a - 1), 1) if a and b else None

    return {
        "total_pct": over("total_s"),
        "throughput_pct": over("series_per_s"),
        "queue_wait_p50_pct": over("queue_wait", "p50_s"),
        "to_result_p50_pct": over("to_result", "p50_s"),
        "run_p50_pct": over("run", "p50_s"),
        "cold_start_pct": over("cold_start_s"),
    }


def table(results: dict[str, Any]) -> str:
    def p50_95(values: dict[str, float]) -> str:
        return f"{values.get('p50_s', '-')}/{values.get('p95_s', '-')}"

    head = ("backend", "total s", "series/s", "wait p50/p95 s", "run p50/p95 s", "to result p50/p95 s", "at once")
    rows = [(*head, "cold s", "ok/runs")]
    for name in ("inprocess", "ray"):
        r = results.get(name)
        if r:
            rows.append((
                name, f"{r['total_s']:.1f}", f"{r['series_per_s']:.3f}", p50_95(r["queue_wait"]),
                p50_95(r["run"]), p50_95(r["to_result"]), str(r["runs_at_once"]), f"{r['cold_start_s']:.1f}",
                f"{r['succeeded']}/{r['runs']}",
            ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for name in ("inprocess", "ray"):
        for model, m in results.get(name, {}).get("per_model", {}).items():
            lines.append(
                f"  {name:<9} {model:<25} wait {p50_95(m['queue_wait'])} s, run {p50_95(m['run'])} s, "
                f"to result {p50_95(m['to_result'])} s, model p50 {m['model_p50_ms']} ms"
            )
    for deployment, b in results.get("ray", {}).get("serve_batches", {}).items():
        if isinstance(b, dict):
            lines.append(
                f"  @serve.batch {deployment}: {b.get('requests')} calls in {b['batches']} batches, "
                f"mean size {b.get('mean_size')}, sizes {b['sizes']}"
            )
    if "ray_vs_inprocess" in results:
        lines.append(f"  Ray vs in-process (%): {results['ray_vs_inprocess']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=6, help="series stored at once (CR and MR alternately)")
    parser.add_argument("--backends", default="inprocess,ray", help="comma-separated: inprocess, ray")
    parser.add_argument("--quiet", type=int, default=2, help="HOUNSFIELD_INFERENCE_QUIET_SECONDS")
    parser.add_argument("--mr-step", type=int, default=2, help="the MR series' voxel size in mm (2: 95 slices)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per backend for the burst's runs")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between polls of the results API")
    parser.add_argument("--keep", action="store_true", help="keep the data folders (server.log)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a setting of both servers")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in ("inprocess", "ray") for b in backends):
        parser.error("--backends: inprocess, ray or both")
    results: dict[str, Any] = {"series": args.series, "machine_cpus": os.cpu_count()}
    for backend in backends:
        results[backend] = run_backend(backend, args)
    if "inprocess" in results and "ray" in results:
        results["ray_vs_inprocess"] = compare(results["inprocess"], results["ray"])
    print(json.dumps(results, indent=2))
    print(table(results))
    return 0 if all(results[b]["complete"] and not results[b]["failed"] for b in backends) else 1


if __name__ == "__main__":
    raise SystemExit(main())
