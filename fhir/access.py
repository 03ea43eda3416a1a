"""The policy's view of a FHIR resource: a route's resource hook (`authz_opt(..., resource=...)`) fills in the
facts a stored resource was filed under (`fhir.repository.Filing`: its patient and modalities), so that a read
of `ImagingStudy/<id>` is decided like a read of the DICOM study it describes."""

from __future__ import annotations

import dataclasses
from typing import Any

from litestar.connection import ASGIConnection

from authz.decision import Resource
from authz.guard import ResourceHook

RID_PARAM = "rid"
"""The path parameter that carries a resource id in every FHIR route (`/DiagnosticReport/{rid:str}`)."""


def stored_resource(resource_type: str) -> ResourceHook:
    """A resource hook for routes on one stored resource: the resource's patient and modalities as filed (an
    unknown id stays a bare resource: the policy decides on what the subject may do at all, and the handler then
    answers 404)."""

    async def hook(connection: ASGIConnection[Any, Any, Any, Any], resource: Resource) -> Resource:
        rid = connection.path_params.get(RID_PARAM)
        if rid is None:
            return resource
        resources = connection.app.state.resources
        async with resources.pool.acquire() as conn:
            stored = await resources.fhir.find(conn, resource_type, str(rid))
        if stored is None:
            return dataclasses.replace(resource, attributes={**resource.attributes, "id": str(rid)})
        study_uid = stored.filing.source_key if resource_type == "ImagingStudy" else None
        return dataclasses.replace(
            resource,
            patient_id=stored.filing.patient_key,
            study_uid=study_uid,
            modalities=stored.filing.modalities,
            attributes={**resource.attributes, "id": str(rid)},
        )

    return hook
