"""The FHIR package's exception family (house style 3): each error carries the HTTP status and the R4
OperationOutcome issue code (https://hl7.org/fhir/R4/valueset-issue-type.html) that `fhir.outcome` renders at
the edge; domain code raises them without knowing HTTP."""

from __future__ import annotations


class FhirError(Exception):
    """The FHIR API's own errors: HTTP `status`, OperationOutcome issue `code` (R4 IssueType) and, where the
    problem is in one element, its FHIRPath `expression` (e.g. `DiagnosticReport.status`)."""

    status = 400
    code = "invalid"

    def __init__(self, detail: str, expression: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.expression = expression


class ResourceNotFound(FhirError):
    status = 404
    code = "not-found"


class ResourceGone(FhirError):
    """The resource existed and was deleted (R4 3.1.0.2 read: 410 Gone)."""

    status = 410
    code = "deleted"


class VersionConflict(FhirError):
    """`If-Match` names a version that is not the current one (R4 3.1.0.4.2 managing resource contention)."""

    status = 412
    code = "conflict"


class Conflict(FhirError):
    """The request conflicts with the server's state (e.g. several matches for a conditional create)."""

    status = 409
    code = "conflict"


class Unprocessable(FhirError):
    """A well-formed resource that breaks a rule of the server or of FHIR (R4: 422 Unprocessable Entity)."""

    status = 422
    code = "processing"


class NotSupported(FhirError):
    status = 405
    code = "not-supported"


class RecordDamaged(FhirError):
    """A stored record that cannot be read back (altered outside the application)."""

    status = 500
    code = "exception"
