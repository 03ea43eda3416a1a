"""What travels to and from a Ray Serve replica (`inference.ray_wire`): pixels narrowed and masks bit-packed on the
way, restored exactly (values, dtype, shape) on the other side, and the lung fields answer through the codec is the
in-process answer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from inference import outputs
from inference.models import ImageInput, ModelInput, Prediction, Segment
from inference.models.lung_fields import LungFields
from inference.ray_wire import (
    PackedMask,
    PackedMasks,
    narrow,
    pack_input,
    pack_mask,
    pack_prediction,
    unpack_input,
    unpack_mask,
    unpack_prediction,
)
from tests.inference.test_inference_e2e import CHEST
from tests.support.data import sample

CODE = codes.SCT.Brain


def _image(pixels: np.ndarray) -> ImageInput:
    return ImageInput("1.2.3", pixels, "MONOCHROME2")


def test_pixels_go_as_the_smallest_dtype_and_come_back_as_they_were() -> None:
    cases = [
        (np.arange(200, dtype=np.int32).reshape(10, 20), np.uint8),
        (np.arange(-5, 195, dtype=np.int64).reshape(10, 20), np.int16),
        (np.arange(0, 60000, 300, dtype=np.uint32).reshape(10, 20), np.uint16),
        (np.linspace(0, 1, 200, dtype=np.float32).reshape(10, 20), np.float32),
        (np.arange(200, dtype=np.uint8).reshape(10, 20), np.uint8),
    ]
    for pixels, sent in cases:
        view = pixels[::2, ::3]  # not contiguous: it would be copied in band
        wire = pack_input(ModelInput((_image(view),)))
        assert wire.images[0].pixels.dtype == sent and wire.images[0].pixels.flags["C_CONTIGUOUS"]
        back = unpack_input(wire).images[0].pixels
        assert back.dtype == pixels.dtype and np.array_equal(back, view)
    assert narrow(np.zeros((0,), dtype=np.int32)).dtype == np.int32
    plain = ModelInput((_image(np.ones((4, 4), np.uint16)),))
    assert unpack_input(plain) is plain


def test_binary_masks_are_bit_packed_and_restored() -> None:
    rng = np.random.default_rng(7)
    mask = rng.random((37, 53)) < 0.3
    packed = pack_mask(mask)
    assert isinstance(packed, PackedMask) and packed.bits.nbytes == (37 * 53 + 7) // 8
    back = unpack_mask(packed)
    assert back.dtype == np.bool_ and back.shape == mask.shape and np.array_equal(back, mask)
    as_int = mask.astype(np.uint8)
    back_int = unpack_mask(pack_mask(as_int))
    assert back_int.dtype == np.uint8 and np.array_equal(back_int, as_int)
    labels = (mask * 255).astype(np.uint8)  # not 0/1: travels as it is
    assert pack_mask(labels) is labels and unpack_mask(labels) is labels


def test_a_series_goes_as_one_volume_and_its_masks_as_one_bit_array() -> None:
    rng = np.random.default_rng(3)
    slices = [rng.integers(0, 4096, (6, 5), dtype=np.uint16) for _ in range(4)]
    images = tuple(
        ImageInput(f"1.2.{i}", s, "MONOCHROME2", position=(0.0, 0.0, float(i))) for i, s in enumerate(slices)
    )
    wire = pack_input(ModelInput(images))
    assert wire.volume is not None and wire.volume.shape == (4, 6, 5) and wire.volume.flags["C_CONTIGUOUS"]
    assert all(image.pixels.size == 0 for image in wire.images)  # the pixels travel once, in the volume
    back = unpack_input(wire).images
    assert [b.sop_instance_uid for b in back] == [i.sop_instance_uid for i in images]
    assert all(b.pixels.dtype == np.uint16 and np.array_equal(b.pixels, s) for b, s in zip(back, slices, strict=True))
    assert back[2].position == (0.0, 0.0, 2.0)
    narrow_slices = [np.full((3, 3), i, dtype=np.int32) for i in range(3)]  # narrowed to uint8, cast back
    wire = pack_input(ModelInput(tuple(_image(s) for s in narrow_slices)))
    assert wire.volume is not None and wire.volume.dtype == np.uint8
    assert [b.pixels.dtype for b in unpack_input(wire).images] == [np.int32] * 3
    mixed = ModelInput((_image(np.ones((2, 2), np.uint16)), _image(np.ones((3, 2), np.uint16))))
    assert pack_input(mixed).volume is None and unpack_input(pack_input(mixed)).images[1].pixels.shape == (3, 2)

    masks = tuple(rng.random((6, 5)) < 0.5 for _ in range(4))
    segment = Segment("Brain", CODE, CODE, masks)
    wired = pack_prediction(Prediction((segment,), {"v": 1.0}))
    assert isinstance(wired.masks[0], PackedMasks) and wired.masks[0].bits.nbytes == (4 * 6 * 5 + 7) // 8
    [got] = unpack_prediction(wired).segments
    assert len(got.masks) == 4 and all(
        np.array_equal(g, m) and g.dtype == np.bool_ for g, m in zip(got.masks, masks, strict=True)
    )


def test_lung_fields_through_the_codec_equal_in_process() -> None:
    image = outputs.image_input(pydicom.dcmread(sample(CHEST)))
    inputs = ModelInput((replace(image, pixels=image.pixels[::2, ::2]),))
    adapter = LungFields.from_settings({})
    expected = adapter.predict(inputs)
    got = unpack_prediction(pack_prediction(adapter.predict(unpack_input(pack_input(inputs)))))
    assert got.measurements == expected.measurements and got.conclusion == expected.conclusion
    [segment], [want] = got.segments, expected.segments
    assert segment.label == want.label and np.array_equal(segment.masks[0], want.masks[0])
    assert want.masks[0].any() and segment.masks[0].dtype == np.bool_
    assert [p.measurements for p in adapter.predict_batch([inputs, inputs])] == [expected.measurements] * 2
