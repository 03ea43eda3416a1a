"""What one cell of the authorization matrix requests (`Probe`), and the application's route table as the
matrix reads it (`routes`): every (method, path) with the action and resource kind its guard declares."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tests.support.matrix_oracle import KIND_GROUP

# --- what a request is --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    """The template as Litestar has it: `/dicom-web/studies/{study:str}`."""
    action: str | None
    kind: str | None

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def params(self) -> list[str]:
        return [m.split(":")[0] for m in re.findall(r"\{([^}]+)\}", self.path)]

    @property
    def group(self) -> str:
        return KIND_GROUP.get(self.kind or "", "system")


Object = tuple[str, str | None]
"""(patient, study) of a stored object."""


@dataclass(frozen=True)
class Probe:
    """One cell's request (the identity is the other axis)."""

    route: str
    shape: str
    label: str
    """What the request addresses, for people: `P5 MG`, `DiagnosticReport of P1 v1 (P5)`."""
    method: str
    url: str
    group: str
    action: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    target: Object | None = None
    """A single-resource read: the resource's (patient, study); a denied one must answer 403 or 404."""
    objects: tuple[Object, ...] = ()
    """What a successful binary answer (frames, rendered, bulk data) discloses: the objects the request names."""
    fhir: str | None = None
    """The request as a Bundle entry's `request.url` (FHIR GET requests only)."""
    allowed_statuses: tuple[int, ...] = (403, 404)
    """What a request naming a resource the identity may not see may answer."""


BAD_IDENTIFIERS = (400, 403, 404)
"""What a request with duplicated or empty identifying parameters may answer (besides an answer within what the
identity may see, for searches): a 400 is the intended answer to an ambiguous target."""


def statuses(shape: str) -> tuple[int, ...]:
    return BAD_IDENTIFIERS if shape.startswith(("dup ", "empty ")) else (403, 404)


# --- the route table ----------------------------------------------------------------------------------------


def routes(app: Any) -> list[Route]:
    """Every (method, path) of the application with its declared action and kind. OPTIONS is left out: it is
    Litestar's automatic CORS preflight answer (no token, no body; tests/server/test_route_sweep.py checks it)."""
    found = []
    for route in app.routes:
        for handler in route.route_handlers:
            spec = handler.opt.get("authz")
            action, kind = spec if spec is not None else (None, None)
            for method in sorted(handler.http_methods):
                if method != "OPTIONS":
                    found.append(Route(method, route.path, action, kind))
    return sorted(found, key=lambda r: (r.path, r.method))


def fill(path: str, values: Mapping[str, str]) -> str:
    """A route template with its path parameters replaced (`{study:str}` by values["study"])."""
    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", lambda m: values[m.group(1)], path)
