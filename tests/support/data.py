"""Test data from packages only (nothing downloads): pydicom's bundled files and pydicom-data's 68 files."""

from __future__ import annotations

from pathlib import Path

import data_store
import pydicom

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA = Path(data_store.__file__).parent / "data"


def sample(name: str) -> Path:
    """A named sample file from either package."""
    for folder in (PYDICOM_DATA, PYDICOM_FILES):
        path = folder / name
        if path.exists():
            return path
    raise FileNotFoundError(name)


def all_samples() -> list[Path]:
    files = sorted(PYDICOM_DATA.glob("*.dcm")) + sorted(PYDICOM_FILES.glob("*.dcm"))
    return files
