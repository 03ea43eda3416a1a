"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3): Patient Root and Study Root, levels PATIENT, STUDY, SERIES, IMAGE.

The identifier's unique keys (lists allowed, C.4.2.2.1) select stored instances; the policy decides `read` on
each matched study (with its patient and modalities, as a WADO-RS retrieve). pynetdicom runs the
sub-operations from the handler's yields and reports them as the standard says: a Pending response per
sub-operation with the Number of Remaining/Completed/Failed/Warning Sub-operations, then Success, or Warning
B000 when some failed, and Cancel FE00 after a C-CANCEL. C-MOVE opens a new association to the Move
Destination, which must be a configured destination (unknown: A801), over TLS when it is marked so; C-GET sends
on the same association.
Each instance goes in its stored transfer syntax when the peer accepted it, else decoded (or re-encoded without
loss) into a syntax the peer accepted (`dicomweb.dimse.syntaxes`: what the move proposes, what a C-GET's storage
contexts accept, what is converted); one that no accepted syntax can carry fails its sub-operation (counted as
failed, its UID in the Failed SOP Instance UID List).
A malformed identifier is A900; a denial 0124 (Refused: Not Authorized); a failure of the server C000. pynetdicom
opens the move association before the first status, so these refusals cost the destination one empty
association.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterator
from typing import Any

import asyncpg
import pydicom
from pydicom.dataset import Dataset
from pynetdicom import build_context, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from authz.actor import Actor
from authz.auditrecord import EventType
from authz.decision import Decision, Resource
from authz.errors import denial_comment
from authz.policy_input import dicomweb_resource
from dicomweb.dimse.audit import BEGIN_TRANSFERRING, operation_record
from dicomweb.dimse.node import Node, OperationTimeout
from dicomweb.dimse.routing import SQL
from dicomweb.dimse.sender import tls_args
from dicomweb.dimse.syntaxes import NotSendable, accepted_syntaxes, outgoing, proposals
from dicomweb.dimse.tcp import NODELAY_HANDLERS
from dicomweb.index.facts import IndexFacts
from dicomweb.uids import is_valid_uid

log = logging.getLogger(__name__)

PATIENT_ROOT = ("1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3")  # MOVE, GET
PENDING, CANCEL = 0xFF00, 0xFE00
NOT_AUTHORIZED, BAD_IDENTIFIER, UNABLE, NO_MATCHES_POSSIBLE = 0x0124, 0xA900, 0xC000, 0xA701
_KEYS = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}

INDEX_FACTS = IndexFacts()


class BadIdentifier(ValueError):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Keys:
    level: str
    patient_id: str | None = None
    studies: list[str] | None = None
    series: list[str] | None = None
    instances: list[str] | None = None


@dataclasses.dataclass(slots=True)
class Plan:
    rows: list[asyncpg.Record]
    decision: Decision | None = None
    denied: str | None = None


def _uids(identifier: Dataset, keyword: str) -> list[str] | None:
    value = identifier.get(keyword)
    if value is None or value == "":
        return None
    uids = [str(v).strip() for v in (value if isinstance(value, list | pydicom.multival.MultiValue) else [value])]
    bad = [u for u in uids if not is_valid_uid(u)]
    if bad or not uids:
        raise BadIdentifier(f"{keyword}: not a valid UID list")
    return uids


def read_keys(identifier: Dataset, model: str) -> Keys:
    """The unique keys of a C-MOVE/C-GET identifier (PS3.4 C.4.2.2.1); raises BadIdentifier."""
    level = str(identifier.get("QueryRetrieveLevel") or "").strip().upper()
    if level == "PATIENT":
        if model not in PATIENT_ROOT:
            raise BadIdentifier("PATIENT level needs the Patient Root model")
        patient = str(identifier.get("PatientID") or "").strip()
        if not patient:
            raise BadIdentifier("PATIENT level needs a PatientID")
        return Keys(level, patient_id=patient)
    if level not in _KEYS:
        raise BadIdentifier(f"Query/Retrieve Level {level[:16]!r} is not supported")
    keys = Keys(
        level,
        patient_id=str(identifier.get("PatientID") or "").strip() or None if model in PATIENT_ROOT else None,
        studies=_uids(identifier, "StudyInstanceUID"),
        series=_uids(identifier, "SeriesInstanceUID") if level != "STUDY" else None,
        instances=_uids(identifier, "SOPInstanceUID") if level == "IMAGE" else None,
    )
    if getattr(keys, {"STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}[level]) is None:
        raise BadIdentifier(f"{level} level needs {_KEYS[level]}")
    return keys


async def _plan(node: Node, actor: Actor, keys: Keys) -> Plan:
    async with node.pool.acquire() as conn:
        rows = await conn.fetch(SQL["retrieve_instances"], keys.studies, keys.series, keys.instances, keys.patient_id)
        studies = list(dict.fromkeys(r["study_uid"] for r in rows))
        facts = {uid: await INDEX_FACTS.study_facts(conn, uid) for uid in studies}
    plan = Plan(list(rows))
    for uid in studies:
        row = facts[uid]
        resource = dicomweb_resource(
            "study",
            patient_id=row.patient_id if row else None,
            study_uid=uid,
            modalities_in_study=list(row.modalities) if row else [],
        )
        plan.decision = await actor.decide("read", resource)
        if not plan.decision.allow:
            plan.denied = f"study {uid}: " + ("; ".join(plan.decision.reasons) or "denied by policy")
            break
    return plan


def _read(node: Node, row: asyncpg.Record) -> bytes:
    return node.run(node.blobs.read_range(row["blob_key"], 0, int(row["size_bytes"])))


def _dataset(data: bytes, row: asyncpg.Record, peer: Any) -> Dataset:
    """The instance in a syntax `peer` (the association the sub-operations go on) accepted; when there is none,
    as stored, so that pynetdicom fails the sub-operation and names the instance in the Failed SOP Instance UID
    List of the final response (PS3.4 C.4.2, C.4.3)."""
    accepted = accepted_syntaxes(peer, str(row["sop_class_uid"])) if peer is not None else []
    try:
        return outgoing(data, str(row["transfer_syntax_uid"]), accepted)
    except NotSendable as exc:
        log.warning("an instance is not sent: %s", exc)  # UIDs of syntaxes only, no identifiers
        return pydicom.dcmread(io.BytesIO(data))


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class _Operation:
    """One C-MOVE or C-GET: its plan, audit records, and the sub-operation datasets."""

    def __init__(self, event: Any, node: Node, command: str) -> None:
        self.event = event
        self.node = node
        self.command = command
        self.address: str | None = event.assoc.requestor.address
        self.principal = node.principal(event.assoc.requestor.ae_title)
        self.plan = Plan([])
        self.failure: tuple[int, str] | None = None
        self.peer: Any = event.assoc if command == "C-GET" else None
        """The association the sub-operations go on: C-GET's own; C-MOVE's to the destination, once made."""

    def on_peer(self, event: Any) -> None:
        """EVT_ACCEPTED of the C-MOVE sub-association (triggered before pynetdicom marks it established, so before
        the first sub-operation): the contexts its destination accepted."""
        self.peer = event.assoc

    def prepare(self) -> None:
        if self.principal is None:
            self.failure = (NOT_AUTHORIZED, "calling AE title not recognized")
            return
        try:
            keys = read_keys(self.event.identifier, str(self.event.request.AffectedSOPClassUID))
            self.plan = self.node.run(_plan(self.node, self.node.actor(self.principal, self.address), keys))
        except (BadIdentifier, ValueError, KeyError, TypeError) as exc:
            self.failure = (BAD_IDENTIFIER, f"identifier: {exc}")
        except OperationTimeout as exc:
            self.failure = (UNABLE, str(exc))
        if self.plan.denied:
            self.failure = (NOT_AUTHORIZED, self.plan.denied)
        self.audit(BEGIN_TRANSFERRING if self.failure is None and self.plan.rows else None)

    def contexts(self) -> list[Any]:
        items = [(str(r["sop_class_uid"]), str(r["transfer_syntax_uid"])) for r in self.plan.rows]
        return proposals(items) or [build_context(Verification)]

    def sub_operations(self) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        if self.failure is not None:
            code, comment = self.failure
            if self.plan.denied and self.plan.decision is not None:  # the policy's reasons: audit record only
                comment = denial_comment(self.plan.decision.decision_id)
            yield _status(code, comment), None
            return
        for row in self.plan.rows:
            if self.event.is_cancelled:
                yield CANCEL, None
                break
            try:
                ds = _dataset(_read(self.node, row), row, self.peer)
            except Exception as exc:  # a missing or unreadable blob fails this sub-operation only
                log.warning("%s: instance could not be read: %s", self.command, type(exc).__name__)
                yield _status(UNABLE, "a stored instance could not be read"), None
                break
            yield PENDING, ds
        self.audit(EventType.INSTANCES_TRANSFERRED if self.plan.rows else None)

    def audit(self, event_type: Any) -> None:
        if self.principal is None:
            return
        rows = self.plan.rows
        studies = list(dict.fromkeys(r["study_uid"] for r in rows))
        resource = Resource(
            kind="study", patient_id=rows[0]["patient_id"] if rows else None, study_uid=studies[0] if studies else None
        )
        status, desc = self.failure or (0, f"{len(rows)} instances of {len(studies)} studies")
        if self.failure is None and event_type is None:
            return
        if self.command == "C-MOVE":
            desc = f"{desc} to {self.event.move_destination}"
        record = operation_record(
            self.principal,
            self.plan.decision,
            action="read",
            command=self.command,
            resource=resource,
            status=status,
            address=self.address,
            outcome_desc=desc,
            event_type=event_type or EventType.INSTANCES_TRANSFERRED,
        )
        try:
            self.node.run(self.node.audit.append(record))
        except Exception:
            log.exception("%s audit record could not be written", self.command)


def handle_move(event: Any, node: Node) -> Iterator[Any]:
    """EVT_C_MOVE: yields the destination, the number of sub-operations, then (status, dataset) pairs."""
    destination = node.config.destination(event.move_destination or "")
    op = _Operation(event, node, "C-MOVE")
    if destination is None:
        op.failure = (0xA801, f"move destination {str(event.move_destination)[:16]!r} unknown")
        op.audit(None)
        yield None, None  # pynetdicom answers A801 Move Destination Unknown
        return
    op.prepare()
    handlers = [*NODELAY_HANDLERS, (evt.EVT_ACCEPTED, op.on_peer)]
    options: dict[str, Any] = {"contexts": op.contexts(), "evt_handlers": handlers}
    if destination.tls:
        options["tls_args"] = tls_args(destination, node.config.tls)
    yield destination.host, destination.port, options
    yield len(op.plan.rows) if op.failure is None else 1
    yield from op.sub_operations()


def handle_get(event: Any, node: Node) -> Iterator[Any]:
    """EVT_C_GET: yields the number of sub-operations, then (status, dataset) pairs."""
    op = _Operation(event, node, "C-GET")
    op.prepare()
    yield len(op.plan.rows) if op.failure is None else 1
    yield from op.sub_operations()


__all__ = ["handle_get", "handle_move", "read_keys"]
