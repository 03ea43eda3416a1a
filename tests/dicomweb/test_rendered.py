"""Rendered and thumbnail resources (PS3.18 10.4, 8.3.5) and rendered WADO-URI (PS3.18 9) over HTTP:
the output pixels are decoded (Pillow) and checked against the display pipeline's arithmetic."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import generate_uid

from dicomweb.retrieve.rendered import is_image_class
from tests.conftest import bearer
from tests.dicomweb.test_wado import parts, path, stow_files
from tests.support.data import sample
from tests.support.factory import ct, multipart, part10, stow_headers

PNG = {"Accept": "image/png"}


def store(http: httpx.Client, *datasets: Dataset) -> None:
    response = http.post("/dicom-web/studies", content=multipart([part10(d) for d in datasets]), headers=stow_headers())
    assert response.status_code == 200, response.text


def image(response: httpx.Response, media_type: str = "image/png") -> np.ndarray[Any, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    return np.asarray(Image.open(io.BytesIO(response.content)))


def halves(**attrs: Any) -> Dataset:
    """An 8x8 CT: left half stored 1064 (40 HU with the intercept -1024), right half stored 0 (-1024 HU)."""
    ds = ct(rows=8, columns=8, RescaleSlope=1, RescaleIntercept=-1024, **attrs)
    arr = np.zeros((8, 8), dtype=np.uint16)
    arr[:, :4] = 1064
    ds.PixelData = arr.tobytes()
    return ds


def constant(value: int, **attrs: Any) -> Dataset:
    """A 4x4 image of one stored value, windowed 0..1000 (so that the value shows as its own gray level)."""
    ds = ct(rows=4, columns=4, WindowCenter=500, WindowWidth=1000, **attrs)
    ds.PixelData = np.full((4, 4), value, dtype=np.uint16).tobytes()
    return ds


def gray(value: int) -> int:
    """The display value of `constant(value)` (LINEAR window 500/1000, PS3.3 C.11.2.1.2.1)."""
    return int(np.clip(np.rint(((value - 499.5) / 999 + 0.5) * 255), 0, 255))


# ---------------------------------------------------------------------------------------------- pixel pipeline


def test_window_rescale_and_functions(http: httpx.Client) -> None:
    ds = halves()
    store(http, ds)
    for window in ("40,400", "40,400,linear", "40,400,LINEAR-EXACT", "40,400,sigmoid"):
        px = image(http.get(path(ds, "/rendered"), params={"window": window}, headers=PNG))
        assert px.shape == (8, 8)
        assert abs(int(px[0, 0]) - 128) <= 1, window  # the center (after rescale) is mid-gray
        assert int(px[0, 7]) <= 1, window  # far below the window: black
    # Centered on the stored value: mid-gray if the rescale were skipped; 40 HU is far below that window.
    px = image(http.get(path(ds, "/rendered"), params={"window": "1064,400"}, headers=PNG))
    assert int(px[0, 0]) == 0


def test_window_of_the_instance_then_min_max(http: httpx.Client) -> None:
    with_window = halves(WindowCenter=[40, 500], WindowWidth=[400, 2000])  # the first pair counts
    plain = halves()
    store(http, with_window, plain)
    px = image(http.get(path(with_window, "/rendered"), headers=PNG))
    assert abs(int(px[0, 0]) - 128) <= 1 and int(px[0, 7]) == 0
    px = image(http.get(path(plain, "/rendered"), headers=PNG))  # min/max: -1024 -> 0, 40 -> 255
    assert int(px[0, 0]) == 255 and int(px[0, 7]) == 0


def test_monochrome1_is_inverted(http: httpx.Client) -> None:
    ds = halves(PhotometricInterpretation="MONOCHROME1")
    store(http, ds)
    px = image(http.get(path(ds, "/rendered"), params={"window": "40,400"}, headers=PNG))
    assert abs(int(px[0, 0]) - 127) <= 1
    assert int(px[0, 7]) >= 254  # low values are white in MONOCHROME1


def test_monochrome1_sample_is_the_inverse_of_its_monochrome2_copy(http: httpx.Client) -> None:
    [cr] = stow_files(http, ["RG3_UNCR.dcm"])
    copy = pydicom.dcmread(sample("RG3_UNCR.dcm"))
    copy.PhotometricInterpretation = "MONOCHROME2"
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    store(http, copy)
    viewport = {"viewport": "440,440"}
    inverted = image(http.get(path(cr, "/rendered"), params=viewport, headers=PNG)).astype(int)
    plain = image(http.get(path(copy, "/rendered"), params=viewport, headers=PNG)).astype(int)
    assert inverted.shape == (440, 440)
    assert np.abs(inverted - (255 - plain)).max() <= 1
    assert inverted.std() > 10  # an image, not a flat field


def test_color_samples(http: httpx.Client) -> None:
    rgb, ybr, ybr_jpeg, palette = stow_files(
        http, ["SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "OBXXXX1A.dcm"]
    )
    reference = pydicom.dcmread(sample("SC_rgb.dcm")).pixel_array.astype(int)
    got_rgb = image(http.get(path(rgb, "/rendered"), headers=PNG)).astype(int)
    assert got_rgb.shape == (100, 100, 3) and np.array_equal(got_rgb, reference)
    got_ybr = image(http.get(path(ybr, "/rendered"), headers=PNG)).astype(int)
    assert np.abs(got_ybr - reference).max() <= 8 and np.abs(got_ybr - reference).mean() < 1  # YBR_FULL -> RGB
    got_jpeg = image(http.get(path(ybr_jpeg, "/rendered"), headers=PNG)).astype(int)
    assert np.abs(got_jpeg - reference).mean() < 3  # YBR_FULL_422 JPEG (lossy) -> RGB
    source = pydicom.dcmread(sample("OBXXXX1A.dcm"))
    expected = apply_color_lut(source.pixel_array, source)
    if expected.dtype != np.uint8:
        expected = expected >> 8
    got_palette = image(http.get(path(palette, "/rendered"), headers=PNG)).astype(int)
    assert got_palette.shape == (600, 800, 3)
    assert np.abs(got_palette - expected.astype(int)).max() <= 1
    assert len({tuple(p) for p in got_palette.reshape(-1, 3)[::97]}) > 10  # colors, not grays


def test_enhanced_multiframe_functional_groups(http: httpx.Client) -> None:
    """Rescale from the shared functional groups, a window per frame (PS3.3 C.7.6.16.2.9, C.7.6.16.2.10)."""
    ds = ct(rows=4, columns=4, frames=2)
    ds.PixelData = np.full((2, 4, 4), 1064, dtype=np.uint16).tobytes()
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    shared = Dataset()
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for center in (40, 240):
        voi, item = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, 400
        item.FrameVOILUTSequence = [voi]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    store(http, ds)
    assert abs(int(image(http.get(path(ds, "/frames/1/rendered"), headers=PNG))[0, 0]) - 128) <= 1
    assert int(image(http.get(path(ds, "/frames/2/rendered"), headers=PNG))[0, 0]) <= 1


def test_modality_lut_and_voi_lut_sequences(http: httpx.Client) -> None:
    mlut, vlut = stow_files(http, ["mlut_18.dcm", "vlut_04.dcm"])
    for ds in (mlut, vlut):
        px = image(http.get(path(ds, "/rendered"), headers=PNG))
        assert px.shape == (512, 512) and px.min() < 20 and px.max() > 235


# ---------------------------------------------------------------------------------------------- geometry, encoding


def test_viewport_scales_with_aspect_crops_and_flips(http: httpx.Client) -> None:
    ds = halves()
    store(http, ds)
    window = {"window": "40,400"}
    px = image(http.get(path(ds, "/rendered"), params={**window, "viewport": "32,64"}, headers=PNG))
    assert px.shape == (32, 32)  # 8x8 fits a 32x64 viewport as 32x32
    left = image(http.get(path(ds, "/rendered"), params={**window, "viewport": "16,16,0,0,4,8"}, headers=PNG))
    assert left.shape == (16, 8) and np.abs(left.astype(int) - 128).max() <= 1  # the left half only
    flipped = image(http.get(path(ds, "/rendered"), params={**window, "viewport": "8,8,8,0,-8,8"}, headers=PNG))
    assert int(flipped[0, 0]) <= 1 and abs(int(flipped[0, 7]) - 128) <= 1


def test_media_types_and_quality(http: httpx.Client) -> None:
    [ct_image] = stow_files(http, ["693_UNCR.dcm"])
    url = path(ct_image, "/rendered")
    default = http.get(url)
    assert image(default, "image/jpeg").shape == (512, 512)
    assert http.get(url, headers={"Accept": "*/*"}).headers["content-type"] == "image/jpeg"
    assert image(http.get(url, params={"accept": "image/gif"}, headers=PNG), "image/gif").shape == (512, 512)
    assert image(http.get(url, headers={"Accept": 'multipart/related; type="image/png"'})).shape == (512, 512)
    low = http.get(url, params={"quality": "10"})
    high = http.get(url, params={"quality": "95"})
    assert low.status_code == high.status_code == 200
    assert len(low.content) * 2 < len(high.content)


def test_multiframe_instance_frames_and_animation(http: httpx.Client) -> None:
    ds = ct(rows=4, columns=4, frames=3, WindowCenter=500, WindowWidth=1000)
    ds.PixelData = np.stack([np.full((4, 4), v, dtype=np.uint16) for v in (100, 500, 900)]).tobytes()
    store(http, ds)
    assert int(image(http.get(path(ds, "/rendered"), headers=PNG))[0, 0]) == gray(100)  # the first frame
    assert int(image(http.get(path(ds, "/frames/3/rendered"), headers=PNG))[0, 0]) == gray(900)
    response = http.get(path(ds, "/frames/3,1/rendered"), headers=PNG)
    assert response.headers["content-type"].startswith('multipart/related; type="image/png"')
    got = parts(response)
    assert [h["content-type"] for h, _ in got] == ["image/png", "image/png"]
    assert got[0][0]["content-location"].endswith(path(ds, "/frames/3/rendered"))
    values = [int(np.asarray(Image.open(io.BytesIO(body)))[0, 0]) for _, body in got]
    assert values == [gray(900), gray(100)]
    gif = http.get(path(ds, "/rendered"), params={"accept": "image/gif"})
    animation = Image.open(io.BytesIO(gif.content))
    assert gif.headers["content-type"] == "image/gif" and animation.n_frames == 3


def test_study_and_series_rendered_are_multipart_of_instances(http: httpx.Client) -> None:
    study = generate_uid()
    a = constant(100, study=study, SeriesNumber=1)
    b1 = constant(300, study=study, SeriesNumber=2, InstanceNumber=2)
    b2 = constant(700, study=study, series=b1.SeriesInstanceUID, SeriesNumber=2, InstanceNumber=1)
    store(http, b1, a, b2)
    got = parts(http.get(f"/dicom-web/studies/{study}/rendered", headers=PNG))
    values = [int(np.asarray(Image.open(io.BytesIO(body)))[0, 0]) for _, body in got]
    assert values == [gray(100), gray(700), gray(300)]  # series number, then instance number order
    assert got[0][0]["content-location"].endswith(path(a, "/rendered"))
    series = parts(http.get(f"/dicom-web/studies/{study}/series/{b1.SeriesInstanceUID}/rendered"))
    assert [h["content-type"] for h, _ in series] == ["image/jpeg", "image/jpeg"]


def test_non_image_sop_classes_are_left_out() -> None:
    assert is_image_class("1.2.840.10008.5.1.4.1.1.2")  # CT
    assert is_image_class("1.2.840.10008.5.1.4.1.1.66.4")  # segmentation
    assert is_image_class("1.2.840.10008.5.1.4.1.1.481.2")  # RT dose
    assert not is_image_class("1.2.840.10008.5.1.4.1.1.88.22")  # enhanced SR
    assert not is_image_class("1.2.840.10008.5.1.4.1.1.11.1")  # presentation state
    assert not is_image_class("1.2.840.10008.5.1.4.1.1.104.1")  # encapsulated PDF
    assert not is_image_class("1.2.840.10008.5.1.4.1.1.481.5")  # RT plan


# ---------------------------------------------------------------------------------------------- thumbnails


def test_thumbnails_pick_a_representative_frame(http: httpx.Client) -> None:
    study = generate_uid()
    single = constant(100, study=study, SeriesNumber=1)
    series = generate_uid()
    members = [
        constant(v, study=study, series=series, SeriesNumber=2, InstanceNumber=n)
        for v, n in ((300, 3), (500, 1), (700, 2))
    ]
    multi = ct(rows=4, columns=4, frames=3, study=study, SeriesNumber=3, WindowCenter=500, WindowWidth=1000)
    multi.PixelData = np.stack([np.full((4, 4), v, dtype=np.uint16) for v in (200, 400, 600)]).tobytes()
    store(http, single, *members, multi)
    base = f"/dicom-web/studies/{study}"
    # Study: the series with the most images (series 2), its middle instance by number (InstanceNumber 2).
    assert int(image(http.get(base + "/thumbnail", headers=PNG))[0, 0]) == gray(700)
    assert int(image(http.get(f"{base}/series/{series}/thumbnail", headers=PNG))[0, 0]) == gray(700)
    assert int(image(http.get(path(multi, "/thumbnail"), headers=PNG))[0, 0]) == gray(400)  # middle frame
    assert int(image(http.get(path(multi, "/frames/3/thumbnail"), headers=PNG))[0, 0]) == gray(600)
    assert http.get(path(multi, "/frames/4/thumbnail")).status_code == 404


def test_thumbnail_size_and_viewport(http: httpx.Client) -> None:
    [big, small] = stow_files(http, ["693_UNCR.dcm", "MR_small.dcm"])
    assert image(http.get(path(big, "/thumbnail")), "image/jpeg").shape == (128, 128)
    assert image(http.get(path(small, "/thumbnail")), "image/jpeg").shape == (64, 64)  # never enlarged
    assert image(http.get(path(big, "/thumbnail"), params={"viewport": "256,256"}), "image/jpeg").shape == (256, 256)
    series = f"/dicom-web/studies/{big.StudyInstanceUID}/series/{big.SeriesInstanceUID}/thumbnail"
    assert image(http.get(series, params={"viewport": "64,32"}), "image/jpeg").shape == (32, 32)


def test_what_ohif_sends_for_thumbnails(http: httpx.Client) -> None:
    """OHIF 3.13 `thumbnailRendering: 'thumbnail'` / `'rendered'`: `?accept=image/jpeg` while dicomweb-client
    sends its bulk data Accept header; the query parameter wins (PS3.18 8.3.3.1)."""
    [ds] = stow_files(http, ["CT_small.dcm"])
    bulk_accept = {"Accept": 'multipart/related; type="application/octet-stream"'}
    for suffix in ("/thumbnail", "/rendered"):
        response = http.get(path(ds, suffix), params={"accept": "image/jpeg"}, headers=bulk_accept)
        assert image(response, "image/jpeg").ndim == 2, suffix
    assert http.get(path(ds, "/thumbnail"), headers=bulk_accept).status_code == 406


# ---------------------------------------------------------------------------------------------- HTTP behaviour


def test_etag_cache_and_no_gzip(http: httpx.Client) -> None:
    [ds] = stow_files(http, ["CT_small.dcm"])
    first = http.get(path(ds, "/rendered"), headers={"Accept-Encoding": "gzip"})
    assert first.status_code == 200 and "content-encoding" not in first.headers
    assert first.headers["cache-control"].startswith("private, max-age=")
    etag = first.headers["etag"]
    again = http.get(path(ds, "/rendered"), headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other = http.get(path(ds, "/rendered"), params={"window": "0,100"}, headers={"If-None-Match": etag})
    assert other.status_code == 200 and other.headers["etag"] != etag


def test_annotation_is_ignored_with_a_warning(http: httpx.Client) -> None:
    [ds] = stow_files(http, ["CT_small.dcm"])
    response = http.get(path(ds, "/rendered"), params={"annotation": "patient"})
    assert response.status_code == 200 and "annotation" in response.headers["warning"]


@pytest.mark.parametrize(
    "params",
    [
        {"window": "abc,400"},
        {"window": "40"},
        {"window": "40,0"},
        {"window": "40,400,cubic"},
        {"window": "40,nan"},
        {"viewport": "0,10"},
        {"viewport": "a,b"},
        {"viewport": "10,10,1"},
        {"viewport": "99999,10"},
        {"viewport": "10,10,500,500,10,10"},
        {"quality": "0"},
        {"quality": "101"},
        {"quality": "high"},
    ],
)
def test_bad_parameters_are_400(http: httpx.Client, params: dict[str, str]) -> None:
    [ds] = stow_files(http, ["CT_small.dcm"])
    response = http.get(path(ds, "/rendered"), params=params)
    assert response.status_code == 400, (params, response.text)
    assert "warning" in response.headers


def test_not_acceptable_and_not_found(http: httpx.Client) -> None:
    [ds] = stow_files(http, ["CT_small.dcm"])
    for accept in ("text/html", "application/dicom", 'multipart/related; type="application/dicom"'):
        assert http.get(path(ds, "/rendered"), headers={"Accept": accept}).status_code == 406, accept
    assert http.get(path(ds, "/rendered"), params={"accept": "video/mp4"}).status_code == 406
    assert http.get(path(ds, "/frames/2/rendered")).status_code == 404
    assert http.get(path(ds, "/frames/0/rendered")).status_code == 400
    unknown = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/1.2.3"
    assert http.get(unknown + "/rendered").status_code == 404
    assert http.get(unknown + "/thumbnail").status_code == 404
    assert http.get("/dicom-web/studies/1.2.3/rendered").status_code == 404
    assert http.get("/dicom-web/studies/1.2.3/thumbnail").status_code == 404


def test_referring_user_outside_the_care_list_is_refused(http: httpx.Client, server: Any, token: Any) -> None:
    mine, theirs = ct(PatientID="P1"), ct(PatientID="P3", Modality="MR")
    store(http, mine, theirs)
    referring = bearer(token(sub="dr-who", roles=["referring"], scopes=[]))
    with httpx.Client(base_url=server.url, headers=referring, timeout=60) as other:
        assert other.get(path(mine, "/rendered")).status_code == 200
        assert other.get(path(mine, "/thumbnail")).status_code == 200
        for suffix in ("/rendered", "/thumbnail", "/frames/1/rendered"):
            denied = other.get(path(theirs, suffix))
            assert denied.status_code == 403, suffix
        assert other.get(f"/dicom-web/studies/{theirs.StudyInstanceUID}/thumbnail").status_code == 403


# ---------------------------------------------------------------------------------------------- WADO-URI


def uri(ds: Dataset, **extra: str) -> dict[str, str]:
    return {
        "requestType": "WADO",
        "studyUID": str(ds.StudyInstanceUID),
        "seriesUID": str(ds.SeriesInstanceUID),
        "objectUID": str(ds.SOPInstanceUID),
        **extra,
    }


def test_wado_uri_rendered(http: httpx.Client) -> None:
    ds = halves()
    multi = ct(rows=4, columns=4, frames=3, WindowCenter=500, WindowWidth=1000)
    multi.PixelData = np.stack([np.full((4, 4), v, dtype=np.uint16) for v in (100, 500, 900)]).tobytes()
    store(http, ds, multi)
    default = http.get("/wado", params=uri(ds))
    assert image(default, "image/jpeg").shape == (8, 8)  # image/jpeg when contentType is absent (PS3.18 9)
    windowed = image(http.get("/wado", params=uri(ds, contentType="image/png", windowCenter="40", windowWidth="400")))
    assert abs(int(windowed[0, 0]) - 128) <= 1 and int(windowed[0, 7]) <= 1
    sized = image(http.get("/wado", params=uri(ds, contentType="image/png", rows="16", columns="32")))
    assert sized.shape == (16, 16)
    region = image(http.get("/wado", params=uri(ds, contentType="image/png", region="0.5,0,1,1")))
    assert region.shape == (8, 4)
    frame = image(http.get("/wado", params=uri(multi, contentType="image/png", frameNumber="3")))
    assert int(frame[0, 0]) == gray(900)
    gif = http.get("/wado", params=uri(ds, contentType="image/gif", imageQuality="50"))
    assert image(gif, "image/gif").shape == (8, 8)
    assert http.get("/wado", params=uri(multi, frameNumber="4")).status_code == 404
    for bad in ({"windowCenter": "40"}, {"region": "0.5,0.5,0.2,1"}, {"rows": "0"}, {"frameNumber": "x"}):
        response = http.get("/wado", params=uri(ds, **bad))
        assert response.status_code == 400, bad
    assert http.get("/wado", params=uri(ds, contentType="text/html")).status_code == 406
    etag = default.headers["etag"]
    assert http.get("/wado", params=uri(ds), headers={"If-None-Match": etag}).status_code == 304
