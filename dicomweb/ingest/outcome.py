"""One instance's result, as the Store Instances Response Module reports it (PS3.18 10.5.3, PS3.4 Annex B.2.3):
the same value answers a STOW-RS part, a C-STORE request, an imported file and an AI result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dicomweb.ingest.admission import NOT_AUTHORIZED, Denial
from dicomweb.ingest.reasons import InstanceRejected

if TYPE_CHECKING:
    from dicomweb.ingest.parse import ParsedInstance


@dataclass(frozen=True, slots=True)
class PatientConflict:
    """An instance refused because its study is filed under another patient: both patients, for the audit record
    only (the sender may not be allowed to see the patient the study is filed under)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    patient_id: str | None
    issuer: str | None
    """The instance's Patient ID and Issuer of Patient ID."""
    study_patient_id: str | None
    study_issuer: str | None
    """Those the study is filed under."""

    def describe(self) -> str:
        """For the audit record (outcome description), never for the sender."""
        return (
            f"instance of patient {_patient(self.patient_id, self.issuer)} refused: study {self.study_uid} is filed "
            f"under patient {_patient(self.study_patient_id, self.study_issuer)}"
        )


def _patient(patient_id: str | None, issuer: str | None) -> str:
    text = repr(patient_id) if patient_id is not None else "(no Patient ID)"
    return f"{text} (issuer {issuer!r})" if issuer is not None else text


PATIENT_CONFLICT_COMMENT = "study is filed under another patient; instance not stored"
"""What the sender is told (STOW-RS Error Comment, C-STORE Error Comment): names no patient."""


@dataclass(slots=True)
class Outcome:
    """One instance's result, as the Store Instances Response Module reports it."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None = None
    series_uid: str | None = None
    failure: int | None = None
    warnings: list[tuple[int, str]] = field(default_factory=list)
    comment: str | None = None
    conflict: PatientConflict | None = None
    """Set when the failure is a study filed under another patient (the caller audits it)."""
    denial: Denial | None = None
    """Set when the policy refused to file the instance (the caller audits it with the decision's reasons)."""
    committed: bool = False
    """This store committed the instance's rows (new or replaced), with its audit record when one was given;
    false for a failure and for bytes that were already stored."""

    @classmethod
    def rejected(cls, exc: InstanceRejected) -> Outcome:
        """The failure of an instance refused before it was stored (unreadable, not spooled, too large)."""
        return cls(exc.sop_class, exc.sop_instance, failure=exc.reason, comment=exc.comment)

    @classmethod
    def of(cls, parsed: ParsedInstance) -> Outcome:
        """The outcome of a parsed instance before any decision: its identity and the parse's coercion warnings."""
        return cls(
            parsed.sop_class_uid,
            parsed.sop_instance_uid,
            parsed.study_uid,
            parsed.series_uid,
            warnings=list(parsed.warnings),
        )

    def deny(self, denial: Denial) -> None:
        """The policy refused to file the instance (0124H); the reasons go to the audit record only."""
        self.failure, self.comment, self.denial = NOT_AUTHORIZED, denial.comment, denial

    @property
    def ok(self) -> bool:
        return self.failure is None
