"""The blob store contract, run unchanged against every implementation (house style 12: real parts).

`FileSystemBlobStore` on a temporary folder, and `S3BlobStore` against moto's real S3 server on 127.0.0.1
(a fresh bucket per test, with and without a key prefix). Store-specific checks (multipart ETags, aborted
uploads, a missing bucket) follow the shared ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import boto3
import pytest
from botocore.exceptions import ClientError

from dicomweb.blobs import BlobNotFound, BlobStore, BlobStoreError
from dicomweb.blobs.fs import FileSystemBlobStore
from dicomweb.blobs.s3 import S3BlobStore
from server.settings import S3Settings
from tests.support import fsync
from tests.support.s3util import ACCESS_KEY, REGION, SECRET_KEY, Moto, s3_settings

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Backend:
    kind: str
    store: BlobStore
    bucket: str | None = None
    prefix: str = ""


@pytest.fixture(params=["fs", "s3", "s3-prefixed"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path, moto: Moto) -> AsyncIterator[Backend]:
    if request.param == "fs":
        fs = FileSystemBlobStore(tmp_path / "blobs")
        yield Backend("fs", fs)
        await fs.close()
        return
    bucket = moto.new_bucket()
    prefix = "archive/v1" if request.param == "s3-prefixed" else ""
    s3 = S3BlobStore(s3_settings(moto, bucket, prefix))
    await s3.open()
    try:
        yield Backend(request.param, s3, bucket, prefix)
    finally:
        await s3.close()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "spool"
    folder.mkdir()
    yield folder


def pattern(seed: int = 0) -> bytes:
    """1 MiB of pseudo-random bytes; `write_file` repeats it, so any slice of a file is known."""
    return hashlib.shake_256(str(seed).encode()).digest(MiB)


def write_file(path: Path, size: int, seed: int = 0) -> str:
    """Write `size` bytes of `pattern(seed)` 1 MiB at a time (never all in memory); returns their sha256."""
    digest = hashlib.sha256()
    block = pattern(seed)
    with open(path, "wb") as fh:
        left = size
        while left:
            piece = block[: min(left, MiB)]
            fh.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


async def put_bytes(store: BlobStore, spool: Path, key: str, data: bytes) -> None:
    src = spool / uuid.uuid4().hex
    src.write_bytes(data)
    await store.put_file(key, src)


async def collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in chunks]


# -- the shared contract ----------------------------------------------------------------------------------


async def test_put_read_stream_size(backend: Backend, spool: Path) -> None:
    store = backend.store
    data = os.urandom(300 * 1024 + 17)
    src = spool / "part"
    src.write_bytes(data)
    await store.put_file("1.2.3/4.5.6/7.8.9", src)
    assert not src.exists()  # consumed: moved or uploaded, then removed

    assert await store.size("1.2.3/4.5.6/7.8.9") == len(data)
    assert await store.read_range("1.2.3/4.5.6/7.8.9", 0, len(data)) == data
    assert await store.read_range("1.2.3/4.5.6/7.8.9", 1000, 5000) == data[1000:6000]
    assert await store.read_range("1.2.3/4.5.6/7.8.9", len(data) - 1, 1) == data[-1:]
    assert await store.read_range("1.2.3/4.5.6/7.8.9", 10, 0) == b""

    whole = await collect(store.stream("1.2.3/4.5.6/7.8.9", chunk_size=64 * 1024))
    assert b"".join(whole) == data
    assert [len(c) for c in whole[:-1]] == [64 * 1024] * (len(whole) - 1)  # full chunks, the last shorter

    tail = await collect(store.stream("1.2.3/4.5.6/7.8.9", offset=250_000))
    assert b"".join(tail) == data[250_000:]
    middle = await collect(store.stream("1.2.3/4.5.6/7.8.9", offset=123, length=100_000, chunk_size=30_000))
    assert b"".join(middle) == data[123:100_123]
    assert [len(c) for c in middle] == [30_000, 30_000, 30_000, 10_000]
    assert await collect(store.stream("1.2.3/4.5.6/7.8.9", offset=len(data))) == []


async def test_put_files_stores_each_and_says_which_failed(backend: Backend, spool: Path) -> None:
    """Several files in one call: each stored (and consumed), with a per-item result; an item that cannot be stored
    (its source missing) fails alone."""
    datas = [os.urandom(1000 + n) for n in range(4)]
    items: list[tuple[str, Path]] = []
    for n, data in enumerate(datas):
        src = spool / f"part{n}"
        src.write_bytes(data)
        items.append((f"1.2.3/4.5.{n % 2}/{n}.frames", src))
    items[2][1].unlink()  # gone before the call
    results = await backend.store.put_files(items)
    assert [r is None for r in results] == [True, True, False, True]
    assert isinstance(results[2], BlobStoreError)
    for n, (key, src) in enumerate(items):
        assert not src.exists()
        if n != 2:
            assert await backend.store.read_range(key, 0, len(datas[n])) == datas[n]
    with pytest.raises(BlobNotFound):
        await backend.store.size(items[2][0])
    assert await backend.store.put_files([]) == []


async def test_empty_blob(backend: Backend, spool: Path) -> None:
    await put_bytes(backend.store, spool, "empty", b"")
    assert await backend.store.size("empty") == 0
    assert b"".join(await collect(backend.store.stream("empty"))) == b""


async def test_read_past_the_end_is_an_error(backend: Backend, spool: Path) -> None:
    await put_bytes(backend.store, spool, "short", b"0123456789")
    with pytest.raises(BlobStoreError, match="shorter"):
        await backend.store.read_range("short", 5, 10)
    with pytest.raises(BlobStoreError, match="shorter"):
        await collect(backend.store.stream("short", offset=5, length=10))


async def test_overwrite_replaces(backend: Backend, spool: Path) -> None:
    await put_bytes(backend.store, spool, "k", b"first")
    await put_bytes(backend.store, spool, "k", b"second!")
    assert await backend.store.read_range("k", 0, 7) == b"second!"


async def test_delete(backend: Backend, spool: Path) -> None:
    store = backend.store
    await put_bytes(store, spool, "a/b", b"x" * 10)
    await store.delete("a/b")
    with pytest.raises(BlobNotFound):
        await store.size("a/b")
    await store.delete("a/b")  # deleting a missing key is not an error
    await store.delete("never/was")


async def test_list(backend: Backend, spool: Path) -> None:
    store = backend.store
    before = datetime.now(UTC) - timedelta(minutes=5)
    blobs = {"1.2/3/a": b"a" * 3, "1.2/4/b": b"b" * 40, "1.25/c": b"", "9/d": b"d"}
    for key, data in blobs.items():
        await put_bytes(store, spool, key, data)

    everything = {info.key: info async for info in store.list()}
    assert {key: info.size for key, info in everything.items()} == {k: len(v) for k, v in blobs.items()}
    for info in everything.values():
        assert info.modified.tzinfo is not None
        assert before <= info.modified <= datetime.now(UTC) + timedelta(minutes=5)

    assert sorted([info.key async for info in store.list("1.2/")]) == ["1.2/3/a", "1.2/4/b"]
    assert sorted([info.key async for info in store.list("1.2")]) == ["1.2/3/a", "1.2/4/b", "1.25/c"]
    assert [info.key async for info in store.list("nothing/")] == []


async def test_missing_key(backend: Backend) -> None:
    store = backend.store
    with pytest.raises(BlobNotFound):
        await store.read_range("1.2/missing", 0, 10)
    with pytest.raises(BlobNotFound):
        await store.read_range("1.2/missing", 0, 0)
    with pytest.raises(BlobNotFound):
        await store.size("1.2/missing")
    with pytest.raises(BlobNotFound):
        await collect(store.stream("1.2/missing"))
    with pytest.raises(BlobNotFound):
        await collect(store.stream("1.2/missing", offset=10, length=5))


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "", "a\\b", "a\x00b"])
async def test_invalid_keys(backend: Backend, spool: Path, key: str) -> None:
    store = backend.store
    src = spool / "f"
    src.write_bytes(b"data")
    with pytest.raises(BlobStoreError, match="invalid blob key"):
        await store.put_file(key, src)
    assert src.exists()  # nothing was consumed
    with pytest.raises(BlobStoreError, match="invalid blob key"):
        await store.read_range(key, 0, 1)
    with pytest.raises(BlobStoreError, match="invalid blob key"):
        await store.size(key)
    with pytest.raises(BlobStoreError, match="invalid blob key"):
        await collect(store.stream(key))
    with pytest.raises(BlobStoreError, match="invalid blob key"):
        await store.delete(key)


@pytest.mark.slow
async def test_large_file_round_trip(backend: Backend, spool: Path) -> None:
    """40 MiB with a 5 MiB threshold: five 8 MiB parts on S3; the bytes come back identical."""
    src = spool / "big"
    size = 40 * MiB
    expected = write_file(src, size)
    await backend.store.put_file("big/one", src)
    assert not src.exists()
    assert await backend.store.size("big/one") == size

    digest = hashlib.sha256()
    async for chunk in backend.store.stream("big/one"):
        digest.update(chunk)
    assert digest.hexdigest() == expected
    across_parts = await backend.store.read_range("big/one", 8 * MiB - 10, 20)  # spans parts 1 and 2
    assert across_parts == (pattern() * 2)[MiB - 10 : MiB + 10]

    if backend.bucket is not None:  # S3: a multipart ETag is "<md5 of part md5s>-<part count>"
        moto_client = boto3.client(
            "s3",
            endpoint_url=backend.store.settings.endpoint_url,  # type: ignore[attr-defined]
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        try:
            key = f"{backend.prefix}/big/one" if backend.prefix else "big/one"
            head = moto_client.head_object(Bucket=backend.bucket, Key=key)
            assert head["ETag"].strip('"').endswith("-5")
        finally:
            moto_client.close()


_MEMORY_PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path

    sys.path.insert(0, sys.argv[1])
    from dicomweb.blobs.fs import FileSystemBlobStore
    from dicomweb.blobs.s3 import S3BlobStore
    from server.settings import S3Settings

    def write(path, size):
        block = bytes(range(256)) * 4096
        with open(path, "wb") as fh:
            for _ in range(size // len(block)):
                fh.write(block)

    def memory():
        # VmHWM is this process's own peak RSS. getrusage's ru_maxrss is not: Linux carries the parent's peak
        # across fork+exec, and the parent here is pytest with moto's in-memory S3 inside it.
        with open("/proc/self/status") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM")}

    async def main():
        cfg = json.loads(sys.argv[2])
        work = Path(cfg["work"])
        if cfg["kind"] == "fs":
            store = FileSystemBlobStore(Path(cfg["fs_root"]))
        else:
            store = S3BlobStore(S3Settings(**cfg["s3"]))
            await store.open()
        # Warm up with a one-part multipart upload, so lazy imports and connection pools are in the baseline.
        write(work / "warm", 6 * 1024 * 1024)
        await store.put_file("warm", work / "warm")
        write(work / "big", cfg["size"])
        base = memory()["VmRSS"]
        await store.put_file("big", work / "big")
        peak = memory()["VmHWM"]
        await store.close()
        print(json.dumps({"base": base, "peak": peak}))

    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak RSS")
async def test_upload_memory_is_bounded(backend: Backend, spool: Path, tmp_path: Path) -> None:
    """A large upload must not hold the file in memory: peak RSS grows by about one part, not by the file.
    Measured in a child process because moto's server, which keeps uploaded objects in memory, runs in this
    one."""
    size = 96 * MiB
    cfg: dict[str, Any] = {"kind": "fs" if backend.kind == "fs" else "s3", "work": str(spool), "size": size}
    if isinstance(backend.store, FileSystemBlobStore):
        cfg["fs_root"] = str(backend.store.root)
    if isinstance(backend.store, S3BlobStore):
        s = backend.store.settings
        cfg["s3"] = {
            "bucket": s.bucket,
            "prefix": s.prefix,
            "endpoint_url": s.endpoint_url,
            "region": s.region,
            "access_key_id": s.access_key_id,
            "secret_access_key": s.secret_access_key,
            "multipart_threshold": s.multipart_threshold,
        }
    with anyio.fail_after(240):
        done = await anyio.run_process(
            [sys.executable, "-c", _MEMORY_PROBE, str(ROOT), json.dumps(cfg)], cwd=tmp_path, check=False
        )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    growth = result["peak"] - result["base"]
    # Observed: ~10 MiB on S3 (one 8 MiB part and its request), ~0 on the filesystem (a rename).
    assert growth < size // 2, f"peak RSS grew by {growth / MiB:.1f} MiB uploading {size // MiB} MiB"
    assert await backend.store.size("big") == size


# -- S3 only ----------------------------------------------------------------------------------------------


async def test_s3_keys_carry_the_prefix(moto: Moto, spool: Path) -> None:
    bucket = moto.new_bucket()
    moto.client.put_object(Bucket=bucket, Key="outside/prefix", Body=b"not ours")
    store = S3BlobStore(s3_settings(moto, bucket, "/tenant-a/"))
    await store.open()
    try:
        await put_bytes(store, spool, "1.2/3", b"abc")
        raw = sorted(o["Key"] for o in moto.client.list_objects_v2(Bucket=bucket)["Contents"])
        assert raw == ["outside/prefix", "tenant-a/1.2/3"]
        assert [info.key async for info in store.list()] == ["1.2/3"]
    finally:
        await store.close()


async def test_s3_list_many_pages(moto: Moto) -> None:
    """More keys than one ListObjectsV2 page (1,000) must all come back, with the store prefix removed."""
    bucket = moto.new_bucket()
    store = S3BlobStore(s3_settings(moto, bucket, "archive/v1"))
    await store.open()
    try:
        limit = asyncio.Semaphore(16)

        async def put(n: int) -> None:
            async with limit:
                await store._s3.put_object(Bucket=bucket, Key=store._key(f"many/{n:05d}"), Body=b"")

        await asyncio.gather(*(put(n) for n in range(1005)))
        await store._s3.put_object(Bucket=bucket, Key=store._key("other"), Body=b"")
        keys = [info.key async for info in store.list("many/")]
        assert keys == [f"many/{n:05d}" for n in range(1005)]
        assert len([info async for info in store.list()]) == 1006
    finally:
        await store.close()


async def test_s3_missing_bucket(moto: Moto) -> None:
    store = S3BlobStore(s3_settings(moto, "no-such-bucket-here"))
    with pytest.raises(BlobStoreError, match="no-such-bucket-here") as caught:
        await store.open()
    assert SECRET_KEY not in str(caught.value)
    with pytest.raises(BlobStoreError, match="not open"):
        await store.size("a")
    await store.close()


async def test_s3_unreachable_endpoint(moto: Moto) -> None:
    settings = S3Settings(
        bucket="b", endpoint_url="http://127.0.0.1:9", access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY
    )
    store = S3BlobStore(settings)
    store.max_attempts = 1  # fail fast; production retries connection errors
    assert SECRET_KEY not in repr(settings)
    with pytest.raises(BlobStoreError, match="cannot reach S3 bucket 'b'") as caught:
        await store.open()
    assert SECRET_KEY not in str(caught.value)


async def test_s3_failed_multipart_upload_is_aborted(moto: Moto, spool: Path) -> None:
    bucket = moto.new_bucket()
    store = S3BlobStore(s3_settings(moto, bucket))
    await store.open()
    client = store._s3
    real_upload_part = client.upload_part
    calls = 0

    async def failing_upload_part(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "boom"}}, "UploadPart")
        return await real_upload_part(**kwargs)

    client.upload_part = failing_upload_part
    try:
        src = spool / "big"
        write_file(src, 20 * MiB)
        with pytest.raises(BlobStoreError, match="InternalError") as caught:
            await store.put_file("big", src)
        assert SECRET_KEY not in str(caught.value)
        assert src.exists()  # a failed store leaves the spool file for the caller to retry or clean up
        assert "Uploads" not in moto.client.list_multipart_uploads(Bucket=bucket)
        with pytest.raises(BlobNotFound):
            await store.size("big")
    finally:
        client.upload_part = real_upload_part
        await store.close()


async def test_s3_cancelled_multipart_upload_is_aborted(moto: Moto, spool: Path) -> None:
    """A STOW whose client disconnects cancels the upload; the parts already sent must not linger."""
    bucket = moto.new_bucket()
    store = S3BlobStore(s3_settings(moto, bucket))
    await store.open()
    client = store._s3
    real_upload_part = client.upload_part
    second_part = anyio.Event()

    async def slow_upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            second_part.set()
            await anyio.sleep(60)
        return await real_upload_part(**kwargs)

    client.upload_part = slow_upload_part
    try:
        src = spool / "big"
        write_file(src, 20 * MiB)
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.put_file, "big", src)
            await second_part.wait()
            tg.cancel_scope.cancel()
        assert "Uploads" not in moto.client.list_multipart_uploads(Bucket=bucket)
        assert src.exists()
    finally:
        client.upload_part = real_upload_part
        await store.close()


# -- filesystem only ----------------------------------------------------------------------------------------


def test_fs_new_folders_are_synced_into_their_parents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob's new study/series/instance folders are entries in their parents: each parent is fsynced (as is
    the blob's own folder after the rename), or a power cut could drop the path to an acknowledged blob."""
    store = FileSystemBlobStore(tmp_path / "blobs")
    synced = fsync.recorded(monkeypatch)
    src = tmp_path / "part"
    src.write_bytes(b"x" * 100)
    asyncio.run(store.put_file("study/series/instance/blob.dcm", src))
    root = str(store.root)
    assert synced == [
        root,  # holds the new study folder
        f"{root}/study",
        f"{root}/study/series",
        str(src),  # the bytes, before the rename
        f"{root}/study/series/instance",  # the rename
    ]
    synced.clear()
    src.write_bytes(b"y" * 100)
    asyncio.run(store.put_file("study/series/instance/other.dcm", src))  # no new folder: the blob and its folder
    assert synced == [str(src), f"{root}/study/series/instance"]


def test_fs_put_files_syncs_each_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of blobs in two folders: each file's bytes before its rename, then each folder once (not once per
    blob), after every rename into it."""
    store = FileSystemBlobStore(tmp_path / "blobs")
    root = str(store.root)
    for folder in ("study/a", "study/b"):
        src = tmp_path / "seed"
        src.write_bytes(b"s")
        asyncio.run(store.put_file(f"{folder}/seed", src))
    synced = fsync.recorded(monkeypatch)
    items = []
    for n in range(6):
        src = tmp_path / f"part{n}"
        src.write_bytes(b"x" * (n + 1))
        items.append((f"study/{'ab'[n % 2]}/{n}.frames", src))
    assert asyncio.run(store.put_files(items)) == [None] * 6
    assert synced == [str(src) for _key, src in items] + [f"{root}/study/a", f"{root}/study/b"]
