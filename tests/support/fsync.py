"""Which files and folders a test's code fsyncs, in order: `os.fsync` recorded (and still done)."""

from __future__ import annotations

import os

import pytest


def recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on (until the monkeypatch is undone), the path of each descriptor passed to `os.fsync`."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced
