"""The spool: where every ingest channel writes an instance's bytes before the store reads them, hashing while it
writes, under one size limit (`HOUNSFIELD_MAX_INSTANCE_BYTES`) and the free-space watermark
(`server.platform.diskspace`).

STOW-RS streams each part into a `Spool`; C-STORE and the inference runner write bytes they hold
(`Spooler.write`); `hounsfield import` copies a file (`Spooler.copy`). Each ends with a `Spooled` file for
`StoreService.store`, or an `InstanceRejected` saying why nothing was spooled: Out of Resources (A700) for a full
disk, free space below the watermark or an instance over the limit (PS3.4 B.2.3), Processing Failure (0110) for a
source file that cannot be read. Spool files end in `.part`; the orphan collector removes stale ones (`sweep`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicomweb.ingest.reasons import OUT_OF_RESOURCES, PROCESSING_FAILURE, InstanceRejected
from server.platform import private
from server.platform.diskspace import BelowWatermark, FreeSpace

SUFFIX = ".part"
_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Spooled:
    """An instance's bytes in a spool file, with their size and SHA-256 (hex). The store consumes the file."""

    path: Path
    size: int
    sha256: str


def out_of_resources(exc: OSError) -> str:
    """The Error Comment of an instance refused because a write failed or space is below the watermark."""
    if isinstance(exc, BelowWatermark):
        return str(exc.strerror)
    return f"out of resources: {exc.strerror or type(exc).__name__}; nothing was stored"


class Spool:
    """A part being received: written to a local file while its SHA-256 and size are computed.

    A write the file system refuses (ENOSPC, EDQUOT, EIO), or free space below the watermark when the part starts,
    does not end the request: the part's file is removed at once, the rest of the part is read and dropped, and
    `finish` says why (Out of Resources, A700). So does a part over the size limit."""

    def __init__(self, folder: Path, max_bytes: int, space: FreeSpace | None = None) -> None:
        self.path = folder / f"{uuid.uuid4().hex}{SUFFIX}"
        self._fh: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self.size = 0
        self.max_bytes = max_bytes
        self.too_large = False
        self.error: OSError | None = None
        try:
            if space is not None:
                space.require()
            private.make_dirs(folder)
            self._fh = open(self.path, "wb", opener=private.opener)
        except OSError as exc:
            self._fail(exc)

    def write(self, data: bytes) -> None:
        if self.too_large or self._fh is None:
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            self.too_large = True
            self.discard()
            return
        self._hash.update(data)
        try:
            self._fh.write(data)
        except OSError as exc:
            self._fail(exc)

    def finish(self) -> Spooled:
        """The spooled part; `InstanceRejected` (A700) when it could not be written whole or is over the limit."""
        if self._fh is not None and not self._fh.closed:
            try:
                self._fh.close()  # flushes: a full disk may only show here
            except OSError as exc:
                self._fail(exc)
        if self.error is not None:
            raise InstanceRejected(OUT_OF_RESOURCES, out_of_resources(self.error))
        if self.too_large:
            raise too_large(self.max_bytes)
        return Spooled(self.path, self.size, self._hash.hexdigest())

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self.discard()  # what was written is freed now, not when the request ends

    def discard(self) -> None:
        if self._fh is not None and not self._fh.closed:
            with contextlib.suppress(OSError):
                self._fh.close()
        self._fh = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def too_large(max_bytes: int) -> InstanceRejected:
    return InstanceRejected(OUT_OF_RESOURCES, f"instance larger than the limit of {max_bytes} bytes")


class Spooler:
    """The spool folder of one server, its size limit and its free-space watermark: every channel spools here."""

    def __init__(self, folder: Path, max_bytes: int, space: FreeSpace | None = None) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.space = space
        """The free-space watermark: below it nothing is spooled (and the store refuses what was, A700)."""

    def open(self) -> Spool:
        """A spool file to stream one part into (STOW-RS)."""
        return Spool(self.folder, self.max_bytes, self.space)

    def write(self, data: bytes) -> Spooled:
        """Spool bytes held in memory (a C-STORE data set, an AI result). Blocking: run it off the event loop."""
        if len(data) > self.max_bytes:
            raise too_large(self.max_bytes)
        with self._file() as (path, fh):
            fh.write(data)
        return Spooled(path, len(data), hashlib.sha256(data).hexdigest())

    def copy(self, src: Path) -> Spooled:
        """Spool a copy of a local file, hashing as it is copied (`hounsfield import`). Blocking."""
        try:
            fin = open(src, "rb")
        except OSError as exc:
            raise _unreadable(exc) from None
        with fin:
            if os.fstat(fin.fileno()).st_size > self.max_bytes:
                raise too_large(self.max_bytes)
            digest = hashlib.sha256()
            size = 0
            with self._file() as (path, fout):
                while True:
                    try:
                        chunk = fin.read(_CHUNK)
                    except OSError as exc:
                        raise _unreadable(exc) from None
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.max_bytes:  # it grew while being read
                        raise too_large(self.max_bytes)
                    digest.update(chunk)
                    fout.write(chunk)
        return Spooled(path, size, digest.hexdigest())

    @contextlib.contextmanager
    def _file(self) -> Iterator[tuple[Path, BinaryIO]]:
        """A new spool file, removed again when what is written to it fails; a failed write is Out of Resources."""
        path = self.folder / f"{uuid.uuid4().hex}{SUFFIX}"
        try:
            if self.space is not None:
                self.space.require()
            try:
                fh = open(path, "wb", opener=private.opener)
            except FileNotFoundError:  # the first spool (or the folder was removed): made once, not per instance
                private.make_dirs(self.folder)
                fh = open(path, "wb", opener=private.opener)
        except OSError as exc:
            raise InstanceRejected(OUT_OF_RESOURCES, out_of_resources(exc)) from None
        try:
            with fh:
                yield path, fh
        except BaseException as exc:
            with contextlib.suppress(OSError):
                path.unlink()  # a full disk: what was written is freed now
            if isinstance(exc, OSError):
                raise InstanceRejected(OUT_OF_RESOURCES, out_of_resources(exc)) from None
            raise


def _unreadable(exc: OSError) -> InstanceRejected:
    return InstanceRejected(PROCESSING_FAILURE, f"cannot read the file: {exc.strerror or type(exc).__name__}")


def sweep(folder: Path, grace_seconds: int) -> int:
    """Delete spool files older than the grace period: parts of uploads cut off by a crash. Blocking."""
    removed = 0
    cutoff = time.time() - grace_seconds
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file() and entry.name.endswith(SUFFIX) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
