"""DIMSE configuration values, parsed from their environment forms (pure functions, house style 1 and 5).

- Peers (`HOUNSFIELD_DIMSE_PEERS`): `TITLE=role[+role...][:sub]`, comma-separated. Only these calling AE titles
  may associate; each becomes the identity (`sub`, default the title; `roles`) the policy decides for.
- Destinations (`HOUNSFIELD_DIMSE_DESTINATIONS`): `TITLE@host:port`, comma-separated: where C-MOVE and
  auto-routing send instances (PS3.4 C.4.2: the Move Destination is an AE title the SCP knows).
- Routing rules (`HOUNSFIELD_DIMSE_ROUTES`): a JSON array (inline, or a path to a JSON file) of
  `{"destination": TITLE, "calling_ae": [...], "modality": [...], "sop_class": [...],
  "attributes": {"Keyword": "pattern"}, "name": "..."}`; every condition given must hold (a list: any of its
  values; a pattern: `*` and `?` wild cards as PS3.4 C.2.2.2.4). A rule without `calling_ae` also matches
  instances stored over STOW-RS.

AE titles follow PS3.5 Table 6.2-1 (VR AE): 1 to 16 characters, no backslash or control characters, leading
and trailing spaces not significant.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword


class DimseConfigError(ValueError):
    """A DIMSE configuration value is malformed; the message says which part."""


_ROLE = re.compile(r"^[A-Za-z0-9_.-]+$")


def ae_title(raw: str) -> str:
    """A checked AE title (PS3.5 VR AE), stripped of its insignificant spaces."""
    title = raw.strip()
    if not 1 <= len(title) <= 16 or "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise DimseConfigError(f"not a valid AE title (1-16 printable characters, no backslash): {raw[:40]!r}")
    return title


@dataclass(frozen=True, slots=True)
class Peer:
    """A calling AE allowed to associate, and the identity its operations run as."""

    ae_title: str
    sub: str
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Destination:
    """A remote AE that C-MOVE and auto-routing may send to."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class RoutingRule:
    """Forward a newly stored instance to `destination` when every given condition holds."""

    destination: str
    name: str = ""
    calling_ae: tuple[str, ...] = ()
    modality: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()
    """(8-hex-digit tag, pattern) pairs."""

    def matches(self, calling_ae: str | None, modality: str | None, sop_class: str, values: Mapping[str, str]) -> bool:
        """`values` maps the tags of `attributes` to the instance's values (absent: no match)."""
        if self.calling_ae and calling_ae not in self.calling_ae:
            return False
        if self.modality and (modality or "") not in self.modality:
            return False
        if self.sop_class and sop_class not in self.sop_class:
            return False
        for tag, pattern in self.attributes:
            value = values.get(tag)
            if value is None or not fnmatch.fnmatchcase(value, pattern):
                return False
        return True


@dataclass(frozen=True, slots=True)
class DimseConfig:
    """Peers, destinations and rules, validated together (a rule names a known destination)."""

    peers: tuple[Peer, ...] = ()
    destinations: tuple[Destination, ...] = ()
    routes: tuple[RoutingRule, ...] = field(default=())

    def peer(self, title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == title.strip()), None)

    def destination(self, title: str) -> Destination | None:
        return next((d for d in self.destinations if d.ae_title == title.strip()), None)


def _items(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def parse_peers(raw: str) -> tuple[Peer, ...]:
    peers: dict[str, Peer] = {}
    for item in _items(raw):
        title, sep, rest = item.partition("=")
        if not sep:
            raise DimseConfigError(f"expected TITLE=role[+role][:sub], got {item[:60]!r}")
        roles_text, _, sub = rest.partition(":")
        roles = tuple(r.strip() for r in roles_text.split("+") if r.strip())
        if not roles or any(not _ROLE.match(r) for r in roles):
            raise DimseConfigError(f"peer {title.strip()[:16]!r}: roles must be names joined by '+'")
        peer = Peer(ae_title(title), sub.strip() or ae_title(title), roles)
        if peer.ae_title in peers:
            raise DimseConfigError(f"peer {peer.ae_title!r} is listed twice")
        peers[peer.ae_title] = peer
    return tuple(peers.values())


def parse_destinations(raw: str) -> tuple[Destination, ...]:
    out: dict[str, Destination] = {}
    for item in _items(raw):
        title, sep, address = item.rpartition("@")
        host, colon, port_text = address.rpartition(":")
        if not sep or not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise DimseConfigError(f"expected TITLE@host:port, got {item[:80]!r}")
        dest = Destination(ae_title(title), host.strip("[]"), int(port_text))
        if dest.ae_title in out:
            raise DimseConfigError(f"destination {dest.ae_title!r} is listed twice")
        out[dest.ae_title] = dest
    return tuple(out.values())


def _strings(rule: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = rule.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DimseConfigError(f"routing rule {key}: expected a string or a list of strings")
    return tuple(v.strip() for v in value)


def _rule(rule: Any, index: int) -> RoutingRule:
    if not isinstance(rule, dict):
        raise DimseConfigError(f"routing rule {index}: expected an object")
    unknown = set(rule) - {"destination", "name", "calling_ae", "modality", "sop_class", "attributes"}
    if unknown:
        raise DimseConfigError(f"routing rule {index}: unknown key(s) {', '.join(sorted(unknown))}")
    if not isinstance(rule.get("destination"), str):
        raise DimseConfigError(f"routing rule {index}: needs a destination AE title")
    attributes = rule.get("attributes", {})
    if not isinstance(attributes, dict):
        raise DimseConfigError(f"routing rule {index}: attributes must be an object of keyword: pattern")
    pairs = []
    for keyword, pattern in attributes.items():
        tag = tag_for_keyword(str(keyword))
        if tag is None or not isinstance(pattern, str):
            raise DimseConfigError(f"routing rule {index}: {str(keyword)[:40]!r} is not a DICOM keyword with a text")
        pairs.append((f"{tag:08X}", pattern))
    return RoutingRule(
        destination=ae_title(rule["destination"]),
        name=str(rule.get("name") or f"rule {index}"),
        calling_ae=tuple(ae_title(t) for t in _strings(rule, "calling_ae")),
        modality=_strings(rule, "modality"),
        sop_class=_strings(rule, "sop_class"),
        attributes=tuple(pairs),
    )


def parse_routes(raw: str) -> tuple[RoutingRule, ...]:
    """Inline JSON (starts with `[`) or the path of a JSON file."""
    text = raw.strip()
    if not text:
        return ()
    if not text.startswith("["):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError as exc:
            raise DimseConfigError(f"cannot read routing rules file: {exc}") from None
    try:
        rules = json.loads(text)
    except ValueError as exc:
        raise DimseConfigError(f"routing rules are not JSON: {exc}") from None
    if not isinstance(rules, list):
        raise DimseConfigError("routing rules: expected a JSON array")
    return tuple(_rule(rule, i) for i, rule in enumerate(rules))


def dimse_config(peers: str = "", destinations: str = "", routes: str = "") -> DimseConfig:
    config = DimseConfig(parse_peers(peers), parse_destinations(destinations), parse_routes(routes))
    check(config)
    return config


def check(config: DimseConfig) -> None:
    """Every rule names a configured destination."""
    for rule in config.routes:
        if config.destination(rule.destination) is None:
            raise DimseConfigError(f"routing rule {rule.name!r}: unknown destination {rule.destination!r}")
