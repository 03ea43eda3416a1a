"""The in-process policy engine: the Rego policies evaluated by regopy (rego-cpp), the embedded default.

The policies (`*.rego` in the policy folder, tests excluded) and the JSON policy data are compiled once into a
rego-cpp bundle with the single entrypoint `hounsfield/authz/decision`; a decision then sets the input and runs
that plan. Compiling is ~20 ms, a decision well under a few milliseconds (tests/authz/test_engines.py measures the
p50), so decisions run inline on the event loop: a thread hop would cost about as much as the evaluation.

The rego-cpp interpreter keeps the input as state between "set input" and "query", so it is not safe to share
between threads: one lock guards each compiled policy (DIMSE handlers run in pynetdicom's threads).

Reload without restart: `reload()` compiles the files again; `decide()` also compares the files' mtimes and
sizes at most once per `check_interval` seconds and recompiles (in a worker thread) when they changed. A policy
that does not compile leaves the previous one in force (as OPA keeps its last good bundle) and is logged; the
same broken files are not retried until they change again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authz.decision import Decision, DecisionScope, PolicyInput
from authz.errors import PolicyUnavailable
from authz.rego_native import rego_shared, regopy

log = logging.getLogger(__name__)

ENTRYPOINT = "hounsfield/authz/decision"
"""`data.hounsfield.authz.decision`, as a rego-cpp bundle entrypoint."""
CONSTANTS = "hounsfield.tables"
"""The package of constant tables (tables.rego), evaluated once at compile time and loaded as data: rego-cpp
builds a constant object again in every evaluation (~5 us an entry), a data lookup costs nothing."""

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)
_COMMENT = re.compile(r"#.*$", re.MULTILINE)
_READS_INPUT_OR_DATA = re.compile(r"\b(input|data)\b")

Fingerprint = tuple[tuple[str, int, int], ...]


class PolicyError(PolicyUnavailable):
    """The policy files or data could not be loaded or compiled (the detail says which and why)."""


@dataclass(frozen=True, slots=True)
class _Sources:
    modules: tuple[tuple[str, str], ...]
    """(file name, Rego text), sorted by name."""
    data: str
    """The policy data as JSON text (an object)."""
    revision: str
    fingerprint: Fingerprint


class _Compiled:
    """One compiled policy: the interpreter, its bundle and the lock that serialises their use."""

    def __init__(self, sources: _Sources) -> None:
        self.sources = sources
        self.lock = threading.Lock()
        self.interpreter = regopy.Interpreter()
        constants = [(n, t) for n, t in sources.modules if _package(t) == CONSTANTS]
        try:
            for name, text in sources.modules:
                if (name, text) not in constants:
                    self.interpreter.add_module(name, text)
            self.interpreter.add_data_json(sources.data)
            if constants:
                self.interpreter.add_data({"hounsfield": {"tables": _constants(constants)}})
            self.bundle = self.interpreter.build(None, [ENTRYPOINT])
        except regopy.RegoError as exc:
            raise PolicyError(f"policy does not compile: {exc}") from None
        if not self.bundle.ok():
            raise PolicyError("policy does not compile: rego-cpp built no bundle")
        self.decision_scope = self._scope()

    def _scope(self) -> DecisionScope:
        """`data.hounsfield.authz.decision_scope`, evaluated once with no input: `study` only when the policy says
        so (a rule that reads the input, or none, means `instance`)."""
        output = rego_shared.rego_query(self.interpreter._impl, "x = data.hounsfield.authz.decision_scope")
        try:
            text = rego_shared.rego_output_string(output)
        finally:
            rego_shared.rego_free_output(output)
        try:
            bindings = json.loads(text).get("bindings", {}) if text.lstrip().startswith("{") else {}
        except ValueError:
            bindings = {}
        return "study" if bindings.get("x") == "study" else "instance"

    def evaluate(self, document: dict[str, Any]) -> Any:
        """The value of `data.hounsfield.authz.decision` for the input document (None when undefined)."""
        try:
            value = regopy.Input(document)
        except (ValueError, regopy.RegoError) as exc:
            raise PolicyUnavailable(f"policy input is not JSON-like: {exc}") from None
        with self.lock:
            try:
                self.interpreter.set_input(value)
                output = rego_shared.rego_bundle_query_entrypoint(self.interpreter._impl, self.bundle._impl, ENTRYPOINT)
            except regopy.RegoError as exc:
                raise PolicyUnavailable(f"policy evaluation failed: {exc}") from None
            try:
                text = rego_shared.rego_output_string(output)
            finally:
                rego_shared.rego_free_output(output)
        return _result(text)


def _package(text: str) -> str | None:
    match = _PACKAGE.search(text)
    return match.group(1) if match else None


def _constants(modules: list[tuple[str, str]]) -> Any:
    """The value of the constants package, evaluated once with no input and no data."""
    rego = regopy.Interpreter()
    for name, text in modules:
        if _READS_INPUT_OR_DATA.search(_COMMENT.sub("", text)):
            raise PolicyError(f"{name}: package {CONSTANTS} holds constants and must not read input or data")
        rego.add_module(name, text)
    output = rego_shared.rego_query(rego._impl, "data." + CONSTANTS)
    try:
        value = _result(rego_shared.rego_output_string(output))
    finally:
        rego_shared.rego_free_output(output)
    if not isinstance(value, dict):
        raise PolicyError(f"package {CONSTANTS} has no value")
    return value


def _result(text: str) -> Any:
    """The first expression of a rego-cpp output. An error comes back as text `(error ...)`, not as JSON."""
    if text == "undefined":
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        log.error("policy evaluation error: %s", text[:2000])
        raise PolicyUnavailable("policy evaluation failed (see the server log)") from None
    if isinstance(parsed, list):  # several results: a policy error (a complete rule with conflicting values)
        raise PolicyUnavailable("policy evaluation gave several results")
    expressions = parsed.get("expressions") if isinstance(parsed, dict) else None
    if not isinstance(expressions, list) or len(expressions) != 1:
        return None
    return expressions[0]


def policy_files(policy_dir: Path) -> list[Path]:
    """The policy modules of a folder: `*.rego`, without the `*_test.rego` unit tests."""
    return sorted(p for p in policy_dir.glob("*.rego") if not p.name.endswith("_test.rego"))


def _fingerprint(policy_dir: Path, data_file: Path | None) -> Fingerprint:
    entries = []
    for path in [*policy_files(policy_dir), *([data_file] if data_file is not None else [])]:
        try:
            stat = path.stat()
        except OSError:
            entries.append((str(path), -1, -1))
            continue
        entries.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


def read_sources(policy_dir: Path, data_file: Path | None) -> _Sources:
    """Read the policy files and data; the revision is the SHA-256 of their names and bytes."""
    fingerprint = _fingerprint(policy_dir, data_file)
    files = policy_files(policy_dir)
    if not files:
        raise PolicyError(f"no Rego policies (*.rego) in {policy_dir}")
    digest = hashlib.sha256()
    modules = []
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"cannot read {path}: {exc.strerror}") from None
        digest.update(path.name.encode() + b"\0" + raw + b"\0")
        try:
            modules.append((path.name, raw.decode("utf-8")))
        except UnicodeDecodeError:
            raise PolicyError(f"{path} is not UTF-8") from None
    data = "{}"
    if data_file is not None:
        try:
            data = data_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read policy data {data_file}: {exc}") from None
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise PolicyError(f"policy data {data_file} is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise PolicyError(f"policy data {data_file} must be a JSON object")
    digest.update(b"data\0" + data.encode("utf-8"))
    return _Sources(tuple(modules), data, digest.hexdigest(), fingerprint)


class RegoEngine:
    """`PolicyEngine` evaluating the policies in-process. Construction compiles them (raises `PolicyError`)."""

    def __init__(self, policy_dir: Path, data_file: Path | None = None, *, check_interval: float = 1.0) -> None:
        self.policy_dir = Path(policy_dir)
        self.data_file = Path(data_file) if data_file is not None else None
        self.check_interval = check_interval
        self._compiled = _Compiled(read_sources(self.policy_dir, self.data_file))
        self._failed: Fingerprint | None = None
        self._next_check = time.monotonic() + check_interval
        self._reloading: asyncio.Future[None] | None = None

    @property
    def revision(self) -> str:
        return self._compiled.sources.revision

    @property
    def decision_scope(self) -> DecisionScope:
        return self._compiled.decision_scope

    def evaluate(self, document: dict[str, Any]) -> Any:
        """The raw `decision` value for an input document (synchronous; for the fake OPA server and benchmarks)."""
        return self._compiled.evaluate(document)

    async def decide(self, policy_input: PolicyInput) -> Decision:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_interval
            await self._reload_if_changed()
        compiled = self._compiled
        return Decision.from_result(compiled.evaluate(policy_input.to_dict()), compiled.sources.revision)

    async def reload(self) -> None:
        """Compile the files again now. Raises `PolicyError` (the old policy stays in force) when they are bad."""
        sources = await asyncio.to_thread(read_sources, self.policy_dir, self.data_file)
        self._compiled = await asyncio.to_thread(_Compiled, sources)
        self._failed = None
        log.info("policy loaded, revision %s", sources.revision)

    async def _reload_if_changed(self) -> None:
        fingerprint = _fingerprint(self.policy_dir, self.data_file)
        if fingerprint in (self._compiled.sources.fingerprint, self._failed):
            return
        if self._reloading is not None:  # another decision is already compiling: wait for it
            await asyncio.shield(self._reloading)
            return
        self._reloading = asyncio.get_running_loop().create_future()
        try:
            await self.reload()
        except PolicyError as exc:
            self._failed = fingerprint
            log.error("policy files changed but do not load; keeping revision %s: %s", self.revision, exc.detail)
        finally:
            self._reloading.set_result(None)
            self._reloading = None

    async def close(self) -> None:
        """Nothing to release beyond memory (the interpreter is freed with the engine)."""
