"""FHIR rows: ImagingStudy search by patient and DiagnosticReport create, p50/p95 over HTTP with
authentication, policy and audit on. STOWs a small archive, waits for the derived ImagingStudy/Patient
resources (the `fhir.sync` job), then times the requests sequentially on loopback.

    .venv/bin/python benchmarks/fhir_bench.py [--patients 100] [--studies-per-patient 3] [--repeat 200]

Run on demand (not part of `make test`); uses its own embedded PostgreSQL in a temporary folder. No FHIR server
runs beside it for a ratio: Orthanc has no FHIR API.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import admin_token, free_port, wait_ready  # noqa: E402
from tests.support.factory import ct, multipart, part10, stow_headers  # noqa: E402


def timed(repeat: int, call: Callable[[int], httpx.Response]) -> dict[str, float]:
    for i in range(10):  # warm-up
        call(i)
    samples = []
    for i in range(repeat):
        start = time.perf_counter()
        answer = call(i)
        samples.append((time.perf_counter() - start) * 1000)
        if answer.status_code >= 300:
            raise SystemExit(f"{answer.status_code}: {answer.text[:300]}")
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p95_ms": samples[int(len(samples) * 0.95) - 1]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--studies-per-patient", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "fhir.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hounsfield-fhir-bench-"))
    port = free_port()
    env = dict(
        os.environ,
        HOUNSFIELD_DATA=str(folder / "data"),
        HOUNSFIELD_PORT=str(port),
        HOUNSFIELD_LOG_LEVEL="warning",
        HOUNSFIELD_FHIR_SYNC_DELAY_MS="100",
    )
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, 120)
        token = admin_token(env)
        http = httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {token}"})
        studies = args.patients * args.studies_per_patient
        for p in range(args.patients):
            parts = [
                part10(ct(PatientID=f"PID{p}", PatientName=f"DOE^P{p}", StudyDescription="CT CHEST", seed=s))
                for s in range(args.studies_per_patient)
            ]
            stored = http.post("/dicom-web/studies", content=multipart(parts), headers=stow_headers())
            if stored.status_code != 200:
                raise SystemExit(f"STOW failed: {stored.status_code} {stored.text[:300]}")
        deadline = time.monotonic() + 300
        while http.get("/fhir/ImagingStudy", params={"_summary": "count"}).json().get("total", 0) < studies:
            if time.monotonic() > deadline:
                raise SystemExit("ImagingStudy resources did not appear")
            time.sleep(0.5)
        patients = {}
        for p in range(args.patients):
            bundle = http.get("/fhir/Patient", params={"identifier": f"PID{p}"}).json()
            patients[p] = bundle["entry"][0]["resource"]["id"]
        rng = random.Random(7)
        picks = [rng.randrange(args.patients) for _ in range(args.repeat + 10)]
        results = {
            "ImagingStudy?patient=Patient/id": timed(
                args.repeat, lambda i: http.get("/fhir/ImagingStudy", params={"patient": patients[picks[i]]})
            ),
            "ImagingStudy?patient.identifier=PID": timed(
                args.repeat,
                lambda i: http.get("/fhir/ImagingStudy", params={"patient.identifier": f"PID{picks[i]}"}),
            ),
            "DiagnosticReport create": timed(
                args.repeat,
                lambda i: http.post(
                    "/fhir/DiagnosticReport",
                    json={
                        "resourceType": "DiagnosticReport",
                        "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
                        "subject": {"reference": f"Patient/{patients[picks[i]]}"},
                        "conclusion": "No acute findings.",
                    },
                    headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal"},
                ),
            ),
            "DiagnosticReport?patient=Patient/id": timed(
                args.repeat, lambda i: http.get("/fhir/DiagnosticReport", params={"patient": patients[picks[i]]})
            ),
        }
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"\nFHIR over HTTP ({studies} studies, {args.patients} patients; {args.repeat} runs each, sequential)")
    print(f"{'request':40} {'p50 ms':>8} {'p95 ms':>8}")
    for name, row in results.items():
        print(f"{name:40} {row['p50_ms']:8.2f} {row['p95_ms']:8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"studies": studies, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
