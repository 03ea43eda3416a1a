"""Storage compression (`HOUNSFIELD_STORE_COMPRESSION`): bytes stored vs bytes received, and ingest
images/s, with compression off, HTJ2K lossless RPCL (.4.202) and JPEG 2000 lossless (.4.90).

    .venv/bin/python benchmarks/storage_bench.py [--slices 40] [--size 512]

For each mode a fresh server (own embedded PostgreSQL, filesystem blobs) receives the same synthetic CT series by
STOW-RS in batches of 10 (tests/support/factory.py `ct()` with a smooth phantom plus noise,
tests/dicomweb/test_ranges.py `phantom()`; `--noise` uses `ct()`'s uniform 12-bit noise instead, a worst case).
Stored bytes are the instance blobs; the `rendition` job's frames (default HTJ2K RPCL) are counted apart after they
settle, since a stored .4.202 instance needs none. Ingest rate is wall time of the STOW requests (authentication,
policy and audit on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.frames_bench import serve  # noqa: E402
from benchmarks.harness import admin_token  # noqa: E402
from tests.dicomweb.test_ranges import phantom  # noqa: E402
from tests.support.factory import ct, multipart, part10, stow_headers  # noqa: E402


def series(slices: int, size: int, noise: bool) -> list[bytes]:
    made = [ct(rows=size, columns=size, seed=s) if noise else phantom(size, size, seed=s) for s in range(slices)]
    for ds in made[1:]:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = made[0].StudyInstanceUID, made[0].SeriesInstanceUID
    return [part10(ds) for ds in made]


def blob_bytes(folder: Path, suffix: str) -> tuple[int, int]:
    files = [p for p in folder.rglob(f"*{suffix}") if ".spool" not in p.parts]
    return len(files), sum(p.stat().st_size for p in files)


def run_mode(mode: str, parts: list[bytes]) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"hounsfield-storage-bench-{mode}-"))
    os.environ["HOUNSFIELD_STORE_COMPRESSION"] = mode
    proc, base, env = serve(folder)
    try:
        token = admin_token(env)
        http = httpx.Client(base_url=base, timeout=300, headers={"Authorization": f"Bearer {token}"})
        start = time.perf_counter()
        for i in range(0, len(parts), 10):
            answer = http.post("/dicom-web/studies", content=multipart(parts[i : i + 10]), headers=stow_headers())
            if answer.status_code != 200:
                raise SystemExit(f"STOW failed: {answer.status_code} {answer.text[:300]}")
        seconds = time.perf_counter() - start
        blobs = folder / "data" / "blobs"
        deadline = time.monotonic() + 120
        while mode != "htj2k" and blob_bytes(blobs, ".frames")[0] < len(parts) and time.monotonic() < deadline:
            time.sleep(0.5)  # renditions settle (none are needed for a stored .4.202 instance)
        count, stored = blob_bytes(blobs, ".dcm")
        renditions = blob_bytes(blobs, ".frames")[1]
    finally:
        proc.terminate()
        proc.wait(30)
    native = sum(len(p) for p in parts)
    return {
        "instances": count,
        "received_bytes": native,
        "stored_bytes": stored,
        "saved_percent": round(100 * (1 - stored / native), 1),
        "rendition_bytes": renditions,
        "stored_plus_renditions_bytes": stored + renditions,
        "ingest_images_per_s": round(len(parts) / seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--noise", action="store_true", help="uniform 12-bit noise (tests/support/factory.py ct())")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "storage.json")
    args = parser.parse_args()
    parts = series(args.slices, args.size, args.noise)
    results: dict[str, Any] = {"slices": args.slices, "size": args.size, "data": "noise" if args.noise else "phantom"}
    for mode in ("none", "htj2k", "j2k"):
        results[mode] = run_mode(mode, parts)
    off = results["none"]["ingest_images_per_s"]
    for mode in ("htj2k", "j2k"):
        results[mode]["ingest_vs_none"] = round(results[mode]["ingest_images_per_s"] / off, 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
