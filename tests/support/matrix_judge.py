"""Judging the authorization matrix's cells against the oracle (`tests.support.matrix_oracle`), and listing the
failures compactly.

A cell fails when its answer is a 5xx, reveals a patient (or, for imaging, a study) the oracle does not let the
identity see, is a denial that names a patient, or answers a single read of a resource the identity may not see
with anything but 403 or 404 (400 too where the request's identifiers were duplicated or empty). The admin's
requests must succeed: an admin failure means a filler or the data set is wrong, and the matrix would be blind.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.support import matrix_dimse
from tests.support.matrix_data import DataSet
from tests.support.matrix_dimse import SUCCESS_OR_PENDING, DimseProbe, Outcome
from tests.support.matrix_extract import Answer, Disclosure, disclosures
from tests.support.matrix_oracle import Identity, allows
from tests.support.matrix_probes import Probe


def _permitted(identity: Identity, probe: Probe, d: Disclosure, data: DataSet) -> bool:
    action = probe.action if d.group == probe.group else "search"
    if d.group == "imaging" and d.study is not None:
        return allows(identity, "imaging", action, d.patient, data.modality(d.study))
    if d.group == "imaging":  # a patient named without a study: some study of theirs must be visible
        studies = data.studies_of(d.patient) or {None}
        return any(allows(identity, "imaging", action, d.patient, data.modality(s)) for s in studies)
    return allows(identity, d.group, action, d.patient)


def _describe(d: Disclosure, data: DataSet) -> str:
    modality = f" {data.modality(d.study)}" if d.group == "imaging" and d.study else ""
    return f"{d.patient} {d.group}{modality}"


@dataclass(frozen=True, order=True)
class Finding:
    """What is wrong with one cell: `kind` with the status, and the patients concerned."""

    kind: str
    status: int
    patients: tuple[str, ...] = ()


def target_allowed(identity: Identity, probe: Probe, data: DataSet) -> bool:
    assert probe.target is not None
    patient, study = probe.target
    return allows(identity, probe.group, probe.action, patient, data.modality(study))


def judge(identity: Identity, probe: Probe, answer: Answer, data: DataSet) -> list[Finding]:
    """Every rule one cell breaks: no 5xx; nothing revealed that the oracle does not permit; a denial names no
    patient; a single read of a resource the identity may not see answers 403 or 404 (or, for a request with
    duplicated or empty identifiers, 400)."""
    status = answer.status
    if status >= 500:
        return [Finding("server error", status)]
    found = disclosures(answer, probe, data)
    findings = []
    if status == 403 and found:
        findings.append(Finding("the denial names", status, tuple(sorted({d.patient for d in found}))))
    leaked = sorted({_describe(d, data) for d in found if not _permitted(identity, probe, d, data)})
    if leaked and status != 403:
        findings.append(Finding("reveals", status, tuple(leaked)))
    if probe.target is not None and not target_allowed(identity, probe, data):
        if status not in probe.allowed_statuses and not leaked:
            findings.append(Finding("answers a read it may not make with", status, (probe.target[0] or "-",)))
    if "admin" in identity.roles and probe.allowed_statuses == (403, 404) and not 200 <= status < 300:
        findings.append(Finding("the admin's request failed (a filler or the data set is wrong)", status))
    return findings


@dataclass
class Report:
    identities: int
    routes: int
    excluded: int
    shapes: int
    cells: int
    requests: int
    failing: int
    lines: list[str]

    def size(self) -> str:
        return (
            f"authorization matrix: {self.identities} identities x {self.routes} routes "
            f"({self.excluded} more are not data reads) x {self.shapes} shapes: {self.cells} cells, "
            f"{self.requests} HTTP requests; {self.failing} failing cells"
        )


Failure = tuple[str, str, str, str, Finding]
"""(identity, route, shape, label, finding)."""


def summarize(failures: list[Failure]) -> list[str]:
    """Failing cells, compactly: one line per (identity, route, shape, kind of failure), with the patients
    concerned and how many requests (labels) failed so."""
    grouped: dict[tuple[str, str, str, str], tuple[set[str], set[str]]] = {}
    for identity, route, shape, label, finding in failures:
        key = (identity, route, shape, f"{finding.kind} {finding.status}")
        patients, labels = grouped.setdefault(key, (set(), set()))
        patients.update(finding.patients)
        labels.add(label)
    return [
        f"{identity} | {route} | {shape} | {kind}: {', '.join(sorted(patients))} | {len(labels)} requests"
        for (identity, route, shape, kind), (patients, labels) in sorted(grouped.items())
    ]


# --- DIMSE --------------------------------------------------------------------------------------------------


def judge_dimse(identity: Identity, probe: DimseProbe, outcome: Outcome, data: DataSet) -> list[Finding]:
    """The HTTP rules in DIMSE terms: nothing revealed that the oracle does not permit, a refusal's error comment
    names no patient, a retrieve of a study the peer may not see does not succeed."""
    found = matrix_dimse.disclosures(probe, outcome, data)
    findings = []
    named = sorted({d.patient for d in found if d.via == "error comment"})
    if named:
        findings.append(Finding("the refusal names", outcome.final, tuple(named)))
    leaked = sorted(
        {
            _describe(d, data)
            for d in found
            if d.via != "error comment" and not _dimse_permitted(identity, probe, d, data)
        }
    )
    if leaked:
        findings.append(Finding("reveals", outcome.final, tuple(leaked)))
    if probe.target is not None:
        patient, study = probe.target
        if not allows(identity, "imaging", "read", patient, data.modality(study)):
            if not leaked and outcome.final in SUCCESS_OR_PENDING:
                findings.append(Finding("a retrieve it may not make succeeds", outcome.final, (patient,)))
        elif "radiologist" in identity.roles and (outcome.final != 0x0000 or not outcome.identifiers):
            findings.append(Finding("a radiologist's retrieve failed (probe or data set wrong)", outcome.final))
    return findings


def _dimse_permitted(identity: Identity, probe: DimseProbe, d: Disclosure, data: DataSet) -> bool:
    studies = {d.study} if d.study is not None else data.studies_of(d.patient)
    return any(allows(identity, "imaging", probe.action, d.patient, data.modality(s)) for s in studies)
