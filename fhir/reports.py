"""DiagnosticReport as clients write it (R4 https://hl7.org/fhir/R4/diagnosticreport.html): the rules a report
must meet beyond its model before it is stored, and where it is filed for the policy.

Rules (a broken one is 422 Unprocessable Entity with the FHIRPath of the element, R4 3.1.0.4/3.1.0.7):
- `status` is a code of the required binding (report-status); anything else is 400 `code-invalid`.
- `subject` references a Patient of this server (`Patient/<id>`; absolute URLs on our base were made relative
  by `fhir.validation.localize`): a report is always about a patient the policy can decide on.
- `imagingStudy` references ImagingStudies of this server, of the same patient as the subject.
- Every other reference (`check_references`) is one of: contained (`#id`, naming a contained resource), an
  absolute `http(s)://` URL elsewhere, or a relative reference to a type this server hosts that exists.
  A relative reference to a type we do not host (`Observation/1` in `result`) cannot resolve here: 422; contain
  the Observation or reference it on the server that holds it. `urn:uuid:` references only resolve inside a
  transaction Bundle (R4 3.1.0.11.2); anywhere else they are 422.

Filing: the subject Patient's DICOM Patient ID and the union of the referenced studies' modalities.
"""

from __future__ import annotations

import re
from typing import Any

from fhir.errors import FhirError, Unprocessable
from fhir.repository import FhirRepository, Filing, Stored
from fhir.served import KINDS
from fhir.validation import references
from server.platform.db import Connection

REPORT_STATUS = frozenset(
    {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
"""http://hl7.org/fhir/ValueSet/diagnostic-report-status (required binding)."""

LOCAL_REFERENCE = re.compile(r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/([A-Za-z0-9\-.]{1,64}))?")


class InvalidCode(FhirError):
    code = "code-invalid"


def hosted_types() -> frozenset[str]:
    return frozenset(KINDS)


async def _local(conn: Connection, repo: FhirRepository, path: str, ref: str, hosted: frozenset[str]) -> Stored:
    match = LOCAL_REFERENCE.fullmatch(ref)
    if match is None:
        raise Unprocessable(f"{path}: {ref!r} is not a reference this server can resolve", path)
    rtype, rid, version = match.groups()
    if rtype not in hosted:
        raise Unprocessable(
            f"{path}: this server does not host {rtype}; contain it (#id) or reference it by absolute URL", path
        )
    stored = await repo.find(conn, rtype, rid)
    if stored is None or stored.deleted:
        raise Unprocessable(f"{path}: {rtype}/{rid} does not exist on this server", path)
    if version is not None and (not version.isdigit() or int(version) > stored.version):
        raise Unprocessable(f"{path}: {rtype}/{rid} has no version {version}", path)
    return stored


async def check_references(conn: Connection, repo: FhirRepository, resource_type: str, content: dict[str, Any]) -> None:
    """Every reference in `content` resolves (see the module's rules)."""
    hosted = hosted_types()
    contained = {c.get("id") for c in content.get("contained") or [] if isinstance(c, dict)}
    for path, ref in references(content, resource_type):
        if ref.startswith("#"):
            if ref != "#" and ref[1:] not in contained:
                raise Unprocessable(f"{path}: no contained resource has id {ref[1:]!r}", path)
        elif ref.startswith("urn:"):
            raise Unprocessable(f"{path}: {ref} does not resolve (urn: references only resolve in a transaction)", path)
        elif ref.startswith(("http://", "https://")):
            continue  # a resource on another server (references to our base were made relative)
        else:
            await _local(conn, repo, path, ref, hosted)


def _reference(value: Any, path: str) -> str:
    ref = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str):
        raise Unprocessable(f"{path}: a literal reference (reference) is required", path)
    return ref


async def prepare_report(conn: Connection, repo: FhirRepository, content: dict[str, Any]) -> Filing:
    """Check a client's DiagnosticReport (validated against the model already) and file it."""
    status = content.get("status")
    if status not in REPORT_STATUS:
        raise InvalidCode(
            f"DiagnosticReport.status: {status!r} is not one of {', '.join(sorted(REPORT_STATUS))}",
            "DiagnosticReport.status",
        )
    if "subject" not in content:
        raise Unprocessable("DiagnosticReport.subject: a report must reference its Patient", "DiagnosticReport.subject")
    hosted = hosted_types()
    subject_ref = _reference(content["subject"], "DiagnosticReport.subject")
    if not subject_ref.startswith("Patient/"):
        raise Unprocessable(
            f"DiagnosticReport.subject: must reference a Patient of this server, not {subject_ref!r}",
            "DiagnosticReport.subject",
        )
    patient = await _local(conn, repo, "DiagnosticReport.subject", subject_ref, hosted)
    patient_key = patient.filing.patient_key
    modalities: set[str] = set()
    for i, item in enumerate(content.get("imagingStudy") or []):
        path = f"DiagnosticReport.imagingStudy[{i}]"
        ref = _reference(item, path)
        if not ref.startswith("ImagingStudy/"):
            raise Unprocessable(f"{path}: must reference an ImagingStudy of this server, not {ref!r}", path)
        study = await _local(conn, repo, path, ref, hosted)
        if study.filing.patient_key != patient_key:
            raise Unprocessable(f"{path}: {ref} is not a study of the report's subject", path)
        modalities.update(study.filing.modalities)
    await check_references(conn, repo, "DiagnosticReport", content)
    return Filing(patient_key, tuple(sorted(modalities)))
