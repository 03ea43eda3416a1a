"""The two policy engines: regopy in-process (compile once, reload on change, revision, speed, threads) and
OPA over HTTP (against a fake OPA server speaking the Data API: answers, timeouts and errors fail closed)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from authz.decision import PolicyInput
from authz.engine_opa import OpaEngine, revision_from
from authz.engine_rego import PolicyError, RegoEngine
from authz.engines import SHIPPED_POLICIES, open_engine, policy_paths
from authz.errors import PolicyUnavailable
from authz.policy_input import break_glass_session, dicomweb_resource, modalities, policy_input, rfc3339
from authz.principal import Principal
from server.settings import Settings
from tests.support.opa_fake_server import FakeOpaServer

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def request(*roles: str, sub: str = "dr-who", action: str = "search", patient: str | None = None) -> PolicyInput:
    who = Principal(sub=sub, issuer="hounsfield", roles=roles)
    kind = "study"
    resource = dicomweb_resource(kind, patient_id=patient, modalities_in_study=["CT"] if patient else ())
    return policy_input(who, action, resource, "127.0.0.1", now=NOW)  # type: ignore[arg-type]


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A private copy of the shipped policies and data, to edit."""
    folder = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, folder)
    return folder


def edit_data(policy_dir: Path, **changes: object) -> None:
    path = policy_dir / "data.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    # mtime granularity: make sure the edit is seen as one even within the same clock tick
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


# --- regopy -------------------------------------------------------------------------------------------------


def test_revision_is_sha256_of_policies_and_data(policy_dir: Path) -> None:
    engine = RegoEngine(policy_dir, policy_dir / "data.json")
    digest = hashlib.sha256()
    for path in sorted(p for p in policy_dir.glob("*.rego") if not p.name.endswith("_test.rego")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(b"data\0" + (policy_dir / "data.json").read_bytes())
    assert engine.revision == digest.hexdigest()
    # Test modules are not part of the policy.
    (policy_dir / "extra_test.rego").write_text("package x_test\n\ntest_x if true\n")
    assert RegoEngine(policy_dir, policy_dir / "data.json").revision == engine.revision


async def test_decisions_record_the_revision(policy_dir: Path) -> None:
    engine = RegoEngine(policy_dir, policy_dir / "data.json")
    decision = await engine.decide(request("referring"))
    assert decision.allow
    assert decision.revision == engine.revision
    assert decision.constraints["patient_ids"] == ["P1", "P2"]
    assert len(decision.decision_id) == 36


async def test_edited_data_is_picked_up_without_restart(policy_dir: Path) -> None:
    engine = RegoEngine(policy_dir, policy_dir / "data.json", check_interval=0)
    before = engine.revision
    edit_data(policy_dir, care_lists={"dr-who": ["P9"]})
    decision = await engine.decide(request("referring"))
    assert decision.constraints["patient_ids"] == ["P9"]
    assert engine.revision != before
    assert decision.revision == engine.revision


async def test_edited_policy_is_picked_up_without_restart(policy_dir: Path) -> None:
    engine = RegoEngine(policy_dir, policy_dir / "data.json", check_interval=0)
    assert not (await engine.decide(request("auditor", action="read", patient="P1"))).allow
    tables = policy_dir / "tables.rego"
    text = tables.read_text()
    audit = '"audit": ["search", "read", "export"],'
    assert audit in text
    tables.write_text(text.replace(audit, audit + '\n\t\t"imaging": ["read"],'))
    assert (await engine.decide(request("auditor", action="read", patient="P1"))).allow


async def test_changes_are_checked_at_most_once_per_interval(policy_dir: Path) -> None:
    engine = RegoEngine(policy_dir, policy_dir / "data.json", check_interval=3600)
    edit_data(policy_dir, care_lists={"dr-who": ["P9"]})
    assert (await engine.decide(request("referring"))).constraints["patient_ids"] == ["P1", "P2"]
    await engine.reload()  # an explicit reload always reads the files
    assert (await engine.decide(request("referring"))).constraints["patient_ids"] == ["P9"]


async def test_a_broken_edit_keeps_the_last_good_policy(policy_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = RegoEngine(policy_dir, policy_dir / "data.json", check_interval=0)
    good = engine.revision
    (policy_dir / "broken.rego").write_text("package hounsfield.authz\n\nthis is not rego {\n")
    with caplog.at_level(logging.ERROR, logger="authz.engine_rego"):
        decision = await engine.decide(request("radiologist"))
    assert decision.allow and decision.revision == good
    assert "do not load" in caplog.text
    with pytest.raises(PolicyError):
        await engine.reload()
    assert engine.revision == good
    # Fixed: loaded again.
    (policy_dir / "broken.rego").unlink()
    edit_data(policy_dir, care_lists={})
    assert (await engine.decide(request("referring"))).constraints["patient_ids"] == []


def test_constant_tables_must_be_constant(policy_dir: Path) -> None:
    tables = policy_dir / "tables.rego"
    tables.write_text(tables.read_text() + "\nlimited := input.subject.roles\n")
    with pytest.raises(PolicyError, match="must not read input"):
        RegoEngine(policy_dir, None)


def test_bad_policies_refuse_to_start(tmp_path: Path, policy_dir: Path) -> None:
    with pytest.raises(PolicyError, match="no Rego policies"):
        RegoEngine(tmp_path / "empty", None)
    (policy_dir / "data.json").write_text("[1, 2]")
    with pytest.raises(PolicyError, match="JSON object"):
        RegoEngine(policy_dir, policy_dir / "data.json")
    (policy_dir / "data.json").write_text("{nope")
    with pytest.raises(PolicyError, match="not JSON"):
        RegoEngine(policy_dir, policy_dir / "data.json")
    with pytest.raises(PolicyError, match="cannot read"):
        RegoEngine(policy_dir, policy_dir / "missing.json")
    (policy_dir / "broken.rego").write_text("package hounsfield.authz\n\nallow if {\n")
    with pytest.raises(PolicyError, match="does not compile"):
        RegoEngine(policy_dir, None)


async def test_no_data_means_no_care_lists(policy_dir: Path) -> None:
    engine = RegoEngine(policy_dir, None)
    assert (await engine.decide(request("referring"))).constraints == {"patient_ids": []}
    assert (await engine.decide(request("radiologist", action="read", patient="P1"))).allow


async def test_a_policy_error_fails_closed(policy_dir: Path) -> None:
    # Two values for one complete rule is an evaluation error in Rego: the engine says it cannot decide.
    (policy_dir / "conflict.rego").write_text('package hounsfield.authz\n\naudit_level := "a"\n\naudit_level := "b"\n')
    decision_rule = policy_dir / "authz.rego"
    decision_rule.write_text(
        decision_rule.read_text().replace(
            '"constraints": constraints,\n}', '"constraints": constraints,\n\t"level": audit_level,\n}'
        )
    )
    engine = RegoEngine(policy_dir, policy_dir / "data.json")
    with pytest.raises(PolicyUnavailable):
        await engine.decide(request("radiologist"))


def test_threads_share_the_engine_safely() -> None:
    engine = RegoEngine(SHIPPED_POLICIES, SHIPPED_POLICIES / "data.json")
    inputs = [request("referring").to_dict(), request("researcher").to_dict(), request("auditor").to_dict()]
    expected = [engine.evaluate(i) for i in inputs]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: engine.evaluate(inputs[n % 3]), range(600)))
    assert all(r == expected[n % 3] for n, r in enumerate(results))


async def test_decision_p50(capsys: pytest.CaptureFixture[str]) -> None:
    """The per-decision cost on the event loop (input conversion + evaluation + result), reported here."""
    engine = RegoEngine(SHIPPED_POLICIES, SHIPPED_POLICIES / "data.json")
    samples = {
        "referring search": request("referring"),
        "radiologist read": request("radiologist", action="read", patient="P1"),
    }
    for name, policy_request in samples.items():
        for _ in range(50):
            await engine.decide(policy_request)
        times = []
        for _ in range(500):
            start = time.perf_counter()
            await engine.decide(policy_request)
            times.append(time.perf_counter() - start)
        p50 = statistics.median(times) * 1000
        with capsys.disabled():
            print(f"\nregopy decision p50 ({name}): {p50:.3f} ms")
        assert p50 < 10, "a decision should take about a millisecond"


# --- OPA over HTTP ------------------------------------------------------------------------------------------


@pytest.fixture
async def opa() -> AsyncIterator[FakeOpaServer]:
    server = FakeOpaServer(SHIPPED_POLICIES, SHIPPED_POLICIES / "data.json")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def opa_engine(opa: FakeOpaServer) -> AsyncIterator[OpaEngine]:
    engine = OpaEngine(opa.url, timeout=0.5, revision="configured")
    yield engine
    await engine.close()


def bound(*roles: str, patient: str, action: str = "search", target: str | None = None) -> PolicyInput:
    """A request of a token with a `patient` claim and no scopes."""
    who = Principal(sub="app", issuer="hounsfield", roles=roles, patient=patient)
    resource = dicomweb_resource("study", patient_id=target, modalities_in_study=["CT"] if target else ())
    return policy_input(who, action, resource, "127.0.0.1", now=NOW)  # type: ignore[arg-type]


def glass(policy_request: PolicyInput, patient: str, study: str | None = None) -> PolicyInput:
    """The request with an open break-glass session for `patient` (and `study`)."""
    session = break_glass_session("bg-1", "unconscious in ED", NOW + dt.timedelta(hours=1), patient, study)
    return dataclasses.replace(policy_request, context=dataclasses.replace(policy_request.context, break_glass=session))


async def test_opa_gives_the_same_decisions(opa: FakeOpaServer, opa_engine: OpaEngine) -> None:
    local = RegoEngine(SHIPPED_POLICIES, SHIPPED_POLICIES / "data.json")
    grants = []
    for policy_request in [
        request("referring"),
        request("researcher"),
        request("referring", action="read", patient="P7"),
        request("auditor", action="read", patient="P1"),
        request("admin", action="delete", patient="P1"),
        bound("radiologist", patient="P7"),
        bound("radiologist", patient="P7", action="read", target="P8"),
        glass(request("referring"), "P5"),
        glass(request("referring"), "P5", "1.2.5"),
        glass(request("referring", action="read", patient="P5"), "P5"),
        glass(request("referring", action="read", patient="P6"), "P5"),
    ]:
        remote = await opa_engine.decide(policy_request)
        here = await local.decide(policy_request)
        assert (remote.allow, remote.reasons, remote.constraints, remote.obligations) == (
            here.allow,
            here.reasons,
            here.constraints,
            here.obligations,
        )
        grants.append(remote.constraints.get("granted"))
    assert {"patient_id": "P5", "study_uid": "1.2.5"} in grants  # the nested constraint survives the wire
    sent = opa.requests[0]
    assert sent["path"] == "hounsfield/authz/decision"
    assert sent["query"] == {"provenance": "true"}
    assert sent["body"] == {"input": request("referring").to_dict()}


async def test_opa_revision_and_decision_id(opa: FakeOpaServer, opa_engine: OpaEngine) -> None:
    assert opa_engine.revision == "configured"
    decision = await opa_engine.decide(request("radiologist"))
    assert decision.revision == opa_engine.revision == "opa:authz=rev-1"
    assert (
        decision.decision_id and decision.decision_id != (await opa_engine.decide(request("radiologist"))).decision_id
    )
    assert revision_from({"provenance": {"version": "1.0"}}) is None
    assert revision_from({"provenance": {"bundles": {"b": {"revision": "7"}, "a": {}}}}) == "opa:a,b=7"


@pytest.mark.parametrize("mode", ["slow", "error", "not-json"])
async def test_opa_failures_fail_closed(opa: FakeOpaServer, opa_engine: OpaEngine, mode: str) -> None:
    opa.mode = mode
    start = time.monotonic()
    with pytest.raises(PolicyUnavailable):
        await opa_engine.decide(request("radiologist"))
    assert time.monotonic() - start < 2.0, "the timeout bounds retries too"
    opa.mode = "ok"
    assert (await opa_engine.decide(request("radiologist"))).allow, "and it recovers"


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("malformed", "policy returned no decision"),
        ("undefined", "policy returned no decision"),
        ("not-object", "OPA answered with no decision"),
    ],
)
async def test_opa_malformed_answers_deny(opa: FakeOpaServer, opa_engine: OpaEngine, mode: str, reason: str) -> None:
    opa.mode = mode
    decision = await opa_engine.decide(request("admin"))
    assert not decision.allow
    assert decision.reasons == (reason,)


async def test_opa_unreachable_fails_closed(opa: FakeOpaServer) -> None:
    url = opa.url
    await opa.stop()
    engine = OpaEngine(url, timeout=0.5, retries=0)
    try:
        with pytest.raises(PolicyUnavailable, match="unreachable"):
            await engine.decide(request("admin"))
    finally:
        await engine.close()


async def test_opa_behind_a_path_prefix(opa: FakeOpaServer) -> None:
    engine = OpaEngine(opa.url + "/opa/", timeout=0.5)
    wrong = OpaEngine(opa.url + "/elsewhere", timeout=0.5)
    try:
        assert (await engine.decide(request("admin"))).allow
        with pytest.raises(PolicyUnavailable, match="404"):
            await wrong.decide(request("admin"))
    finally:
        await engine.close()
        await wrong.close()
    assert OpaEngine("https://opa.example:8443/").revision == "opa:https://opa.example:8443"
    with pytest.raises(ValueError):
        OpaEngine("opa:8181")


# --- choosing the engine ------------------------------------------------------------------------------------


async def test_open_engine_by_settings(tmp_path: Path) -> None:
    settings = Settings.from_env({})
    engine = open_engine(settings)
    assert isinstance(engine, RegoEngine)
    assert policy_paths(settings) == (SHIPPED_POLICIES, SHIPPED_POLICIES / "data.json")
    remote = open_engine(settings.with_overrides(opa_url="http://127.0.0.1:8181", opa_timeout_seconds=0.3))
    assert isinstance(remote, OpaEngine) and remote.timeout == 0.3
    await remote.close()
    own = tmp_path / "own"
    shutil.copytree(SHIPPED_POLICIES, own)
    (own / "data.json").unlink()
    assert policy_paths(settings.with_overrides(policy_dir=own)) == (own, None)
    data = tmp_path / "site.json"
    data.write_text("{}")
    assert policy_paths(settings.with_overrides(policy_dir=own, policy_data_file=data)) == (own, data)


# --- the input document -------------------------------------------------------------------------------------


def test_policy_input_document() -> None:
    who = Principal(sub="dr-who", issuer="hounsfield", roles=("referring",), scopes=("user/*.rs",), patient=None)
    resource = dicomweb_resource(
        "series", patient_id="", study_uid="1.2", series_uid="1.3", modalities_in_study=[" mr", "CT", "MR", None]
    )
    document = policy_input(who, "read", resource, "10.1.2.3", {"id": "bg"}, now=NOW).to_dict()
    assert document["subject"]["roles"] == ["referring"]
    assert document["action"] == "read"
    assert document["resource"] == {
        "kind": "series",
        "patient_id": None,
        "study_uid": "1.2",
        "series_uid": "1.3",
        "instance_uid": None,
        "modalities": ["CT", "MR"],
    }
    assert document["context"] == {
        "time": "2026-03-01T12:00:00.000Z",
        "client_ip": "10.1.2.3",
        "break_glass": {"id": "bg"},
        "channel": "http",
    }
    assert rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5, 678000)) == "2026-01-02T03:04:05.678Z"
    assert (
        rfc3339(dt.datetime(2026, 1, 2, 4, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1))))
        == "2026-01-02T03:04:05.000Z"
    )
    assert modalities(["", "sr"]) == ("SR",)
    with pytest.raises(ValueError):
        dicomweb_resource("galaxy")
    with pytest.raises(ValueError):
        policy_input(who, "frobnicate", resource)  # type: ignore[arg-type]
    assert asyncio.iscoroutinefunction(RegoEngine.decide)
