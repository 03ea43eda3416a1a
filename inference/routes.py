"""The inference API, JSON over HTTP; every route declares its policy kind (authz/policies/tables.rego:
`Model` is the `model` group, `InferenceRequest` the `inference` group; admins register and change models).

- `GET /models?name=&status=`, `POST /models` (a registration document, see `inference.registry.parse_model`),
  `GET /models/{name}/{version}`, `POST /models/{name}/{version}/promote|shadow|retire`,
  `GET /models/{name}/{version}/summary` (monitoring: `inference.monitoring`).
- `POST /inference-requests` `{"study", "series", "model", "version"?, "override_selector"?}` -> 202 Accepted
  with `Location: /inference-requests/{id}`; 422 when the model's input selector does not take the series (the
  reason in `error`), unless `"override_selector": true`, which the policy allows to admins only (the resource
  attribute `override_selector`) and the request's audit record names in its outcome description.
  `GET /inference-requests/{id}`: its state (queued, running, retrying, succeeded, failed), error, latency,
  measurements and outputs (SEG series, DiagnosticReport).
- `GET /inference-results?series=&model=&version=&limit=`: result rows, newest first (failures are visible here).

Requests and results are patient data (`inference` is a patient group in tables.rego): the policy sees the
study a request names, with its patient (the target `_named_target`, parsed once for the guard and the handler;
the resource hook `_requested_study`), and a search gets the policy's patient and modality constraints as SQL
filters, so a token bound to one patient reaches only that patient's runs.

Errors of the `inference.errors` family become `{"error", "status"}` JSON with a `Warning: 299` header.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import MediaType, Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.params import FromPath, JSONBody, QueryParameter

from authz.authn import principal_of
from authz.decision import Resource
from authz.errors import Forbidden
from authz.guard import authz_opt, decision_of, with_attributes, with_study
from authz.recording import AUDIT_NOTE
from authz.target import Target, target_of
from dicomweb import uids
from dicomweb.search.access import AccessConstraints
from inference import dispatch, monitoring, registry
from inference.errors import (
    InferenceError,
    InputNotFound,
    InputRejected,
    InvalidModel,
    ModelExists,
    ModelNotFound,
    RequestNotFound,
)
from inference.services import InferenceDep, inference_services
from server.platform.db import vouch_stateless
from server.platform.http import warning_header

_STATUS: list[tuple[type[InferenceError], int]] = [
    (ModelNotFound, 404),
    (RequestNotFound, 404),
    (InputNotFound, 404),
    (ModelExists, 409),
    (InvalidModel, 400),
    (InputRejected, 422),
]


def inference_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, object]]:
    assert isinstance(exc, InferenceError)
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 400)
    return Response(
        {"error": exc.detail, "status": status},
        status_code=status,
        headers={"Warning": warning_header(exc.detail)},
        media_type=MediaType.JSON,
    )


@get("/models", opt=authz_opt("search", "Model"))
async def list_models(
    inference: InferenceDep,
    name: Annotated[str | None, QueryParameter(max_length=64)] = None,
    status: Annotated[str | None, QueryParameter(max_length=16)] = None,
) -> dict[str, Any]:
    async with inference.pool.acquire() as conn:
        models = await registry.list_models(conn, name, status)
    return {"models": [m.to_json() for m in models], "adapters": list(inference.adapters)}


@post("/models", status_code=201, opt=authz_opt("create", "Model"))
async def register_model(inference: InferenceDep, data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
    model = registry.parse_model(data, list(inference.adapters))
    async with inference.pool.acquire() as conn:
        stored = await registry.register(conn, model)
    return stored.to_json()


@get("/models/{name:str}/{version:str}", opt=authz_opt("read", "Model"))
async def read_model(inference: InferenceDep, name: FromPath[str], version: FromPath[str]) -> dict[str, Any]:
    async with inference.pool.acquire() as conn:
        return (await registry.get(conn, name, version)).to_json()


@get("/models/{name:str}/{version:str}/summary", opt=authz_opt("read", "Model"))
async def model_summary(inference: InferenceDep, name: FromPath[str], version: FromPath[str]) -> dict[str, Any]:
    """Monitoring: counts, failures, latency, throughput, output distributions, feedback, version comparison."""
    async with inference.pool.acquire() as conn:
        await registry.get(conn, name, version)  # 404 for an unknown version
        return await monitoring.summary(conn, name, version)


async def _set(inference: InferenceDep, name: str, version: str, status: registry.Status) -> dict[str, Any]:
    async with inference.pool.acquire() as conn:
        return (await registry.set_status(conn, name, version, status)).to_json()


@post("/models/{name:str}/{version:str}/promote", status_code=200, opt=authz_opt("update", "Model"))
async def promote(inference: InferenceDep, name: FromPath[str], version: FromPath[str]) -> dict[str, Any]:
    return await _set(inference, name, version, "active")


@post("/models/{name:str}/{version:str}/shadow", status_code=200, opt=authz_opt("update", "Model"))
async def shadow(inference: InferenceDep, name: FromPath[str], version: FromPath[str]) -> dict[str, Any]:
    return await _set(inference, name, version, "shadow")


@post("/models/{name:str}/{version:str}/retire", status_code=200, opt=authz_opt("update", "Model"))
async def retire(inference: InferenceDep, name: FromPath[str], version: FromPath[str]) -> dict[str, Any]:
    return await _set(inference, name, version, "retired")


def _field(data: JSONBody[dict[str, Any]], key: str, *, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 64:
        raise InvalidModel(f"{key}: expected a string of 1..64 characters")
    return value


def _override(body: dict[str, Any]) -> bool:
    """`override_selector` of a request body: absent or a JSON boolean."""
    value = body.get("override_selector", False)
    if not isinstance(value, bool):
        raise InvalidModel("override_selector: expected true or false")
    return value


async def _body(connection: ASGIConnection[Any, Any, Any, Any]) -> dict[str, Any]:
    request = connection if isinstance(connection, Request) else Request(connection.scope, connection.receive)
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        raise InvalidModel("the body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidModel("the body is not a JSON object")
    return body


async def _override_requested(connection: ASGIConnection[Any, Any, Any, Any], resource: Resource) -> Resource:
    """POST /inference-requests: the policy sees a selector override as `resource.attributes.override_selector`."""
    return with_attributes(resource, override_selector=True) if _override(await _body(connection)) else resource


async def _named_target(connection: ASGIConnection[Any, Any, Any, Any]) -> Target:
    """POST /inference-requests: the study and series the body names, parsed once for the guard (the policy sees
    the study's patient: a token bound to one patient may ask only for that patient's studies) and the handler
    (`authz.target`). A body that is not an object naming both as UIDs is a 400 before any decision."""
    body = await _body(connection)
    study, series = _field(body, "study"), _field(body, "series")
    assert study is not None and series is not None
    if not uids.is_valid_uid(study) or not uids.is_valid_uid(series):
        raise InvalidModel("study, series: expected DICOM UIDs")
    return Target(uids.study_uid(study), uids.series_uid(series))


async def _requested_study(connection: ASGIConnection[Any, Any, Any, Any], resource: Resource) -> Resource:
    """GET /inference-requests/{rid}: the policy sees the study of the request (an unknown one: a bare resource,
    then 404)."""
    async with inference_services(connection.app).pool.acquire() as conn:
        study = await dispatch.request_study(conn, str(connection.path_params.get("rid")))
        vouch_stateless(conn)  # one SELECT: the release needs no reset query
    return await with_study(connection, resource, study)


@post(
    "/inference-requests",
    status_code=202,
    opt=authz_opt("create", "InferenceRequest", target=_named_target, resource=_override_requested),
)
async def request_inference(
    request: Request[Any, Any, Any], inference: InferenceDep, data: JSONBody[dict[str, Any]]
) -> Response[dict[str, Any]]:
    target = target_of(request)  # the study and series the guard decided on
    study, series = target.study, target.series
    model, version = _field(data, "model"), _field(data, "version", required=False)
    assert study is not None and series is not None and model is not None
    async with inference.pool.acquire() as conn:
        accepted = await dispatch.request_inference(
            conn,
            study_uid=study,
            series_uid=series,
            name=model,
            version=version,
            requested_by=principal_of(request).sub,
            max_attempts=inference.settings.inference_max_attempts,
            max_instances=inference.settings.inference_max_instances,
            override_selector=_override(data),
        )
        body = await dispatch.request_status(conn, str(accepted.request_id))
    if accepted.overridden is not None:
        request.scope.setdefault("state", {})[AUDIT_NOTE] = f"model input selector overridden: {accepted.overridden}"
        body["selector_overridden"] = accepted.overridden
    location = f"/inference-requests/{accepted.request_id}"
    return Response(body, status_code=202, headers={"Location": location})


@get("/inference-requests/{rid:str}", opt=authz_opt("read", "InferenceRequest", resource=_requested_study))
async def request_status(inference: InferenceDep, rid: FromPath[str]) -> dict[str, Any]:
    async with inference.pool.acquire() as conn:
        return await dispatch.request_status(conn, rid)


@get("/inference-results", opt=authz_opt("search", "InferenceRequest"))
async def list_results(
    request: Request[Any, Any, Any],
    inference: InferenceDep,
    series: Annotated[str | None, QueryParameter(max_length=64)] = None,
    model: Annotated[str | None, QueryParameter(max_length=64)] = None,
    version: Annotated[str | None, QueryParameter(max_length=64)] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    async with inference.pool.acquire() as conn:
        found = await dispatch.results(
            conn, series=series, model=model, version=version, limit=limit, access=_access(request)
        )
    return {"results": found}


def _access(request: Request[Any, Any, Any]) -> AccessConstraints:
    """The policy's constraints on this search (a patient-bound token sees its patient's results only), built from
    the guard's decision; without one, nothing is searched (fail closed)."""
    decision = decision_of(request.scope)
    if decision is None:  # the guard decides every route; never search unconstrained without it
        raise Forbidden("no policy decision for this search")
    return AccessConstraints.from_policy(decision.constraints)


def inference_router() -> Router:
    return Router(
        path="/",
        route_handlers=[
            list_models,
            register_model,
            read_model,
            model_summary,
            promote,
            shadow,
            retire,
            request_inference,
            request_status,
            list_results,
        ],
        tags=["AI"],
        exception_handlers={InferenceError: inference_error},
    )
