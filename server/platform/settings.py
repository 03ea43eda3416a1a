"""Settings declared once: a field of a frozen settings dataclass names its environment variable and its parser
in the field's metadata (`setting(...)`), next to its one default and its docstring; `load` reads every such
field from an environment. An unset or empty variable leaves the default; a malformed value raises
`SettingsError` naming the variable, so a misconfigured server refuses to start instead of failing on the first
request. Values that need several variables or checks across fields are built by the settings class itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

Parser = Callable[[str, str], Any]
"""(variable name, its non-empty value) -> the field's value; raises `SettingsError`."""


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the environment variable."""


@dataclass(frozen=True, slots=True)
class Variable:
    """A field's environment variable and how its value is read."""

    name: str
    parse: Parser


def setting(variable: str, default: Any = dataclasses.MISSING, *, parse: Parser | None = None, **kw: Any) -> Any:
    """A dataclass field read from `variable` (a string as is, unless `parse` says otherwise)."""
    metadata = {"env": Variable(variable, parse or text)}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def load(cls: type, env: Mapping[str, str]) -> dict[str, Any]:
    """The values of `cls`'s environment fields whose variable is set and not empty (the others keep their
    defaults)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        var: Variable | None = f.metadata.get("env")
        if var is None:
            continue
        raw = env.get(var.name)
        if raw is None or raw == "":
            continue
        values[f.name] = var.parse(var.name, raw)
    return values


# --- parsers ---------------------------------------------------------------------------------------------------


def text(_name: str, raw: str) -> str:
    return raw


def boolean(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}: expected a boolean (true/false), got {raw!r}")


def integer(minimum: int = 0, maximum: int = 2**63, *, per: int | None = None) -> Parser:
    """An integer within [minimum, maximum]; with `per`, the float `value / per` (per=1000: milliseconds to
    seconds)."""

    def parse(name: str, raw: str) -> Any:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise SettingsError(f"{name}: {value} is outside {minimum}..{maximum}")
        return value if per is None else value / per

    return parse


def choice(*allowed: str) -> Parser:
    """One of `allowed`, case-insensitive."""

    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise SettingsError(f"{name}: expected {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}")
        return value

    return parse


def items(_name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated items, blanks dropped."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def http_url(name: str, raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise SettingsError(f"{name}: expected an http(s):// URL")
    return raw


def url_prefixes(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated http(s) URL prefixes, each with a host and neither credentials, query nor fragment."""
    prefixes = items(name, raw)
    for prefix in prefixes:
        parts = urlparse(prefix)
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
            raise SettingsError(f"{name}: {prefix!r} is not an http(s)://host/... URL prefix")
        if parts.query or parts.fragment:
            raise SettingsError(f"{name}: {prefix!r} must not have a query or fragment")
    return prefixes


def postgres_url(name: str, raw: str) -> str:
    if not raw.startswith(("postgres://", "postgresql://")):
        raise SettingsError(f"{name}: expected a postgresql:// URL")
    return raw


def path(_name: str, raw: str) -> Path:
    return Path(raw)
