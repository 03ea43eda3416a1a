"""Choose the policy engine from the settings: an OPA server when `HOUNSFIELD_OPA_URL` is set, else regopy
in-process (the embedded default) over `HOUNSFIELD_POLICY_DIR` (default: the shipped `authz/policies`)."""

from __future__ import annotations

from pathlib import Path

from authz.decision import PolicyEngine
from authz.engine_opa import OpaEngine
from authz.engine_rego import RegoEngine
from authz.settings import AuthzSettings

SHIPPED_POLICIES = Path(__file__).resolve().parent / "policies"
"""The shipped Rego policies and their example data (`data.json`)."""


def policy_paths(settings: AuthzSettings) -> tuple[Path, Path | None]:
    """The policy folder and data file the in-process engine loads. The data defaults to `data.json` in the
    policy folder (for the shipped folder: the example care lists and consents); none when there is none."""
    policy_dir = settings.policy_dir or SHIPPED_POLICIES
    if settings.policy_data_file is not None:
        return policy_dir, settings.policy_data_file
    default = policy_dir / "data.json"
    return policy_dir, default if default.is_file() else None


def open_engine(settings: AuthzSettings) -> PolicyEngine:
    """The engine for these settings. The in-process one compiles the policies now: a policy that does not
    compile stops the server at start (`authz.engine_rego.PolicyError`) rather than denying every request."""
    if settings.opa_url:
        return OpaEngine(settings.opa_url, settings.opa_timeout_seconds)
    policy_dir, data_file = policy_paths(settings)
    return RegoEngine(policy_dir, data_file)
