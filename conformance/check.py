"""Keep the DICOM Conformance Statement true: its machine-readable tables against the running code.

`hounsfield conformance` prints the differences and exits 1 when there are any; `tests/server/test_conformance.py`
runs the same checks.

- Endpoints: every (method, path) in the statement's endpoint table is a route of the app, and every route
  under `/dicom-web` and `/wado` is in the table (PS3.2 asks a statement to list every service offered).
- Failure reasons: every code in the reasons table is one the ingest defines, and the other way round.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dicomweb.ingest import admission as storeauth
from dicomweb.ingest import reasons

STATEMENT = Path(__file__).with_name("dicom-conformance-statement.md")
DOCUMENTED_PREFIXES = ("/dicom-web", "/wado")
"""Routes under these prefixes must all be documented; others (OpenAPI, health) only when listed."""
_IGNORED_METHODS = frozenset({"OPTIONS", "HEAD"})
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}")

Endpoint = tuple[str, str]


def _table(text: str, name: str) -> list[list[str]]:
    match = re.search(rf"<!-- {name}:begin -->(.*?)<!-- {name}:end -->", text, re.DOTALL)
    if match is None:
        raise ValueError(f"{STATEMENT.name}: no '{name}' table")
    rows = []
    for line in match.group(1).strip().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not cells or set(cells[0]) <= {"-", " ", ":"}:
            continue
        rows.append(cells)
    return rows[1:]  # without the header row


def normalize(path: str) -> str:
    """`/studies/{study:str}` and `/studies/{study}` compare equal: only the parameter names count."""
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", path.rstrip("/") or "/")


def documented_endpoints(statement: Path = STATEMENT) -> set[Endpoint]:
    rows = _table(statement.read_text(encoding="utf-8"), "endpoints")
    return {(row[0].upper(), normalize(row[1].strip("`"))) for row in rows}


def documented_reasons(statement: Path = STATEMENT) -> set[int]:
    rows = _table(statement.read_text(encoding="utf-8"), "reasons")
    return {int(row[0].rstrip("H"), 16) for row in rows}


def app_endpoints(app: Any) -> set[Endpoint]:
    """(method, path) of every HTTP route of a Litestar app."""
    found: set[Endpoint] = set()
    for route in app.routes:
        for method in getattr(route, "methods", ()):
            if method not in _IGNORED_METHODS:
                found.add((str(method), normalize(route.path)))
    return found


def ingest_reasons() -> set[int]:
    """Failure and warning codes the ingest can report (constants of `dicomweb.ingest.reasons`, and the policy's
    refusal of an instance, `dicomweb.ingest.admission`)."""
    names = (
        "PROCESSING_FAILURE",
        "DUPLICATE_REJECTED",
        "OUT_OF_RESOURCES",
        "DATASET_MISMATCH",
        "CANNOT_UNDERSTAND",
        "TRANSFER_SYNTAX_NOT_SUPPORTED",
        "WARNING_COERCION",
    )
    return {int(getattr(reasons, n)) for n in names} | {storeauth.NOT_AUTHORIZED}


def endpoint_problems(app: Any, statement: Path = STATEMENT) -> list[str]:
    documented = documented_endpoints(statement)
    served = app_endpoints(app)
    problems = [f"documented but not served: {m} {p}" for m, p in sorted(documented - served)]
    problems += [
        f"served but not documented: {m} {p}"
        for m, p in sorted(served - documented)
        if p.startswith(DOCUMENTED_PREFIXES)
    ]
    return problems


def reason_problems(statement: Path = STATEMENT) -> list[str]:
    documented = documented_reasons(statement)
    defined = ingest_reasons()
    problems = [f"reason {c:04X}H documented but not defined by the ingest" for c in sorted(documented - defined)]
    problems += [f"reason {c:04X}H used by the ingest but not documented" for c in sorted(defined - documented)]
    return problems


def problems(app: Any) -> list[str]:
    """Every difference between the statement and `app` (a Litestar app) or the ingest's reasons."""
    return endpoint_problems(app) + reason_problems()


def report(found: list[str]) -> int:
    """Print the differences (or that there are none); the exit status: 1 when there are any."""
    for problem in found:
        print(problem)
    if not found:
        print(f"{STATEMENT.name}: endpoints and failure reasons match the code")
    return 1 if found else 0
