"""C-STORE on several associations against `HOUNSFIELD_PROCESSES`: images/s and the server's CPU milliseconds per
image (all its processes, user + system, from psutil), for a scaling estimate.

Every process runs the DICOM AE on the shared port (`server.cli.process_app`) and the kernel spreads the
associations over them; the CPU per image (the processes and their PostgreSQL children, when the parent owns an
embedded one) says what a machine with more cores would take (cores x 1000 / ms per image, at best).

    .venv/bin/python benchmarks/cstore_scaling.py [--processes 1 2] [--associations 4] [--images 300]

No Orthanc, no network namespace; run on demand (not part of `make test`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cstore import make_files, start_hounsfield, store, store_parallel  # noqa: E402
from benchmarks.harness import stop_started  # noqa: E402


def cpu_seconds(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def run(processes: int, associations: int, images: int) -> str:
    os.environ["HOUNSFIELD_PROCESSES"] = str(processes)
    folder = Path(tempfile.mkdtemp(prefix="hounsfield-scaling-"))
    procs: list[subprocess.Popen[bytes]] = []
    embedded = None
    try:
        dimse, embedded = start_hounsfield(folder, procs)
        store(dimse, "HOUNSFIELD", make_files(folder / "warm", 20, 256, patient="W1"))
        files = make_files(folder / "files", images, 256, patient="P4")
        time.sleep(3)  # the warm-up's jobs
        before = cpu_seconds(procs[-1].pid)
        rate = store_parallel(dimse, "HOUNSFIELD", files, associations)
        used = cpu_seconds(procs[-1].pid) - before
        return (
            f"HOUNSFIELD_PROCESSES={processes}: {associations} associations {rate:.1f} images/s, "
            f"server CPU {1000 * used / images:.2f} ms per image"
        )
    finally:
        stop_started(procs, embedded, folder)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    os.environ["TCP_NODELAY"] = "1"
    for processes in args.processes:
        print(run(processes, args.associations, args.images), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
