"""DIMSE configuration values, parsed from their environment forms (pure functions, house style 1 and 5).

- Peers (`HOUNSFIELD_DIMSE_PEERS`): `TITLE=role[+role...][:sub][@binding...]`, comma-separated. Only these calling
  AE titles may associate; each becomes the identity (`sub`, default the title; `roles`) the policy decides for.
  A calling AE title is a claim anyone can make, so each peer is bound to where it may connect from and, over
  TLS, to the certificate it must present. A binding is an address (`@10.1.2.3`, `@::1`), a network
  (`@10.1.0.0/16`), `@*` (any address: the title alone identifies the peer), `@cn:NAME` (a client certificate
  whose subject Common Name is NAME) or `@sha256:HEX` (a client certificate with this SHA-256 fingerprint of its
  DER form). Addresses and networks: the peer may connect from any of them. Certificates: it must present one of
  them (so it comes over TLS); with certificates and no address, from any address. A peer with no binding at all
  may connect from the loopback addresses only (127.0.0.0/8, ::1): the form without bindings stays valid and is
  safe on the default `HOUNSFIELD_HOST` (127.0.0.1), and a peer on another host needs an explicit binding.
- Destinations (`HOUNSFIELD_DIMSE_DESTINATIONS`): `TITLE@host:port[+tls]`, comma-separated: where C-MOVE and
  auto-routing send instances (PS3.4 C.4.2: the Move Destination is an AE title the SCP knows); `+tls`: over TLS,
  the destination's certificate verified against `HOUNSFIELD_DIMSE_TLS_CA` and its host name or address.
- TLS (`HOUNSFIELD_DIMSE_TLS_*`, PS3.15 Annex B, BCP 195): see `TlsConfig`.
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
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydicom.datadict import tag_for_keyword

ISSUER = "dimse"
"""The `issuer` of DIMSE identities: they come from the peer table, not from a token."""


class DimseConfigError(ValueError):
    """A DIMSE configuration value is malformed; the message says which part."""


_ROLE = re.compile(r"^[A-Za-z0-9_.-]+$")


def ae_title(raw: str) -> str:
    """A checked AE title (PS3.5 VR AE), stripped of its insignificant spaces."""
    title = raw.strip()
    if not 1 <= len(title) <= 16 or "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise DimseConfigError(f"not a valid AE title (1-16 printable characters, no backslash): {raw[:40]!r}")
    return title


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Networks:
    """The IP networks a peer may connect from. A plain class rather than a tuple of `Network`s: the settings
    object reaches Litestar's signature models, whose converter (msgspec) rejects a union of two classes."""

    __slots__ = ("items",)

    def __init__(self, items: tuple[Network, ...]) -> None:
        self.items = items

    def __contains__(self, address: object) -> bool:
        """`address`: text (a dual-stack listener's `::ffff:a.b.c.d` counts as `a.b.c.d`; a zone is ignored)."""
        try:
            ip = ipaddress.ip_address(str(address or "").split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Networks) and other.items == self.items

    def __hash__(self) -> int:
        return hash(self.items)

    def __repr__(self) -> str:
        return f"Networks({', '.join(map(str, self.items))})"


LOOPBACK = Networks((ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")))
"""Where a peer without bindings may connect from."""


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """What identifies a TLS client: its verified certificate's subject Common Names and SHA-256 fingerprint."""

    common_names: tuple[str, ...]
    sha256: str
    """Lower-case hex of the SHA-256 of the certificate's DER form."""


@dataclass(frozen=True, slots=True)
class CertificateBinding:
    """`cn:NAME` or `sha256:HEX`: a client certificate a peer may present."""

    kind: Literal["cn", "sha256"]
    value: str

    def matches(self, certificate: ClientCertificate) -> bool:
        if self.kind == "cn":
            return self.value in certificate.common_names
        return self.value == certificate.sha256

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True, slots=True)
class Peer:
    """A calling AE allowed to associate, where it may connect from, and the identity its operations run as."""

    ae_title: str
    sub: str
    roles: tuple[str, ...]
    networks: Networks | None = LOOPBACK
    """The addresses it may connect from (None: any)."""
    certificates: tuple[CertificateBinding, ...] = ()
    """The client certificates it may present, one of which it must (empty: none needed)."""

    def allows_address(self, address: str | None) -> bool:
        return self.networks is None or address in self.networks

    def owns(self, certificate: ClientCertificate) -> bool:
        return any(binding.matches(certificate) for binding in self.certificates)


@dataclass(frozen=True, slots=True)
class Destination:
    """A remote AE that C-MOVE and auto-routing may send to."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    """Associate over TLS (`+tls`), verifying the destination's certificate."""


ClientCertificates = Literal["required", "optional", "off"]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """DICOM TLS (PS3.15 Annex B, the BCP 195 TLS Secure Transport Connection Profiles: TLS 1.2 or later, BCP 195
    cipher suites), from `HOUNSFIELD_DIMSE_TLS_*`.

    With a certificate and key, a TLS listener runs on `port` (IANA's `dicom-tls`, 2762, by default); with `only`
    (the default) the plain listener on `HOUNSFIELD_DIMSE_PORT` does not run, so configuring TLS is enough to
    refuse plain-text DIMSE, and a plain listener besides needs `HOUNSFIELD_DIMSE_TLS_ONLY=false`. Client
    certificates, verified against `ca`, are `required` (the default when a CA is given: a client without one
    fails the handshake), `optional` (checked when presented) or `off` (not asked for). The CA also verifies the
    certificates of `+tls` destinations, to which the server presents its own certificate."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    port: int = 2762
    client_certificates: ClientCertificates = "off"
    only: bool = True

    @property
    def listens(self) -> bool:
        return self.cert is not None


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
    """Peers, destinations, rules and TLS, validated together (a rule names a known destination; a binding to a
    certificate or a TLS destination has the TLS settings it needs)."""

    peers: tuple[Peer, ...] = ()
    destinations: tuple[Destination, ...] = ()
    routes: tuple[RoutingRule, ...] = field(default=())
    tls: TlsConfig | None = None

    def peer(self, title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == title.strip()), None)

    def destination(self, title: str) -> Destination | None:
        return next((d for d in self.destinations if d.ae_title == title.strip()), None)


def _items(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def _certificate(title: str, text: str) -> CertificateBinding:
    kind, _, value = text.partition(":")
    value = value.strip()
    if kind == "cn" and value:
        return CertificateBinding("cn", value)
    if kind == "sha256":
        fingerprint = value.replace(":", "").lower()
        if _FINGERPRINT.match(fingerprint):
            return CertificateBinding("sha256", fingerprint)
    raise DimseConfigError(f"peer {title!r}: {text[:80]!r} is not cn:NAME or sha256:<64 hex digits>")


def _bindings(title: str, texts: list[str]) -> tuple[Networks | None, tuple[CertificateBinding, ...]]:
    """(networks or None for any address, certificates) of a peer's `@` bindings."""
    networks: list[Network] = []
    certificates: list[CertificateBinding] = []
    anywhere = False
    for raw in texts:
        text = raw.strip()
        if text == "*":
            anywhere = True
        elif text.startswith(("cn:", "sha256:")):
            certificates.append(_certificate(title, text))
        else:
            try:
                networks.append(ipaddress.ip_network(text.strip("[]")))
            except ValueError:
                raise DimseConfigError(
                    f"peer {title!r}: {text[:80]!r} is not an address, a network (host bits zero), '*', cn:NAME or "
                    "sha256:HEX"
                ) from None
    if anywhere and networks:
        raise DimseConfigError(f"peer {title!r}: '@*' (any address) contradicts its address bindings")
    if networks:
        return Networks(tuple(networks)), tuple(certificates)
    if anywhere or certificates:
        return None, tuple(certificates)
    return LOOPBACK, ()


def parse_peers(raw: str) -> tuple[Peer, ...]:
    peers: dict[str, Peer] = {}
    for item in _items(raw):
        title, sep, rest = item.partition("=")
        if not sep:
            raise DimseConfigError(f"expected TITLE=role[+role][:sub][@binding...], got {item[:60]!r}")
        identity, *bindings = rest.split("@")
        roles_text, _, sub = identity.partition(":")
        roles = tuple(r.strip() for r in roles_text.split("+") if r.strip())
        if not roles or any(not _ROLE.match(r) for r in roles):
            raise DimseConfigError(f"peer {title.strip()[:16]!r}: roles must be names joined by '+'")
        networks, certificates = _bindings(ae_title(title), bindings)
        peer = Peer(ae_title(title), sub.strip() or ae_title(title), roles, networks, certificates)
        if peer.ae_title in peers:
            raise DimseConfigError(f"peer {peer.ae_title!r} is listed twice")
        peers[peer.ae_title] = peer
    return tuple(peers.values())


def parse_destinations(raw: str) -> tuple[Destination, ...]:
    out: dict[str, Destination] = {}
    for item in _items(raw):
        tls = item.endswith("+tls")
        title, sep, address = item.removesuffix("+tls").rpartition("@")
        host, colon, port_text = address.rpartition(":")
        if not sep or not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise DimseConfigError(f"expected TITLE@host:port[+tls], got {item[:80]!r}")
        dest = Destination(ae_title(title), host.strip("[]"), int(port_text), tls)
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


def parse_tls(
    cert: str = "", key: str = "", ca: str = "", port: str = "", client_certificates: str = "", only: str = ""
) -> TlsConfig | None:
    """The `HOUNSFIELD_DIMSE_TLS_*` values (CERT, KEY, CA: PEM file paths; PORT; CLIENT_CERTS; ONLY); None when
    no file is named. The files must exist; they are read when the AE starts."""
    paths = {
        name: Path(value.strip()) if value.strip() else None
        for name, value in (("cert", cert), ("key", key), ("ca", ca))
    }
    if not any(paths.values()):
        if client_certificates.strip() or only.strip():
            raise DimseConfigError("CLIENT_CERTS and ONLY need HOUNSFIELD_DIMSE_TLS_CERT and _KEY")
        return None
    for name, path in paths.items():
        if path is not None and not path.is_file():
            raise DimseConfigError(f"{name.upper()}: no such file {str(path)[:120]!r}")
    if (paths["cert"] is None) != (paths["key"] is None):
        raise DimseConfigError("CERT and KEY go together (the server's certificate chain and its private key)")
    port_text = port.strip() or "2762"
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise DimseConfigError(f"PORT: not a port number: {port_text[:20]!r}")
    mode = client_certificates.strip().lower() or ("required" if paths["ca"] is not None else "off")
    if mode not in ("required", "optional", "off"):
        raise DimseConfigError(f"CLIENT_CERTS: expected required, optional or off, got {mode[:20]!r}")
    if mode != "off" and paths["ca"] is None:
        raise DimseConfigError(f"CLIENT_CERTS={mode} needs HOUNSFIELD_DIMSE_TLS_CA to verify them")
    only_text = only.strip().lower() or "true"
    if only_text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise DimseConfigError(f"ONLY: expected true or false, got {only_text[:20]!r}")
    return TlsConfig(
        cert=paths["cert"],
        key=paths["key"],
        ca=paths["ca"],
        port=int(port_text),
        client_certificates=mode,  # type: ignore[arg-type]
        only=only_text in ("true", "1", "yes", "on"),
    )


def dimse_config(
    peers: str = "", destinations: str = "", routes: str = "", tls: TlsConfig | None = None
) -> DimseConfig:
    config = DimseConfig(parse_peers(peers), parse_destinations(destinations), parse_routes(routes), tls)
    check(config)
    check_tls(config)
    return config


def check(config: DimseConfig) -> None:
    """Every rule names a configured destination."""
    for rule in config.routes:
        if config.destination(rule.destination) is None:
            raise DimseConfigError(f"routing rule {rule.name!r}: unknown destination {rule.destination!r}")


def check_tls(config: DimseConfig) -> None:
    """A peer bound to certificates can present one (a TLS listener that asks for client certificates); a TLS
    destination's certificate can be verified (a CA)."""
    tls = config.tls
    for peer in config.peers:
        if peer.certificates and (tls is None or not tls.listens or tls.client_certificates == "off"):
            raise DimseConfigError(
                f"peer {peer.ae_title!r} is bound to a certificate: it needs the TLS listener with client "
                "certificates (HOUNSFIELD_DIMSE_TLS_CERT, _KEY and _CA)"
            )
    for dest in config.destinations:
        if dest.tls and (tls is None or tls.ca is None):
            raise DimseConfigError(f"destination {dest.ae_title!r} uses TLS: it needs HOUNSFIELD_DIMSE_TLS_CA")
