"""Access constraints a policy puts on searches, as plain values (no authz types here): they become SQL
conditions in the search builder so that paging and counts only ever see permitted rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicomweb.errors import DicomWebError


class UnknownConstraint(DicomWebError):
    """The policy returned a constraint this server cannot enforce: refuse rather than widen the search."""


@dataclass(frozen=True, slots=True)
class AccessConstraints:
    patient_ids: tuple[str, ...] | None = None
    """Only these patients (None: no such limit; empty: nothing)."""
    patient_ids_excluded: tuple[str, ...] = ()
    modalities_excluded: tuple[str, ...] = ()

    @classmethod
    def from_policy(cls, constraints: Mapping[str, Any]) -> AccessConstraints:
        known = {"patient_ids", "patient_ids_excluded", "modalities_excluded"}
        unknown = set(constraints) - known
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
        )

    @property
    def empty(self) -> bool:
        return self.patient_ids is None and not self.patient_ids_excluded and not self.modalities_excluded


UNRESTRICTED = AccessConstraints()
