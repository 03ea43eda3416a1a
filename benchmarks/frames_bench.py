"""Frames: OHIF's full-frame request, the first progressive HTJ2K stage by byte range vs the whole
frame, and encoder throughput. STOWs a synthetic 512 x 512 16-bit CT series (smooth phantom + noise), lets the
`rendition` jobs run (one warm pass asks every frame once, which also makes any missing rendition), then times
sequential requests on loopback with authentication, policy and audit on.

    .venv/bin/python benchmarks/frames_bench.py [--slices 40] [--repeat 200]

Rows:
* OHIF full frame: `multipart/related; type=application/octet-stream; transfer-syntax=*` (native bytes here);
* progressive stage 1: `?accept=image/jhc` + `Range: bytes=0-65535` (206) vs the whole image/jhc frame;
* transcode: frames/s of each encoder on one 512 x 512 frame, in-process, one thread;
* lossless size: HTJ2K RPCL bytes vs native bytes (what storage compression would save on this series).

Run on demand (not part of `make test`); uses its own embedded PostgreSQL in a temporary folder. Orthanc rows
(benchmarks/orthanc.py, Debian's Orthanc + DICOMweb plugin, HTTP basic authentication on, in a loopback-only network
namespace) on the same files where Orthanc has the feature: the OHIF full-frame request; Orthanc has no byte-range
progressive HTJ2K (n/a). `--no-orthanc` times Hounsfield only.
"""

from __future__ import annotations

import argparse
import json
import os
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
from benchmarks.orthanc import Orthanc, in_loopback_namespace  # noqa: E402
from dicomweb.pixels import encode  # noqa: E402
from tests.dicomweb.test_ranges import phantom  # noqa: E402
from tests.support.factory import multipart, part10, stow_headers  # noqa: E402

OHIF = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def timed(repeat: int, call: Callable[[int], httpx.Response]) -> dict[str, float]:
    samples = []
    size = 0
    for i in range(repeat):
        start = time.perf_counter()
        answer = call(i)
        samples.append((time.perf_counter() - start) * 1000)
        if answer.status_code >= 300:
            raise SystemExit(f"{answer.status_code}: {answer.text[:300]}")
        size = len(answer.content)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p95_ms": round(samples[max(0, int(len(samples) * 0.95) - 1)], 2),
        "per_s": round(1000 * len(samples) / sum(samples), 1),
        "bytes": size,
    }


def encoders(repeat: int) -> dict[str, dict[str, float]]:
    ds = phantom(512, 512)
    native = bytes(ds.PixelData)
    image = encode.image_of(ds)
    out: dict[str, dict[str, float]] = {}
    for syntax, codec in encode.CODECS.items():
        if not encode.can_encode(syntax) or encode.unsupported(syntax, image):
            continue
        stream = encode.encode_frame(native, syntax, image)
        start = time.perf_counter()
        for _ in range(repeat):
            encode.encode_frame(native, syntax, image)
        seconds = time.perf_counter() - start
        out[syntax] = {
            "frames_per_s": round(repeat / seconds, 1),
            "ratio": round(len(native) / len(stream), 2),
            "lossy": codec.lossy,
        }
    return out


def serve(folder: Path) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    port = free_port()
    env = dict(os.environ, HOUNSFIELD_DATA=str(folder / "data"), HOUNSFIELD_PORT=str(port))
    env.update(HOUNSFIELD_LOG_LEVEL="warning", HOUNSFIELD_DIMSE="false", HOUNSFIELD_INFERENCE="false")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc, 120)
    return proc, base, env


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--encode-repeat", type=int, default=20)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "frames.json")
    parser.add_argument("--no-orthanc", action="store_true", help="time Hounsfield only")
    args = parser.parse_args()
    if not args.no_orthanc:
        in_loopback_namespace()  # Orthanc binds every interface: run everything on a private loopback
    results: dict[str, object] = {"transcode": encoders(args.encode_repeat)}
    parts: list[bytes] = []
    proc, base, env = serve(Path(tempfile.mkdtemp(prefix="hounsfield-frames-bench-")))
    try:
        token = admin_token(env)
        http = httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {token}"})
        series = [phantom(512, 512, seed=s) for s in range(args.slices)]
        for ds in series[1:]:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
        for i in range(0, len(series), 10):
            batch = [part10(d) for d in series[i : i + 10]]
            parts.extend(batch)
            answer = http.post("/dicom-web/studies", content=multipart(batch), headers=stow_headers())
            if answer.status_code != 200:
                raise SystemExit(f"STOW failed: {answer.status_code} {answer.text[:300]}")
        urls = [
            f"/dicom-web/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}/instances/{d.SOPInstanceUID}"
            "/frames/1"
            for d in series
        ]
        jhc = {"accept": "image/jhc"}
        start = time.perf_counter()
        sizes = [len(http.get(u, params=jhc, headers={"Accept": OHIF}).content) for u in urls]  # warm pass
        results["warm_pass_s"] = round(time.perf_counter() - start, 2)
        native_bytes = 512 * 512 * 2
        results["htj2k_rpcl_vs_native"] = {
            "mean_bytes": round(statistics.mean(sizes)),
            "native_bytes": native_bytes,
            "saved_percent": round(100 * (1 - statistics.mean(sizes) / native_bytes), 1),
        }
        n = len(urls)
        results["ohif_full_frame"] = timed(args.repeat, lambda i: http.get(urls[i % n], headers={"Accept": OHIF}))
        results["jhc_stage1_range_0_65535"] = timed(
            args.repeat,
            lambda i: http.get(urls[i % n], params=jhc, headers={"Accept": OHIF, "Range": "bytes=0-65535"}),
        )
        results["jhc_full_frame"] = timed(args.repeat, lambda i: http.get(urls[i % n], params=jhc))
    finally:
        proc.terminate()
        proc.wait(30)
    if not args.no_orthanc:
        results["orthanc"] = bench_orthanc(parts, urls, args.repeat)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print_table(results)
    return 0


def bench_orthanc(parts: list[bytes], urls: list[str], repeat: int) -> dict[str, object]:
    """The same files in Orthanc (DICOMweb plugin), the same OHIF full-frame request; a warm pass first."""
    folder = Path(tempfile.mkdtemp(prefix="hounsfield-frames-bench-orthanc-"))
    with Orthanc(folder, users={"bench": "bench-password"}) as orthanc:
        with httpx.Client(base_url=orthanc.url, timeout=120, auth=("bench", "bench-password")) as http:
            for data in parts:
                if http.post("/instances", content=data).status_code != 200:
                    raise SystemExit("Orthanc did not store a file")
            web = list(urls)  # the same paths: both serve DICOMweb under /dicom-web
            for u in web:
                http.get(u, headers={"Accept": OHIF})
            n = len(web)
            return {
                "ohif_full_frame": timed(repeat, lambda i: http.get(web[i % n], headers={"Accept": OHIF})),
                "jhc_stage1_range_0_65535": "n/a",
                "jhc_full_frame": "n/a",
            }


def print_table(results: dict[str, object]) -> None:
    """Hounsfield beside Orthanc: frames/s, p50 and the ratio (Hounsfield / Orthanc frames/s)."""
    orthanc = results.get("orthanc")
    print(f"\n{'request':28} {'hounsfield f/s':>15} {'p50 ms':>8} {'orthanc f/s':>12} {'p50 ms':>8} {'ratio':>7}")
    for name in ("ohif_full_frame", "jhc_stage1_range_0_65535", "jhc_full_frame"):
        ours = results[name]
        assert isinstance(ours, dict)
        theirs = orthanc.get(name, "n/a") if isinstance(orthanc, dict) else "n/a"
        if isinstance(theirs, dict):
            ratio = f"{ours['per_s'] / theirs['per_s']:.2f}x"
            other = f"{theirs['per_s']:12.1f} {theirs['p50_ms']:8.2f}"
        else:
            ratio, other = "n/a", f"{'n/a':>12} {'n/a':>8}"
        print(f"{name:28} {ours['per_s']:15.1f} {ours['p50_ms']:8.2f} {other} {ratio:>7}")


if __name__ == "__main__":
    raise SystemExit(main())
