"""Access constraints a policy puts on searches, as plain values (no authz types here): they become SQL
conditions in the search builder so that paging and counts only ever see permitted rows.

A row is visible when it passes the limits (`patient_ids`, `patient_ids_excluded`, `modalities_excluded`), or
when it belongs to the `granted` patient (and study): what a break-glass session adds to a search."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicomweb.errors import DicomWebError

KNOWN = frozenset({"patient_ids", "patient_ids_excluded", "modalities_excluded", "granted"})


class UnknownConstraint(DicomWebError):
    """The policy returned a constraint this server cannot enforce: refuse rather than widen the search."""


@dataclass(frozen=True, slots=True)
class Grant:
    """Rows of this patient (and of this study only, when given) are visible whatever the limits say."""

    patient_id: str
    study_uid: str | None = None

    @classmethod
    def from_policy(cls, value: Any) -> Grant:
        if not isinstance(value, Mapping) or set(value) - {"patient_id", "study_uid"}:
            raise UnknownConstraint("policy constraint granted must be {patient_id, study_uid?}")
        patient, study = value.get("patient_id"), value.get("study_uid")
        if not isinstance(patient, str) or not patient or not (study is None or (isinstance(study, str) and study)):
            raise UnknownConstraint("policy constraint granted needs a patient_id (and a study_uid or none)")
        return cls(patient, study)


@dataclass(frozen=True, slots=True)
class AccessConstraints:
    patient_ids: tuple[str, ...] | None = None
    """Only these patients (None: no such limit; empty: nothing)."""
    patient_ids_excluded: tuple[str, ...] = ()
    modalities_excluded: tuple[str, ...] = ()
    granted: Grant | None = None
    """Rows visible besides those the limits above let through (None: no such rows)."""
    owner: tuple[str, str] | None = None
    """(issuer, sub): only resources this identity wrote, whatever else is granted. Never from the policy: the
    FHIR layer sets it for the types whose searches list the caller's own resources (Subscription)."""

    @classmethod
    def from_policy(cls, constraints: Mapping[str, Any]) -> AccessConstraints:
        unknown = set(constraints) - KNOWN
        if unknown:
            raise UnknownConstraint(f"policy constraint(s) not enforceable: {', '.join(sorted(unknown))}")

        def strings(key: str) -> tuple[str, ...]:
            value = constraints.get(key) or []
            if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
                raise UnknownConstraint(f"policy constraint {key} must be a list")
            return tuple(sorted(str(v) for v in value))

        return cls(
            patient_ids=strings("patient_ids") if "patient_ids" in constraints else None,
            patient_ids_excluded=strings("patient_ids_excluded"),
            modalities_excluded=strings("modalities_excluded"),
            granted=Grant.from_policy(constraints["granted"]) if "granted" in constraints else None,
        )

    @property
    def limited(self) -> bool:
        """Whether the limits (not the grant) narrow the rows at all."""
        return self.patient_ids is not None or bool(self.patient_ids_excluded) or bool(self.modalities_excluded)

    @property
    def empty(self) -> bool:
        return not self.limited


UNRESTRICTED = AccessConstraints()
