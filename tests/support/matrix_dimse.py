"""The authorization matrix over DIMSE (a smaller one): configured peers (`HOUNSFIELD_DIMSE_PEERS`, each a role
and a subject) query and retrieve with pynetdicom: C-FIND at every level of both information models (every
patient's ID, every study's UID, a UID list, universal matching), C-GET of each study, of a UID list pairing a
study the peer may see with each other study (the DIMSE form of a duplicated identifier), and of each patient,
and C-MOVE of each study to a storage SCP the test runs. What comes back (identifiers, received instances,
error comments) is compared with the oracle like the HTTP answers."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.support.matrix_data import DataSet
from tests.support.matrix_extract import Disclosure, pieces
from tests.support.matrix_oracle import Identity

TITLE = "HOUNSFIELD"
DESTINATION = "MATRIXSCP"
PEERS: dict[str, Identity] = {
    "RAD": Identity("DIMSE RAD (radiologist)", "rad-dimse", ("radiologist",)),
    "REF": Identity("DIMSE REF (referring dr-who)", "dr-who", ("referring",)),
    "TECH": Identity("DIMSE TECH (technologist)", "tech-dimse", ("technologist",)),
    "RES": Identity("DIMSE RES (researcher)", "res-dimse", ("researcher",)),
    "EHR": Identity("DIMSE EHR (ehr)", "ehr-dimse", ("ehr",)),
    "AUD": Identity("DIMSE AUD (auditor)", "sec-dimse", ("auditor",)),
}
"""Calling AE title -> the identity the server maps it to."""

MODELS = {
    "find study-root": StudyRootQueryRetrieveInformationModelFind,
    "find patient-root": PatientRootQueryRetrieveInformationModelFind,
    "get study-root": StudyRootQueryRetrieveInformationModelGet,
    "get patient-root": PatientRootQueryRetrieveInformationModelGet,
    "move study-root": StudyRootQueryRetrieveInformationModelMove,
}
SUCCESS_OR_PENDING = frozenset({0x0000, 0xFF00, 0xFF01, 0xB000})


def peers_setting() -> str:
    """HOUNSFIELD_DIMSE_PEERS for `PEERS`."""
    return ",".join(f"{ae}={'+'.join(i.roles)}:{i.sub}" for ae, i in PEERS.items())


@dataclass(frozen=True)
class DimseProbe:
    op: str
    """A key of MODELS."""
    shape: str
    label: str
    keys: tuple[tuple[str, Any], ...]
    target: tuple[str, str | None] | None = None
    """A retrieve of one study: its (patient, study); a denied one must not succeed."""

    @property
    def route(self) -> str:
        return f"C-{self.op.split()[0].upper()} {self.op.split()[1]}"

    @property
    def action(self) -> str:
        return "search" if self.op.startswith("find") else "read"


def probes(data: DataSet) -> list[DimseProbe]:
    patients = sorted({s.patient for s in data.studies})
    out: list[DimseProbe] = []
    for op in ("find study-root", "find patient-root"):
        base = (("QueryRetrieveLevel", "STUDY"), ("PatientID", ""), ("StudyInstanceUID", ""), ("ModalitiesInStudy", ""))
        out.append(DimseProbe(op, "STUDY universal", "all", base))
        out += [DimseProbe(op, "STUDY by PatientID", p, (*base[:1], ("PatientID", p), *base[2:])) for p in patients]
        for s in data.studies:
            label = f"{s.patient} {s.modality}"
            out.append(DimseProbe(op, "STUDY by UID", label, (*base[:2], ("StudyInstanceUID", s.study))))
            series = (("QueryRetrieveLevel", "SERIES"), ("StudyInstanceUID", s.study), ("SeriesInstanceUID", ""))
            out.append(DimseProbe(op, "SERIES of a study", label, (*series, ("PatientID", ""))))
            image = (("QueryRetrieveLevel", "IMAGE"), *series[1:2], ("SeriesInstanceUID", s.series))
            out.append(DimseProbe(op, "IMAGE of a series", label, (*image, ("SOPInstanceUID", ""), ("PatientID", ""))))
        listed = [s.study for s in data.studies if s.patient in ("P1", "P5")]
        out.append(DimseProbe(op, "STUDY UID list", "P1 and P5", (*base[:2], ("StudyInstanceUID", listed))))
    out.append(
        DimseProbe(
            "find patient-root", "PATIENT universal", "all", (("QueryRetrieveLevel", "PATIENT"), ("PatientID", ""))
        )
    )
    decoys = [s for s in data.studies if (s.patient, s.modality) in (("P1", "CT"), ("P4", "CT"))]
    for s in data.studies:
        label, target = f"{s.patient} {s.modality}", (s.patient, s.study)
        study = (("QueryRetrieveLevel", "STUDY"), ("StudyInstanceUID", s.study))
        out.append(DimseProbe("get study-root", "STUDY", label, study, target))
        out.append(DimseProbe("move study-root", "STUDY", label, study, target))
        for decoy in decoys:
            if decoy is not s:
                listed = [decoy.study, s.study]
                keys = (("QueryRetrieveLevel", "STUDY"), ("StudyInstanceUID", listed))
                out.append(
                    DimseProbe(
                        "get study-root", "STUDY UID list decoy first", f"{label} (decoy {decoy.patient})", keys, target
                    )
                )
    for p in patients:
        keys = (("QueryRetrieveLevel", "PATIENT"), ("PatientID", p))
        out.append(DimseProbe("get patient-root", "PATIENT", p, keys))
    return out


@dataclass
class Outcome:
    statuses: list[int] = field(default_factory=list)
    identifiers: list[Dataset] = field(default_factory=list)
    """C-FIND matches, or instances received by C-GET / C-MOVE."""
    comments: list[str] = field(default_factory=list)

    @property
    def final(self) -> int:
        return self.statuses[-1] if self.statuses else -1


class MoveDestination:
    """A storage SCP (pynetdicom) that C-MOVE sends to; it keeps what each operation delivered."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        self.moving = threading.Lock()
        """Held by one C-MOVE at a time (peers run in parallel), so that what arrives is that move's."""
        ae = AE(ae_title=DESTINATION)
        ae.add_supported_context(CTImageStorage)
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return 0x0000

    def take(self) -> list[Dataset]:
        with self._lock:
            got, self.received = self.received, []
        return got

    def close(self) -> None:
        self.server.shutdown()


def _query(keys: tuple[tuple[str, Any], ...]) -> Dataset:
    ds = Dataset()
    for keyword, value in keys:
        setattr(ds, keyword, value)
    return ds


def _collect(outcome: Outcome, answers: Any, op: str, title: str) -> None:
    for status, identifier in answers:
        assert status is not None, f"{title}: no answer to a {op}"
        outcome.statuses.append(int(status.Status))
        if "ErrorComment" in status:
            outcome.comments.append(str(status.ErrorComment))
        if op.startswith("find") and identifier is not None and status.Status in (0xFF00, 0xFF01):
            outcome.identifiers.append(identifier)


def run(
    port: int, title: str, items: list[DimseProbe], destination: MoveDestination
) -> list[tuple[DimseProbe, Outcome]]:
    """Every probe of one peer on one association per information model, one operation at a time."""
    received: list[Dataset] = []
    results: list[tuple[DimseProbe, Outcome]] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset)
        return 0x0000

    for op, model in MODELS.items():
        mine = [p for p in items if p.op == op]
        if not mine:
            continue
        ae = AE(ae_title=title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        contexts = [build_context(model)]
        extra: dict[str, Any] = {}
        if op.startswith("get"):
            contexts.append(build_context(CTImageStorage))
            extra = dict(
                ext_neg=[build_role(CTImageStorage, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)]
            )
        assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title=TITLE, **extra)
        assert assoc.is_established, f"{title} could not associate"
        try:
            for probe in mine:
                outcome = Outcome()
                query = _query(probe.keys)
                answers: Any = None
                if op.startswith("find"):
                    answers = assoc.send_c_find(query, model)
                elif op.startswith("get"):
                    answers = assoc.send_c_get(query, model)
                if op.startswith("move"):
                    with destination.moving:
                        _collect(outcome, assoc.send_c_move(query, DESTINATION, model), op, title)
                        outcome.identifiers += destination.take()
                else:
                    _collect(outcome, answers, op, title)
                outcome.identifiers += received
                received.clear()
                results.append((probe, outcome))
        finally:
            assoc.release()
    return results


def disclosures(probe: DimseProbe, outcome: Outcome, data: DataSet) -> set[Disclosure]:
    """Patients in the identifiers and instances that came back, and in error comments (less what the request
    itself named)."""
    found: set[Disclosure] = set()
    for ds in outcome.identifiers:
        patient, study = str(ds.get("PatientID", "")), str(ds.get("StudyInstanceUID", "") or "")
        known = data.tokens.get(study) if study else None
        if patient:
            found.add(Disclosure("imaging", patient, known[1] if known else None, "identifier"))
        if known:
            found.add(Disclosure("imaging", known[0], known[1], "identifier"))
    asked = {str(v) for _, value in probe.keys for v in (value if isinstance(value, list) else [value])}
    for comment in outcome.comments:
        for piece in pieces(comment):
            hit = data.tokens.get(piece)
            if hit is not None and piece not in asked:
                found.add(Disclosure("imaging", hit[0], hit[1], "error comment"))
    return found
