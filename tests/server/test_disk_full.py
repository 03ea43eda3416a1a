"""A disk that fills (`server.platform.diskspace`): below the free-space watermark ingest is refused cleanly (STOW-RS
503 with Retry-After, C-STORE A700), derived work waits, reads go on and /readyz and the `hounsfield.disk.*` gauges
say so; a write that hits a full file system (ENOSPC) fails that instance alone with A700, never a 500.

The full disk is real: a small tmpfs mounted over the blob folder in the server's own mount namespace (`unshare -m`,
which needs root: skipped elsewhere). The test reaches that file system through /proc/<pid>/root. The watermark alone
is tested without root, with a watermark above the free space of the test machine's disk."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from server.platform import telemetry
from server.platform.diskspace import FreeSpace
from server.settings import Settings, SettingsError
from tests.conftest import free_port
from tests.support.dimse_util import TITLE, start
from tests.support.factory import ct, multipart, part10, stow_headers
from tests.support.procs import ServerProcess, serve

pytestmark = pytest.mark.timeout(240)

FAILED = "00081198"
REFERENCED = "00081199"
FAILURE_REASON = "00081197"
SOP_INSTANCE = "00081155"
OUT_OF_RESOURCES = 0xA700
ABOVE_ANY_DISK = 2**62
MIB = 1024 * 1024


def c_store(port: int, ds: Any) -> int:
    """C-STORE `ds` as the configured peer CT1 (pynetdicom as the modality); the response status."""
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=TITLE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status)


def jobs_of(dsn: str, kind: str) -> list[tuple[str, int]]:
    """(state, attempts) of the jobs of `kind`."""

    async def run() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT state, attempts FROM jobs WHERE kind = $1", kind)
            return [(r["state"], r["attempts"]) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def renditions_count(dsn: str) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM renditions"))
        finally:
            await conn.close()

    return asyncio.run(run())


# --- the watermark (no root needed) ----------------------------------------------------------------------------


def test_below_the_watermark_ingest_is_refused_and_reads_go_on(make_server: Any) -> None:
    """One server stores while there is room; a second on the same database and data folder, whose watermark is
    above the disk's free space, refuses STOW-RS (503, Retry-After, before reading the body) and C-STORE (A700),
    leaves the rendition jobs queued while its worker runs other jobs, serves reads, and /readyz says why."""
    roomy = make_server(worker_enabled=False)  # stores, and leaves its jobs to the other server's worker
    stored = ct(rows=64, columns=64)
    response = httpx.post(
        roomy.dicomweb + "/studies", content=multipart([part10(stored)]), headers={**stow_headers(), **roomy.headers}
    )
    assert response.status_code == 200

    full = start(make_server, min_free_bytes=ABOVE_ANY_DISK)
    headers = full.headers
    refused = httpx.post(
        full.dicomweb + "/studies", content=multipart([part10(ct())]), headers={**stow_headers(), **headers}
    )
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "60"
    assert "watermark" in refused.headers["Warning"] and "watermark" in refused.json()["error"]

    assert c_store(full.settings.dimse_port, ct()) == OUT_OF_RESOURCES

    ready = httpx.get(full.url + "/readyz")
    assert ready.status_code == 200  # still ready: reads are served
    assert ready.json()["disk"].startswith("low: data folder, spool") and "watermark" in ready.json()["disk"]

    found = httpx.get(full.dicomweb + "/studies", params={"StudyInstanceUID": stored.StudyInstanceUID}, headers=headers)
    assert found.status_code == 200 and len(found.json()) == 1
    frame = httpx.get(
        f"{full.dicomweb}/studies/{stored.StudyInstanceUID}/series/{stored.SeriesInstanceUID}"
        f"/instances/{stored.SOPInstanceUID}/frames/1",
        headers={**headers, "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
    )
    assert frame.status_code == 200 and stored.PixelData in frame.content

    # The full server's worker runs jobs (the FHIR sync of the stored study) but not the rendition job.
    deadline = time.monotonic() + 60
    while not jobs_of(full.dsn, "fhir.sync") or {state for state, _ in jobs_of(full.dsn, "fhir.sync")} != {"done"}:
        assert time.monotonic() < deadline, jobs_of(full.dsn, "fhir.sync")
        time.sleep(0.2)
    time.sleep(1.0)  # several worker rounds past the rendition job's idle wait
    assert jobs_of(full.dsn, "rendition") == [("queued", 0)]  # paused: not even tried (no retry spent)
    assert renditions_count(full.dsn) == 0


def test_free_space_gauges() -> None:
    """`hounsfield.disk.free` (bytes) and `hounsfield.disk.low` (1 below the watermark) per watched volume."""
    reader = InMemoryMetricReader()
    tel = telemetry.Telemetry.build("none", metric_readers=(reader,))
    here = Path.cwd()
    stop = tel.watch_free_space(FreeSpace([("data folder", here), ("spool", here / "not-made-yet")], ABOVE_ANY_DISK))
    points: dict[tuple[str, str], Any] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    points[(metric.name, str(point.attributes["hounsfield.disk.volume"]))] = point.value
    free = shutil.disk_usage(here).free
    assert abs(points[("hounsfield.disk.free", "data folder")] - free) < 512 * MIB
    assert points[("hounsfield.disk.low", "data folder")] == 1 and points[("hounsfield.disk.low", "spool")] == 1
    stop()
    assert not tel.disk_sources
    tel.meter_provider.shutdown()
    tel.tracer_provider.shutdown()


# --- a real small file system (root) ---------------------------------------------------------------------------


def _tmpfs_possible() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m probe /mnt"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


# In CI (root, CI=true) a missing tmpfs is a failure, never a skip.
needs_tmpfs = pytest.mark.skipif(
    os.environ.get("CI") != "true" and not _tmpfs_possible(), reason="mounting a tmpfs needs root (unshare -m)"
)


def _on_tmpfs(folder: Path, mib: int) -> list[str]:
    """The command prefix that runs the server in its own mount namespace with a `mib` MiB tmpfs on `folder`."""
    script = f'mount -t tmpfs -o size={mib}m,mode=0700 hounsfield-test "$0" && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(folder)]


def _seen(server: ServerProcess, path: Path) -> Path:
    """`path` as the server sees it (in its mount namespace)."""
    return Path(f"/proc/{server.proc.pid}/root{path.resolve()}")


def _free(server: ServerProcess, path: Path) -> int:
    st = os.statvfs(_seen(server, path))
    return st.f_bavail * st.f_frsize


def _stow(server: ServerProcess, datasets: list[Any]) -> httpx.Response:
    body = multipart([part10(ds) for ds in datasets])
    return httpx.post(
        server.url + "/dicom-web/studies", content=body, headers={**stow_headers(), **server.headers}, timeout=120
    )


@needs_tmpfs
def test_enospc_fails_each_instance_with_a700_and_everything_acknowledged_is_intact(dsn: str, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    port = free_port()
    env = {
        "HOUNSFIELD_STORAGE_URL": str(blobs),
        "HOUNSFIELD_MIN_FREE_BYTES": "0",  # no watermark: every write goes until the file system is full
        "HOUNSFIELD_RENDITIONS": "",
        "HOUNSFIELD_INFERENCE": "false",
        "HOUNSFIELD_DIMSE_PORT": str(port),
        "HOUNSFIELD_DIMSE_PEERS": "CT1=technologist",
    }
    with serve(dsn, tmp_path / "data", wrap=_on_tmpfs(blobs, 16), **env) as server:
        study, series = generate_uid(), generate_uid()
        sent = [ct(study, series, rows=512, columns=1024, seed=i, InstanceNumber=i + 1) for i in range(24)]
        acknowledged, failed = [], []
        for batch in (sent[0:8], sent[8:16], sent[16:24]):
            response = _stow(server, batch)
            assert response.status_code in (200, 202, 409), response.text  # never a 5xx
            answer = response.json()
            acknowledged += [i[SOP_INSTANCE]["Value"][0] for i in answer.get(REFERENCED, {}).get("Value", [])]
            failed += answer.get(FAILED, {}).get("Value", [])
        assert acknowledged and failed, "the file system never filled, or nothing fit"
        assert {item[FAILURE_REASON]["Value"][0] for item in failed} == {OUT_OF_RESOURCES}
        assert len(acknowledged) + len(failed) == len(sent)
        assert c_store(port, ct(study, series, rows=2048, columns=5120, seed=99)) == OUT_OF_RESOURCES  # 20 MiB

        # Reads go on; every acknowledged instance is there, byte for byte; no refused instance is indexed.
        assert httpx.get(server.url + "/readyz").status_code == 200
        by_uid = {ds.SOPInstanceUID: ds for ds in sent}
        for uid in acknowledged:
            ds = by_uid[uid]
            got = httpx.get(
                f"{server.url}/dicom-web/studies/{study}/series/{series}/instances/{uid}",
                headers={**server.headers, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                timeout=60,
            )
            assert got.status_code == 200 and part10(ds) in got.content
        listed = httpx.get(
            f"{server.url}/dicom-web/studies/{study}/instances", headers=server.headers, timeout=60
        ).json()
        assert sorted(i["00080018"]["Value"][0] for i in listed) == sorted(acknowledged)
        # The spool keeps nothing of the refused parts: their space was given back at once.
        assert not list(_seen(server, blobs / ".spool").glob("*.part"))


@needs_tmpfs
def test_renditions_pause_below_the_watermark_and_resume_when_space_is_freed(dsn: str, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    env = {
        "HOUNSFIELD_STORAGE_URL": str(blobs),
        "HOUNSFIELD_MIN_FREE_BYTES": str(8 * MIB),
        "HOUNSFIELD_RENDITIONS_IDLE_MS": "3000",  # renditions start 3 s after the last store
        "HOUNSFIELD_INFERENCE": "false",
        "HOUNSFIELD_DIMSE": "false",
    }
    with serve(dsn, tmp_path / "data", wrap=_on_tmpfs(blobs, 24), **env) as server:
        study, series = generate_uid(), generate_uid()
        images = [ct(study, series, rows=256, columns=256, seed=i, InstanceNumber=i + 1) for i in range(4)]
        assert _stow(server, images).status_code == 200
        # An operator's file (or anything else) takes the space down to below the watermark.
        filler = _seen(server, blobs / "filler")
        with open(filler, "wb") as fh:
            fh.truncate(0)
            fh.write(b"\0" * (_free(server, blobs) - 4 * MIB))
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["disk"].startswith("low: spool, blob store 4") and "watermark 8" in ready["disk"], ready
        refused = _stow(server, [ct(study, series, seed=9)])
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        time.sleep(6)  # past the renditions' idle wait, several worker rounds
        assert renditions_count(dsn) == 0, "rendition jobs wrote below the watermark"
        assert {attempts for _, attempts in jobs_of(dsn, "rendition")} == {0}  # paused, not failed and retried
        assert not list(_seen(server, blobs).rglob("*.frames"))
        assert _free(server, blobs) > 3 * MIB

        filler.unlink()  # space freed: the paused work runs, and ingest is taken again
        deadline = time.monotonic() + 60
        while renditions_count(dsn) < len(images):
            assert time.monotonic() < deadline, "the renditions did not resume once space was freed"
            time.sleep(0.5)
        assert "disk" not in httpx.get(server.url + "/readyz").json()
        assert _stow(server, [ct(study, series, seed=10)]).status_code == 200


def test_watermark_settings_and_description(tmp_path: Path) -> None:
    settings = Settings.from_env({"HOUNSFIELD_DATA": str(tmp_path)})
    assert (settings.min_free_bytes, settings.min_free_percent) == (1024**3, 0)
    with pytest.raises(SettingsError, match="HOUNSFIELD_MIN_FREE_PERCENT"):
        Settings.from_env({"HOUNSFIELD_MIN_FREE_PERCENT": "100"})
    names = [name for name, _ in FreeSpace.of_settings(settings).volumes]
    assert names == ["data folder", "spool", "blob store", "database"]
    external = settings.with_overrides(database_url="postgresql://db/h", storage_url="s3://bucket", s3=object())
    assert [name for name, _ in FreeSpace.of_settings(external).volumes] == ["data folder", "spool"]
    assert FreeSpace.of_settings(settings.with_overrides(min_free_bytes=0)).describe() is None  # off
    share = FreeSpace([("data folder", tmp_path)], 0, min_percent=99)  # 99 % of the volume: low anywhere
    text = share.describe()
    assert text is not None and text.startswith("low: data folder ")
