"""What a response reveals: the patients (and, for imaging, the studies) named in it.

- DICOM Part 10, alone or as parts of `multipart/related`: the instance's PatientID and StudyInstanceUID.
- DICOM JSON (QIDO-RS, metadata): each item's PatientID (0010,0020) and Study/Series/SOP Instance UIDs.
- FHIR resources, wherever they are nested (searchset, history, batch-response, included resources): a Patient
  by its identifier, an ImagingStudy by its study, a DiagnosticReport by its subject; each resource's text is
  attributed to the resource's own group.
- Every other text (error bodies, OperationOutcomes, links, inference results, break-glass sessions, header
  values): each identifier the data set knows (Patient IDs, UIDs, FHIR ids) that the request did not itself
  name, attributed to the group of the resource it appears in.
- Binary answers (frames, bulk data, rendered images): the objects the request named (a 2xx is a disclosure
  of their patient).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pydicom
from pydicom.errors import InvalidDicomError

from tests.support.matrix_data import DataSet
from tests.support.matrix_probes import Probe

FHIR_GROUPS = {
    "ImagingStudy": "imaging",
    "DiagnosticReport": "report",
    "Patient": "patient",
    "Endpoint": "endpoint",
    "Subscription": "subscription",
    "AuditEvent": "audit",
}
"""Resources whose content belongs to a group of their own; others (Bundle, OperationOutcome) inherit."""
BASE64_KEYS = frozenset({"InlineBinary", "data", "query"})
"""JSON members holding base64 (DICOM JSON InlineBinary, FHIR Attachment.data, AuditEvent.entity.query)."""
_SPLIT = re.compile(r"[\s/?&=|,:;()'\"<>\[\]{}#\\*^]+")
_DICOM_TAG = re.compile(r"^[0-9A-F]{8}$")


@dataclass(frozen=True, order=True)
class Disclosure:
    group: str
    patient: str
    study: str | None
    via: str


@dataclass
class Answer:
    """A response (or one Bundle entry's part of one)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    parsed: Any = None
    """Already parsed JSON (a Bundle entry)."""

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name), "")


def pieces(text: str) -> Iterable[str]:
    for piece in _SPLIT.split(unquote(text)):
        piece = piece.rstrip(".")
        if piece:
            yield piece


def request_tokens(probe: Probe, data: DataSet) -> set[str]:
    """The identifiers the request itself names (an echo of them reveals nothing)."""
    text = probe.url + " " + (probe.fhir or "") + " " + (probe.body or b"").decode("utf-8", "replace")
    return {p for p in pieces(text) if p in data.tokens}


class _Collector:
    def __init__(self, data: DataSet, known: set[str]) -> None:
        self.data = data
        self.known = known
        self.found: set[Disclosure] = set()

    def add(self, group: str, token: str, via: str) -> None:
        hit = self.data.tokens.get(token)
        if hit is not None:
            self.found.add(Disclosure(group, hit[0], hit[1], via))

    def text(self, value: str, group: str, via: str) -> None:
        for piece in pieces(value):
            if piece not in self.known:
                self.add(group, piece, via)

    def dataset(self, raw: bytes) -> None:
        try:
            ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, force=True)
        except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
            raise AssertionError(f"an application/dicom answer is not DICOM: {exc}") from None
        study = str(ds.get("StudyInstanceUID", ""))
        patient = str(ds.get("PatientID", ""))
        known = self.data.tokens.get(study)
        self.found.add(Disclosure("imaging", patient or (known[0] if known else "?"), study or None, "Part 10"))
        if known and known[0] != patient:
            self.found.add(Disclosure("imaging", known[0], study, "Part 10 study"))

    def dicom_item(self, item: dict[str, Any]) -> None:
        """A DICOM JSON data set: its patient and study, whether or not the request named them."""
        values = {
            tag: (item.get(tag) or {}).get("Value") or [] for tag in ("00100020", "0020000D", "0020000E", "00080018")
        }
        patient = values["00100020"][0] if values["00100020"] else None
        uid = next((v[0] for t, v in values.items() if t != "00100020" and v and isinstance(v[0], str)), None)
        known = self.data.tokens.get(uid) if uid else None
        if isinstance(patient, str) and patient:
            self.found.add(Disclosure("imaging", patient, known[1] if known else None, "DICOM JSON PatientID"))
        if known is not None:
            self.found.add(Disclosure("imaging", known[0], known[1], "DICOM JSON UID"))

    def resource(self, node: dict[str, Any], rtype: str, group: str) -> None:
        """A FHIR resource of a patient: its existence in the answer discloses that patient."""
        if rtype == "Patient":
            for ident in node.get("identifier") or []:
                self.add(group, str(ident.get("value")), "Patient resource")
            if node.get("id") in self.data.patient_ids:
                self.add(group, self.data.patient_ids[node["id"]], "Patient resource")
        elif rtype == "ImagingStudy":
            for ident in node.get("identifier") or []:
                self.add(group, str(ident.get("value", "")).removeprefix("urn:oid:"), "ImagingStudy resource")
            self._subject(node, group, f"{rtype} subject")
        elif rtype == "DiagnosticReport":
            self._subject(node, group, f"{rtype} subject")

    def _subject(self, node: dict[str, Any], group: str, via: str) -> None:
        ref = (node.get("subject") or {}).get("reference")
        if isinstance(ref, str) and ref.rsplit("/", 1)[-1] in self.data.patient_ids:
            self.add(group, self.data.patient_ids[ref.rsplit("/", 1)[-1]], via)

    def walk(self, node: Any, group: str, via: str) -> None:
        if isinstance(node, dict):
            rtype = node.get("resourceType")
            if isinstance(rtype, str):
                group = FHIR_GROUPS.get(rtype, group)
                via = rtype if rtype in FHIR_GROUPS else via
                self.resource(node, rtype, group)
            elif node and all(isinstance(k, str) and _DICOM_TAG.match(k) for k in node):
                self.dicom_item(node)
            for key, value in node.items():
                if key not in BASE64_KEYS:
                    self.walk(value, group, via)
        elif isinstance(node, list):
            for item in node:
                self.walk(item, group, via)
        elif isinstance(node, str):
            self.text(node, group, via)


def _boundary(content_type: str) -> bytes | None:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    return match.group(1).encode() if match else None


def _parts(body: bytes, boundary: bytes) -> list[tuple[str, bytes]]:
    """The parts of a multipart/related body: (content type, bytes)."""
    out = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk.partition(b"\r\n\r\n")
        match = re.search(rb"(?im)^content-type:\s*([^\r\n]+)", head)
        out.append((match.group(1).decode("latin-1") if match else "", content.removesuffix(b"\r\n")))
    return out


def _json(collector: _Collector, raw: bytes, group: str) -> None:
    text = raw.decode("utf-8", "replace")
    try:
        collector.walk(json.loads(text), group, "JSON")
    except ValueError:
        lines = text.splitlines()
        try:
            for line in lines:
                if line.strip():
                    collector.walk(json.loads(line), group, "NDJSON")
        except ValueError:
            collector.text(text, group, "text")


def _body(collector: _Collector, content_type: str, raw: bytes, probe: Probe, status: int) -> None:
    essence = content_type.split(";")[0].strip().lower()
    if essence == "multipart/related":
        boundary = _boundary(content_type)
        assert boundary is not None, f"multipart answer without a boundary: {content_type}"
        for part_type, content in _parts(raw, boundary):
            _body(collector, part_type or "application/octet-stream", content, probe, status)
    elif essence == "application/dicom":
        collector.dataset(raw)
    elif essence.endswith("json") or essence.startswith("text/") or essence.endswith("ndjson"):
        _json(collector, raw, probe.group)
    elif raw and 200 <= status < 300:
        for patient, study in probe.objects:
            collector.found.add(Disclosure("imaging", patient, study, f"{essence or 'binary'} body"))


def disclosures(answer: Answer, probe: Probe, data: DataSet) -> set[Disclosure]:
    collector = _Collector(data, request_tokens(probe, data))
    for name, value in answer.headers:
        collector.text(value, probe.group, f"header {name}")
    if answer.parsed is not None:
        collector.walk(answer.parsed, probe.group, "Bundle entry")
    elif answer.body:
        _body(collector, answer.header("content-type"), answer.body, probe, answer.status)
    return collector.found
