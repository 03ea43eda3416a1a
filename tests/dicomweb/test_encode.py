"""Encoders (dicomweb.pixels.encode): lossless targets are bit-exact as a client decodes them (pydicom with the
pylibjpeg plugins), across bit depths, signedness, color and planar configuration, and multi-frame; lossy targets are
close and say so (PS3.3 C.7.6.1.1.5); HTJ2K RPCL streams are really RPCL with a tile-part per resolution."""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomweb.pixels import decode as transcode
from dicomweb.pixels import encode
from dicomweb.pixels.native import ImageInfo, TranscodeError
from tests.support.data import sample
from tests.support.factory import ct, part10

LOSSLESS = [
    encode.J2K_LOSSLESS,
    encode.HTJ2K_LOSSLESS,
    encode.HTJ2K_RPCL,
    encode.RLE_LOSSLESS,
    encode.JPEG_LS_LOSSLESS,
]
LOSSY = [encode.J2K_LOSSY, encode.HTJ2K_LOSSY, encode.JPEG_LS_NEAR_LOSSLESS]


def image(
    bits_allocated: int, bits_stored: int, signed: bool, *, samples: int = 1, planar: int = 0, frames: int = 1
) -> Dataset:
    """A smooth phantom with noise, in the asked pixel format."""
    ds = ct(rows=40, columns=48, frames=frames)
    rng = np.random.default_rng(bits_stored * 10 + samples + frames)
    y, x = np.mgrid[0:40, 0:48]
    top = 2 ** (bits_stored - 1) if signed else 2**bits_stored
    low = -top if signed else 0
    base = (np.sin(x / 7.0) * np.cos(y / 5.0) + 1) / 2 * (top - low - 1) + low
    shape = (frames, 40, 48, samples) if samples > 1 else (frames, 40, 48)
    noise = rng.integers(-3, 4, size=shape)
    base = base[None, :, :, None] if samples > 1 else base[None]
    values = np.clip(base + noise, low, top - 1)
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}
    arr = values.astype(dtype[(bits_allocated, signed)])
    if samples > 1 and planar:
        arr = arr.transpose(0, 3, 1, 2)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.SamplesPerPixel = samples
    if samples > 1:
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = planar
    ds.PixelData = arr.tobytes()
    return ds


FORMATS = {
    "u8": dict(bits_allocated=8, bits_stored=8, signed=False),
    "u12": dict(bits_allocated=16, bits_stored=12, signed=False),
    "s12": dict(bits_allocated=16, bits_stored=12, signed=True),
    "u16": dict(bits_allocated=16, bits_stored=16, signed=False),
    "s16": dict(bits_allocated=16, bits_stored=16, signed=True),
    "rgb": dict(bits_allocated=8, bits_stored=8, signed=False, samples=3, planar=0),
    "rgb-planar": dict(bits_allocated=8, bits_stored=8, signed=False, samples=3, planar=1),
    "u16x3frames": dict(bits_allocated=16, bits_stored=16, signed=False, frames=3),
}


def decoded(data: bytes) -> np.ndarray:
    got = pydicom.dcmread(io.BytesIO(data))
    return got.pixel_array


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("target", LOSSLESS)
def test_lossless_instances_are_bit_exact(target: str, fmt: str) -> None:
    assert encode.can_encode(target), f"no encoder plugin installed for {target}"  # all are dependencies
    ds = image(**FORMATS[fmt])  # type: ignore[arg-type]
    original = pydicom.dcmread(io.BytesIO(part10(ds))).pixel_array
    out = transcode.transcode_instance(part10(ds), target)
    got = pydicom.dcmread(io.BytesIO(out))
    assert got.file_meta.TransferSyntaxUID == target
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert "LossyImageCompression" not in got
    assert np.array_equal(got.pixel_array, original)
    frames = int(ds.get("NumberOfFrames") or 1)
    fragments = list(pydicom.encaps.generate_frames(got.PixelData, number_of_frames=frames))
    assert len(fragments) == frames


@pytest.mark.parametrize("target", LOSSLESS)
def test_single_frames_decode_like_the_native_frame(target: str) -> None:
    """Frames as the frames resource sends them: one codestream, decoded by pydicom's decoder for the syntax."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    ds = image(16, 12, True, frames=2)
    info = encode.image_of(ds)
    native = bytes(ds.PixelData)
    size = len(native) // 2
    decoder = get_decoder(UID(target))
    for n in range(2):
        frame = native[n * size : (n + 1) * size]
        stream = encode.encode_frame(frame, target, info)
        options = dict(
            rows=40, columns=48, samples_per_pixel=1, bits_allocated=16, bits_stored=12, pixel_representation=1
        )
        arr, _ = decoder.as_array(
            encapsulate([stream]), photometric_interpretation="MONOCHROME2", number_of_frames=1, **options
        )
        assert np.array_equal(arr, encode.frame_array(frame, info))


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm", "emri_small_jpeg_2k_lossless.dcm"]
)
def test_samples_to_htj2k_and_jpeg2000_are_bit_exact(name: str) -> None:
    data = sample(name).read_bytes()
    original = pydicom.dcmread(io.BytesIO(data)).pixel_array
    for target in (encode.HTJ2K_RPCL, encode.J2K_LOSSLESS):
        assert np.array_equal(decoded(transcode.transcode_instance(data, target)), original), target


@pytest.mark.parametrize("target", LOSSY)
def test_lossy_targets_are_close_and_marked(target: str) -> None:
    assert encode.can_encode(target), f"no encoder plugin installed for {target}"  # all are dependencies
    ds = image(16, 12, False)
    ds.LossyImageCompression = "00"
    original = pydicom.dcmread(io.BytesIO(part10(ds))).pixel_array.astype(float)
    got = pydicom.dcmread(io.BytesIO(transcode.transcode_instance(part10(ds), target)))
    assert got.LossyImageCompression == "01"
    assert got.LossyImageCompressionMethod == encode.CODECS[target].method
    assert float(got.LossyImageCompressionRatio) > 1
    error = np.abs(got.pixel_array.astype(float) - original)
    assert error.mean() < 40 and error.max() < 400  # of 4096 levels


def test_jpeg_baseline_for_8_bit_data_only() -> None:
    for fmt in ("u8", "rgb-planar"):
        ds = image(**FORMATS[fmt])  # type: ignore[arg-type]
        original = pydicom.dcmread(io.BytesIO(part10(ds))).pixel_array.astype(float)
        got = pydicom.dcmread(io.BytesIO(transcode.transcode_instance(part10(ds), encode.JPEG_BASELINE)))
        assert got.LossyImageCompressionMethod == "ISO_10918_1"
        assert np.abs(got.pixel_array.astype(float) - original).mean() < 4, fmt
    with pytest.raises(TranscodeError, match="8-bit"):
        transcode.transcode_instance(part10(image(16, 12, False)), encode.JPEG_BASELINE)
    with pytest.raises(TranscodeError, match="8-bit"):
        encode.encode_frame(b"\0" * 40 * 48 * 2, encode.JPEG_BASELINE, encode.image_of(image(16, 12, False)))


def _markers(stream: bytes) -> list[tuple[int, bytes]]:
    """The main header marker segments and the tile-part headers of a J2K codestream."""
    out: list[tuple[int, bytes]] = []
    i = 2
    while i < len(stream):
        marker, length = struct.unpack(">HH", stream[i : i + 4])
        out.append((marker, stream[i + 4 : i + 2 + length]))
        if marker == 0xFF90:  # SOT: Psot is the tile-part length from the SOT marker
            psot = struct.unpack(">I", stream[i + 6 : i + 10])[0]
            i += psot
        else:
            i += 2 + length
        if stream[i : i + 2] == b"\xff\xd9":
            break
    return out


def test_htj2k_rpcl_is_rpcl_with_tlm_and_a_tile_part_per_resolution() -> None:
    ds = image(16, 16, True)
    stream = encode.encode_frame(bytes(ds.PixelData), encode.HTJ2K_RPCL, encode.image_of(ds))
    markers = _markers(stream)
    kinds = [m for m, _ in markers]
    cod = next(body for m, body in markers if m == 0xFF52)
    assert cod[1] == 2  # SGcod progression order: 2 = RPCL (ISO 15444-1 Table A.16)
    levels = cod[5]
    assert 0xFF55 in kinds  # TLM
    assert kinds.count(0xFF90) == levels + 1  # one tile-part per resolution
    plain = encode.encode_frame(bytes(ds.PixelData), encode.HTJ2K_LOSSLESS, encode.image_of(ds))
    assert 0xFF55 not in [m for m, _ in _markers(plain)]


def test_unsupported_images_and_targets() -> None:
    info = encode.image_of(image(16, 12, False))
    assert encode.unsupported("1.2.840.10008.1.2.4.100", info) is not None  # MPEG-2: no encoder
    assert not encode.can_encode("1.2.840.10008.1.2.4.100")
    assert not transcode.can_transcode(encode.J2K_LOSSLESS, "1.2.840.10008.1.2.4.100")
    assert transcode.can_transcode("1.2.840.10008.1.2.1", encode.HTJ2K_RPCL)
    one_bit = ImageInfo(rows=4, columns=8, bits_allocated=1, bits_stored=1)
    with pytest.raises(TranscodeError):
        encode.encode_frame(b"\0" * 4, encode.HTJ2K_LOSSLESS, one_bit)
