"""What the inference handlers and resource hooks use: one `InferenceServices`, a dependency (`inference`) of the
route handlers and, for the resource hooks the guard runs, in the app's state (`inference_services(app)`). The
inference plugin opens it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg

from inference.settings import InferenceSettings
from server.platform.deps import Provided

STATE_KEY = "hounsfield.inference"


@dataclass(frozen=True)
class InferenceServices:
    settings: InferenceSettings
    pool: asyncpg.Pool
    adapters: tuple[str, ...]
    """The model adapters this server can run (none while AI on ingest is off: `HOUNSFIELD_INFERENCE`)."""


def inference_services(app: Any) -> InferenceServices:
    """The services the inference plugin published in `app`'s state (a Litestar app)."""
    services: InferenceServices = app.state[STATE_KEY]
    return services


InferenceDep: TypeAlias = Provided[InferenceServices]
"""`inference`: as route handlers declare it (a Litestar named dependency provided by `inference.plugin`)."""
