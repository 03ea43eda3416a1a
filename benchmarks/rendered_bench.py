"""Rendered p50: a 512x512 CT frame rendered to JPEG over HTTP, authentication, policy and audit on,
beside Orthanc's DICOMweb plugin on the same file (HTTP basic authentication on).

Stores pydicom-data's `693_UNCR.dcm` (512x512 CT, 14 bits, rescale and window in the file) in both servers and
times sequential GETs of `.../instances/{uid}/rendered` (Accept: image/jpeg), of the same with a window and a
256x256 viewport, and of `.../thumbnail`, on loopback.

    .venv/bin/python benchmarks/rendered_bench.py [--repeat 200] [--no-orthanc]

Run on demand (not part of `make test`); Hounsfield runs as `hounsfield serve` with its own embedded PostgreSQL
in a temporary folder; Orthanc through `benchmarks/orthanc.py` (in a loopback-only network namespace).
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
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import admin_token, free_port, wait_ready  # noqa: E402
from benchmarks.orthanc import Orthanc, in_loopback_namespace  # noqa: E402
from tests.support.data import sample  # noqa: E402
from tests.support.factory import multipart, stow_headers  # noqa: E402

FILE = "693_UNCR.dcm"
JPEG = {"Accept": "image/jpeg"}
BASELINE_TYPE = "application/dicom+json"
BASELINE = "metadata (baseline, no pixels)"


def timed(repeat: int, call: Callable[[], httpx.Response], expected: str = "image/jpeg") -> dict[str, float]:
    for _ in range(10):  # warm-up
        call()
    samples = []
    size = 0
    for _ in range(repeat):
        start = time.perf_counter()
        answer = call()
        samples.append((time.perf_counter() - start) * 1000)
        if answer.status_code != 200 or answer.headers.get("content-type") != expected:
            raise SystemExit(f"{answer.status_code} {answer.headers.get('content-type')}: {answer.text[:300]}")
        size = len(answer.content)
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p95_ms": samples[int(len(samples) * 0.95) - 1], "bytes": size}


def baseline(http: httpx.Client, instance: str, repeat: int) -> dict[str, float]:
    """The same resource's metadata: the per-request cost without pixels (HTTP, auth, policy, audit, index)."""
    return timed(
        repeat, lambda: http.get(instance + "/metadata", headers={"Accept": "application/dicom+json"}), BASELINE_TYPE
    )


def requests(http: httpx.Client, instance: str) -> dict[str, Callable[[], httpx.Response]]:
    return {
        "rendered (default window)": lambda: http.get(instance + "/rendered", headers=JPEG),
        # Literal commas: Orthanc does not decode %2C in these parameters.
        "rendered window+viewport 256": lambda: http.get(
            instance + "/rendered?window=40,400,linear&viewport=256,256", headers=JPEG
        ),
        "thumbnail": lambda: http.get(instance + "/thumbnail", headers=JPEG),
    }


def start_hounsfield(folder: Path) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    port = free_port()
    env = dict(os.environ, HOUNSFIELD_DATA=str(folder / "data"), HOUNSFIELD_PORT=str(port))
    env["HOUNSFIELD_LOG_LEVEL"] = "warning"
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc, 120)
    token = admin_token(env)
    return proc, base, {"Authorization": f"Bearer {token}"}


def bench_hounsfield(folder: Path, data: bytes, path: str, repeat: int) -> dict[str, dict[str, float]]:
    proc, base, auth = start_hounsfield(folder)
    try:
        with httpx.Client(base_url=base, timeout=60, headers=auth) as http:
            stored = http.post("/dicom-web/studies", content=multipart([data]), headers=stow_headers())
            if stored.status_code != 200:
                raise SystemExit(f"STOW failed: {stored.status_code} {stored.text[:300]}")
            rows = {name: timed(repeat, call) for name, call in requests(http, "/dicom-web" + path).items()}
            return {**rows, BASELINE: baseline(http, "/dicom-web" + path, repeat)}
    finally:
        proc.terminate()
        proc.wait(30)


def bench_orthanc(folder: Path, data: bytes, path: str, repeat: int) -> dict[str, dict[str, float]]:
    users = {"bench": "bench-password"}
    with Orthanc(folder, users=users) as orthanc:
        with httpx.Client(base_url=orthanc.url, timeout=60, auth=("bench", "bench-password")) as http:
            if http.post("/instances", content=data).status_code != 200:
                raise SystemExit("Orthanc did not store the file")
            calls = requests(http, "/dicom-web" + path)
            rows = {name: timed(repeat, call) for name, call in calls.items() if name != "thumbnail"}
            return {**rows, BASELINE: baseline(http, "/dicom-web" + path, repeat)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--no-orthanc", action="store_true", help="time Hounsfield only")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "rendered.json")
    args = parser.parse_args()
    if not args.no_orthanc:
        in_loopback_namespace()
    data = sample(FILE).read_bytes()
    ds = pydicom.dcmread(sample(FILE), stop_before_pixels=True)
    path = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    folder = Path(tempfile.mkdtemp(prefix="hounsfield-rendered-bench-"))
    try:
        results = {"hounsfield": bench_hounsfield(folder / "hounsfield", data, path, args.repeat)}
        if not args.no_orthanc:
            results["orthanc"] = bench_orthanc(folder / "orthanc", data, path, args.repeat)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nRendered {FILE} (512x512 CT) to image/jpeg over HTTP, auth on; {args.repeat} sequential runs each")
    print(f"{'server':11} {'request':30} {'p50 ms':>8} {'p95 ms':>8} {'bytes':>8}")
    for server, rows in results.items():
        for name, row in rows.items():
            print(f"{server:11} {name:30} {row['p50_ms']:8.2f} {row['p95_ms']:8.2f} {int(row['bytes']):8d}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"file": FILE, "repeat": args.repeat, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
