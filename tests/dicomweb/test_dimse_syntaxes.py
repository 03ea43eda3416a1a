"""The choices behind the DIMSE negotiation matrix (`dicomweb.dimse.syntaxes`), case by case: what is proposed,
what an instance is sent in, and what is refused. The matrix itself (tests/dicomweb/test_dimse_negotiation.py) runs
them against dcmtk and pynetdicom peers."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from dicomweb.dimse.syntaxes import FALLBACK, MAX_CONTEXTS, NotSendable, as_syntax, choose, proposals

J2K_LOSSLESS, J2K_LOSSY = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"
JPEG_BASELINE, JPEG_LOSSLESS, RLE = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5"
MPEG2 = "1.2.840.10008.1.2.4.100"  # no decoder is installed for it


def test_proposals_offer_the_stored_syntax_apart_from_the_native_fallback() -> None:
    contexts = proposals(
        [(MRImageStorage, J2K_LOSSLESS), (MRImageStorage, RLE), (CTImageStorage, ImplicitVRLittleEndian)]
    )
    got = [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in contexts]
    assert got == [
        (MRImageStorage, list(FALLBACK)),
        (CTImageStorage, list(FALLBACK)),
        (MRImageStorage, [J2K_LOSSLESS]),
        (MRImageStorage, [RLE]),
    ]


def test_proposals_keep_every_sop_class_when_over_the_limit() -> None:
    classes = [f"1.2.3.{i}" for i in range(100)]
    contexts = proposals([(c, J2K_LOSSLESS) for c in classes])
    assert len(contexts) == MAX_CONTEXTS
    assert [cx.abstract_syntax for cx in contexts[:100]] == classes  # every class has its fallback context
    assert all(list(cx.transfer_syntax) == [J2K_LOSSLESS] for cx in contexts[100:])


@pytest.mark.parametrize(
    ("stored", "accepted", "sent"),
    [
        (J2K_LOSSY, [ImplicitVRLittleEndian, J2K_LOSSY], J2K_LOSSY),  # as stored whenever accepted
        (J2K_LOSSY, [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ExplicitVRLittleEndian),  # decoded
        (JPEG_BASELINE, [ExplicitVRBigEndian], ExplicitVRBigEndian),
        (ImplicitVRLittleEndian, [ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        (RLE, [J2K_LOSSLESS], J2K_LOSSLESS),  # lossless to lossless
        (ExplicitVRLittleEndian, [J2K_LOSSY, J2K_LOSSLESS], J2K_LOSSLESS),  # never lossy
    ],
)
def test_choose(stored: str, accepted: list[str], sent: str) -> None:
    assert choose(stored, accepted) == sent


@pytest.mark.parametrize(
    ("stored", "accepted", "reason"),
    [
        (JPEG_BASELINE, [J2K_LOSSLESS], "lossy"),  # a lossy image is not re-encoded as lossless
        (J2K_LOSSY, [JPEG_BASELINE], "lossy"),
        (ExplicitVRLittleEndian, [JPEG_BASELINE], "without loss"),  # nor encoded lossily
        (MPEG2, [ExplicitVRLittleEndian], "no decoder"),
        (ExplicitVRLittleEndian, [], "no presentation context"),
    ],
)
def test_choose_refuses(stored: str, accepted: list[str], reason: str) -> None:
    with pytest.raises(NotSendable, match=reason):
        choose(stored, accepted)


def test_a_data_set_without_pixels_takes_any_syntax() -> None:
    """PS3.5 A.4: outside Pixel Data a compressed syntax is Explicit VR Little Endian, so an SR can go on a
    context that accepted only JPEG 2000."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.PatientID = "P1"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    out = as_syntax(buf.getvalue(), J2K_LOSSLESS)
    assert out.file_meta.TransferSyntaxUID == J2K_LOSSLESS and out.PatientID == "P1"
    assert out.original_encoding == (False, True)  # read as explicit VR little endian, as pynetdicom checks
