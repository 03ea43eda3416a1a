"""Whether a Ray cluster can ever place the model deployments asked of it: a pure check, no Ray in here.

Ray schedules a replica only on one node that holds every resource it asks for (its CPUs, GPUs and custom
resources), and Serve waits without end for a replica it cannot place (it only logs that scheduling takes long).
So before deploying, each deployment's replica is matched against the nodes' totals, and the deployments'
replicas together (`num_cpus`/`num_gpus`/custom resources x the replicas Serve starts) against the cluster's
totals, in the order given: a deployment that cannot be placed is named with what it asks and what there is.
Resources that other workloads hold at the moment are not counted here; a replica waiting for them is bounded by
the run timeout instead (`HOUNSFIELD_INFERENCE_RUN_TIMEOUT_S`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Resources = Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Demand:
    """One deployment's ask: per replica, and how many replicas Serve starts."""

    name: str
    per_replica: Resources
    replicas: int


def _amount(value: float) -> str:
    return f"{value:g}"


def _describe(resources: Resources) -> str:
    return ", ".join(f"{_amount(v)} {k}" for k, v in sorted(resources.items()) if v) or "nothing"


def problems(demands: Sequence[Demand], nodes: Sequence[Resources]) -> dict[str, str]:
    """The deployments that cannot be placed, each with the reason (empty: every one fits)."""
    found: dict[str, str] = {}
    left: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            left[key] = left.get(key, 0.0) + float(value)
    totals = dict(left)
    placed: list[str] = []
    for demand in demands:
        ask = {k: float(v) for k, v in demand.per_replica.items() if v}
        if not any(all(node.get(k, 0.0) >= v for k, v in ask.items()) for node in nodes):
            largest = {k: max((float(node.get(k, 0.0)) for node in nodes), default=0.0) for k in ask}
            found[demand.name] = (
                f"model {demand.name} asks {_describe(ask)} per replica, but no node of the Ray cluster has that"
                f" (the most one node has: {', '.join(f'{_amount(v)} {k}' for k, v in sorted(largest.items()))})"
            )
            continue
        whole = {k: v * demand.replicas for k, v in ask.items()}
        short = {k: v for k, v in whole.items() if v > left.get(k, 0.0) + 1e-9}
        if short:
            found[demand.name] = (
                f"model {demand.name} asks {_describe(whole)} for {demand.replicas} replica(s), but the Ray"
                f" cluster has {', '.join(f'{_amount(totals.get(k, 0.0))} {k}' for k in sorted(short))}"
                + (f", of which {', '.join(placed)} take(s) {_describe(_taken(totals, left, short))}" if placed else "")
            )
            continue
        for key, value in whole.items():
            left[key] = left.get(key, 0.0) - value
        placed.append(demand.name)
    return found


def _taken(totals: Resources, left: Resources, keys: Resources) -> dict[str, float]:
    return {k: totals.get(k, 0.0) - left.get(k, 0.0) for k in keys}
