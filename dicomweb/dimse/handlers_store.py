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

Early acknowledgement (`HOUNSFIELD_DIMSE_EARLY_ACK`, on by default): every check that decides the answer runs
before it, in the association's thread and on the loop: the structure and parse (`parse_instance`), the policy,
the free-space watermark and the size limit, and the identity checks against the index and the instances
acknowledged but not indexed yet (`dicomweb.dimse.indexer`). Then the instance is made durable in the intake
(`dicomweb.dimse.intake`: the file fsynced and renamed, with its origin) and Success (or B000) is answered; the
index store runs just after, from a task on the loop, and writes the instance's record in its transaction. A
Success then means: the instance will be stored and visible to C-FIND and QIDO-RS shortly after (a crash
included: the intake is replayed at start); storage commitment is not claimed. With the setting off, the store
below runs before the answer.

The status is the truth about the instance: the record of a stored instance (DICOM Instances Transferred,
PS3.15 A.5.3.4) is written in its index transaction, so an instance is stored and recorded or neither (A700 when
the record cannot be written), and once the ingest has begun it is not cut off by the DIMSE timeout (an ingest
cancelled midway could still commit after a failure was answered). Other outcomes (a failure, bytes already
stored) are recorded after the ingest; when that record cannot be written the status still goes out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from authz.decision import Resource
from dicomweb.dimse.indexer import identity
from dicomweb.dimse.intake import Identity
from dicomweb.dimse.node import Node, OperationTimeout
from dicomweb.dimse.store_operation import SUCCESS, StoreOperation, audit_of, settle, status_of
from dicomweb.ingest.admission import NOT_AUTHORIZED
from dicomweb.ingest.checks import check_structure
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.outcome import Outcome, PatientConflict
from dicomweb.ingest.parse import ParsedInstance, parse_instance
from dicomweb.ingest.reasons import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, InstanceRejected
from dicomweb.ingest.spool import Spooled, out_of_resources
from server.platform.db import unavailable

log = logging.getLogger(__name__)


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


async def _ingest(node: Node, operation: StoreOperation, spooled: Spooled) -> Dataset:
    """The store before the answer (early acknowledgement off)."""
    audit = audit_of(operation)
    admit = operation.admission(node.actor(operation.principal, operation.address))
    outcome = await node.store.store(spooled, operation.origin, audit=audit, admit=admit)
    await settle(node.audit, operation, outcome)
    return _response(*status_of(outcome))


async def _refuse(node: Node, operation: StoreOperation, outcome: Outcome) -> Dataset:
    """An instance refused before the answer: recorded as the store records it, then answered."""
    await settle(node.audit, operation, outcome)
    return _response(*status_of(outcome))


async def _check(node: Node, operation: StoreOperation, parsed: ParsedInstance, ident: Identity) -> Outcome:
    """What the store would decide, decided before the answer: the policy and the identity checks
    (`Indexer.check`, which reserves the instance among the pending ones when it passes). The size limit and the
    free-space watermark were checked when the instance was spooled, just before."""
    outcome = Outcome.of(parsed)
    denial = await operation.admission(node.actor(operation.principal, operation.address))(parsed)
    if denial is not None:
        outcome.deny(denial)
        return outcome
    assert node.indexer is not None
    conflict = await node.indexer.check(ident)
    if conflict is not None:
        outcome.failure, outcome.comment = conflict.status, conflict.comment
        if conflict.study_patient is not None:
            outcome.conflict = PatientConflict(
                parsed.study_uid,
                parsed.series_uid,
                parsed.sop_instance_uid,
                ident.patient_id,
                ident.issuer,
                *conflict.study_patient,
            )
    return outcome


def _acknowledge(node: Node, operation: StoreOperation, spooled: Spooled) -> Dataset:
    """Early acknowledgement: the checks, the durable intake, the answer; the index store follows on the loop."""
    indexer = node.indexer
    assert indexer is not None
    if not indexer.room(node.timeout):  # the index is behind by the whole backlog: not acknowledged
        return _response(OUT_OF_RESOURCES, "the server is busy indexing received instances; retry later")
    acknowledged = False
    try:
        try:
            parsed = parse_instance(spooled.path, bulk_threshold=node.store.bulk_threshold)  # this thread: blocking
        except InstanceRejected as exc:
            return node.run_to_end(_refuse(node, operation, Outcome.rejected(exc)))
        ident = identity(parsed, spooled.sha256)
        outcome = node.run_to_end(_check(node, operation, parsed, ident))
        if not outcome.ok:
            return node.run_to_end(_refuse(node, operation, outcome))
        try:
            entry = indexer.intake.keep(spooled, operation.origin)
        except OSError as exc:
            node.run_to_end(indexer.release(ident))
            log.error("C-STORE intake not written: %s", exc.strerror or type(exc).__name__)
            outcome.failure, outcome.comment = OUT_OF_RESOURCES, out_of_resources(exc)
            return node.run_to_end(_refuse(node, operation, outcome))
        acknowledged = True  # durable: stored now, or by the replay at the next start
        try:
            node.loop.call_soon_threadsafe(indexer.submit, entry, ident, operation, parsed)
        except RuntimeError:  # the loop closed (shutdown) since the checks
            log.warning("C-STORE kept in the intake for the next start (the server is stopping)")
        return _response(*status_of(outcome))
    finally:
        if not acknowledged:
            indexer.give_back()


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
        operation = StoreOperation(principal, address, _received(ds), origin)
        if node.indexer is not None:
            return _acknowledge(node, operation, spooled)
        return node.run_to_end(_ingest(node, operation, spooled))
    except OperationTimeout:
        return _response(OUT_OF_RESOURCES, "the server did not store the instance in time")
    except Exception as exc:  # `store` raises only when nothing was stored; the checks when nothing was kept
        if unavailable(exc):  # the server reconnects by itself; the sender may retry (PS3.4 B.2.3 A7xx)
            log.warning("C-STORE from %s: database unavailable", principal.client_id)
            return _response(OUT_OF_RESOURCES, "the database is unavailable; retry later")
        log.exception("C-STORE failed")
        return _response(OUT_OF_RESOURCES, "the server could not store the instance")
    finally:
        spooled.path.unlink(missing_ok=True)  # consumed by the ingest or the intake, unless refused before


def _undecodable(path: Path, exc: Exception) -> Dataset:
    """The response to a data set the decoder failed on: the structural fault when the checks find one."""
    try:
        check_structure(path)
    except InstanceRejected as rejected:
        return _response(rejected.reason, rejected.comment)
    return _response(CANNOT_UNDERSTAND, f"the data set cannot be decoded ({type(exc).__name__})")
