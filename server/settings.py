"""Typed, frozen settings built once at start from the environment.

Each package declares its section (`server.platform.settings.PlatformSettings`, `dicomweb.settings`,
`authz.settings`, `fhir.settings`, `inference.settings`), every field with its variable, default, parser and
docstring (`setting(...)`); domain code reads its own section's type. `Settings` is their union, loaded once:
`Settings.from_env` reads every declared field and the few values that need several variables. A malformed value
raises `SettingsError` naming the variable, so a misconfigured server refuses to start instead of failing on the
first request. Every field is documented in the README too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from authz.settings import PUBLIC_PATHS, AuthzSettings, authz_values
from dicomweb.settings import DicomwebSettings, dicomweb_values
from fhir.settings import FhirSettings
from inference.settings import InferenceSettings, inference_values
from server.platform.settings import PlatformSettings, S3Settings, SettingsError, load, platform_values

__all__ = [
    "PUBLIC_PATHS",
    "AuthzSettings",
    "DicomwebSettings",
    "FhirSettings",
    "InferenceSettings",
    "PlatformSettings",
    "S3Settings",
    "Settings",
    "SettingsError",
]


@dataclass(frozen=True)
class Settings(InferenceSettings, FhirSettings, AuthzSettings):
    """Everything the server reads from its environment, validated once: every package's section."""

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        values = load(cls, env)  # every field declared with `setting(...)`
        for section in (platform_values, dicomweb_values, authz_values, inference_values):
            values.update(section(env))
        settings = cls(**values)
        return settings.with_overrides(**overrides) if overrides else settings
