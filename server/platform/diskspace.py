"""The free-space watermark: below it the server refuses new data and pauses derived work, and keeps serving.

A full disk breaks more than the write that hits it: the embedded PostgreSQL can no longer extend a table or
write WAL, and then every request fails (each one appends to the audit trail). So the server stops taking data
while some space is left (`HOUNSFIELD_MIN_FREE_BYTES`, `HOUNSFIELD_MIN_FREE_PERCENT`): ingest (STOW-RS, C-STORE,
import, AI results) is refused with DICOM's Out of Resources (A700, PS3.4 B.2.3) or HTTP 503 with Retry-After, and
derived work that writes blobs (renditions, AI runs) waits in the job queue, so that reads, the audit trail and
the database keep the space that is left. Each volume the server writes to is watched: the data folder, the spool,
the filesystem blob store and the embedded PostgreSQL's data folder.

`BelowWatermark` is an `OSError` with errno ENOSPC: code that already handles a full disk handles the watermark the
same way, and the other way round.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class VolumeSettings(Protocol):
    """What `FreeSpace.of_settings` reads of the server's settings (`server.settings.Settings` has it)."""

    @property
    def data_dir(self) -> Path: ...
    @property
    def spool_dir(self) -> Path: ...
    @property
    def blob_dir(self) -> Path: ...
    @property
    def s3(self) -> object | None: ...
    @property
    def database_url(self) -> str | None: ...
    @property
    def min_free_bytes(self) -> int: ...
    @property
    def min_free_percent(self) -> float: ...


RETRY_AFTER_SECONDS = 60
"""What a refused client is told to wait (Retry-After, RFC 9110 10.2.3): space is freed by an operator, not soon."""


def size_text(n: int) -> str:
    """`n` bytes for people: 120 MB, 1.0 GB (decimal units, as `df -H` prints)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"


@dataclass(frozen=True, slots=True)
class Reading:
    """One watched volume's free space now, and the watermark it must stay above."""

    name: str
    """What the server keeps there: `data folder`, `spool`, `blob store`, `database`."""
    path: Path
    free: int
    """Bytes an unprivileged writer may still use (statvfs f_bavail)."""
    total: int
    watermark: int
    device: int = 0
    """st_dev: volumes on one file system share it."""

    @property
    def low(self) -> bool:
        return self.free < self.watermark


def summary(readings: Sequence[Reading]) -> str:
    """`spool, blob store 4.2 MB free, watermark 8.4 MB; ...`: volumes that share a file system named together."""
    groups: dict[int, list[Reading]] = {}
    for reading in readings:
        groups.setdefault(reading.device, []).append(reading)
    parts = []
    for group in groups.values():
        first = group[0]
        names = ", ".join(r.name for r in group)
        parts.append(f"{names} {size_text(first.free)} free, watermark {size_text(first.watermark)}")
    return "; ".join(parts)


class BelowWatermark(OSError):
    """A write was refused because a volume has less free space than the watermark (errno ENOSPC)."""

    def __init__(self, readings: Sequence[Reading]) -> None:
        super().__init__(errno.ENOSPC, "out of resources: " + summary(readings))
        self.readings = tuple(readings)


def existing(path: Path) -> Path:
    """`path`, or its nearest existing parent (the spool folder is made on first use)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


class FreeSpace:
    """The watched volumes and their watermark: `max(min_bytes, min_percent of the volume's size)`.

    Reading is a statvfs per volume (about a microsecond), done on every check rather than cached, so that space
    freed by an operator is seen at once. A change between above and below is logged once each way."""

    def __init__(
        self,
        volumes: Sequence[tuple[str, Path]],
        min_bytes: int,
        min_percent: float = 0.0,
    ) -> None:
        self.volumes = tuple((name, Path(path)) for name, path in volumes)
        self.min_bytes = min_bytes
        self.min_percent = min_percent
        self._was_low = False

    @classmethod
    def of_settings(cls, settings: VolumeSettings) -> FreeSpace:
        """The volumes a server with `settings` writes to."""
        volumes: list[tuple[str, Path]] = [("data folder", settings.data_dir), ("spool", settings.spool_dir)]
        if settings.s3 is None:
            volumes.append(("blob store", settings.blob_dir))
        if settings.database_url is None:  # the embedded PostgreSQL (server/platform/dbroles.py)
            volumes.append(("database", settings.data_dir / "pg"))
        return cls(volumes, settings.min_free_bytes, settings.min_free_percent)

    @property
    def enabled(self) -> bool:
        return self.min_bytes > 0 or self.min_percent > 0

    def readings(self) -> list[Reading]:
        """Every volume's free space now (one entry per volume, even where two share a file system)."""
        out = []
        for name, path in self.volumes:
            where = existing(path)
            st = os.statvfs(where)
            total = st.f_blocks * st.f_frsize
            watermark = max(self.min_bytes, int(total * self.min_percent / 100))
            out.append(Reading(name, path, st.f_bavail * st.f_frsize, total, watermark, os.stat(where).st_dev))
        return out

    def low(self) -> list[Reading]:
        """The volumes below their watermark now (empty: all is well, or the watermark is off)."""
        if not self.enabled:
            return []
        try:
            found = [r for r in self.readings() if r.low]
        except OSError as exc:  # a volume that cannot even be looked at is no reason to refuse everything
            log.warning("free space could not be read: %s", exc.strerror or exc)
            return []
        self._note(found)
        return found

    def is_low(self) -> bool:
        return bool(self.low())

    def require(self) -> None:
        """Raise `BelowWatermark` when a volume is below its watermark (call before writing new data)."""
        found = self.low()
        if found:
            raise BelowWatermark(found)

    def describe(self) -> str | None:
        """For /readyz: None when every volume is above its watermark, else `low: <volumes> <free> free, ...`."""
        found = self.low()
        if not found:
            return None
        return f"low: {summary(found)} (ingest refused, derived work paused)"

    def _note(self, found: list[Reading]) -> None:
        now_low = bool(found)
        if now_low and not self._was_low:
            log.error(
                "free space below the watermark (%s): ingest refused and derived work paused until space is freed",
                summary(found),
            )
        elif self._was_low and not now_low:
            log.warning("free space back above the watermark: ingest and derived work resume")
        self._was_low = now_low
