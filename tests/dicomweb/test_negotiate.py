"""Media type and transfer syntax choice (PS3.18 8.7), as pure functions."""

from __future__ import annotations

import pytest

from dicomweb.codecs import negotiate
from dicomweb.codecs.mediatypes import DICOM, OCTET_STREAM, accept_from_request, parse_accept
from dicomweb.codecs.negotiate import Choice, Offer
from dicomweb.errors import NotAcceptable

ELE = "1.2.840.10008.1.2.1"
ILE = "1.2.840.10008.1.2"
EBE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
J2K = "1.2.840.10008.1.2.4.90"
J2K_LOSSY = "1.2.840.10008.1.2.4.91"
JPEG_LS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"
HTJ2K = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
NATIVE = {ELE, ILE, EBE, DEFLATED}


def can_transcode(stored: str, target: str) -> bool:
    """Like transcode.can_transcode with every decoder present."""
    return stored == target or target in NATIVE


def instance_offers(*accept: str) -> list[Offer]:
    return negotiate.offers(parse_accept(list(accept)) or parse_accept(["*/*"]), DICOM)


def pixel_offers(*accept: str) -> list[Offer]:
    return negotiate.offers(parse_accept(list(accept)) or parse_accept(["*/*"]), OCTET_STREAM)


def one_instance(accept: str, stored: str, single: bool = False) -> Choice:
    return negotiate.choose_instances(instance_offers(accept), [stored], can_transcode, single_part_ok=single)[0]


# ---------------------------------------------------------------------------------------------- instances


def test_no_transfer_syntax_means_explicit_vr_little_endian() -> None:
    assert one_instance('multipart/related; type="application/dicom"', J2K) == Choice(DICOM, ELE, True)
    assert one_instance('multipart/related; type="application/dicom"', ELE) == Choice(DICOM, ELE, True)


def test_wildcard_syntax_keeps_the_stored_one() -> None:
    assert one_instance('multipart/related; type="application/dicom"; transfer-syntax=*', J2K).transfer_syntax == J2K
    assert one_instance("multipart/related; type=application/dicom; transfer-syntax=*", EBE).transfer_syntax == EBE


def test_explicit_syntax_is_honoured_or_not_acceptable() -> None:
    assert one_instance(f"multipart/related; type=application/dicom; transfer-syntax={ILE}", ELE).transfer_syntax == ILE
    assert one_instance(f"multipart/related; type=application/dicom; transfer-syntax={J2K}", J2K).transfer_syntax == J2K
    with pytest.raises(NotAcceptable):
        one_instance(f"multipart/related; type=application/dicom; transfer-syntax={JPEG_LS}", ELE)


def test_quoted_and_unquoted_parameters_are_equal() -> None:
    quoted = one_instance(f'multipart/related; type="application/dicom"; transfer-syntax="{ILE}"', ELE)
    plain = one_instance(f"multipart/related;type=application/dicom;transfer-syntax={ILE}", ELE)
    assert quoted == plain == Choice(DICOM, ILE, True)


def test_q_values_order_the_offers_and_unsatisfiable_ones_are_skipped() -> None:
    accept = (
        f"multipart/related; type=application/dicom; transfer-syntax={ILE}; q=0.2, "
        f"multipart/related; type=application/dicom; transfer-syntax={JPEG_LS}; q=0.9, "
        "multipart/related; type=application/dicom; transfer-syntax=*; q=0.5"
    )
    # JPEG-LS first (cannot encode), then the stored form (q=0.5) before implicit (q=0.2)
    assert one_instance(accept, J2K).transfer_syntax == J2K
    assert one_instance(accept, JPEG_LS).transfer_syntax == JPEG_LS


def test_each_instance_gets_its_own_syntax() -> None:
    accept = (
        f"multipart/related; type=application/dicom; transfer-syntax={J2K}, "
        "multipart/related; type=application/dicom; q=0.5"
    )
    choices = negotiate.choose_instances(instance_offers(accept), [J2K, ELE, RLE], can_transcode)
    assert [c.transfer_syntax for c in choices] == [J2K, ELE, ELE]


def test_wildcards_mean_the_default() -> None:
    for accept in ("*/*", "application/*", "multipart/related", 'multipart/related; type="*/*"', "multipart/*"):
        assert one_instance(accept, J2K) == Choice(DICOM, ELE, True), accept


def test_bare_application_dicom_is_single_part_only_for_one_instance() -> None:
    assert one_instance("application/dicom", ELE, single=True) == Choice(DICOM, ELE, False)
    assert one_instance("application/dicom", ELE, single=False) == Choice(DICOM, ELE, True)


def test_other_media_types_are_not_acceptable() -> None:
    with pytest.raises(NotAcceptable):
        one_instance("application/dicom+json", ELE)
    with pytest.raises(NotAcceptable):
        one_instance('multipart/related; type="image/jpeg"', ELE)


def test_invalid_transfer_syntax_parameter_is_ignored() -> None:
    # PS3.18 8.7.7: values that are not valid are ignored, so the range is unusable and the next one wins.
    accept = "multipart/related; type=application/dicom; transfer-syntax=banana, application/dicom; q=0.1"
    assert one_instance(accept, J2K, single=True) == Choice(DICOM, ELE, False)


def test_no_decoder_means_not_acceptable() -> None:
    with pytest.raises(NotAcceptable):
        negotiate.choose_instances(instance_offers("application/dicom"), [J2K], lambda s, t: s == t)


def test_accept_query_parameter_replaces_the_header() -> None:
    ranges = accept_from_request(['multipart/related; type="application/dicom"; transfer-syntax=*'], ["text/html"])
    assert negotiate.choose_instances(negotiate.offers(ranges, DICOM), [RLE], can_transcode)[0].transfer_syntax == RLE


# ---------------------------------------------------------------------------------------------- frames, bulk


def pixels(accept: str, stored: str, single: bool = False, decodable: bool = True) -> Choice:
    return negotiate.choose_pixels(pixel_offers(accept), stored, lambda _ts: decodable, single_part_ok=single)


def test_ohif_frames_header_gets_the_stored_syntax() -> None:
    accept = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    assert pixels(accept, J2K) == Choice(OCTET_STREAM, J2K, True)
    assert pixels(accept, HTJ2K) == Choice(OCTET_STREAM, HTJ2K, True)
    # Native data are sent as little-endian bytes, whatever the stored byte order or deflation.
    for stored in (ELE, ILE, EBE, DEFLATED):
        assert pixels(accept, stored) == Choice(OCTET_STREAM, ELE, True)


def test_octet_stream_default_is_decoded_little_endian() -> None:
    for stored in (J2K, RLE, EBE, ELE):
        assert pixels('multipart/related; type="application/octet-stream"', stored).transfer_syntax == ELE
    with pytest.raises(NotAcceptable):
        pixels('multipart/related; type="application/octet-stream"', J2K, decodable=False)


def test_explicit_frame_syntax() -> None:
    def octet(syntax: str) -> str:
        return f"multipart/related; type=application/octet-stream; transfer-syntax={syntax}"

    assert pixels(octet(J2K), J2K).transfer_syntax == J2K
    assert pixels(octet(ILE), J2K).transfer_syntax == ILE
    assert pixels(octet(EBE), EBE).transfer_syntax == EBE
    with pytest.raises(NotAcceptable):
        pixels(octet(J2K), RLE)
    with pytest.raises(NotAcceptable):
        pixels(octet(DEFLATED), DEFLATED)
    with pytest.raises(NotAcceptable):
        pixels(octet(EBE), ELE)


def test_compressed_media_types_match_the_stored_syntax() -> None:
    assert pixels('multipart/related; type="image/jp2"', J2K_LOSSY) == Choice("image/jp2", J2K_LOSSY, True)
    assert pixels(f'multipart/related; type="image/jp2"; transfer-syntax={J2K}', J2K).media_type == "image/jp2"
    assert pixels('multipart/related; type="image/*"', RLE).media_type == "image/dicom-rle"
    assert pixels('multipart/related; type="image/x-dicom-rle"', RLE).media_type == "image/x-dicom-rle"
    with pytest.raises(NotAcceptable):
        pixels('multipart/related; type="image/jp2"', RLE)
    with pytest.raises(NotAcceptable):
        pixels(f'multipart/related; type="image/jp2"; transfer-syntax={J2K_LOSSY}', J2K)


def encoded(
    accept: str, stored: str, *, encodable: frozenset[str] = frozenset({J2K, J2K_LOSSY, RLE, HTJ2K, HTJ2K_RPCL})
) -> Choice:
    """Like `pixels` with encoders for `encodable` (the frames route asks dicomweb.pixels.encode)."""
    return negotiate.choose_pixels(
        pixel_offers(accept), stored, lambda _ts: True, single_part_ok=True, can_encode=lambda ts: ts in encodable
    )


def test_compressed_media_types_are_encoded_into_when_stored_otherwise() -> None:
    assert encoded("image/jp2", ELE) == Choice("image/jp2", J2K, False)
    assert encoded(f"image/jp2; transfer-syntax={J2K_LOSSY}", RLE) == Choice("image/jp2", J2K_LOSSY, False)
    # HTJ2K: the RPCL form unless a syntax is named; image/jhc (Cornerstone) is image/jphc.
    assert encoded("image/jphc", ELE) == Choice("image/jphc", HTJ2K_RPCL, False)
    assert encoded("image/jhc", J2K) == Choice("image/jhc", HTJ2K_RPCL, False)
    assert encoded(f"image/jphc; transfer-syntax={HTJ2K}", ELE).transfer_syntax == HTJ2K
    assert encoded("image/jhc", HTJ2K) == Choice("image/jhc", HTJ2K, False)  # stored HTJ2K as is
    assert encoded('multipart/related; type="image/dicom-rle"', ELE) == Choice("image/dicom-rle", RLE, True)
    assert encoded(f"application/octet-stream; transfer-syntax={HTJ2K_RPCL}", ELE).transfer_syntax == HTJ2K_RPCL
    # No encoder (JPEG-LS, JPEG baseline here), a syntax the media type does not carry, or nothing to decode: 406.
    for accept, stored in [
        ("image/jls", ELE),
        ("image/jpeg", ELE),
        (f"image/jp2; transfer-syntax={HTJ2K}", ELE),
        ("image/jpx", ELE),
    ]:
        with pytest.raises(NotAcceptable):
            encoded(accept, stored)
    with pytest.raises(NotAcceptable, match="image/jphc"):
        negotiate.choose_pixels(
            pixel_offers("image/jls"),
            ELE,
            lambda _ts: True,
            single_part_ok=True,
            can_encode=lambda ts: ts == HTJ2K_RPCL,
        )
    with pytest.raises(NotAcceptable):
        negotiate.choose_pixels(
            pixel_offers("image/jphc"), J2K, lambda _ts: False, single_part_ok=True, can_encode=lambda ts: True
        )


def test_ohif_progressive_request_query_parameter_wins() -> None:
    """OHIF 3.13: `?accept=image/jhc` while its Accept header still asks for octet-stream with any syntax."""
    ranges = accept_from_request(["image/jhc"], ["multipart/related; type=application/octet-stream; transfer-syntax=*"])
    got = negotiate.choose_pixels(
        negotiate.offers(ranges, OCTET_STREAM), ELE, lambda _ts: True, single_part_ok=True, can_encode=lambda _: True
    )
    assert got == Choice("image/jhc", HTJ2K_RPCL, False)


def test_instances_per_instance_checks() -> None:
    offers = instance_offers(f"multipart/related; type=application/dicom; transfer-syntax={HTJ2K_RPCL}")
    checks = [lambda s, t: True, lambda s, t: s == t]
    with pytest.raises(NotAcceptable, match="no encoder"):
        negotiate.choose_instances(offers, [ELE, ELE], can_transcode, per_instance=checks)
    got = negotiate.choose_instances(offers, [ELE, HTJ2K_RPCL], can_transcode, per_instance=checks)
    assert [c.transfer_syntax for c in got] == [HTJ2K_RPCL, HTJ2K_RPCL]


def test_single_part_only_where_one_item_is_asked_for() -> None:
    assert pixels("application/octet-stream", J2K, single=True) == Choice(OCTET_STREAM, ELE, False)
    assert pixels("application/octet-stream", J2K, single=False) == Choice(OCTET_STREAM, ELE, True)
    assert pixels("*/*", J2K, single=True).multipart


def test_preference_between_compressed_and_native() -> None:
    accept = 'multipart/related; type="image/jp2"; q=0.9, multipart/related; type="application/octet-stream"; q=0.5'
    assert pixels(accept, J2K).media_type == "image/jp2"
    assert pixels(accept, RLE) == Choice(OCTET_STREAM, ELE, True)


def test_bulk_data_is_native() -> None:
    offers = pixel_offers('multipart/related; type="application/octet-stream"; transfer-syntax=*')
    assert negotiate.choose_bulk(offers, J2K) == Choice(OCTET_STREAM, ELE, True)
    assert negotiate.choose_bulk(offers, EBE) == Choice(OCTET_STREAM, ELE, True)
    big = pixel_offers(f"multipart/related; type=application/octet-stream; transfer-syntax={EBE}")
    assert negotiate.choose_bulk(big, EBE).transfer_syntax == EBE
    with pytest.raises(NotAcceptable):
        negotiate.choose_bulk(pixel_offers('multipart/related; type="image/jp2"'), J2K)


def test_choice_content_type() -> None:
    assert Choice(OCTET_STREAM, J2K, True).content_type == f"application/octet-stream; transfer-syntax={J2K}"


# ---------------------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/dicom+json", "application/dicom+json"),
        ("application/dicom+json, application/json", "application/dicom+json"),
        ("application/json", "application/json"),
        ("*/*", "application/dicom+json"),
        ("application/*", "application/dicom+json"),
        ("application/json; q=0.5, application/dicom+json", "application/dicom+json"),
    ],
)
def test_metadata_media_type(accept: str, expected: str) -> None:
    assert negotiate.choose_metadata(parse_accept([accept])) == expected


def test_metadata_as_xml_is_not_acceptable() -> None:
    with pytest.raises(NotAcceptable):
        negotiate.choose_metadata(parse_accept(['multipart/related; type="application/dicom+xml"']))


def test_media_type_of_syntax() -> None:
    assert negotiate.media_type_of_syntax(J2K) == "image/jp2"
    assert negotiate.media_type_of_syntax(RLE) == "image/dicom-rle"
    assert negotiate.media_type_of_syntax(HTJ2K) == "image/jphc"
    assert negotiate.media_type_of_syntax(ELE) is None
