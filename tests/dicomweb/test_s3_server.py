"""The same server on S3 (moto's server): STOW-RS bytes land in the bucket under the prefix, the index names
them, and a rejected duplicate leaves nothing behind."""

from __future__ import annotations

import time

import httpx
import pydicom

from server.settings import S3Settings
from tests.dicomweb.test_stow_errors import counts, reasons
from tests.support.data import sample
from tests.support.factory import ct, multipart, part10, stow_headers
from tests.support.s3util import ACCESS_KEY, REGION, SECRET_KEY, Moto


def s3_server(make_server, moto: Moto, tmp_path):
    bucket = moto.new_bucket()
    s3 = S3Settings(
        bucket=bucket,
        prefix="archive",
        endpoint_url=moto.endpoint,
        region=REGION,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        multipart_threshold=5 * 1024 * 1024,
    )
    return make_server(storage_url=f"s3://{bucket}/archive", s3=s3), bucket


def keys(moto: Moto, bucket: str) -> list[str]:
    listing = moto.client.list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def instance_keys(moto: Moto, bucket: str) -> list[str]:
    """The stored instances' objects (rendition blobs, `….frames`, are made by a job in the background)."""
    return [k for k in keys(moto, bucket) if not k.endswith(".frames")]


def test_stow_to_s3(make_server, moto: Moto, tmp_path) -> None:
    srv, bucket = s3_server(make_server, moto, tmp_path)
    ds = ct(rows=1024, columns=1024, frames=4)  # 8 MiB: a multipart upload at the 5 MiB threshold
    original = part10(ds)
    with httpx.Client(base_url=srv.url, timeout=120, headers=srv.headers) as http:
        resp = http.post(
            "/dicom-web/studies",
            content=multipart([original, sample("CT_small.dcm").read_bytes()]),
            headers=stow_headers(),
        )
        assert resp.status_code == 200, resp.text
        stored = instance_keys(moto, bucket)
        assert len(stored) == 2 and all(k.startswith("archive/") for k in stored)
        ours = next(k for k in stored if ds.SOPInstanceUID in k)
        body = moto.client.get_object(Bucket=bucket, Key=ours)["Body"].read()
        assert body == original
        # WADO-RS reads the bytes back from S3: the whole instance, and one frame by ranged GET.
        base = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        whole = http.get(base, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert whole.status_code == 200
        assert original in whole.content
        frame = http.get(base + "/frames/3", headers={"Accept": "application/octet-stream; transfer-syntax=*"})
        assert frame.status_code == 200
        assert frame.content == ds.PixelData[2 * 1024 * 1024 * 2 : 3 * 1024 * 1024 * 2]
        # A different file under the same SOP Instance UID is refused and leaves no object behind.
        changed = ct(study=ds.StudyInstanceUID, series=ds.SeriesInstanceUID, sop=ds.SOPInstanceUID, seed=9)
        resp = http.post("/dicom-web/studies", content=multipart([part10(changed)]), headers=stow_headers())
        assert resp.status_code == 409
        assert instance_keys(moto, bucket) == stored
        # The HTJ2K renditions of both images land in the bucket too (the rendition job, through the blob store).
        deadline = time.monotonic() + 60
        while len([k for k in keys(moto, bucket) if k.endswith(".frames")]) < 2:
            assert time.monotonic() < deadline, keys(moto, bucket)
            time.sleep(0.2)
    assert pydicom.dcmread(sample("CT_small.dcm")).SOPInstanceUID in " ".join(stored)


def test_identical_resend_is_not_uploaded_again(make_server, moto: Moto, tmp_path) -> None:
    """On a remote store the instance is looked up before its upload: re-sending the same bytes (a modality
    retrying, a study sent twice) costs no PUT, which a versioned bucket would keep as a second copy."""
    srv, bucket = s3_server(make_server, moto, tmp_path)
    moto.client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    data = part10(ct(seed=5))
    with httpx.Client(base_url=srv.url, timeout=60, headers=srv.headers) as http:
        for _ in range(2):
            resp = http.post("/dicom-web/studies", content=multipart([data]), headers=stow_headers())
            assert resp.status_code == 200, resp.text
    versions = moto.client.list_object_versions(Bucket=bucket).get("Versions", [])
    dcm = [v for v in versions if v["Key"].endswith(".dcm")]
    assert len(dcm) == 1, dcm


def test_failed_upload_stores_nothing(make_server, moto: Moto, tmp_path) -> None:
    """An upload that fails (here: the bucket is gone) fails the instance with A700 before any index row."""
    srv, bucket = s3_server(make_server, moto, tmp_path)
    moto.client.delete_bucket(Bucket=bucket)
    with httpx.Client(base_url=srv.url, timeout=60, headers=srv.headers) as http:
        resp = http.post("/dicom-web/studies", content=multipart([part10(ct(seed=6))]), headers=stow_headers())
    assert resp.status_code == 409, resp.text
    assert reasons(resp) == [0xA700]
    assert counts(srv.dsn) == (0, 0, 0)
