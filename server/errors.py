"""The one place where the packages' error handlers are put together for the app (house style 3): DICOMweb's
errors (`dicomweb.httperrors`), authz's (`authz.httperrors`), Litestar's HTTPException and anything unexpected
(`server.platform.http`)."""

from __future__ import annotations

from litestar.exceptions import HTTPException

from authz.errors import AuthzError
from authz.httperrors import authz_error
from dicomweb.errors import DicomWebError
from dicomweb.httperrors import dicomweb_error
from server.platform.http import http_error, internal_error

EXCEPTION_HANDLERS = {
    DicomWebError: dicomweb_error,
    AuthzError: authz_error,
    HTTPException: http_error,
    Exception: internal_error,
}
