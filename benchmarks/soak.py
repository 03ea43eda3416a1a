"""Soak: does a server under steady mixed load keep a flat memory curve? Starts `hounsfield serve` on a temporary
data folder (embedded PostgreSQL, authentication, policy and audit on, as shipped), stores a few studies, then runs
`--clients` concurrent clients for `--minutes`, each request drawn from a mix of

* QIDO-RS: studies by PatientID, by StudyDate range, by name with paging, ModalitiesInStudy with includefield;
  the series of a study, the instances of a series;
* metadata: of an instance, a series or a study;
* frames: frame 1 of an instance (`multipart/related; type=application/octet-stream`);
* STOW-RS: one to three new instances, into a new study or a new series of a stored one (later requests ask for
  them too, so the set of distinct resources keeps growing, as in an archive);

several subjects sharing the load (tokens signed with the server's key). Every `--interval` seconds it prints the
server's resident size (RSS), its threads and open descriptors, the embedded PostgreSQL's memory (the sum of its
processes' unique set sizes), and the requests and failures so far; at the end a summary: RSS at the start of the
load, at 5 minutes and at the end, its maximum, and its growth over the second part of the run (from 5 minutes on;
from half-way in runs of 10 minutes or less). Exit status 1 when that growth exceeds `--max-growth-mib` (memory
did not plateau) or a request failed (any status other than 200, or a broken connection).

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--clients 8] [--interval 30] [--env NAME=VALUE ...]

Run on demand (not part of `make test`; tests/server/test_memory.py is the short version). `--env` passes settings
to the server, e.g. `--env HOUNSFIELD_POLICY_CACHE_SECONDS=0` to evaluate the policy on every request.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from authz.tokens import issue_token  # noqa: E402
from benchmarks.harness import free_port, wait_ready  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.support.factory import ct, multipart, part10, stow_headers  # noqa: E402

MIB = 1 << 20
FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"
KINDS = ("qido", "metadata", "frames", "stow")
PATIENTS = 40
PLATEAU_FROM = 5 * 60
"""Seconds into the load from which the memory curve must be flat (the issue's "start, 5 min, end")."""


@dataclass
class Archive:
    """What is stored, as the clients know it: (study, series, instance, patient) of every instance."""

    instances: list[tuple[str, str, str, str]] = field(default_factory=list)
    next_uid: int = 0

    def uid(self) -> str:
        self.next_uid += 1
        return f"2.25.{int(time.time())}{self.next_uid:07d}"


@dataclass
class Counts:
    done: collections.Counter[str] = field(default_factory=collections.Counter)
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def fail(self, kind: str, what: str) -> None:
        self.failed[kind] += 1
        self.examples.setdefault(f"{kind} {what[:60]}", what[:300])


def instances(archive: Archive, rng: random.Random, rows: int) -> tuple[bytes, list[tuple[str, str, str, str]]]:
    """A STOW-RS body of one to three new instances: a new study (half the time) or a new series of a stored one."""
    if archive.instances and rng.random() < 0.5:
        study, _, _, patient = rng.choice(archive.instances)
    else:
        study, patient = archive.uid(), f"SOAK{rng.randrange(PATIENTS)}"
    series = archive.uid()
    made, parts = [], []
    for number in range(1, rng.randint(1, 3) + 1):
        sop = archive.uid()
        date = f"2020{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        ds = ct(study, series, sop, rows=rows, columns=rows, seed=rng.randrange(1 << 30), PatientID=patient)
        ds.PatientName = f"SOAK^{patient}"
        ds.StudyDate, ds.InstanceNumber, ds.StudyDescription = date, number, "SOAK CT"
        parts.append(part10(ds))
        made.append((study, series, sop, patient))
    return multipart(parts), made


def qido_path(archive: Archive, rng: random.Random) -> str:
    study, series, _, patient = rng.choice(archive.instances)
    month = rng.randint(1, 12)
    return rng.choice(
        [
            f"/dicom-web/studies?PatientID={patient}",
            f"/dicom-web/studies?StudyDate=2020{month:02d}01-2020{month:02d}28&limit=20",
            f"/dicom-web/studies?PatientName=SOAK*&limit=25&offset={rng.randrange(50)}",
            "/dicom-web/studies?ModalitiesInStudy=CT&includefield=00081030&limit=25",
            f"/dicom-web/studies/{study}/series",
            f"/dicom-web/studies/{study}/series/{series}/instances",
        ]
    )


def metadata_path(archive: Archive, rng: random.Random) -> str:
    study, series, sop, _ = rng.choice(archive.instances)
    return rng.choice(
        [
            f"/dicom-web/studies/{study}/series/{series}/instances/{sop}/metadata",
            f"/dicom-web/studies/{study}/series/{series}/metadata",
            f"/dicom-web/studies/{study}/metadata",
        ]
    )


async def request(
    http: httpx.AsyncClient, kind: str, archive: Archive, rng: random.Random, token: str, rows: int, counts: Counts
) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    made: list[tuple[str, str, str, str]] = []
    try:
        if kind == "stow":
            body, made = instances(archive, rng, rows)
            answer = await http.post("/dicom-web/studies", content=body, headers={**stow_headers(), **auth})
        elif kind == "frames":
            study, series, sop, _ = rng.choice(archive.instances)
            path = f"/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/1"
            answer = await http.get(path, headers={"Accept": FRAMES, **auth})
        else:
            path = qido_path(archive, rng) if kind == "qido" else metadata_path(archive, rng)
            answer = await http.get(path, headers=auth)
        await answer.aread()
    except httpx.TransportError as exc:
        counts.fail(kind, f"{type(exc).__name__}: {exc}")
        return
    if answer.status_code not in (200, 204):  # 204: a QIDO-RS search that matched nothing
        counts.fail(kind, f"{answer.status_code}: {answer.text[:240]}")
        return
    counts.done[kind] += 1
    archive.instances.extend(made)


@dataclass(frozen=True)
class Load:
    base: str
    until: float
    weights: list[int]
    tokens: list[str]
    rows: int


async def client(load: Load, archive: Archive, seed: int, counts: Counts) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=load.base, timeout=120) as http:
        while time.monotonic() < load.until:
            kind = rng.choices(KINDS, load.weights)[0]
            await request(http, kind, archive, rng, rng.choice(load.tokens), load.rows, counts)


def postgres_processes(pgdata: Path) -> list[psutil.Process]:
    """The embedded cluster's postmaster (its command line names the data folder) and its backends."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any(str(pgdata) in arg for arg in cmdline) and any(arg.endswith("postgres") for arg in cmdline[:1]):
            try:
                return [proc, *proc.children(recursive=True)]
            except psutil.Error:
                return [proc]
    return []


@dataclass(frozen=True)
class Sample:
    elapsed: float
    rss: int
    threads: int
    fds: int
    postgres: int
    requests: int
    failed: int


def sample(server: psutil.Process, pgdata: Path, elapsed: float, counts: Counts) -> Sample:
    postgres = 0
    for proc in postgres_processes(pgdata):
        try:
            postgres += proc.memory_full_info().uss
        except psutil.Error:
            pass
    return Sample(
        elapsed,
        server.memory_info().rss,
        server.num_threads(),
        server.num_fds(),
        postgres,
        sum(counts.done.values()),
        sum(counts.failed.values()),
    )


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60:3d}:{int(seconds) % 60:02d}"


def print_sample(s: Sample, counts: Counts) -> None:
    kinds = " ".join(f"{counts.done[k]:7d}" for k in KINDS)
    print(
        f"{clock(s.elapsed)}  {s.rss / MIB:8.1f}  {s.threads:7d}  {s.fds:5d}  {s.postgres / MIB:7.1f}  "
        f"{s.requests:8d}  {kinds}  {s.failed:6d}",
        flush=True,
    )


def at(samples: list[Sample], seconds: float) -> Sample:
    """The first sample at or after `seconds` (the last one when the run was shorter)."""
    return next((s for s in samples if s.elapsed >= seconds), samples[-1])


async def soak(args: argparse.Namespace, base: str, server: psutil.Process, pgdata: Path, tokens: list[str]) -> int:
    archive = Archive()
    counts = Counts()
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        while len(archive.instances) < args.seed_instances:
            await request(http, "stow", archive, rng, tokens[0], args.rows, counts)
    if counts.failed:
        print(f"seeding failed: {dict(counts.examples)}", file=sys.stderr)
        return 1
    print(f"stored {len(archive.instances)} instances; {args.clients} clients, {args.minutes:g} min, mix {args.mix}")
    print(" time   RSS MiB  threads    fds  PG MiB  requests  " + " ".join(f"{k:>7}" for k in KINDS) + "  failed")
    counts = Counts()
    weights = [int(dict(p.split("=") for p in args.mix.split(",")).get(k, 0)) for k in KINDS]
    start = time.monotonic()
    until = start + args.minutes * 60
    samples = [sample(server, pgdata, 0, counts)]
    print_sample(samples[-1], counts)
    load = Load(base, until, weights, tokens, args.rows)
    clients = [asyncio.create_task(client(load, archive, args.seed + n, counts)) for n in range(args.clients)]
    while time.monotonic() < until:
        await asyncio.sleep(min(args.interval, max(0.0, until - time.monotonic())))
        samples.append(sample(server, pgdata, time.monotonic() - start, counts))
        print_sample(samples[-1], counts)
        if server.status() == psutil.STATUS_ZOMBIE or not server.is_running():
            print("the server died", file=sys.stderr)
            return 1
    await asyncio.gather(*clients)
    samples.append(sample(server, pgdata, time.monotonic() - start, counts))
    print_sample(samples[-1], counts)
    return summary(args, samples, counts)


def summary(args: argparse.Namespace, samples: list[Sample], counts: Counts) -> int:
    total = samples[-1].elapsed
    reference = at(samples, PLATEAU_FROM if total > 2 * PLATEAU_FROM else total / 2)
    first, five, end = samples[0], at(samples, PLATEAU_FROM), samples[-1]
    peak = max(s.rss for s in samples)
    growth = end.rss - reference.rss
    rate = sum(counts.done.values()) / total if total else 0.0
    print()
    print(f"requests: {sum(counts.done.values())} ({rate:.0f}/s): " + ", ".join(f"{k} {counts.done[k]}" for k in KINDS))
    print(
        f"failed: {sum(counts.failed.values())}"
        + "".join(f"\n  {what}" for what in list(counts.examples.values())[:10])
    )
    print(
        f"server RSS MiB: start {first.rss / MIB:.1f}, {clock(five.elapsed).strip()} {five.rss / MIB:.1f}, "
        f"end ({clock(end.elapsed).strip()}) {end.rss / MIB:.1f}, max {peak / MIB:.1f}"
    )
    print(f"threads {first.threads} -> {end.threads}, open descriptors {first.fds} -> {end.fds}")
    print(f"PostgreSQL MiB (unique set sizes): {first.postgres / MIB:.1f} -> {end.postgres / MIB:.1f}")
    plateau = growth <= args.max_growth_mib * MIB
    print(
        f"growth from {clock(reference.elapsed).strip()} to the end: {growth / MIB:+.1f} MiB "
        f"({'plateau' if plateau else 'NOT a plateau'}; limit {args.max_growth_mib} MiB)"
    )
    return 0 if plateau and not counts.failed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--interval", type=float, default=30, help="seconds between samples")
    parser.add_argument("--mix", default="qido=3,metadata=3,frames=3,stow=1", help="relative weights of the kinds")
    parser.add_argument("--seed-instances", type=int, default=200, help="instances stored before the load")
    parser.add_argument("--rows", type=int, default=64, help="rows and columns of the stored images")
    parser.add_argument("--subjects", type=int, default=8, help="distinct token subjects sharing the load")
    parser.add_argument("--max-growth-mib", type=float, default=24)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a server setting")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="hounsfield-soak-"))
    port = free_port()
    env = dict(os.environ, HOUNSFIELD_DATA=str(folder / "data"), HOUNSFIELD_PORT=str(port))
    env.update(HOUNSFIELD_LOG_LEVEL="warning", HOUNSFIELD_DIMSE="false", HOUNSFIELD_INFERENCE="false")
    env.update(item.split("=", 1) for item in args.env)
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, 120)
        settings = Settings.from_env(env)
        ttl = int(args.minutes * 60) + 3600  # valid for the whole run
        tokens = [issue_token(settings, f"soak-{n}", roles=["admin"], ttl_seconds=ttl) for n in range(args.subjects)]
        status = asyncio.run(soak(args, base, psutil.Process(proc.pid), settings.data_dir / "pg", tokens))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
                print(f"server stopped on SIGTERM (exit status {code}; 143 is the orderly exit)")
            except subprocess.TimeoutExpired:
                proc.kill()
                print("server did not stop within 60 s of SIGTERM: killed")
        shutil.rmtree(folder, ignore_errors=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
