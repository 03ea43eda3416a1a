"""When the server last ingested an instance, for work that gives way to ingest (`server.platform.jobs.Deferral`)."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from server.platform import private

log = logging.getLogger(__name__)


class IngestActivity:
    """When the server last started or finished ingesting an instance, for work that gives way to ingest
    (`server.platform.jobs.Deferral`). With a `path`, the processes of one server share it through that file's
    modification time (written at most every `WRITE_SECONDS`), so the process that runs the job worker also
    sees the ingest of the others; without, it is this process's alone."""

    WRITE_SECONDS = 0.2

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._last = -math.inf  # time.time() of the last ingest here
        self._written = -math.inf

    def touch(self) -> None:
        now = time.time()
        self._last = now
        if self.path is not None and now - self._written >= self.WRITE_SECONDS:
            self._written = now
            try:
                try:
                    os.utime(self.path, (now, now))
                except FileNotFoundError:
                    self.path.touch(mode=private.FILE_MODE)
            except OSError as exc:  # the data folder's trouble shows elsewhere; this is only a hint
                log.debug("ingest activity not recorded: %s", exc)

    def last(self) -> float:
        """`time.time()` of the latest ingest this process knows of (its own or, through the file, another's)."""
        if self.path is None:
            return self._last
        try:
            return max(self._last, self.path.stat().st_mtime)
        except OSError:
            return self._last

    def busy_for(self, quiet_seconds: float) -> float:
        """Seconds until ingest has been quiet for `quiet_seconds` (0: quiet now)."""
        return max(0.0, self.last() + quiet_seconds - time.time())
