"""What building the stored DICOM JSON costs, alone: per instance, the way ingest builds it
(dicomweb.ingest.dicomjson) against pydicom's (`Dataset.to_json_dict` of a copy, then `json.dumps`), both from a
freshly read data set (pixels not read, as ingest reads it; the read itself is not timed) and both including the
conversion of the elements from their raw form, which ingest does either way. Files: the synthetic CT of
benchmarks/compare.py and the corpus of tests/dicomweb/test_corpus.py (pydicom's and pydicom-data's files).

    .venv/bin/python benchmarks/metadata_build.py [--ct 200] [--repeat 5]

Prints, for each set, the median over the repeats of the mean milliseconds per instance of each path, and of
the conversion of the top-level elements from raw alone (items are converted during either walk).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_data import generate  # noqa: E402
from dicomweb.ingest import dicomjson  # noqa: E402
from tests.support import corpus  # noqa: E402


def with_pydicom(ds: Dataset) -> str:
    copy = Dataset()
    copy.set_original_encoding(ds.is_implicit_VR, ds.is_little_endian, ds._character_set)
    for tag in ds.keys():
        copy[tag] = ds[tag]
    doc = copy.to_json_dict(bulk_data_threshold=2**31)
    return json.dumps({k: doc[k] for k in sorted(doc)}, separators=(",", ":"), ensure_ascii=False)


def with_dicomjson(ds: Dataset) -> str:
    converted = [ds[tag] for tag in ds.keys()]
    doc = dicomjson.from_elements(converted)
    return dicomjson.dumps({k: doc[k] for k in sorted(doc)})


def convert_only(ds: Dataset) -> str:
    """The part both paths share and do first: pydicom converting the top-level elements from raw."""
    for tag in ds.keys():
        ds[tag]
    return ""


def readable(data: list[bytes]) -> list[bytes]:
    """The files both paths make a document of (the others are refused by both, early)."""
    out = []
    for raw in data:
        try:
            if with_pydicom(read(raw)) == with_dicomjson(read(raw)):
                out.append(raw)
        except Exception:  # refused: not part of the timing
            continue
    return out


def read(raw: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, defer_size=1025)


def timed(build: Callable[[Dataset], str], data: list[bytes], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        datasets = [read(raw) for raw in data]
        start = time.perf_counter()
        for ds in datasets:
            build(ds)
        runs.append((time.perf_counter() - start) / len(data) * 1000)
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ct", type=int, default=200, help="synthetic CT instances")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the corpus is meant to be odd
    logging.disable(logging.WARNING)
    ct = generate(ROOT / "var" / "bench-cache", args.ct, 0)
    sets = {
        "synthetic CT": [path.read_bytes() for path in ct.stow],
        "corpus": [path.read_bytes() for _, path in corpus.corpus_files() if corpus.is_dicom_file(path)],
    }
    for name, data in sets.items():
        data = readable(data)
        before = timed(with_pydicom, data, args.repeat)
        after = timed(with_dicomjson, data, args.repeat)
        shared = timed(convert_only, data, args.repeat)
        print(
            f"{name:13} {len(data):4} files: pydicom {before:.3f} ms, dicomjson {after:.3f} ms per instance "
            f"({before / after:.2f}x); of which converting the top-level elements {shared:.3f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
