"""The decision cache in front of the real Rego engine: repeated questions are answered once per TTL, the
time of the request is not part of the question, and a changed policy revision asks again."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

from authz.decision import Decision, PolicyInput, Resource
from authz.decision_cache import CachingEngine
from authz.engine_rego import RegoEngine
from authz.engines import SHIPPED_POLICIES
from authz.policy_input import policy_input
from authz.principal import Principal
from server.settings import Settings


class Counting:
    """Counts the questions that reach the real engine."""

    def __init__(self, engine: RegoEngine) -> None:
        self.engine = engine
        self.calls = 0

    @property
    def revision(self) -> str:
        return self.engine.revision

    @property
    def decision_scope(self) -> Any:
        return self.engine.decision_scope

    async def decide(self, policy_input: PolicyInput) -> Decision:
        self.calls += 1
        return await self.engine.decide(policy_input)

    async def reload(self) -> None:
        await self.engine.reload()

    async def close(self) -> None:
        await self.engine.close()


def test_cache(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    data_file = policies / "data.json"
    counting = Counting(RegoEngine(policies, data_file, check_interval=0))
    engine = CachingEngine(counting, ttl=60)
    who = Principal(sub="dr-who", issuer="hounsfield", roles=("referring",))
    study = Resource(kind="study", patient_id="P4", study_uid="1.2.3")

    def ask(minute: int) -> PolicyInput:
        return policy_input(who, "read", study, "127.0.0.1", now=dt.datetime(2026, 1, 1, 12, minute, tzinfo=dt.UTC))

    async def run() -> None:
        first = await engine.decide(ask(0))
        again = await engine.decide(ask(1))  # another time: the same question
        assert not first.allow and again is first
        assert counting.calls == 1
        # Put P4 on dr-who's care list: a new revision, so the cache asks the engine again.
        data = json.loads(data_file.read_text())
        data["care_lists"]["dr-who"].append("P4")
        data_file.write_text(json.dumps(data))
        await engine.reload()
        allowed = await engine.decide(ask(2))
        assert allowed.allow and counting.calls == 2
        short = CachingEngine(counting, ttl=0)
        await short.decide(ask(3))
        assert counting.calls == 3
        await engine.close()

    asyncio.run(run())


async def test_cache_holds_at_most_its_entries() -> None:
    """However many distinct questions arrive, the cache keeps the `entries` most recently used."""
    counting = Counting(RegoEngine(SHIPPED_POLICIES, SHIPPED_POLICIES / "data.json"))
    engine = CachingEngine(counting, ttl=60, entries=3)
    who = Principal(sub="dr-who", issuer="hounsfield", roles=("radiologist",))

    def ask(study: int) -> PolicyInput:
        return policy_input(who, "read", Resource(kind="study", patient_id="P1", study_uid=f"1.2.{study}"))

    for study in range(4):
        await engine.decide(ask(study))
    assert counting.calls == 4
    for study in (1, 2, 3):  # the three most recent: still cached
        await engine.decide(ask(study))
    assert counting.calls == 4
    await engine.decide(ask(0))  # the oldest was dropped when the fourth came
    assert counting.calls == 5


def test_cache_entries_setting() -> None:
    assert Settings.from_env({}).policy_cache_entries == 4096
    assert Settings.from_env({"HOUNSFIELD_POLICY_CACHE_ENTRIES": "100"}).policy_cache_entries == 100


def _frames_of(engine: CachingEngine, instances: list[str]) -> list[Decision]:
    who = Principal(sub="rad", issuer="hounsfield", roles=("radiologist",))

    async def run() -> list[Decision]:
        return [
            await engine.decide(
                policy_input(
                    who,
                    "read",
                    Resource(kind="frames", patient_id="P1", study_uid="1.2.3", series_uid="1.2.3.4", instance_uid=uid),
                    "127.0.0.1",
                )
            )
            for uid in instances
        ]

    return asyncio.run(run())


def test_a_study_scoped_policy_decides_a_study_once(tmp_path: Path) -> None:
    """The shipped policy declares `decision_scope := "study"`: a viewer's frames of many instances of one study
    are one question; a policy that does not say so is asked per instance."""
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    counting = Counting(RegoEngine(policies, policies / "data.json", check_interval=0))
    assert counting.decision_scope == "study"
    decisions = _frames_of(CachingEngine(counting, ttl=60), [f"1.2.3.4.{n}" for n in range(20)])
    assert all(d.allow for d in decisions) and len({d.decision_id for d in decisions}) == 1
    assert counting.calls == 1

    rego = policies / "authz.rego"
    rego.write_text(rego.read_text().replace('decision_scope := "study"', ""))
    per_instance = Counting(RegoEngine(policies, policies / "data.json", check_interval=0))
    assert per_instance.decision_scope == "instance"
    _frames_of(CachingEngine(per_instance, ttl=60), [f"1.2.3.4.{n}" for n in range(20)])
    assert per_instance.calls == 20


def test_a_scope_that_reads_the_input_is_per_instance(tmp_path: Path) -> None:
    """Only a constant "study" counts: a rule computed from the input is undefined without one, so per instance."""
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    rego = policies / "authz.rego"
    rego.write_text(
        rego.read_text().replace('decision_scope := "study"', 'decision_scope := "study" if input.resource.kind')
    )
    assert RegoEngine(policies, policies / "data.json", check_interval=0).decision_scope == "instance"
