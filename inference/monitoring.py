"""Monitoring of model versions: what the summary API shows and the OpenTelemetry metrics record.

- Per version: result counts by state, failures, shadow runs, latency (mean, p50, p95, max, of the model call),
  throughput (results finished in the last hour), the distribution of each output measurement (count, mean,
  standard deviation, min, p50, max: a shift is a drift signal), and radiologist feedback (reports made final
  = accepted, entered-in-error = rejected).
- Comparison with the other versions of the same model on the series both ran successfully: for each shared
  measurement, the number of series and the mean absolute difference (active vs shadow).
- OpenTelemetry instruments on the process's meter provider (`server.platform.telemetry` sets it):
  `hounsfield.inference.runs` (counter; model, version, shadow, outcome), `hounsfield.inference.latency`
  (histogram, ms; model, version) and `hounsfield.inference.output` (histogram; model, version, measurement).

Feedback arrives through a FHIR repository write hook (`feedback_hook`): any write of a DiagnosticReport that an
AI result made, with status final or entered-in-error, is recorded on that result, in the write's transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from opentelemetry import metrics

from fhir.repository import Stored, WriteHook
from server.platform.db import Connection, Queries

SQL = Queries(Path(__file__).with_name("dispatch.sql"))
SUMMARY_LIMIT = 20_000
FEEDBACK = {"final": "accepted", "entered-in-error": "rejected"}
_meter = metrics.get_meter("hounsfield.inference")
RUNS = _meter.create_counter("hounsfield.inference.runs", unit="{run}", description="Model runs by outcome")
LATENCY = _meter.create_histogram("hounsfield.inference.latency", unit="ms", description="Model call latency")
OUTPUT = _meter.create_histogram("hounsfield.inference.output", description="Output measurements (drift signal)")


def record_run(
    model: str, version: str, shadow: bool, outcome: str, latency_ms: float | None, stats: dict[str, Any]
) -> None:
    attributes = {"model": model, "version": version}
    RUNS.add(1, {**attributes, "shadow": shadow, "outcome": outcome})
    if latency_ms is not None:
        LATENCY.record(latency_ms, attributes)
    for name, value in stats.items():
        if isinstance(value, int | float):
            OUTPUT.record(float(value), {**attributes, "measurement": name})


def feedback_hook() -> WriteHook:
    async def hook(conn: Connection, stored: Stored) -> None:
        if stored.resource_type != "DiagnosticReport" or stored.content is None:
            return
        status = stored.content.get("status")
        if status in FEEDBACK:
            await conn.execute(SQL["record_feedback"], stored.id, status)

    return hook


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _distribution(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": min(values),
        "p50": _percentile(values, 0.5),
        "max": max(values),
    }


def _stats(value: Any) -> dict[str, float]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return {k: float(v) for k, v in (loaded or {}).items() if isinstance(v, int | float)}


def _version_summary(rows: list[Any], now: dt.datetime) -> dict[str, Any]:
    states: dict[str, int] = defaultdict(int)
    for row in rows:
        states[row["state"]] += 1
    latencies = [float(r["latency_ms"]) for r in rows if r["latency_ms"] is not None]
    outputs: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["state"] == "succeeded":
            for name, value in _stats(row["stats"]).items():
                outputs[name].append(value)
    recent = [r for r in rows if r["finished_at"] is not None and r["finished_at"] > now - dt.timedelta(hours=1)]
    feedback: dict[str, int] = defaultdict(int)
    for row in rows:
        if row["feedback"]:
            feedback[FEEDBACK.get(row["feedback"], row["feedback"])] += 1
    return {
        "results": len(rows),
        "states": dict(states),
        "failures": states.get("failed", 0),
        "shadow_runs": sum(1 for r in rows if r["shadow"]),
        "latency_ms": _distribution(latencies) if latencies else None,
        "throughput_per_hour": len(recent),
        "outputs": {name: _distribution(values) for name, values in sorted(outputs.items())},
        "feedback": dict(feedback),
    }


def _comparison(mine: list[Any], theirs: list[Any]) -> dict[str, Any]:
    """Mean absolute difference of each measurement on the series both versions ran successfully."""
    a = {r["series_uid"]: _stats(r["stats"]) for r in mine if r["state"] == "succeeded"}
    b = {r["series_uid"]: _stats(r["stats"]) for r in theirs if r["state"] == "succeeded"}
    shared = sorted(set(a) & set(b))
    names = sorted({n for s in shared for n in a[s]} & {n for s in shared for n in b[s]})
    diffs = {
        name: statistics.fmean(abs(a[s][name] - b[s][name]) for s in shared if name in a[s] and name in b[s])
        for name in names
    }
    return {"series": len(shared), "mean_abs_difference": diffs}


async def summary(conn: Connection, name: str, version: str) -> dict[str, Any]:
    """The monitoring summary of one version (the model must exist: the caller checks)."""
    rows = await conn.fetch(SQL["summary_rows"], name, SUMMARY_LIMIT)
    by_version: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_version[row["model_version"]].append(row)
    now = dt.datetime.now(dt.UTC)
    return {
        "model": name,
        "version": version,
        **_version_summary(by_version.get(version, []), now),
        "compared_with": {
            other: _comparison(by_version.get(version, []), others)
            for other, others in sorted(by_version.items())
            if other != version
        },
    }
