"""S3 blob store (AWS, or any S3-compatible endpoint such as MinIO, Ceph or moto) over aiobotocore.

Why it is shaped like this:
- An S3 PUT (and CompleteMultipartUpload) is durable when it returns, so `put_file` needs no fsync dance: the
  Protocol's "survives a crash when this returns" holds as soon as S3 answers 200.
- Instances can be gigabytes (whole-slide images, long cine), so large files go up as a multipart upload read
  from disk one part at a time: memory stays at about one part however big the file. A failed multipart upload
  is aborted, because S3 keeps (and bills) the parts of an unfinished upload forever otherwise.
- WADO-RS frame retrieval and HTTP Range requests read slices of an instance; a ranged GetObject fetches only
  those bytes instead of the whole object.
- Errors become the blob store's own family (`BlobNotFound`, `BlobStoreError`, house style 3) with messages
  made from the S3 error code and our key, never from request data, so credentials cannot leak into logs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import anyio
import anyio.to_thread
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from dicomweb.blobs.base import BlobInfo, BlobNotFound, BlobStoreError, check_key
from server.platform.settings import S3Settings

log = logging.getLogger(__name__)

MIN_PART_SIZE = 8 * 1024 * 1024
"""Parts are at least this large: S3 allows at most 10,000 parts per upload, so 8 MiB parts reach ~78 GiB, and
fewer, larger requests amortise the per-request latency."""

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _raise_store_error(exc: BaseException, action: str, key: str) -> NoReturn:
    """Translate a botocore/aiohttp failure into the blob store's exception family.

    The message is built from the S3 error code and message (which S3 never fills with credentials) or the
    exception's class name, not from the request, so nothing secret reaches logs or HTTP error bodies.
    """
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in _NOT_FOUND_CODES:
            raise BlobNotFound(f"blob {key} is missing") from exc
        message = str(exc.response.get("Error", {}).get("Message", "")).strip()
        detail = f"{code}: {message}" if message else code or "unknown error"
        raise BlobStoreError(f"S3 {action} of {key} failed ({detail})") from exc
    raise BlobStoreError(f"S3 {action} of {key} failed ({type(exc).__name__})") from exc


def _range_header(offset: int, length: int | None) -> str | None:
    """The HTTP Range for a slice (RFC 9110 14.1.2: last-byte-pos is inclusive); None for the whole object,
    because `bytes=0-` on an empty object is answered 416 by S3."""
    if length is None:
        return None if offset == 0 else f"bytes={offset}-"
    return f"bytes={offset}-{offset + length - 1}"


def _read_part(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


class S3BlobStore:
    """A `BlobStore` over one bucket (and optional key prefix). Call `open()` before use and `close()` at the
    end; the lifespan owns both (house style 6)."""

    max_attempts: int = 5
    """Attempts per S3 call, retried by botocore's standard mode (throttling, 5xx, dropped connections):
    transient faults of a remote store should not fail a STOW."""

    local = False

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        prefix = settings.prefix.strip("/")
        self._prefix = f"{prefix}/" if prefix else ""
        self._part_size = max(settings.multipart_threshold, MIN_PART_SIZE)
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the client and check the bucket, so a wrong bucket name or missing permission stops the
        server at start instead of failing the first store."""
        if self._client is not None:
            return
        stack = AsyncExitStack()
        retries = {"max_attempts": self.max_attempts, "mode": "standard"}
        config = AioConfig(retries=retries, connect_timeout=10, read_timeout=60)
        kwargs: dict[str, Any] = {"region_name": self.settings.region, "config": config}
        if self.settings.endpoint_url:
            kwargs["endpoint_url"] = self.settings.endpoint_url
        if self.settings.access_key_id:
            kwargs["aws_access_key_id"] = self.settings.access_key_id
            kwargs["aws_secret_access_key"] = self.settings.secret_access_key
        bucket = self.settings.bucket
        try:
            client = await stack.enter_async_context(get_session().create_client("s3", **kwargs))
            await client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            await stack.aclose()
            code = _error_code(exc)
            if code in {"404", "NoSuchBucket", "NotFound"}:
                raise BlobStoreError(f"S3 bucket {bucket!r} does not exist") from exc
            if code in {"403", "AccessDenied", "Forbidden"}:
                raise BlobStoreError(f"S3 bucket {bucket!r} is not accessible to these credentials") from exc
            raise BlobStoreError(f"cannot open S3 bucket {bucket!r} ({code or 'unknown error'})") from exc
        except (*_TRANSPORT_ERRORS, ValueError) as exc:
            await stack.aclose()
            raise BlobStoreError(f"cannot reach S3 bucket {bucket!r} ({type(exc).__name__})") from exc
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._client = client

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def _s3(self) -> Any:
        if self._client is None:
            raise BlobStoreError("the S3 blob store is not open")
        return self._client

    def _key(self, key: str) -> str:
        return self._prefix + check_key(key)

    # -- writes ------------------------------------------------------------------------------------------

    async def put_file(self, key: str, path: Path) -> None:
        """Upload `path` under `key`, then delete `path` (the Protocol lets stores consume it)."""
        full = self._key(key)
        s3 = self._s3
        try:
            size = (await anyio.Path(path).stat()).st_size
        except OSError as exc:
            raise BlobStoreError(f"cannot read {path.name} to store {key}: {exc.strerror}") from exc
        if size < self.settings.multipart_threshold:
            try:
                body = await anyio.to_thread.run_sync(_read_part, path, 0, size)
            except OSError as exc:
                raise BlobStoreError(f"cannot read {path.name} to store {key}: {exc.strerror}") from exc
            if len(body) != size:
                raise BlobStoreError(f"{path.name} changed while storing {key}")
            try:
                await s3.put_object(Bucket=self.settings.bucket, Key=full, Body=body, ContentLength=size)
            except (ClientError, *_TRANSPORT_ERRORS) as exc:
                _raise_store_error(exc, "upload", key)
        else:
            await self._put_multipart(key, full, path, size)
        try:
            await anyio.Path(path).unlink(missing_ok=True)
        except OSError as exc:  # the blob is stored; a leftover spool file is only litter
            log.warning("stored blob %s but could not remove %s: %s", key, path.name, exc.strerror)

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[BlobStoreError | None]:
        """One upload after another (each is durable once S3 answered)."""
        results: list[BlobStoreError | None] = []
        for key, path in items:
            try:
                await self.put_file(key, path)
                results.append(None)
            except BlobStoreError as exc:
                results.append(exc)
        return results

    async def _put_multipart(self, key: str, full: str, path: Path, size: int) -> None:
        s3 = self._s3
        bucket = self.settings.bucket
        try:
            # CRC32 per part, as boto3's own transfer manager does: S3 checks each part's bytes on arrival.
            created = await s3.create_multipart_upload(Bucket=bucket, Key=full, ChecksumAlgorithm="CRC32")
        except (ClientError, *_TRANSPORT_ERRORS) as exc:
            _raise_store_error(exc, "multipart upload", key)
        upload_id = created["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            offset = 0
            number = 1
            while offset < size:
                want = min(self._part_size, size - offset)
                chunk = await anyio.to_thread.run_sync(_read_part, path, offset, want)
                if not chunk:
                    raise BlobStoreError(f"{path.name} shrank while storing {key}")
                answer = await s3.upload_part(
                    Bucket=bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    ContentLength=len(chunk),
                    ChecksumAlgorithm="CRC32",
                )
                part: dict[str, Any] = {"PartNumber": number, "ETag": answer["ETag"]}
                if answer.get("ChecksumCRC32"):  # S3 wants each part's checksum echoed on completion
                    part["ChecksumCRC32"] = answer["ChecksumCRC32"]
                parts.append(part)
                offset += len(chunk)
                number += 1
                del chunk  # one part in memory at a time
            await s3.complete_multipart_upload(
                Bucket=bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException as exc:
            await self._abort(key, full, upload_id)
            if isinstance(exc, (ClientError, *_TRANSPORT_ERRORS)):
                _raise_store_error(exc, "multipart upload", key)
            raise

    async def _abort(self, key: str, full: str, upload_id: str) -> None:
        """Abort even when the upload was cancelled (shielded), or S3 keeps the orphaned parts."""
        with anyio.CancelScope(shield=True):
            try:
                await self._s3.abort_multipart_upload(Bucket=self.settings.bucket, Key=full, UploadId=upload_id)
            except (ClientError, *_TRANSPORT_ERRORS) as exc:
                log.warning(
                    "could not abort the multipart upload of %s (%s); a bucket lifecycle rule "
                    "should expire incomplete uploads",
                    key,
                    type(exc).__name__,
                )

    async def delete(self, key: str) -> None:
        """DeleteObject succeeds on a missing key already; a 404 from a compatible store is ignored too."""
        try:
            await self._s3.delete_object(Bucket=self.settings.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return
            _raise_store_error(exc, "delete", key)
        except _TRANSPORT_ERRORS as exc:
            _raise_store_error(exc, "delete", key)

    # -- reads -------------------------------------------------------------------------------------------

    async def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            await self.size(key)  # same contract as the filesystem store: a missing key is still an error
            return b""
        full = self._key(key)
        try:
            answer = await self._s3.get_object(
                Bucket=self.settings.bucket, Key=full, Range=_range_header(offset, length)
            )
            async with answer["Body"] as body:
                data: bytes = await body.read()
        except ClientError as exc:
            if _error_code(exc) == "InvalidRange":
                raise BlobStoreError(f"blob {key} is shorter than the index says") from exc
            _raise_store_error(exc, "read", key)
        except _TRANSPORT_ERRORS as exc:
            _raise_store_error(exc, "read", key)
        if len(data) != length:
            raise BlobStoreError(f"blob {key} is shorter than the index says")
        return data

    async def stream(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = 1024 * 1024
    ) -> AsyncIterator[bytes]:
        """Yield `chunk_size` chunks (the last one shorter), like the filesystem store, from one GetObject."""
        if length is not None and length <= 0:
            await self.size(key)
            return
        full = self._key(key)
        args: dict[str, Any] = {"Bucket": self.settings.bucket, "Key": full}
        if (header := _range_header(offset, length)) is not None:
            args["Range"] = header
        try:
            answer = await self._s3.get_object(**args)
        except ClientError as exc:
            if _error_code(exc) == "InvalidRange":
                if length is None:
                    return  # offset at or past the end: nothing to send, as a file read would give
                raise BlobStoreError(f"blob {key} is shorter than the index says") from exc
            _raise_store_error(exc, "read", key)
        except _TRANSPORT_ERRORS as exc:
            _raise_store_error(exc, "read", key)
        sent = 0
        async with answer["Body"] as body:
            while True:
                buf = bytearray()
                try:
                    while len(buf) < chunk_size:
                        data = await body.read(chunk_size - len(buf))
                        if not data:
                            break
                        buf += data
                except _TRANSPORT_ERRORS as exc:
                    _raise_store_error(exc, "read", key)
                if not buf:
                    break
                sent += len(buf)
                yield bytes(buf)
                if len(buf) < chunk_size:
                    break
        if length is not None and sent != length:
            raise BlobStoreError(f"blob {key} is shorter than the index says")

    async def size(self, key: str) -> int:
        try:
            answer = await self._s3.head_object(Bucket=self.settings.bucket, Key=self._key(key))
        except (ClientError, *_TRANSPORT_ERRORS) as exc:
            _raise_store_error(exc, "head", key)
        return int(answer["ContentLength"])

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        """ListObjectsV2, page by page (1,000 keys each), so a large bucket is never held in memory."""
        if prefix:
            check_key(prefix)
        paginator = self._s3.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.settings.bucket, Prefix=self._prefix + prefix).__aiter__()
        while True:
            try:  # only the S3 call is guarded: errors thrown in at `yield` are the consumer's own
                page = await pages.__anext__()
            except StopAsyncIteration:
                return
            except (ClientError, *_TRANSPORT_ERRORS) as exc:
                _raise_store_error(exc, "list", prefix or "/")
            for item in page.get("Contents", ()):
                modified = item["LastModified"]
                if isinstance(modified, datetime) and modified.tzinfo is None:
                    modified = modified.replace(tzinfo=UTC)
                yield BlobInfo(item["Key"][len(self._prefix) :], int(item["Size"]), modified)
