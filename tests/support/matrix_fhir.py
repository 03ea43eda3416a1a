"""The authorization matrix's FHIR requests, generated from the FHIR type table (`fhir.types.TYPES`) and the
search parameters (`fhir.search.index.PARAMS`): for each served type, read, vread of every version and _history of
every resource of the data set; searches (plain, by each patient, chained, duplicated, OR-ed and empty
identifiers, and every `_include` / `_revinclude` the parameters allow), also by POST; and every GET again as an
entry of a `batch` and of a `transaction` Bundle."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from fhir.search.index import PARAMS
from fhir.types import TYPES
from tests.support.matrix_data import DataSet, FhirResource
from tests.support.matrix_oracle import KIND_GROUP
from tests.support.matrix_probes import Probe, Route, statuses

FHIR_JSON = "application/fhir+json"
_FHIR_ROUTE = re.compile(r"^/fhir/([A-Za-z]+)(/.*)?$")


def includes(resource_type: str) -> list[tuple[str, str]]:
    """Every `_include` and `_revinclude` the search parameters allow on a search of `resource_type` whose
    targets this server serves: (parameter, value)."""
    found = []
    for name, spec in PARAMS.get(resource_type, {}).items():
        if spec.type == "reference" and set(spec.targets) & set(TYPES):
            found.append(("_include", f"{resource_type}:{name}"))
    for source, params in PARAMS.items():
        for name, spec in params.items():
            if source in TYPES and spec.type == "reference" and resource_type in spec.targets:
                found.append(("_revinclude", f"{source}:{name}"))
    return found


def _search_queries(resource_type: str, data: DataSet) -> list[tuple[str, str, str]]:
    """(shape, label, query) of searches on one type."""
    params = PARAMS.get(resource_type, {})
    own = {r.patient: r for r in reversed(data.fhir.get(resource_type, [])) if r.patient}
    queries = [("plain", "all", "")]
    patients = sorted({s.patient for s in data.studies})
    if "patient" in params:
        for p in patients:
            queries.append(("by patient", p, f"patient=Patient/{data.patient_fhir_id(p)}"))
            queries.append(("chained patient.identifier", p, f"patient.identifier={p}"))
        a, b = data.patient_fhir_id("P1"), data.patient_fhir_id("P5")
        queries += [
            ("dup patient", "P1 and P5", f"patient=Patient/{a}&patient=Patient/{b}"),
            ("OR patient", "P1 or P5", f"patient=Patient/{a},Patient/{b}"),
            ("empty patient", "all", "patient="),
        ]
    if "identifier" in params and resource_type == "Patient":
        for p in patients:
            queries.append(("by identifier", p, f"identifier={p}"))
        queries += [
            ("dup identifier", "P1 and P5", "identifier=P1&identifier=P5"),
            ("empty identifier", "all", "identifier="),
        ]
    if "P1" in own and "P5" in own:
        queries += [
            ("dup _id", "P1's and P5's", f"_id={own['P1'].id}&_id={own['P5'].id}"),
            ("empty _id", "all", "_id="),
        ]
    for param, value in includes(resource_type):
        queries.append((f"{param}={value}", "all", urlencode({param: value})))
    return queries


def _fhir_search(route: Route, rtype: str, data: DataSet, *, form: bool) -> list[Probe]:
    group = KIND_GROUP[TYPES[rtype].kind]
    probes = []
    for shape, label, query in _search_queries(rtype, data):
        entry = f"{rtype}?{query}" if query else rtype
        if form:
            probe = Probe(
                route=route.key,
                shape=f"POST {shape}",
                label=label,
                method="POST",
                url=f"/fhir/{rtype}/_search",
                group=group,
                action="search",
                headers=(("Content-Type", "application/x-www-form-urlencoded"), ("Accept", FHIR_JSON)),
                body=query.encode(),
                allowed_statuses=statuses(shape),
            )
        else:
            probe = Probe(
                route=route.key,
                shape=shape,
                label=label,
                method="GET",
                url=f"/fhir/{entry}",
                group=group,
                action="search",
                headers=(("Accept", FHIR_JSON),),
                fhir=entry,
                allowed_statuses=statuses(shape),
            )
        probes.append(probe)
    return probes


def _describe(resource: FhirResource, patient: str | None, vid: str | None = None) -> str:
    text = f"{resource.type} of {resource.patient or 'no patient'}"
    if vid is not None:
        text += f" v{vid} (filed under {patient or 'no patient'})"
    return text


def _fhir_reads(route: Route, rtype: str, suffix: str, data: DataSet) -> list[Probe]:
    group = KIND_GROUP[TYPES[rtype].kind]
    common = dict(route=route.key, method="GET", group=group, action="read", headers=(("Accept", FHIR_JSON),))
    probes = []
    for resource in data.fhir.get(rtype, []):
        base = f"{rtype}/{resource.id}"
        if suffix == "/{rid:str}":
            target = (resource.patient, resource.study)
            probes.append(
                Probe(
                    shape="direct",
                    label=_describe(resource, None),
                    url=f"/fhir/{base}",
                    fhir=base,
                    target=target,
                    **common,
                )
            )
        elif suffix == "/{rid:str}/_history":
            probes.append(
                Probe(
                    shape="direct",
                    label=_describe(resource, None),
                    url=f"/fhir/{base}/_history",
                    fhir=f"{base}/_history",
                    **common,
                )
            )
        elif suffix == "/{rid:str}/_history/{vid:str}":
            for version in resource.versions:
                path = f"{base}/_history/{version.vid}"
                target = (version.patient, resource.study)
                label = _describe(resource, version.patient, version.vid)
                probes.append(
                    Probe(shape="direct", label=label, url=f"/fhir/{path}", fhir=path, target=target, **common)
                )
    return probes


def fhir(route: Route, data: DataSet) -> list[Probe] | None:
    """A route on a type of the FHIR type table: search, search by POST, read, vread, history."""
    match = _FHIR_ROUTE.match(route.path)
    if match is None or match.group(1) not in TYPES:
        return None
    rtype, suffix = match.group(1), match.group(2) or ""
    if route.method == "GET" and suffix == "" and route.action == "search":
        return _fhir_search(route, rtype, data, form=False)
    if route.method == "POST" and suffix == "/_search":
        return _fhir_search(route, rtype, data, form=True)
    if route.method == "GET" and suffix in ("/{rid:str}", "/{rid:str}/_history", "/{rid:str}/_history/{vid:str}"):
        return _fhir_reads(route, rtype, suffix, data)
    return None


def bundles(route: Route, fhir_probes: list[Probe]) -> list[Probe]:
    """POST /fhir: every FHIR GET request again as an entry of a batch and of a transaction Bundle."""
    out = []
    for probe in fhir_probes:
        for kind in ("batch", "transaction"):
            out.append(
                replace(
                    probe,
                    route=route.key + f" ({probe.route})",
                    shape=f"{kind}: {probe.shape}",
                    method="POST",
                    url="/fhir",
                )
            )
    return out


def bundle_body(kind: str, probes: list[Probe]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [{"request": {"method": "GET", "url": p.fhir}} for p in probes],
    }
