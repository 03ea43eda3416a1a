"""The policy's view of a FHIR resource: a route's resource hook (`authz_opt(..., resource=...)`) fills in the
facts a stored resource was filed under (`fhir.repository.Filing`: its patient and modalities), so that a read
of `ImagingStudy/<id>` is decided like a read of the DICOM study it describes. A version (vread) is seen as it
was filed when written, which need not be where the resource is filed now."""

from __future__ import annotations

import dataclasses
from typing import Any

from litestar.connection import ASGIConnection

from authz.decision import Resource
from authz.guard import ResourceHook
from fhir.repository import Filing, Stored
from fhir.services import fhir_services

RID_PARAM = "rid"
"""The path parameter that carries a resource id in every FHIR route (`/DiagnosticReport/{rid:str}`)."""
VID_PARAM = "vid"
"""The path parameter that carries a version id (`/DiagnosticReport/{rid:str}/_history/{vid:str}`)."""
MAX_VERSION_DIGITS = 9


def filed(kind: str, rid: str | None, filing: Filing) -> Resource:
    """The resource the policy sees for a resource (or one version of it) filed under `filing`: its patient, its
    modalities and, for an ImagingStudy, the study it describes."""
    return Resource(
        kind=kind,
        patient_id=filing.patient_key,
        study_uid=filing.source_key if kind == "ImagingStudy" else None,
        modalities=filing.modalities,
        attributes={"id": rid} if rid else {},
    )


def version_number(vid: str) -> int | None:
    """A version id as this server assigns them (1, 2, ...); None for anything else (no such version)."""
    if not (vid.isascii() and vid.isdigit()) or len(vid) > MAX_VERSION_DIGITS:
        return None
    return int(vid)


def _on(resource: Resource, rid: str, stored: Stored | None) -> Resource:
    if stored is None:  # unknown: the policy decides on what the subject may do at all; the handler answers 404
        return dataclasses.replace(resource, attributes={**resource.attributes, "id": rid})
    seen = filed(resource.kind, rid, stored.filing)
    return dataclasses.replace(
        resource,
        patient_id=seen.patient_id,
        study_uid=seen.study_uid,
        modalities=seen.modalities,
        attributes={**resource.attributes, "id": rid},
    )


def stored_resource(resource_type: str) -> ResourceHook:
    """A resource hook for routes on one stored resource: the resource's patient and modalities as filed now (an
    unknown id stays a bare resource: the policy decides on what the subject may do at all, and the handler then
    answers 404)."""

    async def hook(connection: ASGIConnection[Any, Any, Any, Any], resource: Resource) -> Resource:
        rid = connection.path_params.get(RID_PARAM)
        if rid is None:
            return resource
        fhir = fhir_services(connection.app)
        async with fhir.pool.acquire() as conn:
            stored = await fhir.repository.find(conn, resource_type, str(rid))
        return _on(resource, str(rid), stored)

    return hook


def stored_version(resource_type: str) -> ResourceHook:
    """A resource hook for vread: the version's patient and modalities as filed when it was written. A version
    that does not exist is decided as the resource is now (so a missing version of a resource the caller may not
    read is a 403, of one it may read a 404)."""

    async def hook(connection: ASGIConnection[Any, Any, Any, Any], resource: Resource) -> Resource:
        rid, vid = connection.path_params.get(RID_PARAM), connection.path_params.get(VID_PARAM)
        if rid is None:
            return resource
        fhir = fhir_services(connection.app)
        number = version_number(str(vid)) if vid is not None else None
        async with fhir.pool.acquire() as conn:
            stored = None
            if number is not None:
                stored = await fhir.repository.find_version(conn, resource_type, str(rid), number)
            if stored is None:
                stored = await fhir.repository.find(conn, resource_type, str(rid))
        return _on(resource, str(rid), stored)

    return hook
