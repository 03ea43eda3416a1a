"""Authorization as a guard on the route (house style 7), declared by route metadata:

    @get("/studies", opt=authz_opt("search", "study"))

Every request reaching a handler has been authenticated (`authz.authn`), and this guard asks the policy engine
about the action on the resource, with facts about the resource (its patient and modalities) looked up in the
index. A route without an `authz` declaration is refused (fail closed). The decision is kept in the request
state for the handler (search constraints) and for the audit record.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from authz.decision import Action, Context, Decision, PolicyInput, Resource
from authz.errors import Forbidden, Unauthenticated
from authz.principal import Principal
from server.db import Queries

FACTS = Queries(Path(__file__).with_name("facts.sql"))
OPT_KEY = "authz"
PRINCIPAL = "hounsfield.principal"
DECISION = "hounsfield.decision"
RESOURCE = "hounsfield.resource"
OPENAPI_PATH = "/openapi"


def authz_opt(action: Action, kind: str, **extra: Any) -> dict[str, Any]:
    """Route metadata declaring what a route does: `opt=authz_opt("read", "frames")`."""
    return {OPT_KEY: (action, kind), **extra}


def principal_of(scope: Any) -> Principal | None:
    value = scope.get("state", {}).get(PRINCIPAL)
    return value if isinstance(value, Principal) else None


def decision_of(scope: Any) -> Decision | None:
    value = scope.get("state", {}).get(DECISION)
    return value if isinstance(value, Decision) else None


async def _resource(connection: ASGIConnection[Any, Any, Any, Any], kind: str) -> Resource:
    params = connection.path_params
    study = params.get("study")
    series = params.get("series")
    instance = params.get("instance")
    if study is None and kind == "instance" and "objectUID" in connection.query_params:  # WADO-URI
        study = connection.query_params.get("studyUID")
        series = connection.query_params.get("seriesUID")
        instance = connection.query_params.get("objectUID")
    if study is None:
        return Resource(kind=kind)
    resources = connection.app.state.resources
    async with resources.pool.acquire() as conn:
        row = await conn.fetchrow(FACTS["study_facts"], str(study))
    if row is None:
        return Resource(kind=kind, study_uid=str(study), series_uid=series, instance_uid=instance)
    return Resource(
        kind=kind,
        patient_id=row["patient_id"],
        study_uid=str(study),
        series_uid=series,
        instance_uid=instance,
        modalities=tuple(row["modalities"]),
    )


async def authorize(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The app-wide guard: authenticated principal + declared action → policy decision, or 401/403."""
    resources = connection.app.state.resources
    if connection.scope["path"] in resources.settings.auth_public_paths:
        return
    if connection.scope.get("method") == "OPTIONS":
        return  # Litestar's automatic OPTIONS answers carry no data (CORS preflight sends no token)
    principal = principal_of(connection.scope)
    if principal is None:
        raise Unauthenticated("a bearer token is required", error="")
    spec = handler.opt.get(OPT_KEY)
    if spec is None and connection.scope["path"].startswith(OPENAPI_PATH):
        spec = ("read", "system")  # the API description (Litestar's own routes)
    if spec is None:
        raise Forbidden("this route declares no authorization rule")
    action, kind = spec
    resource = await _resource(connection, kind)
    client = connection.scope.get("client")
    policy_input = PolicyInput(
        subject=principal.to_input(),
        action=action,
        resource=resource,
        context=Context(
            time=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            client_ip=client[0] if client else None,
            break_glass=None,
        ),
    )
    decision = await resources.policy.decide(policy_input)
    state = connection.scope.setdefault("state", {})
    state[DECISION] = decision
    state[RESOURCE] = resource
    if not decision.allow:
        raise Forbidden("; ".join(decision.reasons) or "denied by policy", decision)
