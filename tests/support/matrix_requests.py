"""The authorization matrix's requests, generated from the application's route table and the FHIR type table
(`fhir.types.TYPES`, search parameters `fhir.search.index.PARAMS`), never hand-listed:

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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from fhir.types import TYPES
from tests.support.matrix_data import DataSet, Study
from tests.support.matrix_fhir import bundles, fhir
from tests.support.matrix_probes import BAD_IDENTIFIERS, Object, Probe, Route, fill, statuses

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
                url=fill(route.path, _values(study)),
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
        _plain(route, f"run on {r.patient}", fill(route.path, {"rid": r.id}), target=(r.patient, r.study))
        for r in data.runs
    ]


def models(route: Route, data: DataSet) -> list[Probe]:
    if not route.params:
        return [_plain(route, "all", route.path)]
    return [_plain(route, f"{n} {v}", fill(route.path, {"name": n, "version": v})) for n, v in data.models]


def break_glass(route: Route, data: DataSet) -> list[Probe]:
    if not route.params:
        return [_plain(route, "all", route.path), _plain(route, "open", route.path + "?open=true", shape="open")]
    return [_plain(route, "P5's session", fill(route.path, {"session_id": data.break_glass_session}))]


def audit(route: Route, data: DataSet) -> list[Probe]:
    if "{rid" in route.path:
        return [_plain(route, "an event about P5", fill(route.path, {"rid": data.audit_event}))]
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
    return [_plain(route, "the document", fill(route.path, values))]


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
    "GET /dimse/intake": plain_get,
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


def generate(all_routes: list[Route], data: DataSet) -> Generated:
    """Every probe of every route (`routes(app)`), from the data set. Entries of NOT_DATA_READS or EXPLICIT that
    name no route are reported too: the lists must not outlive the routes they describe."""
    keys = {r.key for r in all_routes}
    generated = Generated([], [], [], [])
    generated.unfilled += [
        f"the matrix names a route the app does not have: {k}" for k in NOT_DATA_READS if k not in keys
    ]
    generated.unfilled += [f"the matrix names a route the app does not have: {k}" for k in EXPLICIT if k not in keys]
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
