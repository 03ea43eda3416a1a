"""The blob store interface (house style 10: a Protocol at the boundary).

Keys are relative paths made of UIDs, hex digests and `/`; values are immutable once written (a replaced
instance gets a new key), which is what makes strong ETags and crash-safe overwrite possible.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from dicomweb.errors import DicomWebError


class BlobStoreError(DicomWebError):
    """The store failed (I/O error, network, credentials)."""


class BlobNotFound(BlobStoreError):
    """The key does not exist (an index row whose bytes are gone is a consistency error)."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    key: str
    size: int
    modified: datetime


@runtime_checkable
class BlobStore(Protocol):
    local: bool
    """Writes stay on this machine (a rename within one file system). A remote store's write is an upload, worth
    a lookup first when the bytes may already be stored (`dicomweb.ingest.service.StoreService`)."""

    async def put_file(self, key: str, path: Path) -> None:
        """Store the local file `path` under `key`, durably: when this returns the bytes survive a crash.
        The file may be moved (not copied) by stores on the same file system; callers must not reuse it."""
        ...

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[BlobStoreError | None]:
        """`put_file` for each (key, path), durably when this returns: per item None when it is stored, or why it
        is not (the others are stored all the same). A filesystem store makes each folder durable once for all
        its items instead of once per item."""
        ...

    async def read_range(self, key: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`."""
        ...

    def stream(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = 1024 * 1024
    ) -> AsyncIterator[bytes]:
        """The bytes from `offset` (to the end, or `length` of them), in chunks."""
        ...

    async def size(self, key: str) -> int: ...

    async def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""
        ...

    def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        """Every blob under `prefix` (used by the orphan collector)."""
        ...

    async def close(self) -> None: ...


def check_key(key: str) -> str:
    """Keys are made by us from validated UIDs; refuse anything that could escape the store."""
    if not key or key.startswith("/") or ".." in key.split("/") or "\\" in key or "\x00" in key:
        raise BlobStoreError(f"invalid blob key {key[:100]!r}")
    return key
