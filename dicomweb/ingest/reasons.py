"""Failure and warning reasons of the Store Instances Response Module (PS3.18 10.5.3, PS3.4 Annex B.2.3), and the
exception that carries one: every ingest channel answers with these codes (the C-STORE status is the same code)."""

from __future__ import annotations

from dicomweb.uids import is_valid_uid

PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_REJECTED = 0x0111  # Duplicate SOP Instance (PS3.7 C.4.2: 0111H)
WARNING_COERCION = 0xB000
WARNING_ELEMENTS_DISCARDED = 0xB006


class InstanceRejected(Exception):
    """The part is not an instance we can store; carries the DICOM failure reason and a readable comment."""

    def __init__(self, reason: int, comment: str, sop_class: str | None = None, sop_instance: str | None = None):
        super().__init__(comment)
        self.reason = reason
        self.comment = comment
        # Only valid UIDs are echoed back (a response's UI values, a Warning header): the comment shows others.
        self.sop_class = sop_class if sop_class and is_valid_uid(sop_class) else None
        self.sop_instance = sop_instance if sop_instance and is_valid_uid(sop_instance) else None
