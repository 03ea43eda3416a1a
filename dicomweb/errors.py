"""The DICOMweb exception family (house style 3).

Each subclass carries data; `dicomweb/httperrors.py` maps them to HTTP statuses and bodies.
Domain code raises these and never imports HTTP types.
"""

from __future__ import annotations


class DicomWebError(Exception):
    """Base of every error the DICOMweb services raise on purpose."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidParameter(DicomWebError):
    """A path or query parameter is malformed (400)."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name = name


class BadRequest(DicomWebError):
    """The request as a whole cannot be understood (400): an unparsable multipart body, for example."""


class UnsupportedMediaType(DicomWebError):
    """The request body's Content-Type is not one this resource accepts (415)."""

    def __init__(self, detail: str, content_type: str | None) -> None:
        super().__init__(detail)
        self.content_type = content_type


class NotAcceptable(DicomWebError):
    """None of the media types or transfer syntaxes the client accepts can be produced (406)."""

    def __init__(self, detail: str, offered: tuple[str, ...] = ()) -> None:
        super().__init__(detail)
        self.offered = offered


class NotFound(DicomWebError):
    """The study, series, instance, frame or bulk data does not exist (404)."""

    def __init__(self, resource: str, detail: str | None = None) -> None:
        super().__init__(detail or f"{resource} not found")
        self.resource = resource


class PayloadTooLarge(DicomWebError):
    """A part or header exceeds the configured limit (413)."""


class RangeNotSatisfiable(DicomWebError):
    """A Range header asks for bytes that do not exist (416)."""

    def __init__(self, detail: str, total: int) -> None:
        super().__init__(detail)
        self.total = total


class StorageUnavailable(DicomWebError):
    """The blob store or database could not be reached (503); nothing was acknowledged."""


class StorageFull(StorageUnavailable):
    """Free space is below the watermark: new data is refused before it is read (503 with Retry-After, RFC 9110
    15.6.4); reads go on."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
