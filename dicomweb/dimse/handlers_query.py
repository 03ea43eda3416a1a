"""C-FIND SCP (PS3.4 C.4.1): Patient Root and Study Root Query/Retrieve information models, levels PATIENT,
STUDY, SERIES and IMAGE, answered by the QIDO-RS query engine.

The identifier's keys become the same parsed `dicomweb.search.query.Query` a QIDO-RS request makes (a key with a value
is a matching key, an empty one a return key; sequence and binary attributes are return keys only), so
matching follows the same rules (PS3.4 C.2.2.2: single value, UID list, wild card, range; person names
case-insensitive), and the policy's constraints become the same SQL filters. PATIENT level (Patient Root
only) is a study search grouped by patient (Patient ID, Issuer). Each match is a Pending response: FF00, or
FF01 when the identifier had keys the engine does not match (C.4.1.1.4: optional keys not supported); a
C-CANCEL between matches ends the operation with FE00. A malformed key is A900, a policy denial 0124 (PS3.7
Annex C general status: Refused, Not Authorized), an internal failure C000 (unable to process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from authz.decision import Decision
from authz.errors import denial_comment
from authz.policy_input import dicomweb_resource
from authz.principal import Principal
from dicomweb.dimse.audit import operation_record
from dicomweb.dimse.node import Node, OperationTimeout
from dicomweb.errors import DicomWebError
from dicomweb.search.access import AccessConstraints
from dicomweb.search.query import Level, Query, parse_query
from dicomweb.search.service import search

log = logging.getLogger(__name__)

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
LEVELS = {"STUDY": Level.STUDY, "SERIES": Level.SERIES, "IMAGE": Level.INSTANCE}
KINDS = {"PATIENT": "study", "STUDY": "study", "SERIES": "series", "IMAGE": "instance"}
PENDING, PENDING_WARNING, SUCCESS, CANCEL = 0xFF00, 0xFF01, 0x0000, 0xFE00
NOT_AUTHORIZED, BAD_IDENTIFIER, UNABLE = 0x0124, 0xA900, 0xC000

_QR_LEVEL = Tag(0x0008, 0x0052)
_CHARSET = Tag(0x0008, 0x0005)
_RETRIEVE_AE = Tag(0x0008, 0x0054)
_NOT_KEYS = frozenset({_QR_LEVEL, _CHARSET, _RETRIEVE_AE})
_PATIENT_COUNTS = {
    "00201200": "studies",  # NumberOfPatientRelatedStudies
    "00201202": "series",  # NumberOfPatientRelatedSeries
    "00201204": "instances",  # NumberOfPatientRelatedInstances
}
_PATIENT_KEY = ("00100020", "00100021")  # PatientID, IssuerOfPatientID
_RETURN_ONLY_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """An identifier read into QIDO-RS form: the query, the tags to return, and whether keys were ignored."""

    level_name: str
    query: Query
    returned: tuple[str, ...]
    ignored: bool


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def read_identifier(identifier: Dataset, model: str) -> Request:
    """The C-FIND identifier as a parsed query; raises DicomWebError (A900) when it is malformed."""
    level_name = str(identifier.get("QueryRetrieveLevel") or "").strip().upper()
    if level_name not in KINDS or (level_name == "PATIENT" and model != PATIENT_ROOT_FIND):
        raise DicomWebError(f"Query/Retrieve Level {level_name[:16]!r} is not supported by this model")
    pairs: list[tuple[str, str]] = []
    returned: list[str] = []
    ignored = False
    for elem in identifier:
        if elem.tag in _NOT_KEYS or elem.tag.is_private or elem.tag.element == 0:
            continue
        tag = f"{int(elem.tag):08X}"
        returned.append(tag)
        if level_name == "PATIENT" and tag in _PATIENT_COUNTS:
            continue
        if elem.VR in _RETURN_ONLY_VRS:
            pairs.append(("includefield", tag))
            ignored = ignored or (elem.VR == "SQ" and any(len(item) for item in elem.value or []))
            continue
        pairs.append((tag, _text(elem.value)))
    level = LEVELS.get(level_name, Level.STUDY)
    query = parse_query(level, pairs)
    return Request(level_name, query, tuple(returned), ignored or bool(query.unsupported))


def _response(match: dict[str, Any], request: Request, title: str) -> Dataset:
    """The response identifier: the requested keys (empty when the data lacks them), level and AE title."""
    picked = {t: match[t] for t in request.returned if t in match and "BulkDataURI" not in match[t]}
    if "00080005" in match:
        picked["00080005"] = match["00080005"]
    ds = Dataset.from_json(picked)
    for tag in request.returned:
        if tag not in picked:
            try:
                vr = dictionary_VR(int(tag, 16)).split(" or ")[0]
            except KeyError:
                continue
            ds.add_new(int(tag, 16), vr, None if vr != "SQ" else [])
    ds.QueryRetrieveLevel = request.level_name
    ds.RetrieveAETitle = title
    return ds


def _patients(matches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Study matches grouped by patient, with the patient's counts (PS3.4 Table C.6-1)."""
    groups: dict[tuple[str | None, ...], dict[str, Any]] = {}
    for match in matches:
        key = tuple(json.dumps(match.get(t, {}).get("Value"), sort_keys=True) for t in _PATIENT_KEY)
        group = groups.get(key)
        if group is None:
            group = groups[key] = dict(match)
            group["studies"] = group["series"] = group["instances"] = 0
        group["studies"] += 1
        group["series"] += int((match.get("00201206", {}).get("Value") or [0])[0])
        group["instances"] += int((match.get("00201208", {}).get("Value") or [0])[0])
    out = []
    for group in groups.values():
        for tag, name in _PATIENT_COUNTS.items():
            group[tag] = {"vr": "IS", "Value": [group.pop(name)]} if name in group else group[tag]
        out.append(group)
    return out


async def _page(node: Node, query: Query, access: AccessConstraints) -> list[dict[str, Any]]:
    base = (node.settings.public_url or f"http://{node.settings.host}:{node.settings.port}") + "/dicom-web"
    result = await search(node.pool, query, base, access)
    return result.matches


def handle_find(event: Any, node: Node) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND: a generator of (status, identifier) in the association's thread."""
    assoc = event.assoc
    address = assoc.requestor.address
    principal = node.principal(assoc.requestor.ae_title)
    if principal is None:
        yield _status(NOT_AUTHORIZED, "calling AE title not recognized"), None
        return
    decision: Decision | None = None
    query_text = b""
    status = UNABLE
    desc: str | None = None
    try:
        try:
            identifier = event.identifier
        except Exception as exc:  # pydicom raises many kinds for an undecodable data set
            raise DicomWebError(f"undecodable identifier ({type(exc).__name__})") from None
        query_text = json.dumps(identifier.to_json_dict(), sort_keys=True).encode()
        request = read_identifier(identifier, str(event.request.AffectedSOPClassUID))
        searched = dicomweb_resource(KINDS[request.level_name])
        decision = node.run(node.actor(principal, address).decide("search", searched))
        if not decision.allow:
            status, desc = NOT_AUTHORIZED, "; ".join(decision.reasons) or "denied by policy"
            yield _status(status, denial_comment(decision.decision_id)), None  # the reasons: audit record only
            return
        access = AccessConstraints.from_policy(decision.constraints)
        pending = PENDING_WARNING if request.ignored else PENDING
        status = SUCCESS
        for ds in _matches(node, request, access):
            if event.is_cancelled:
                status = CANCEL
                yield CANCEL, None
                return
            yield pending, ds
        yield SUCCESS, None
    except (DicomWebError, ValueError, KeyError, TypeError) as exc:
        status, desc = BAD_IDENTIFIER, f"identifier: {exc}"
        yield _status(status, desc), None
    except OperationTimeout as exc:
        status, desc = UNABLE, str(exc)
        yield _status(status, desc), None
    finally:
        _audit(node, principal, decision, status, desc, query_text, address)


def _matches(node: Node, request: Request, access: AccessConstraints) -> Iterator[Dataset]:
    title = node.settings.dimse_ae_title
    query = request.query
    if request.level_name == "PATIENT":
        studies: list[dict[str, Any]] = []
        while True:
            page = node.run(_page(node, query, access))
            studies.extend(page)
            if len(page) < query.limit:
                break
            query = dataclasses.replace(query, offset=query.offset + len(page))
        for patient in _patients(studies):
            yield _response(patient, request, title)
        return
    while True:
        page = node.run(_page(node, query, access))
        for match in page:
            yield _response(match, request, title)
        if len(page) < query.limit:
            return
        query = dataclasses.replace(query, offset=query.offset + len(page))


def _audit(
    node: Node,
    principal: Principal,
    decision: Decision | None,
    status: int,
    desc: str | None,
    query: bytes,
    address: str | None,
) -> None:
    record = operation_record(
        principal,
        decision,
        action="search",
        command="C-FIND",
        resource=None,
        status=status,
        address=address,
        outcome_desc=desc,
        query=query,
    )
    try:
        node.run(node.audit.append(record))
    except Exception:
        log.exception("C-FIND audit record could not be written")
