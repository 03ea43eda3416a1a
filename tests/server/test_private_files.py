"""Everything the server writes under its data folder is its user's alone (the folder holds PHI): folders 0700,
files 0600, like the signing key, whatever the umask of the process. Real server and real writers: an
instance stored by STOW-RS (spooled, compressed for storage, filed in the blob store) and its rendition made
by the job worker; the token signing key; the ingest activity mark."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import httpx

from tests.dicomweb.test_ranges import phantom, store
from tests.dicomweb.test_renditions import rows_of, wait_for


def modes(folder: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder)) + ("/" if path.is_dir() else "")] = stat.S_IMODE(path.lstat().st_mode)
    return found


def test_data_folder_files_are_0600_and_folders_0700(make_server: Any, tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: the modes must not depend on the process's
    try:
        server = make_server(store_compression="j2k")
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
            ds = phantom(64, 64, frames=2)
            store(http, ds)
            wait_for(lambda: rows_of(server.dsn, ds.SOPInstanceUID))  # the HTJ2K rendition, by the job worker
    finally:
        os.umask(old)
    data = server.settings.data_dir
    found = modes(data)
    assert any(name.endswith(".dcm") for name in found), found  # the instance's blob
    assert any(name.endswith(".frames") for name in found), found  # its rendition
    assert "keys/signing.pem" in found and "ingest.activity" in found, found
    folder = {name: name == "." or name.endswith("/") for name in found}
    wrong = {name: oct(mode) for name, mode in found.items() if mode != (0o700 if folder[name] else 0o600)}
    assert wrong == {}, wrong


def test_an_open_blob_folder_is_closed_at_start(make_server: Any, tmp_path: Path) -> None:
    """A blob folder left open to others (an existing install, or made by hand) is made 0700 when the server
    starts: what is already in it is then out of other accounts' reach too."""
    blobs = tmp_path / "existing" / "blobs"
    blobs.mkdir(parents=True)
    os.chmod(blobs, 0o755)
    server = make_server(data_dir=tmp_path / "existing")
    assert server.settings.blob_dir == blobs
    assert stat.S_IMODE(blobs.stat().st_mode) == 0o700
