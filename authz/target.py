"""The target of a request: the study, series and instance it names, parsed once and read by both the guard and
the handler.

A route declares how its target is parsed (`authz_opt(..., target=parser)`); the default reads the path
parameters `study`, `series` and `instance`. The guard runs the parser before anything else looks at the
request: a malformed, missing or repeated identifier is a 400 (the parser's `InvalidParameter`) before any
policy decision or data access. The guard keeps the parsed value in the request state, decides on it and
records it in the audit record; the handler serves what `target_of` returns and never reads the identifying
parameters itself, so what is decided, served and audited is one value. (Two parsings of one request can
disagree: a query parser that keeps the first of two `studyUID` values and a binder that keeps the last.)

Identifiers are checked value objects (`dicomweb.uids.UID`, PS3.5 9.1).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection

from authz.errors import Forbidden
from dicomweb import uids

TARGET = "hounsfield.target"
"""Where the guard keeps the parsed target in the request scope's state."""


@dataclass(frozen=True, slots=True)
class Target:
    """The DICOM entities one request names; None where it names none (a search of the whole archive)."""

    study: uids.UID | None = None
    series: uids.UID | None = None
    instance: uids.UID | None = None


NO_TARGET = Target()

TargetParser = Callable[[ASGIConnection[Any, Any, Any, Any]], Awaitable[Target]]
"""Parses a request's target; raises `dicomweb.errors.InvalidParameter` (400) for a malformed request."""


async def path_target(connection: ASGIConnection[Any, Any, Any, Any]) -> Target:
    """The default: the path parameters `study`, `series`, `instance` (each at most once, by construction of a
    path), checked as UIDs."""
    params = connection.path_params
    study, series, instance = params.get("study"), params.get("series"), params.get("instance")
    return Target(
        uids.study_uid(str(study)) if study is not None else None,
        uids.series_uid(str(series)) if series is not None else None,
        uids.instance_uid(str(instance)) if instance is not None else None,
    )


def target_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Target:
    """The target the guard parsed and decided on. A request the guard did not see has none: refused."""
    value = connection.scope.get("state", {}).get(TARGET)
    if not isinstance(value, Target):
        raise Forbidden("no policy decision for this request")
    return value
