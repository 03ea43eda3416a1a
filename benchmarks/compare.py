"""Hounsfield against Orthanc: the same synthetic CT data set, both servers started in the same run and
driven by the same client (httpx, async), with Hounsfield's authentication (a real JWT), OPA policy and audit on.

Rows: STOW-RS instances/s (10 instances a request, 4 requests at once); QIDO-RS p50/p95 (patient ID, date range,
patient name prefix, series of a study, instances of a series, OHIF's study list); series metadata p50 (the
100-instance series); OHIF's frame request (`multipart/related; type=application/octet-stream;
transfer-syntax=*`) frames/s and p50 at concurrency 8; instance and series retrieve MB/s; C-STORE images/s
on one association and on 4 at once (the same files under new UIDs)
(dcmtk `storescu`, benchmarks/cstore.py). Physical references on the same machine: reading the same bytes from
the page cache, a trivial HTTP server (uvicorn, a fixed body) on loopback, and the C-STORE files sent into a
pynetdicom storage SCP that stores nothing (the ceiling of the DIMSE library Hounsfield is built on). Each row
prints both figures and "H adv." (how many times Hounsfield is ahead: Orthanc's time ÷ Hounsfield's, or
Hounsfield's rate ÷ Orthanc's; above 1 means ahead). Orthanc runs twice on the same storage: with its default
configuration (HTTP compression on: it gzips whatever a client accepts gzip for, frames included) for every row,
then with `HttpCompressionEnabled: false` for the read rows; each read row compares Hounsfield with the better
of the two, and the table says which configuration won it. Also the peak resident size of each server under the load.
The read rows start once the server's ingest work is done (Hounsfield: its job queue drained, renditions and FHIR
sync; the row "ingest settled s" says how long that took). JSON goes to benchmarks/results/compare.json.

    .venv/bin/python benchmarks/compare.py [--instances 2000] [--repeat 50] [--cstore 200]
    .venv/bin/python benchmarks/compare.py --instances small        # a quick run (200 instances)
    .venv/bin/python benchmarks/compare.py --processes 2            # also Hounsfield with HOUNSFIELD_PROCESSES=2

The data set is generated once into var/bench-cache/ (deterministic; a new folder when a parameter changes).
Run on demand (not part of `make test`); needs root (unshare -n, apt-get orthanc orthanc-dicomweb when missing)
and dcmtk. Everything runs in a network namespace with only loopback up (benchmarks/orthanc.py).
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
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_data import DataSet, generate, uid  # noqa: E402
from benchmarks.cstore import CALLING, start_hounsfield, store, store_parallel  # noqa: E402
from benchmarks.harness import free_port, stop_started  # noqa: E402
from benchmarks.orthanc import Orthanc, in_loopback_namespace  # noqa: E402

OHIF_FRAME = "multipart/related; type=application/octet-stream; transfer-syntax=*"
DICOM = 'multipart/related; type="application/dicom"'
SMALL = 200


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


class Peak:
    """Samples the resident size of a process and its children (from /proc) every 0.1 s; `peak` in MiB."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self, pid: int) -> list[int]:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return [pid]
        return [pid] + [p for c in children for p in self._tree(int(c))]

    def rss(self) -> float:
        total = 0
        for pid in self._tree(self.pid):
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError):
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak, 1)


class Target:
    """One server under test: its DICOMweb root, an httpx client, its DIMSE port and AE title."""

    def __init__(self, name: str, base: str, headers: dict[str, str], dimse: int, aet: str, pid: int) -> None:
        self.name, self.base, self.dimse, self.aet = name, base, dimse, aet
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        self.http = httpx.AsyncClient(base_url=base, headers=headers, timeout=300, limits=limits)
        self.memory = Peak(pid)
        self.dsn = ""  # Hounsfield's database (its job queue), to wait for ingest's background work

    async def get(self, path: str, accept: str = "application/dicom+json") -> httpx.Response:
        answer = await self.http.get(path, headers={"Accept": accept})
        if answer.status_code >= 300:
            raise SystemExit(f"{self.name} GET {path}: {answer.status_code} {answer.text[:300]}")
        return answer


async def concurrently(jobs: list[Callable[[], Awaitable[Any]]], concurrency: int) -> tuple[float, list[float]]:
    """Run the jobs `concurrency` at a time; returns (wall seconds, each job's latency in ms)."""
    queue = list(reversed(jobs))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            job = queue.pop()
            t0 = time.perf_counter()
            await job()
            latencies.append((time.perf_counter() - t0) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


async def stow(target: Target, files: list[Path]) -> float:
    """Instances/s of STOW-RS, 10 instances a request, 4 requests at once."""
    boundary = "compareboundary"
    headers = {"Content-Type": f"{DICOM}; boundary={boundary}", "Accept": "application/dicom+json"}

    def body(chunk: list[Path]) -> bytes:
        parts = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
                 for p in chunk]  # fmt: skip
        return b"".join(parts) + f"--{boundary}--\r\n".encode()

    async def one(chunk: list[Path]) -> None:
        answer = await target.http.post("/studies", content=body(chunk), headers=headers)
        if answer.status_code != 200:
            raise SystemExit(f"STOW into {target.name}: {answer.status_code} {answer.text[:300]}")

    chunks = [files[i : i + 10] for i in range(0, len(files), 10)]
    wall, _ = await concurrently([lambda c=c: one(c) for c in chunks], 4)  # type: ignore[misc]
    return len(files) / wall


async def latency(target: Target, path: str, repeat: int, accept: str = "application/dicom+json") -> dict[str, float]:
    await target.get(path, accept)  # warm-up
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await target.get(path, accept)
        samples.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(statistics.median(samples), 2), "p95_ms": round(pct(samples, 0.95), 2)}


async def frames(target: Target, urls: list[str], requests: int) -> dict[str, float]:
    async def one(url: str) -> None:
        await target.get(url, OHIF_FRAME)

    await one(urls[0])
    order = [urls[i % len(urls)] for i in range(requests)]
    wall, lat = await concurrently([lambda u=u: one(u) for u in order], 8)  # type: ignore[misc]
    return {"frames_per_s": round(requests / wall, 1), "p50_ms": round(statistics.median(lat), 2)}


async def received(http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> int:
    """Bytes of one GET, counted as they arrive rather than kept: holding a 50 MB body in httpx cost this client
    more CPU than either server spent sending it (the client was the bottleneck, at 95% of a core), and its
    variance (170-470 MB/s for the same server) swamped the difference between the servers."""
    async with http.stream("GET", path, headers=headers) as answer:
        if answer.status_code >= 300:
            raise SystemExit(f"GET {path}: {answer.status_code} {(await answer.aread())[:300]!r}")
        size = 0
        async for chunk in answer.aiter_bytes():
            size += len(chunk)
    return size


async def throughput(target: Target, paths: list[str], accept: str) -> float:
    """MB/s (10^6 bytes) of sequential retrieves of the paths."""
    headers = {"Accept": accept}
    await received(target.http, paths[0], headers)
    size = 0
    t0 = time.perf_counter()
    for path in paths:
        size += await received(target.http, path, headers)
    return size / (time.perf_counter() - t0) / 1e6


def queries(data: DataSet) -> dict[str, str]:
    start = data.first_date
    end = f"{int(start[:4])}{start[4:6]}28"
    return {
        "QIDO PatientID": f"/studies?PatientID={data.patient}",
        "QIDO StudyDate range": f"/studies?StudyDate={start}-{end}&limit=100",
        "QIDO PatientName prefix": f"/studies?PatientName={data.patient_name.split('^')[0]}*&limit=100",
        "QIDO series of a study": f"/studies/{data.study}/series",
        "QIDO instances of a series": f"/studies/{data.study}/series/{data.series}/instances",
        "QIDO OHIF study list": "/studies?limit=101&offset=0&fuzzymatching=false&includefield=00081030%2C00080060",
    }


async def measure(target: Target, data: DataSet, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"STOW-RS instances/s": await stow(target, data.stow)}
    out["ingest settled s"] = await settle(target)
    out.update(await reads(target, data, args))
    out["C-STORE images/s"] = await asyncio.to_thread(store, target.dimse, target.aet, data.cstore)
    out["C-STORE 4 associations images/s"] = await asyncio.to_thread(
        store_parallel, target.dimse, target.aet, parallel_files(data), 4
    )
    out["peak RSS MiB"] = target.memory.stop()
    return out


def parallel_files(data: DataSet) -> list[Path]:
    """The C-STORE row's files again under new SOP Instance and Series UIDs (the same bytes otherwise), for the
    4-association row: a resent instance would be an idempotent no-op. Made once into the data set's folder."""
    folder = data.folder / "cstore-parallel"
    paths = [folder / p.name for p in data.cstore]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(exist_ok=True)
    for src, dst in zip(data.cstore, paths, strict=True):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(
            uid("parallel", ds.SOPInstanceUID)
        )
        ds.SeriesInstanceUID = uid("parallel", ds.SeriesInstanceUID)
        ds.save_as(dst, enforce_file_format=True)
    return paths


async def reads(target: Target, data: DataSet, args: argparse.Namespace) -> dict[str, Any]:
    """The read rows (QIDO, metadata, frames, retrieves) on a server that holds the data set."""
    out: dict[str, Any] = {}
    for name, path in queries(data).items():
        out[name] = await latency(target, path, args.repeat)
    series = f"/studies/{data.study}/series/{data.series}"
    out["series metadata"] = await latency(target, series + "/metadata", max(5, args.repeat // 5))
    listing = (await target.get(series + "/instances")).json()
    sops = [item["00080018"]["Value"][0] for item in listing]
    instances = [f"{series}/instances/{sop}" for sop in sops]
    out["OHIF frames c=8"] = await frames(target, [i + "/frames/1" for i in instances], args.frames)
    out["instance retrieve MB/s"] = await throughput(target, instances, DICOM)
    out["series retrieve MB/s"] = await throughput(target, [series] * 3, DICOM)
    return out


async def settle(target: Target) -> float:
    """Seconds until the server's background work after ingest is done, so that the read rows see a quiet server:
    Hounsfield's job queue (renditions, FHIR sync) drained; Orthanc has none to wait for (a fixed 3 s)."""
    t0 = time.perf_counter()
    if not target.dsn:
        await asyncio.sleep(3)
        return 3.0
    import asyncpg

    conn = await asyncpg.connect(target.dsn)
    try:
        pending = "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running') AND run_at <= now() + interval '5 s'"
        while await conn.fetchval(pending) and time.perf_counter() - t0 < 600:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return round(time.perf_counter() - t0, 1)


def references(data: DataSet, trivial: str) -> dict[str, float]:
    """Page-cache read MB/s of the data set's files (second pass), and a trivial HTTP server on loopback."""
    for path in data.stow:
        path.read_bytes()
    t0, size = time.perf_counter(), 0
    for path in data.stow:
        size += len(path.read_bytes())
    page_cache = size / (time.perf_counter() - t0) / 1e6

    async def http() -> tuple[float, float]:
        async with httpx.AsyncClient(base_url=trivial, limits=httpx.Limits(max_connections=16)) as client:
            await client.get("/small")
            wall, _ = await concurrently([lambda: client.get("/small") for _ in range(2000)], 8)
            t0, total = time.perf_counter(), 0
            for _ in range(100):
                total += await received(client, "/big", {})
            return 2000 / wall, total / (time.perf_counter() - t0) / 1e6

    rps, mbps = asyncio.run(http())
    return {
        "page cache read MB/s": page_cache,
        "trivial HTTP req/s c=8": rps,
        "trivial HTTP MB/s": mbps,
        "no-op pynetdicom C-STORE images/s": dimse_floor(data.cstore),
    }


def dimse_floor(files: list[Path]) -> float:
    """The C-STORE row's files sent by storescu into a pynetdicom SCP that stores nothing (a handler that only
    answers success; the server's 1 MiB PDUs): the ceiling of the DIMSE library Hounsfield's storage SCP is built
    on, on this machine."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    ae = AE(ae_title="NOOP")
    ae.maximum_pdu_size = 1024 * 1024  # as HOUNSFIELD_DIMSE_MAX_PDU's default
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda _event: 0x0000)])
    assert server is not None  # non-blocking: the server is returned
    try:
        store(port, "NOOP", files[:20])  # warm-up
        return store(port, "NOOP", files)
    finally:
        server.shutdown()


TRIVIAL = """
BIG = b"x" * (512 * 1024 + 1024)
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = BIG if scope["path"] == "/big" else b"ok"
    head = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": head})
    await send({"type": "http.response.body", "body": body})
"""


def start_trivial(folder: Path, procs: list[subprocess.Popen[bytes]]) -> str:
    (folder / "trivial_app.py").write_text(TRIVIAL)
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "trivial_app:app", "--port", str(port), "--log-level", "warning"]
    procs.append(subprocess.Popen(cmd, cwd=folder))
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(base + "/small")
            return base
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("trivial server did not start")


def _advantage(row: str, key: str | None, hv: float, ov: float) -> float:
    """How many times Hounsfield is ahead: Orthanc's time / Hounsfield's, or Hounsfield's rate / Orthanc's."""
    if (key or "").endswith("_ms") or row == "peak RSS MiB":
        return ov / hv
    return hv / ov


def best_orthanc(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Orthanc's figures with each read measure taken from its better configuration, and which one won each
    (keyed by row, or by "row key" for the measures of a row)."""
    on, off = results["orthanc"], results.get("orthanc compression off", {})
    best: dict[str, Any] = dict(on)
    won: dict[str, str] = {}
    for row, value in off.items():
        if isinstance(value, dict):
            best[row] = {}
            for key, figure in value.items():
                # the better: lower latency, higher rate (per measure; one row's measures may differ)
                better = figure < on[row][key] if key.endswith("_ms") else figure > on[row][key]
                best[row][key] = figure if better else on[row][key]
                won[f"{row} {key}"] = "off" if better else "on"
        else:
            better = value > on[row]
            best[row], won[row] = (value, "off") if better else (on[row], "on")
    return best, won


def report(results: dict[str, Any]) -> None:
    h = results["hounsfield"]
    o, won = best_orthanc(results)
    results["orthanc best"], results["orthanc best configuration"] = o, won
    print(
        f"\n{results['instances']} CT instances 512x512 16-bit ({results['mib']} MiB), {results['cstore']} by C-STORE"
    )
    print("Orthanc: read rows from its better configuration (HTTP compression on = its default, or off)")
    others = [name for name in results if name.startswith("hounsfield ") and name.endswith(" processes")]
    extra = "".join(f"{'H ' + name.split()[1] + ' proc':>14}{'adv.':>7}" for name in others)
    print(f"{'row':34}{'Hounsfield':>14}{'Orthanc':>14}{'H adv.':>8}{'Orthanc cfg':>13}{extra}")

    def more(row: str, key: str | None, ov: float) -> str:
        cells = ""
        for name in others:
            value = results[name][row][key] if key else results[name][row]
            adv = f"{_advantage(row, key, value, ov):7.2f}" if row != "ingest settled s" else f"{'':>7}"
            cells += f"{value:14.2f}{adv}"
        return cells

    for row, hv in h.items():
        ov, cfg = o[row], won.get(row, "")
        if isinstance(hv, dict):
            for key in hv:
                adv, cfg = _advantage(row, key, hv[key], ov[key]), won.get(f"{row} {key}", "")
                print(f"{row + ' ' + key:34}{hv[key]:14.2f}{ov[key]:14.2f}{adv:8.2f}{cfg:>13}{more(row, key, ov[key])}")
        elif row == "ingest settled s":
            print(f"{row:34}{hv:14.1f}{ov:14.1f}{'':>8}{'':>13}{more(row, None, ov)}")
        else:
            adv = _advantage(row, None, hv, ov)
            print(f"{row:34}{hv:14.1f}{ov:14.1f}{adv:8.2f}{cfg:>13}{more(row, None, ov)}")
    print("physical references (same machine):")
    for row, value in results["references"].items():
        print(f"  {row:32}{value:14.1f}")


async def run_targets(targets: list[Target], data: DataSet, args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for target in targets:
        out[target.name] = await measure(target, data, args)
        await target.http.aclose()
    return out


async def run_reads(target: Target, data: DataSet, args: argparse.Namespace) -> dict[str, Any]:
    try:
        return await reads(target, data, args)
    finally:
        await target.http.aclose()
        target.memory.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", default="2000", help=f"instances sent with STOW-RS ('small': {SMALL})")
    parser.add_argument("--cstore", type=int, default=0, help="instances sent with C-STORE (default: a tenth)")
    parser.add_argument("--repeat", type=int, default=50, help="runs of each QIDO query")
    parser.add_argument("--frames", type=int, default=400, help="frame requests (concurrency 8)")
    parser.add_argument(
        "--processes", type=int, nargs="*", default=[], help="also run Hounsfield with HOUNSFIELD_PROCESSES=N (each N)"
    )
    parser.add_argument("--inference", action="store_true", help="keep Hounsfield's AI-on-ingest hook on")
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "bench-cache")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "compare.json")
    args = parser.parse_args()
    args.instances = SMALL if args.instances == "small" else int(args.instances)
    args.cstore = args.cstore or max(20, args.instances // 10)
    args.json, args.cache = args.json.resolve(), args.cache.resolve()
    if not shutil.which("storescu"):
        raise SystemExit("dcmtk is needed (apt-get install dcmtk)")
    in_loopback_namespace()
    os.environ["TCP_NODELAY"] = "1"
    if not args.inference:  # AI on ingest is not part of what Orthanc does; its model runs would share the CPUs
        os.environ.setdefault("HOUNSFIELD_INFERENCE", "false")
    data = generate(args.cache, args.instances, args.cstore)
    folder = Path(tempfile.mkdtemp(prefix="hounsfield-compare-"))
    embedded = None
    procs: list[subprocess.Popen[bytes]] = []
    orthanc = Orthanc(folder / "orthanc", peers={CALLING: ("127.0.0.1", 104)})
    try:
        orthanc.start()
        dimse, embedded = start_hounsfield(folder, procs)
        assert orthanc.proc is not None
        targets = [
            Target("orthanc", orthanc.url + "/dicom-web", {}, orthanc.dicom_port, orthanc.aet, orthanc.proc.pid),
            hounsfield_target(folder, procs[-1], dimse, embedded),
        ]
        results: dict[str, Any] = asyncio.run(run_targets(targets, data, args))
        for n in args.processes:  # a fresh server (its own data and database) for each other configuration
            stop_started(procs[-1:], embedded)
            procs.pop()
            embedded = None
            results[f"hounsfield {n} processes"] = other_configuration(folder / f"processes-{n}", n, data, args)
        orthanc.stop()  # the same storage, served again with HTTP compression off: the read rows once more
        orthanc = Orthanc(folder / "orthanc", peers={CALLING: ("127.0.0.1", 104)}, http_compression=False)
        orthanc.start()
        assert orthanc.proc is not None
        plain = Target("orthanc", orthanc.url + "/dicom-web", {}, orthanc.dicom_port, orthanc.aet, orthanc.proc.pid)
        results["orthanc compression off"] = asyncio.run(run_reads(plain, data, args))
        results["references"] = references(data, start_trivial(folder, procs))
        results["instances"], results["cstore"] = len(data.stow), len(data.cstore)
        results["mib"] = round(sum(p.stat().st_size for p in data.stow) / 2**20, 1)
        report(results)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    except BaseException:
        log = folder / "hounsfield.log"
        if log.exists():
            print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        orthanc.stop()
        stop_started(procs, embedded, folder)


def other_configuration(folder: Path, processes: int, data: DataSet, args: argparse.Namespace) -> dict[str, Any]:
    """Every row against Hounsfield started with `HOUNSFIELD_PROCESSES=processes` in `folder`."""
    procs: list[subprocess.Popen[bytes]] = []
    embedded = None
    previous = os.environ.get("HOUNSFIELD_PROCESSES")
    os.environ["HOUNSFIELD_PROCESSES"] = str(processes)
    try:
        folder.mkdir(parents=True)
        dimse, embedded = start_hounsfield(folder, procs)
        target = hounsfield_target(folder, procs[-1], dimse, embedded)
        measured: dict[str, Any] = asyncio.run(run_targets([target], data, args))["hounsfield"]
        return measured
    finally:
        if previous is None:
            os.environ.pop("HOUNSFIELD_PROCESSES", None)
        else:
            os.environ["HOUNSFIELD_PROCESSES"] = previous
        stop_started(procs, embedded)


def hounsfield_target(folder: Path, server: subprocess.Popen[bytes], dimse: int, embedded: Any) -> Target:
    """The Hounsfield server `start_hounsfield` started in `folder`, with an admin token of its key."""
    env = dict(os.environ, HOUNSFIELD_DATA=str(folder / "data"))
    token = subprocess.run(
        [sys.executable, "-m", "server.cli", "token", "--sub", "bench", "--role", "admin"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    base = f"http://127.0.0.1:{hounsfield_port(server.pid)}/dicom-web"
    target = Target("hounsfield", base, {"Authorization": f"Bearer {token}"}, dimse, "HOUNSFIELD", server.pid)
    target.dsn = os.environ.get("DATABASE_URL") or embedded.get_uri()
    return target


def hounsfield_port(pid: int) -> int:
    """The HTTP port start_hounsfield gave the server (from its environment)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"HOUNSFIELD_PORT=")).split(b"=", 1)[1])


if __name__ == "__main__":
    raise SystemExit(main())
