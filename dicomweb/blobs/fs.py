"""Filesystem blob store: temp file, fsync, rename, fsync the folder (so an acknowledged store survives a
power cut). Blocking calls run in worker threads."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread

from dicomweb.blobs.base import BlobInfo, BlobNotFound, BlobStoreError, check_key
from server.platform import private


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """`mkdir -p` that makes each new folder durable: a folder created for a blob (a new study or series) is an
    entry in its parent, which is fsynced like the blob's own folder is after the rename, so a power cut cannot
    lose the path to an acknowledged blob."""
    private.make_dirs(path, lambda folder: fsync_dir(folder.parent))  # also one a concurrent store made


class FileSystemBlobStore:
    local = True

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        private.make_dirs(self.root)
        private.tighten(self.root)
        self._tmp = self.root / ".tmp"
        private.make_dirs(self._tmp)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _put(self, key: str, src: Path) -> None:
        folder = self._place(key, src)
        try:
            fsync_dir(folder)
        except OSError as exc:
            raise BlobStoreError(f"cannot store blob: {exc.strerror}") from exc

    def _put_many(self, items: Sequence[tuple[str, Path]]) -> list[BlobStoreError | None]:
        """Each file fsynced and renamed into place, then each folder they went to fsynced once."""
        results: list[BlobStoreError | None] = []
        folders: dict[Path, list[int]] = {}
        for n, (key, src) in enumerate(items):
            try:
                folders.setdefault(self._place(key, src), []).append(n)
                results.append(None)
            except BlobStoreError as exc:
                results.append(exc)
        for folder, members in folders.items():
            try:
                fsync_dir(folder)
            except OSError as exc:
                for n in members:
                    results[n] = BlobStoreError(f"cannot store blob: {exc.strerror}")
        return results

    def _place(self, key: str, src: Path) -> Path:
        """The file's bytes made durable and the file renamed to the blob's path (copied across file systems); the
        folder it is in, whose fsync makes the new name durable."""
        dest = self._path(key)
        try:
            _make_dirs(dest.parent)
            same_fs = os.stat(src).st_dev == os.stat(dest.parent).st_dev
            if same_fs:
                with open(src, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(src, dest)
            else:
                tmp = self._tmp / f"{os.getpid()}-{abs(hash(key))}.part"
                try:
                    with open(src, "rb") as fin, open(tmp, "wb", opener=private.opener) as fout:
                        shutil.copyfileobj(fin, fout, 1024 * 1024)
                        fout.flush()
                        os.fsync(fout.fileno())
                    os.replace(tmp, dest)
                except OSError:
                    tmp.unlink(missing_ok=True)  # a full disk: the partial copy is freed now
                    raise
                os.unlink(src)
        except OSError as exc:
            raise BlobStoreError(f"cannot store blob: {exc.strerror}") from exc
        return dest.parent

    async def put_file(self, key: str, path: Path) -> None:
        await anyio.to_thread.run_sync(self._put, key, path)

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[BlobStoreError | None]:
        return await anyio.to_thread.run_sync(self._put_many, list(items))

    def _read(self, key: str, offset: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} is missing") from None
        except OSError as exc:
            raise BlobStoreError(f"cannot read blob: {exc.strerror}") from exc
        if len(data) != length:
            raise BlobStoreError(f"blob {key} is shorter than the index says")
        return data

    async def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 256 * 1024:
            return self._read(key, offset, length)  # page-cache reads this small beat a thread hop
        return await anyio.to_thread.run_sync(self._read, key, offset, length)

    async def stream(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = 1024 * 1024
    ) -> AsyncIterator[bytes]:
        """Chunks of `chunk_size` (the last one shorter), one worker-thread hop each: the file is opened and its
        first chunk read in the same hop, so a blob up to `chunk_size` (an instance of a CT series) costs one hop,
        not one for each of open, seek, read, the read that finds the end, and close."""
        want = chunk_size if length is None else min(chunk_size, length)
        if want <= 0:
            return
        try:
            fh, data = await anyio.to_thread.run_sync(_open_at, self._path(key), offset, want)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} is missing") from None
        try:
            remaining = length
            while True:
                if remaining is not None:
                    remaining -= len(data)
                if len(data) < want:  # a short read of a regular file: its end
                    if remaining:
                        raise BlobStoreError(f"blob {key} is shorter than the index says")
                    if data:
                        yield data
                    return
                yield data
                if remaining == 0:
                    return
                want = chunk_size if remaining is None else min(chunk_size, remaining)
                data = await anyio.to_thread.run_sync(fh.read, want)
        finally:
            fh.close()

    async def size(self, key: str) -> int:
        try:
            return (await anyio.Path(self._path(key)).stat()).st_size
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} is missing") from None

    async def delete(self, key: str) -> None:
        def _delete() -> None:
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass

        await anyio.to_thread.run_sync(_delete)

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        def _scan() -> list[BlobInfo]:
            out = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    full = Path(dirpath) / name
                    key = full.relative_to(self.root).as_posix()
                    if not key.startswith(prefix):
                        continue
                    st = full.stat()
                    out.append(BlobInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
            return out

        for info in await anyio.to_thread.run_sync(_scan):
            yield info

    async def close(self) -> None:
        return None


def _open_at(path: Path, offset: int, size: int) -> tuple[BinaryIO, bytes]:
    """The file opened at `offset`, and its first `size` bytes (fewer at its end)."""
    fh = open(path, "rb")
    try:
        fh.seek(offset)
        return fh, fh.read(size)
    except BaseException:
        fh.close()
        raise
