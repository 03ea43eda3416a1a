"""The model registry: which models exist, in which versions, what input each takes, and whether it
runs (active: runs and publishes; shadow: runs and records only; retired: does not run).

Values are checked once at the edge (house style 2): `parse_model` turns a registration document into a `Model`
or raises `InvalidModel` naming the field. Versions of one name coexist; at most one is active: promoting a
version retires the active one (`promote`). A document without `status` registers the version as `shadow`
(`DEFAULT_STATUS`): a new version runs and is compared before it publishes anything.

The registrations of the models this server ships (`inference.models`) are package data in `registrations/`
(`shipped_documents`; `hounsfield models register --shipped`), each as `shadow`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg

from inference.errors import InvalidModel, ModelExists, ModelNotFound
from server.platform.db import Connection, Queries

SQL = Queries(Path(__file__).with_name("registry.sql"))

Status = Literal["active", "shadow", "retired"]
STATUSES: tuple[Status, ...] = ("active", "shadow", "retired")
DEFAULT_STATUS: Status = "shadow"
"""The status of a registration that names none: it runs and records, and publishes nothing."""
SHIPPED = Path(__file__).with_name("registrations")
"""The registration documents of the shipped models (one JSON object per file)."""
OUTPUTS = ("SEG", "SR", "DiagnosticReport")
BACKENDS = ("in-process", "ray")
"""`backend.backend` of a registration: pins where the model runs; absent, `HOUNSFIELD_INFERENCE_BACKEND` decides
(a light classical model can stay in process, next to the server, while the heavy ones run in Ray Serve)."""
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
UID = re.compile(r"[0-9]+(\.[0-9]+)*")
SELECTOR_KEYS = frozenset({"modality", "sop_class", "body_part", "series_description", "min_instances"})


@dataclass(frozen=True, slots=True)
class SeriesFacts:
    """What the index knows about a series, as a selector matches it."""

    study_uid: str
    series_uid: str
    modality: str | None
    body_part: str | None
    series_description: str | None
    sop_classes: frozenset[str]
    instances: int
    patient_id: str | None = None


@dataclass(frozen=True, slots=True)
class Selector:
    """Which series a model takes: every given condition must hold. `modality`, `sop_class`, `body_part` are
    allow-lists (DICOM Modality PS3.3 C.7.3.1.1.1, SOP Class UIDs, Body Part Examined, case-insensitive);
    `series_description` a regular expression searched case-insensitively; `min_instances` a minimum count."""

    modality: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    series_description: str | None = None
    min_instances: int = 1

    def matches(self, facts: SeriesFacts) -> bool:
        return self.mismatch(facts) is None

    def mismatch(self, facts: SeriesFacts) -> str | None:
        """Why the series is not an input of this selector (the first condition that fails), None when it is."""
        if self.modality and (facts.modality or "").upper() not in self.modality:
            return f"modality {facts.modality or '(none)'} is not one of {', '.join(self.modality)}"
        if self.sop_class and not facts.sop_classes & set(self.sop_class):
            return f"no instance has a SOP class of {', '.join(self.sop_class)}"
        if self.body_part and (facts.body_part or "").upper() not in self.body_part:
            return f"body part {facts.body_part or '(none)'} is not one of {', '.join(self.body_part)}"
        if self.series_description is not None and not re.search(
            self.series_description, facts.series_description or "", re.IGNORECASE
        ):
            return f"the series description does not match {self.series_description!r}"
        if facts.instances < self.min_instances:
            return f"{facts.instances} instances, fewer than {self.min_instances}"
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"min_instances": self.min_instances}
        if self.modality:
            out["modality"] = list(self.modality)
        if self.sop_class:
            out["sop_class"] = list(self.sop_class)
        if self.body_part:
            out["body_part"] = list(self.body_part)
        if self.series_description is not None:
            out["series_description"] = self.series_description
        return out


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    version: str
    task: str
    selector: Selector
    outputs: tuple[str, ...]
    status: Status
    backend: dict[str, Any] = field(default_factory=dict)
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    @property
    def adapter(self) -> str:
        return str(self.backend.get("adapter", ""))

    def runs_in(self, default: str) -> str:
        """Where this model runs: `backend.backend` when the registration pins it (`in-process` or `ray`), else
        the server's `HOUNSFIELD_INFERENCE_BACKEND` (`default`: `inprocess` or `ray`); `inprocess` or `ray`."""
        pinned = self.backend.get("backend")
        if pinned == "in-process":
            return "inprocess"
        return "ray" if pinned == "ray" else default

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "selector": self.selector.to_json(),
            "outputs": list(self.outputs),
            "status": self.status,
            "backend": dict(self.backend),
            "created": self.created_at.isoformat() if self.created_at else None,
            "updated": self.updated_at.isoformat() if self.updated_at else None,
        }


def _strings(raw: Any, name: str, *, upper: bool = False) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
        raise InvalidModel(f"selector.{name}: expected a string or a list of non-empty strings")
    return tuple(i.strip().upper() if upper else i.strip() for i in items)


def parse_selector(raw: Any) -> Selector:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidModel("selector: expected an object")
    unknown = set(raw) - SELECTOR_KEYS
    if unknown:
        raise InvalidModel(f"selector: unknown keys {', '.join(sorted(unknown))}")
    sop_classes = _strings(raw.get("sop_class"), "sop_class")
    bad = [u for u in sop_classes if len(u) > 64 or not UID.fullmatch(u)]
    if bad:
        raise InvalidModel(f"selector.sop_class: {bad[0]!r} is not a UID")
    pattern = raw.get("series_description")
    if pattern is not None:
        if not isinstance(pattern, str) or len(pattern) > 256:
            raise InvalidModel("selector.series_description: expected a regular expression (at most 256 characters)")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidModel(f"selector.series_description: not a regular expression: {exc}") from None
    minimum = raw.get("min_instances", 1)
    if not isinstance(minimum, int) or isinstance(minimum, bool) or not 1 <= minimum <= 100_000:
        raise InvalidModel("selector.min_instances: expected an integer 1..100000")
    return Selector(
        modality=_strings(raw.get("modality"), "modality", upper=True),
        sop_class=sop_classes,
        body_part=_strings(raw.get("body_part"), "body_part", upper=True),
        series_description=pattern,
        min_instances=minimum,
    )


def _text(raw: Mapping[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidModel(f"{key}: expected a value matching {pattern.pattern}")
    return value


def parse_model(raw: Any, adapters: Collection[str]) -> Model:
    """A registration document (`POST /models`, `hounsfield models register`) as a checked `Model`. The
    adapter named in `backend.adapter` must be one this server knows (`adapters`)."""
    if not isinstance(raw, Mapping):
        raise InvalidModel("expected a JSON object")
    task = raw.get("task")
    if not isinstance(task, str) or not task.strip() or len(task) > 128:
        raise InvalidModel("task: expected a short description of what the model does")
    outputs = _strings(raw.get("outputs") or [], "outputs")
    bad = [o for o in outputs if o not in OUTPUTS]
    if bad:
        raise InvalidModel(f"outputs: {bad[0]!r} is not one of {', '.join(OUTPUTS)}")
    status = raw.get("status", DEFAULT_STATUS)
    if status not in STATUSES:
        raise InvalidModel(f"status: expected one of {', '.join(STATUSES)}")
    backend = raw.get("backend") or {}
    if not isinstance(backend, Mapping):
        raise InvalidModel("backend: expected an object")
    adapter = backend.get("adapter")
    if adapter not in adapters:
        raise InvalidModel(f"backend.adapter: expected one of {', '.join(sorted(adapters))}, got {adapter!r}")
    kind = backend.get("backend")
    if kind is not None and kind not in BACKENDS:
        raise InvalidModel(f"backend.backend: expected one of {', '.join(BACKENDS)} (or none: the server's default)")
    return Model(
        name=_text(raw, "name", NAME),
        version=_text(raw, "version", VERSION),
        task=task.strip(),
        selector=parse_selector(raw.get("selector")),
        outputs=outputs,
        status=status,
        backend=dict(backend),
    )


def shipped_documents() -> list[tuple[str, Any]]:
    """(file name, parsed JSON) of each shipped registration, by file name."""
    found = []
    for path in sorted(SHIPPED.glob("*.json")):
        try:
            found.append((path.name, json.loads(path.read_text(encoding="utf-8"))))
        except ValueError as exc:
            raise InvalidModel(f"{path.name}: not JSON: {exc}") from None
    return found


def _json(value: Any) -> dict[str, Any]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return dict(loaded) if isinstance(loaded, Mapping) else {}


def model_of(row: asyncpg.Record) -> Model:
    return Model(
        name=row["name"],
        version=row["version"],
        task=row["task"],
        selector=parse_selector(_json(row["selector"])),
        outputs=tuple(row["outputs"] or ()),
        status=row["status"],
        backend=_json(row["backend"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def register(conn: Connection, model: Model) -> Model:
    """Store a new version; an existing (name, version) is a conflict (versions are immutable)."""
    async with conn.transaction():
        await conn.execute(SQL["lock_name"], model.name)
        if model.status == "active":
            await conn.execute(SQL["retire_other_active"], model.name, model.version)
        row = await conn.fetchrow(
            SQL["insert_model"],
            model.name,
            model.version,
            model.task,
            json.dumps(model.selector.to_json()),
            list(model.outputs),
            model.status,
            json.dumps(model.backend),
        )
        if row is None:  # raised inside the transaction: the retirement above is rolled back
            raise ModelExists(f"model {model.key} is registered already; register a new version")
    return model_of(row)


async def list_models(conn: Connection, name: str | None = None, status: str | None = None) -> list[Model]:
    return [model_of(r) for r in await conn.fetch(SQL["list_models"], name, status)]


async def get(conn: Connection, name: str, version: str) -> Model:
    row = await conn.fetchrow(SQL["get_model"], name, version)
    if row is None:
        raise ModelNotFound(f"no model {name}/{version}")
    return model_of(row)


async def running(conn: Connection) -> list[Model]:
    return [model_of(r) for r in await conn.fetch(SQL["running_models"])]


async def set_status(conn: Connection, name: str, version: str, status: Status) -> Model:
    """promote (active; the previously active version of the name is retired), shadow, or retire."""
    if status not in STATUSES:
        raise InvalidModel(f"status: expected one of {', '.join(STATUSES)}")
    async with conn.transaction():
        await conn.execute(SQL["lock_name"], name)
        if status == "active":
            await conn.execute(SQL["retire_other_active"], name, version)
        row = await conn.fetchrow(SQL["set_status"], name, version, status)
        if row is None:
            raise ModelNotFound(f"no model {name}/{version}")
    return model_of(row)
