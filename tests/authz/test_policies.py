"""The shipped Rego policies: their unit tests (authz/policies/*_test.rego) run here through regopy, and the
case table of cases_test.rego runs through the in-process engine, which is how production evaluates them.

Why not `opa test`-style `test_*` rules with `with input as ...` for every case: rego-cpp 1.5.2 crashes on
`with input as` (a segfault as soon as the policy calls a built-in), takes seconds and gigabytes to compile
`with`, and renders some strings passed through `with` wrongly. So the cases are data, evaluated here with
the input set as in production; opa_test.rego runs the same table under real OPA (`opa test authz/policies`).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from authz.decision import Decision, Resource
from authz.engine_rego import RegoEngine, policy_files
from authz.engines import SHIPPED_POLICIES
from authz.policy_input import break_glass_session, dicomweb_resource, policy_input
from authz.principal import Principal
from authz.rego_native import rego_shared, regopy

OPA_ONLY = {"opa_test.rego"}
"""Test modules regopy cannot load (they use `with input as`)."""
CONSTRAINT_KEYS = {"patient_ids", "patient_ids_excluded", "modalities_excluded", "granted"}
"""The only constraints the policy may emit: the search code translates exactly these into SQL."""
LIST_KEYS = CONSTRAINT_KEYS - {"granted"}
TEST_RULE = re.compile(r"^(test_\w+)\s+(?:if|:=|\{)", re.MULTILINE)
PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)


def rego_test_modules() -> list[Path]:
    return sorted(p for p in SHIPPED_POLICIES.glob("*_test.rego") if p.name not in OPA_ONLY)


def rego_test_rules() -> list[tuple[str, str]]:
    """(package, rule) of every `test_*` rule in the regopy-runnable test modules."""
    rules = []
    for path in rego_test_modules():
        text = path.read_text(encoding="utf-8")
        package = PACKAGE.search(text)
        assert package, f"{path.name} has no package"
        rules += [(package.group(1), name) for name in TEST_RULE.findall(text)]
    return rules


def interpreter_with_tests() -> regopy.Interpreter:
    rego = regopy.Interpreter()
    for path in [*policy_files(SHIPPED_POLICIES), *rego_test_modules()]:
        rego.add_module(path.name, path.read_text(encoding="utf-8"))
    return rego


def query(rego: regopy.Interpreter, ref: str) -> Any:
    """The value of `ref` (None when undefined). Not `Interpreter.query`: regopy's Output fails on an error."""
    output = rego_shared.rego_query(rego._impl, ref)
    try:
        text = str(rego_shared.rego_output_string(output))
    finally:
        rego_shared.rego_free_output(output)
    assert not text.startswith("(error"), text[:2000]
    return None if text == "undefined" else json.loads(text)["expressions"][0]


@functools.cache
def rego_test_package() -> dict[str, Any]:
    """`data.hounsfield.authz_test`: the case table and the fixture data."""
    value = query(interpreter_with_tests(), "data.hounsfield.authz_test")
    assert isinstance(value, dict)
    return value


def cases() -> dict[str, dict[str, Any]]:
    return dict(rego_test_package()["cases"])


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> RegoEngine:
    """The shipped policies with the tests' fixture data (not the editable example data.json)."""
    data = tmp_path_factory.mktemp("policy") / "fixture.json"
    data.write_text(json.dumps(rego_test_package()["fixture_data"]))
    return RegoEngine(SHIPPED_POLICIES, data)


# --- the Rego unit tests ------------------------------------------------------------------------------------


def test_test_rules_found() -> None:
    assert len(rego_test_rules()) >= 5
    assert len(cases()) >= 60


@pytest.mark.parametrize(("package", "rule"), rego_test_rules(), ids=[r for _, r in rego_test_rules()])
def test_rego_unit_test(package: str, rule: str) -> None:
    assert query(interpreter_with_tests(), f"data.{package}.{rule}") is True


@pytest.mark.parametrize("name", sorted(cases()))
def test_policy_case(engine: RegoEngine, name: str) -> None:
    case = cases()[name]
    result = engine.evaluate(case["input"])
    assert isinstance(result, dict)
    assert result["allow"] is case["allow"], result
    for key in ("reasons", "constraints", "obligations"):
        if key in case:
            assert result[key] == case[key], f"{key}: {result}"
    # What holds for every decision:
    assert set(result["constraints"]) <= CONSTRAINT_KEYS
    lists = [v for k, v in result["constraints"].items() if k in LIST_KEYS]
    assert all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists)
    if "granted" in result["constraints"]:
        granted = result["constraints"]["granted"]
        assert set(granted) <= {"patient_id", "study_uid"} and all(isinstance(v, str) for v in granted.values())
        assert result["obligations"] == {"audit": "detailed", "break_glass": True}, "a grant is always flagged"
    if result["allow"]:
        assert result["obligations"]["audit"] in {"standard", "detailed"}
        assert result["reasons"]
    else:
        assert result["reasons"], "a denial always says why"
        assert result["obligations"] == {"audit": "detailed"}
        assert result["constraints"] == {}
    if case["input"].get("action") not in {"search", "export"}:
        assert result["constraints"] == {}, "constraints are only for collections"


def test_opa_test_covers_the_same_cases() -> None:
    text = (SHIPPED_POLICIES / "opa_test.rego").read_text(encoding="utf-8")
    assert "every _, c in cases" in text
    assert "package hounsfield.authz_test" in text


def test_shipped_data_is_the_example() -> None:
    data = json.loads((SHIPPED_POLICIES / "data.json").read_text())
    assert data["care_lists"]["dr-who"] == ["P1", "P2"]
    assert data["research_opt_out"] == ["P3"]
    assert data["restricted_modalities"]["MG"] == ["radiologist", "admin"]
    assert set(data["break_glass_roles"]) == {"referring", "radiologist"}


# --- realistic inputs, built the way the server builds them -------------------------------------------------

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def principal(*roles: str, sub: str = "dr-who", scopes: tuple[str, ...] = (), patient: str | None = None) -> Principal:
    return Principal(
        sub=sub,
        issuer="hounsfield",
        roles=roles,
        scopes=scopes,
        patient=patient,
        client_id="viewer",
        purpose_of_use=("TREAT",),
    )


def study(patient: str | None, *modalities: str) -> Resource:
    return dicomweb_resource(
        "study", patient_id=patient, study_uid="1.2.840.1", modalities_in_study=modalities or ("CT",)
    )


def search(kind: str = "study") -> Resource:
    return dicomweb_resource(kind)


async def decide(engine: RegoEngine, who: Principal, action: Any, resource: Resource, glass: bool = False) -> Decision:
    """`glass`: the subject has an open break-glass session for patient P5."""
    session = break_glass_session("bg-7", "unconscious in ED", NOW + dt.timedelta(hours=1), "P5") if glass else None
    return await engine.decide(policy_input(who, action, resource, "10.0.0.7", session, now=NOW))


REALISTIC: list[tuple[str, Principal, str, Resource, bool, bool, dict[str, Any], str | None]] = [
    # name, principal, action, resource, break-glass, allow, constraints, a reason
    ("radiologist read", principal("radiologist"), "read", study("P9", "MR"), False, True, {}, None),
    (
        "radiologist delete",
        principal("radiologist"),
        "delete",
        study("P9"),
        False,
        False,
        {},
        "no role of radiologist may delete study",
    ),
    ("referring read in care", principal("referring"), "read", study("P1"), False, True, {}, None),
    (
        "referring read outside",
        principal("referring"),
        "read",
        study("P5"),
        False,
        False,
        {},
        "patient P5 is not in the care list of dr-who",
    ),
    (
        "referring search",
        principal("referring"),
        "search",
        search(),
        False,
        True,
        {"patient_ids": ["P1", "P2"], "modalities_excluded": ["MG"]},
        None,
    ),
    ("technologist store", principal("technologist"), "create", dicomweb_resource("study"), False, True, {}, None),
    (
        "technologist MG",
        principal("technologist"),
        "read",
        study("P1", "MG", "ct"),
        False,
        False,
        {},
        "modality MG is restricted to roles admin, radiologist",
    ),
    (
        "ai-service read",
        principal("ai-service"),
        "read",
        dicomweb_resource(
            "frames", patient_id="P2", study_uid="1.2", series_uid="1.3", instance_uid="1.4", modalities_in_study=["CT"]
        ),
        False,
        True,
        {},
        None,
    ),
    (
        "ai-service report",
        principal("ai-service"),
        "create",
        dicomweb_resource("DiagnosticReport", patient_id="P2"),
        False,
        True,
        {},
        None,
    ),
    ("auditor audit", principal("auditor"), "search", dicomweb_resource("AuditEvent"), False, True, {}, None),
    (
        "auditor images",
        principal("auditor"),
        "read",
        study("P1"),
        False,
        False,
        {},
        "no role of auditor may read study",
    ),
    ("admin delete", principal("admin"), "delete", study("P3", "MG"), False, True, {}, None),
    ("researcher read", principal("researcher"), "read", study("P1"), False, True, {}, None),
    (
        "researcher opted out",
        principal("researcher"),
        "read",
        study("P3"),
        False,
        False,
        {},
        "patient P3 opted out of research use",
    ),
    (
        "researcher search",
        principal("researcher"),
        "search",
        search("series"),
        False,
        True,
        {"patient_ids_excluded": ["P3"], "modalities_excluded": ["MG"]},
        None,
    ),
    (
        "patient scope search",
        principal("radiologist", scopes=("patient/ImagingStudy.rs",), patient="P2"),
        "search",
        search("instance"),
        False,
        True,
        {"patient_ids": ["P2"]},
        None,
    ),
    (
        "patient scope other",
        principal("radiologist", scopes=("patient/ImagingStudy.rs",), patient="P2"),
        "read",
        study("P1"),
        False,
        False,
        {},
        "patient P1 is outside the token's patient context",
    ),
    (
        "scope lacks read",
        principal("radiologist", scopes=("user/ImagingStudy.s",)),
        "read",
        study("P1"),
        False,
        False,
        {},
        "token scopes do not permit read on ImagingStudy",
    ),
    (
        "system scope",
        principal("technologist", scopes=("system/ImagingStudy.c",)),
        "create",
        dicomweb_resource("study"),
        False,
        True,
        {},
        None,
    ),
    ("break-glass read", principal("referring"), "read", study("P5"), True, True, {}, "break-glass"),
    (
        "break-glass search",
        principal("referring"),
        "search",
        search(),
        True,
        True,
        {"patient_ids": ["P1", "P2"], "modalities_excluded": ["MG"], "granted": {"patient_id": "P5"}},
        "break-glass",
    ),
    ("break-glass other patient", principal("referring"), "read", study("P6"), True, False, {}, None),
    (
        "patient claim without scopes",
        principal("radiologist", patient="P2"),
        "search",
        search("series"),
        False,
        True,
        {"patient_ids": ["P2"]},
        None,
    ),
    (
        "patient claim other patient",
        principal("radiologist", patient="P2"),
        "read",
        study("P1"),
        False,
        False,
        {},
        None,
    ),
    (
        "break-glass not eligible",
        principal("researcher"),
        "read",
        study("P3"),
        True,
        False,
        {},
        "patient P3 opted out of research use",
    ),
]


@pytest.mark.parametrize(
    ("who", "action", "resource", "glass", "allow", "constraints", "reason"),
    [r[1:] for r in REALISTIC],
    ids=[r[0] for r in REALISTIC],
)
async def test_realistic_decision(
    engine: RegoEngine,
    who: Principal,
    action: str,
    resource: Resource,
    glass: bool,
    allow: bool,
    constraints: dict[str, Any],
    reason: str | None,
) -> None:
    decision = await decide(engine, who, action, resource, glass)
    assert decision.allow is allow, decision
    assert decision.constraints == constraints
    if reason is not None:
        assert reason in decision.reasons
    assert decision.revision == engine.revision
    if glass and allow:
        assert decision.obligations == {"audit": "detailed", "break_glass": True}
    elif allow:
        assert decision.obligations == {"audit": "standard"}
    else:
        assert decision.obligations == {"audit": "detailed"}


async def test_shipped_data_drives_the_default_engine() -> None:
    engine = RegoEngine(SHIPPED_POLICIES, SHIPPED_POLICIES / "data.json")
    decision = await decide(engine, principal("referring", sub="dr-house"), "search", search())
    assert decision.constraints["patient_ids"] == ["P2", "P4"]
