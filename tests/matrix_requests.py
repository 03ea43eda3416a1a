"""The authorization matrix's requests, generated from the application's route table and the FHIR type table
(`fhir.types.TYPES`, search parameters `fhir.searchindex.PARAMS`), never hand-listed:

- every GET route under /dicom-web is filled by its path parameters ({study}, {series}, {instance}, {frames},
  {tag}) from each study of the data set; the search routes without parameters get query shapes (a patient's
  PatientID, duplicated and empty identifying parameters, UID lists);
- every FHIR route of a served type: read, vread of every version, _history, search (by patient, chained,
  duplicated, empty, and every `_include` / `_revinclude` the search parameters allow), search by POST, and the
  same GET requests as entries of a `batch` and of a `transaction` Bundle (POST /fhir);
- the other data reads have explicit fillers (WADO-URI with duplicated and empty UIDs, inference results,
  models, break-glass sessions, the audit trail, discovery documents);
- `NOT_DATA_READS` lists, with a reason each, the routes that read no data (writes, health, OpenAPI).

A route none of these fill fails the matrix with "add a filler for <route>".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode

from fhir.searchindex import PARAMS
from fhir.types import TYPES
from tests.matrix_data import DataSet, FhirResource, Study
from tests.matrix_oracle import KIND_GROUP

# --- what a request is --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    """The template as Litestar has it: `/dicom-web/studies/{study:str}`."""
    action: str | None
    kind: str | None

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def params(self) -> list[str]:
        return [m.split(":")[0] for m in re.findall(r"\{([^}]+)\}", self.path)]

    @property
    def group(self) -> str:
        return KIND_GROUP.get(self.kind or "", "system")


Object = tuple[str, str | None]
"""(patient, study) of a stored object."""


@dataclass(frozen=True)
class Probe:
    """One cell's request (the identity is the other axis)."""

    route: str
    shape: str
    label: str
    """What the request addresses, for people: `P5 MG`, `DiagnosticReport of P1 v1 (P5)`."""
    method: str
    url: str
    group: str
    action: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    target: Object | None = None
    """A single-resource read: the resource's (patient, study); a denied one must answer 403 or 404."""
    objects: tuple[Object, ...] = ()
    """What a successful binary answer (frames, rendered, bulk data) discloses: the objects the request names."""
    fhir: str | None = None
    """The request as a Bundle entry's `request.url` (FHIR GET requests only)."""
    allowed_statuses: tuple[int, ...] = (403, 404)
    """What a request naming a resource the identity may not see may answer."""


BAD_IDENTIFIERS = (400, 403, 404)
"""What a request with duplicated or empty identifying parameters may answer (besides an answer within what the
identity may see, for searches): a 400 is the intended answer to an ambiguous target."""


def statuses(shape: str) -> tuple[int, ...]:
    return BAD_IDENTIFIERS if shape.startswith(("dup ", "empty ")) else (403, 404)


# --- the route table ----------------------------------------------------------------------------------------


def routes(app: Any) -> list[Route]:
    """Every (method, path) of the application with its declared action and kind. OPTIONS is left out: it is
    Litestar's automatic CORS preflight answer (no token, no body; tests/test_route_sweep.py checks it)."""
    found = []
    for route in app.routes:
        for handler in route.route_handlers:
            spec = handler.opt.get("authz")
            action, kind = spec if spec is not None else (None, None)
            for method in sorted(handler.http_methods):
                if method != "OPTIONS":
                    found.append(Route(method, route.path, action, kind))
    return sorted(found, key=lambda r: (r.path, r.method))


NOT_DATA_READS: Mapping[str, str] = {
    "POST /dicom-web/studies": "STOW-RS store (a write)",
    "POST /dicom-web/studies/{study:str}": "STOW-RS store (a write)",
    "POST /break-glass": "starts a break-glass session (a write; the data set starts one)",
    "POST /break-glass/{session_id:uuid}/close": "closes a session (a write)",
    **{
        f"{method} /fhir/{name}{suffix}": "a FHIR write (create, update, delete)"
        for name in TYPES
        for method, suffix in (("POST", ""), ("PUT", "/{rid:str}"), ("DELETE", "/{rid:str}"))
    },
    "POST /inference-requests": "starts an inference run (a write; the data set starts some)",
    "POST /models": "registers a model (a write)",
    "POST /models/{name:str}/{version:str}/promote": "changes a model's status (a write)",
    "POST /models/{name:str}/{version:str}/shadow": "changes a model's status (a write)",
    "POST /models/{name:str}/{version:str}/retire": "changes a model's status (a write)",
    "GET /healthz": "liveness: public, no data",
    "GET /readyz": "readiness: public, no data",
    "GET /openapi": "the API description (Swagger UI)",
    "GET /openapi/openapi.json": "the API description",
    "GET /openapi/swagger": "the API description (Swagger UI)",
    "GET /openapi/oauth2-redirect.html": "Swagger UI's OAuth2 redirect page",
    "GET /openapi/{path:str}": "the API description's other renderings (none configured: 404)",
}
"""Routes that read no patient data, with why: they are not requested (and are counted in the matrix size)."""


# --- DICOMweb -----------------------------------------------------------------------------------------------

DICOM_JSON = "application/dicom+json"
ACCEPT = {
    "metadata": DICOM_JSON,
    "study": 'multipart/related; type="application/dicom"',
    "series": 'multipart/related; type="application/dicom"',
    "instance": 'multipart/related; type="application/dicom"',
    "frames": 'multipart/related; type="application/octet-stream"',
    "bulkdata": 'multipart/related; type="application/octet-stream"',
    "rendered": "image/jpeg",
}
DICOMWEB_PARAMS = {"study", "series", "instance", "frames", "tag"}


def _values(study: Study) -> dict[str, str]:
    return {
        "study": study.study,
        "series": study.series,
        "instance": study.instance,
        "frames": "1",
        "tag": study.bulk_tag,
    }


def _fill(path: str, values: Mapping[str, str]) -> str:
    return re.sub(r"\{([^}:]+)(?::[^}]*)?\}", lambda m: values[m.group(1)], path)


def _label(study: Study) -> str:
    return f"{study.patient} {study.modality}"


def _qido_queries(data: DataSet) -> list[tuple[str, str, str]]:
    """(shape, label, query) of a search route without path parameters."""
    p1 = next(s for s in data.studies if s.patient == "P1")
    p5 = next(s for s in data.studies if s.patient == "P5")
    queries = [("plain", "all", "")]
    queries += [
        ("by PatientID", p, urlencode({"PatientID": p})) for p in dict.fromkeys(s.patient for s in data.studies)
    ]
    queries += [
        ("dup PatientID", "P1 and P5", "PatientID=P1&PatientID=P5"),
        ("dup StudyInstanceUID", "P1 and P5", f"StudyInstanceUID={p1.study}&StudyInstanceUID={p5.study}"),
        ("UID list", "P1 and P5", f"StudyInstanceUID={p1.study},{p5.study}"),
        ("empty PatientID", "all", "PatientID="),
        ("includefield all", "all", "includefield=all"),
    ]
    return queries


def dicomweb(route: Route, data: DataSet) -> list[Probe] | None:
    """A GET route under /dicom-web, filled from each study of the data set by its path parameters."""
    if route.method != "GET" or not route.path.startswith("/dicom-web") or route.kind is None:
        return None
    if not set(route.params) <= DICOMWEB_PARAMS:
        return None
    action = route.action or "read"
    accept = DICOM_JSON if action == "search" else ACCEPT.get(route.kind)
    if accept is None:
        return None
    common = dict(route=route.key, method="GET", group=route.group, action=action, headers=(("Accept", accept),))
    if not route.params:
        return [
            Probe(
                shape=shape,
                label=label,
                url=route.path + (f"?{query}" if query else ""),
                allowed_statuses=statuses(shape),
                **common,
            )
            for shape, label, query in _qido_queries(data)
        ]
    probes = []
    for study in data.studies:
        obj = (study.patient, study.study)
        single = action == "read"
        probes.append(
            Probe(
                shape="direct",
                label=_label(study),
                url=_fill(route.path, _values(study)),
                target=obj if single else None,
                objects=(obj,),
                **common,
            )
        )
    return probes


# --- WADO-URI -----------------------------------------------------------------------------------------------


def _wado(params: Iterable[tuple[str, str]]) -> str:
    return "/wado?" + urlencode([("requestType", "WADO"), *params])


def wado_uri(route: Route, data: DataSet) -> list[Probe]:
    """Each instance as a Part 10 file and rendered; then the attacks on the one parsed target: a decoy study
    the identity may see (P1's, or P4's CT) named first or last beside the victim's, duplicated series and object
    UIDs, and empty UIDs."""
    dicom = ("contentType", "application/dicom")
    decoys = [s for s in data.studies if (s.patient, s.modality) in (("P1", "CT"), ("P4", "CT"))]
    common = dict(route=route.key, method="GET", group="imaging", action="read")
    probes = []
    for victim in data.studies:
        obj = (victim.patient, victim.study)
        uids = [("studyUID", victim.study), ("seriesUID", victim.series), ("objectUID", victim.instance)]
        label = _label(victim)
        probes.append(Probe(shape="Part 10", label=label, url=_wado([*uids, dicom]), target=obj, **common))
        probes.append(Probe(shape="rendered", label=label, url=_wado(uids), target=obj, objects=(obj,), **common))
        bad = dict(allowed_statuses=BAD_IDENTIFIERS, target=obj, **common)
        empty = [("studyUID", ""), *uids, dicom]
        probes.append(Probe(shape="empty studyUID first", label=label, url=_wado(empty), objects=(obj,), **bad))
        only_empty = [("studyUID", ""), *uids[1:], dicom]
        probes.append(Probe(shape="empty studyUID", label=label, url=_wado(only_empty), objects=(obj,), **bad))
        for decoy in decoys:
            if decoy is victim:
                continue
            both = (obj, (decoy.patient, decoy.study))
            lab = f"{label} (decoy {_label(decoy)})"
            shapes = {
                "dup studyUID decoy first": [("studyUID", decoy.study), *uids, dicom],
                "dup studyUID victim first": [uids[0], ("studyUID", decoy.study), *uids[1:], dicom],
                "dup all UIDs decoy first": [
                    ("studyUID", decoy.study),
                    ("studyUID", victim.study),
                    ("seriesUID", decoy.series),
                    ("seriesUID", victim.series),
                    ("objectUID", decoy.instance),
                    ("objectUID", victim.instance),
                ],
                "dup objectUID decoy first": [
                    ("studyUID", decoy.study),
                    ("seriesUID", decoy.series),
                    ("objectUID", decoy.instance),
                    ("objectUID", victim.instance),
                    dicom,
                ],
            }
            for shape, params in shapes.items():
                probes.append(Probe(shape=shape, label=lab, url=_wado(params), objects=both, **bad))
    return probes


# --- FHIR ---------------------------------------------------------------------------------------------------

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


# --- the other data reads -----------------------------------------------------------------------------------


def _plain(route: Route, label: str, url: str, *, target: Object | None = None, shape: str = "direct") -> Probe:
    return Probe(
        route=route.key,
        shape=shape,
        label=label,
        method=route.method,
        url=url,
        group=route.group,
        action=route.action or "read",
        headers=(("Accept", "application/json, application/fhir+json"),),
        target=target,
    )


def inference_results(route: Route, data: DataSet) -> list[Probe]:
    probes = [_plain(route, "all", route.path + "?limit=1000")]
    probes += [
        _plain(route, f"{r.patient}'s series", f"{route.path}?series={r.series}", shape="by series") for r in data.runs
    ]
    return probes


def inference_request(route: Route, data: DataSet) -> list[Probe]:
    return [
        _plain(route, f"run on {r.patient}", _fill(route.path, {"rid": r.id}), target=(r.patient, r.study))
        for r in data.runs
    ]


def models(route: Route, data: DataSet) -> list[Probe]:
    if not route.params:
        return [_plain(route, "all", route.path)]
    return [_plain(route, f"{n} {v}", _fill(route.path, {"name": n, "version": v})) for n, v in data.models]


def break_glass(route: Route, data: DataSet) -> list[Probe]:
    if not route.params:
        return [_plain(route, "all", route.path), _plain(route, "open", route.path + "?open=true", shape="open")]
    return [_plain(route, "P5's session", _fill(route.path, {"session_id": data.break_glass_session}))]


def audit(route: Route, data: DataSet) -> list[Probe]:
    if "{rid" in route.path:
        return [_plain(route, "an event about P5", _fill(route.path, {"rid": data.audit_event}))]
    if route.path.endswith("$export"):
        return [_plain(route, "the data set's events", route.path + "?" + urlencode({"_until": data.loaded_at}))]
    if route.path.endswith("$verify"):
        return [_plain(route, "the chain", route.path)]
    return [
        _plain(route, "latest", route.path + "?_count=20"),
        _plain(route, "P5", route.path + "?patient=P5", shape="by patient"),
    ]


def plain_get(route: Route, data: DataSet) -> list[Probe]:
    values = {"rid": "DiagnosticReport-imaging-study"}
    return [_plain(route, "the document", _fill(route.path, values))]


EXPLICIT: Mapping[str, Callable[[Route, DataSet], list[Probe]]] = {
    "GET /wado": wado_uri,
    "GET /inference-results": inference_results,
    "GET /inference-requests/{rid:str}": inference_request,
    "GET /models": models,
    "GET /models/{name:str}/{version:str}": models,
    "GET /models/{name:str}/{version:str}/summary": models,
    "GET /break-glass": break_glass,
    "GET /break-glass/{session_id:uuid}": break_glass,
    "GET /fhir/AuditEvent": audit,
    "GET /fhir/AuditEvent/{rid:str}": audit,
    "GET /fhir/AuditEvent/$export": audit,
    "GET /fhir/AuditEvent/$verify": audit,
    "GET /dimse/routing": plain_get,
    "GET /fhir/metadata": plain_get,
    "GET /fhir/.well-known/smart-configuration": plain_get,
    "GET /.well-known/smart-configuration": plain_get,
    "GET /fhir/SearchParameter/{rid:str}": plain_get,
}
"""Data reads that are neither DICOMweb resources nor FHIR types of the type table."""

BUNDLE_ROUTE = "POST /fhir"


@dataclass
class Generated:
    probes: list[Probe]
    routes: list[Route]
    """The routes requested."""
    excluded: list[Route]
    """The routes of NOT_DATA_READS."""
    unfilled: list[str]
    """Routes no generator could fill (each a failure)."""


def generate(app: Any, data: DataSet) -> Generated:
    """Every probe of every route of `app`, from the data set."""
    all_routes = routes(app)
    keys = {r.key for r in all_routes}
    stale = [k for k in [*NOT_DATA_READS, *EXPLICIT] if k not in keys]
    assert not stale, f"the matrix names routes the app does not have: {stale}"
    generated = Generated([], [], [], [])
    bundle: Route | None = None
    for route in all_routes:
        if route.key in NOT_DATA_READS:
            generated.excluded.append(route)
            continue
        if route.key == BUNDLE_ROUTE:
            bundle = route
            continue
        filler = EXPLICIT.get(route.key)
        probes = filler(route, data) if filler is not None else (fhir(route, data) or dicomweb(route, data))
        if not probes:
            generated.unfilled.append(f"add a filler for {route.key}")
            continue
        generated.routes.append(route)
        generated.probes += probes
    if bundle is None:
        generated.unfilled.append(f"the FHIR batch/transaction route {BUNDLE_ROUTE} is gone: update the matrix")
    else:
        generated.routes.append(bundle)
        generated.probes += bundles(bundle, [p for p in generated.probes if p.fhir is not None])
    return generated
