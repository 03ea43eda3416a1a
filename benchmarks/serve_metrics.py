"""Ray Serve's batching, as Serve itself reports it: the `ray_serve_actual_batch_size` histogram that each
`@serve.batch` method records, exported in Prometheus text by the Ray node's metrics agent (its metrics export
port, named in the node's session folder), per application and deployment."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import psutil

BATCH_METRIC = "ray_serve_actual_batch_size"
SETTLE = 12.0
"""Seconds without a new batch in Serve's metrics before they count as complete (Ray exports every ~10 s)."""


def metrics_port(processes: Iterable[psutil.Process]) -> int | None:
    """The metrics export port of the Ray node among `processes` (a server's descendants: its local Ray
    instance), from the session folder its processes name."""
    for p in processes:
        try:
            match = re.search(r"--session-dir=(\S+)", " ".join(p.cmdline()))
        except psutil.Error:
            continue
        if match:
            for path in Path(match.group(1)).glob("metrics_export_port_*"):
                return int(path.read_text().strip())
    return None


def batch_sizes(port: int | None, calls: dict[str, int], wait: float = 45.0) -> dict[str, Any]:
    """Serve's `ray_serve_actual_batch_size` histogram per deployment (`name@version`), scraped until its counts
    have not moved for `SETTLE` seconds (Ray exports metrics every few seconds) or every call is counted as a batch
    of its own, at most `wait` seconds. `calls`: the requests each model's deployment received (every attempt of
    its runs), so that the mean batch size is exact (Serve's `_sum` is not reliable: equal sizes observed within
    one export interval were summed once in Ray 2.60)."""
    if port is None:
        return {"error": "the server's Ray session (metrics export port) was not found"}
    deadline = time.monotonic() + wait
    found: dict[str, Any] = {}
    last: tuple[Any, float] = ((), time.monotonic())
    while time.monotonic() < deadline:
        try:
            found = parse_batches(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        except httpx.HTTPError as exc:
            found = {"error": f"metrics: {type(exc).__name__}"}
        counts = tuple(sorted((d, e.get("batches", 0)) for d, e in found.items()))
        if counts != last[0]:
            last = (counts, time.monotonic())
        every_call = all(found.get(d, {}).get("batches") == n for d, n in calls.items())
        if every_call or (counts and time.monotonic() - last[1] >= SETTLE):
            break
        time.sleep(2)
    for deployment, entry in found.items():
        if isinstance(entry, dict) and entry.get("batches") and deployment in calls:
            entry["requests"] = calls[deployment]
            entry["mean_size"] = round(calls[deployment] / entry["batches"], 2)
    return found


def parse_batches(text: str) -> dict[str, Any]:
    """Per deployment: batches (the histogram's count) and sizes per bucket (from the cumulative buckets)."""
    out: dict[str, Any] = {}
    line = re.compile(BATCH_METRIC + r"_(bucket|count)\{([^}]*)\} ([0-9.e+-]+)")
    for kind, labels, value in line.findall(text):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        entry = out.setdefault(tags.get("deployment", "?"), {"batches": 0, "cumulative": {}})
        if kind == "count":
            entry["batches"] += int(float(value))
        else:
            entry["cumulative"][tags["le"]] = entry["cumulative"].get(tags["le"], 0) + int(float(value))
    for entry in out.values():
        cumulative = entry.pop("cumulative")
        buckets, below = {}, 0
        for le in sorted(cumulative, key=lambda b: float("inf") if b == "+Inf" else float(b)):
            if cumulative[le] > below:
                buckets[f"<={le.removesuffix('.0')}"] = cumulative[le] - below
            below = cumulative[le]
        entry["sizes"] = buckets
    return out
