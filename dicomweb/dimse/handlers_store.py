"""C-STORE SCP (PS3.4 Annex B) through the one ingest entry of every channel (`StoreService.store`).

The received data set is written, with the File Meta Information pynetdicom builds from the presentation
context and the request (PS3.10 7.1), as a Part 10 file into the spool (`dicomweb.ingest.spool`); then the same
validation, blob write, index transaction and listeners (jobs, auto-routing) run as for a STOW-RS part, with an
origin naming the calling and called AE titles and the peer's address.
The Store Instances Response Module's failure and warning reasons are PS3.4 Annex B codes already, so they
are the C-STORE-RSP status: A700 out of resources, A900 data set does not match SOP class, C000 cannot
understand (also an instance whose study is filed under another patient), 0111 duplicate SOP instance (overwrite
off), 0110 processing failure, B000 coercion; a policy denial is 0124 Refused: Not Authorized (a PS3.7 Annex C
general status).

The status is the truth about the instance: the record of a stored instance (DICOM Instances Transferred,
PS3.15 A.5.3.4) is written in its index transaction, so an instance is stored and recorded or neither (A700 when
the record cannot be written), and once the ingest has begun it is not cut off by the DIMSE timeout (an ingest
cancelled midway could still commit after a failure was answered). Other outcomes (a failure, bytes already
stored) are recorded after the ingest; when that record cannot be written the status still goes out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from authz.auditrecord import AuditRecord
from authz.decision import Decision, Resource
from authz.principal import Principal
from dicomweb.dimse.audit import operation_record
from dicomweb.dimse.node import Node, OperationTimeout
from dicomweb.ingest.admission import NOT_AUTHORIZED, Admission, Denial, instance_resource, policy_admission
from dicomweb.ingest.checks import check_structure
from dicomweb.ingest.events import InstanceStored
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.outcome import Outcome
from dicomweb.ingest.parse import ParsedInstance
from dicomweb.ingest.reasons import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, InstanceRejected
from dicomweb.ingest.spool import Spooled
from server.platform.db import unavailable

log = logging.getLogger(__name__)

SUCCESS = 0x0000


def _response(status: int, comment: str | None = None) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    if comment and status not in (SUCCESS,):
        # LO of the default repertoire (PS3.7 C.4.2, PS3.5 6.2): printable ASCII, no backslash (a value separator).
        rsp.ErrorComment = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in comment[:64])
    return rsp


_READ = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality")
"""The attributes read from the decoded data set before the ingest (a corrupt one fails there; the audit record of
an instance the ingest refuses before parsing it names them)."""


def _received(ds: Dataset) -> Resource:
    """The instance as the request's data set names it, for the audit record until the ingest has parsed it."""

    def text(keyword: str) -> str | None:
        return str(ds.get(keyword) or "") or None

    return Resource(
        kind="instance",
        patient_id=text("PatientID"),
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        instance_uid=text("SOPInstanceUID"),
    )


@dataclass(slots=True)
class _Operation:
    """One C-STORE as the audit trail names it: who, from where, which instance, and what the policy decided
    about it (on the instance as the ingest parsed it: `dicomweb.ingest.admission`)."""

    principal: Principal
    address: str | None
    instance: Resource
    origin: Origin
    decision: Decision | None = None

    def record(self, status: int, desc: str | None, *, replaced: bool = False) -> AuditRecord:
        return operation_record(
            self.principal,
            self.decision,
            action="update" if replaced else "create",
            command="C-STORE",
            resource=self.instance,
            status=status,
            address=self.address,
            outcome_desc=desc,
        )

    def admission(self, node: Node) -> Admission:
        """The policy's decision on the parsed instance, kept here for the audit record."""
        decided: list[Decision] = []

        async def decide(resource: Resource) -> Decision:
            return await node.actor(self.principal, self.address).decide("create", resource)

        ask = policy_admission(decide, decided)

        async def admit(parsed: ParsedInstance) -> Denial | None:
            self.instance = instance_resource(parsed)
            denial = await ask(parsed)
            self.decision = decided[-1]
            return denial

        return admit


def _status(outcome: Outcome) -> tuple[int, str | None]:
    if outcome.failure is not None:
        return outcome.failure, outcome.comment
    if outcome.warnings:
        return outcome.warnings[0][0], outcome.warnings[0][1]
    return SUCCESS, None


async def _ingest(node: Node, operation: _Operation, spooled: Spooled) -> Dataset:
    def audit(stored: InstanceStored) -> list[AuditRecord]:
        warnings = stored.parsed.warnings
        status, comment = (warnings[0][0], warnings[0][1]) if warnings else (SUCCESS, None)
        return [operation.record(status, comment, replaced=stored.replaced)]

    outcome = await node.store.store(spooled, operation.origin, audit=audit, admit=operation.admission(node))
    status, comment = _status(outcome)
    if outcome.denial is not None:  # the reasons go to the audit record only
        status, comment = NOT_AUTHORIZED, outcome.denial.comment
    if outcome.committed:
        node.audit.nudge()  # its record committed with it; into the chain now
        return _response(status, comment)
    # Nothing stored by this operation (a failure, or the same bytes already stored). A study filed under another
    # patient: the record names both patients, the response neither.
    try:
        detail = outcome.conflict.describe() if outcome.conflict else comment
        if outcome.denial is not None:
            detail = outcome.denial.reasons
        await node.audit.append(operation.record(status, detail))
    except Exception as exc:  # the answer is the truth about the instance all the same
        if unavailable(exc):
            log.warning("C-STORE audit record not written (database unavailable)")
        else:
            log.exception("C-STORE audit record not written")
    return _response(status, comment)


def handle_store(event: Any, node: Node) -> Dataset:
    """EVT_C_STORE: runs in the association's thread. A data set that cannot be decoded is refused before the
    policy is asked, with the fault named by the structural checks of the ingest (`ingest.check_structure`)
    rather than by whichever exception the decoder raised."""
    assoc = event.assoc
    principal = node.principal(assoc.requestor.ae_title)
    if principal is None:  # associations are accepted only for configured peers; never store for others
        return _response(NOT_AUTHORIZED, "calling AE title not recognized")
    try:
        data = event.encoded_dataset(include_meta=True)  # the bytes as received, behind pynetdicom's File Meta
    except Exception as exc:  # the request's UIDs cannot make a File Meta group
        log.info("C-STORE from %s: unusable request: %s", principal.client_id, type(exc).__name__)
        return _response(CANNOT_UNDERSTAND, "the request's SOP Class or Instance UID cannot be encoded")
    try:
        spooled = node.store.spool.write(data)  # blocking: this is the association's thread
    except InstanceRejected as exc:  # a full disk, free space below the watermark, over the size limit
        log.error("C-STORE from %s: not spooled: %s", principal.client_id, exc.comment)
        return _response(exc.reason, exc.comment)
    try:
        try:
            ds = event.dataset
            for keyword in _READ:  # pynetdicom decodes lazily: make a corrupt data set fail here, not later
                ds.get(keyword)
        except Exception as exc:  # pydicom raises many kinds (and RecursionError) for malformed input
            log.info("C-STORE from %s: undecodable data set: %s", principal.client_id, type(exc).__name__)
            return _undecodable(spooled.path, exc)
        address = assoc.requestor.address
        origin = Origin.dimse(principal.client_id or "", assoc.acceptor.ae_title, principal.sub, address)
        operation = _Operation(principal, address, _received(ds), origin)
        return node.run_to_end(_ingest(node, operation, spooled))
    except OperationTimeout:
        return _response(OUT_OF_RESOURCES, "the server did not store the instance in time")
    except Exception as exc:  # `store` raises only when nothing was stored
        if unavailable(exc):  # the server reconnects by itself; the sender may retry (PS3.4 B.2.3 A7xx)
            log.warning("C-STORE from %s: database unavailable", principal.client_id)
            return _response(OUT_OF_RESOURCES, "the database is unavailable; retry later")
        log.exception("C-STORE failed")
        return _response(OUT_OF_RESOURCES, "the server could not store the instance")
    finally:
        spooled.path.unlink(missing_ok=True)  # consumed by the ingest, unless it was refused or failed before


def _undecodable(path: Path, exc: Exception) -> Dataset:
    """The response to a data set the decoder failed on: the structural fault when the checks find one."""
    try:
        check_structure(path)
    except InstanceRejected as rejected:
        return _response(rejected.reason, rejected.comment)
    return _response(CANNOT_UNDERSTAND, f"the data set cannot be decoded ({type(exc).__name__})")
