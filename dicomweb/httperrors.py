"""DICOMweb's exception family as HTTP responses: each error's status, a JSON body `{"error": ..., "status": ...}`
and a `Warning: 299` header (PS3.18 8.6.3 asks for a Warning header explaining failures)."""

from __future__ import annotations

from typing import Any

from litestar import MediaType, Request, Response

from dicomweb.errors import (
    BadRequest,
    DicomWebError,
    InvalidParameter,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    StorageFull,
    StorageUnavailable,
    UnsupportedMediaType,
)
from server.platform.http import warning_header

_STATUS: list[tuple[type[DicomWebError], int]] = [
    (InvalidParameter, 400),
    (BadRequest, 400),
    (UnsupportedMediaType, 415),
    (NotAcceptable, 406),
    (NotFound, 404),
    (PayloadTooLarge, 413),
    (RangeNotSatisfiable, 416),
    (StorageUnavailable, 503),
]


def status_for(exc: DicomWebError) -> int:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def dicomweb_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, object]]:
    assert isinstance(exc, DicomWebError)
    status = status_for(exc)
    headers = {"Warning": warning_header(exc.detail)}
    if isinstance(exc, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{exc.total}"
    if isinstance(exc, StorageFull):
        headers["Retry-After"] = str(exc.retry_after)
    return Response(
        {"error": exc.detail, "status": status},
        status_code=status,
        headers=headers,
        media_type=MediaType.JSON,
    )
