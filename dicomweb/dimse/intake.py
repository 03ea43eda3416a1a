"""The C-STORE intake: a received instance made durable before its C-STORE-RSP, so that the index store may run
just after the answer (`dicomweb.dimse.indexer`) and a crash at any point loses nothing that was acknowledged.

An intake entry is the spooled Part 10 file, fsynced and renamed into `<spool>/intake/` (the spool's file system,
so the rename is atomic), with what the store needs to replay it: the origin (calling and called AE titles,
address, subject) and the time received. Those travel in the file name (`<ns>.<id>.<origin>.dcm`, the origin as
base64url JSON), so one fsync of the file and one of the folder make the entry durable; an origin too long for a
file name is written first to a sidecar (`<ns>.<id>.json`, fsynced) and the file is named `<ns>.<id>.dcm`. A
sidecar without its file is an answer that was never sent, and is removed at replay.

Entries the store refused after the answer (a race with another process or STOW-RS) are moved to
`intake/refused/` for an operator; nothing removes them.

With several server processes (`HOUNSFIELD_PROCESSES`), each runs the DICOM AE and has an intake of its own (a
slot): the primary process (the `primary.lock` holder) uses `intake/` itself, the others `intake/<n>/` (n = 1, 2,
...), each holding its slot's lock (`intake/<n>/.lock`) for as long as it lives, so that no two processes write or
replay one folder. A process replays its slot's entries at start (the replacement of a process that died takes the
first free slot, usually its predecessor's); the primary also takes over, at its start, the entries of slots no
process holds (after a crash, or with fewer processes than before). The processes see each other's acknowledged
instances through the database (`Indexer.check`, migrations/0025_intake_reservations.sql).

`Pending` is the other half of the promise that nothing acknowledged is later refused: the identities (a study's
patient, a series' study, an instance's bytes) of the instances acknowledged but not indexed yet, checked with the
index before each answer (PS3.3 A.1.2: a study is of one patient)."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dicomweb.blobs.fs import fsync_dir
from dicomweb.ingest.origin import Channel, Origin
from dicomweb.ingest.outcome import PATIENT_CONFLICT_COMMENT
from dicomweb.ingest.reasons import CANNOT_UNDERSTAND, DATASET_MISMATCH, DUPLICATE_REJECTED
from dicomweb.ingest.spool import Spooled
from server.platform import private

SUFFIX = ".dcm"
SIDECAR = ".json"
REFUSED = "refused"
LOCK = ".lock"
_NAME_MAX = 240
"""Longest file name used (most file systems allow 255 bytes)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One acknowledged instance waiting for the index: its file, bytes and origin."""

    path: Path
    size: int
    sha256: str
    origin: Origin
    received_ns: int
    """`time.time_ns()` when it was made durable."""

    @property
    def name(self) -> str:
        return self.path.name

    def sidecar(self) -> Path:
        return _sidecar(self.path)


def _sidecar(path: Path) -> Path:
    stem = path.name.split(".")
    return path.with_name(f"{stem[0]}.{stem[1]}{SIDECAR}")


def _encode(origin: Origin) -> str:
    fields = {"c": origin.calling_ae, "d": origin.called_ae, "s": origin.subject, "a": origin.address}
    raw = json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode(text: str) -> Origin:
    fields = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    return Origin(
        Channel.DIMSE,
        subject=fields.get("s"),
        address=fields.get("a"),
        calling_ae=fields.get("c"),
        called_ae=fields.get("d"),
    )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def slot_folder(root: Path, slot: int) -> Path:
    """The intake folder of slot `slot` under the intake root (slot 0, the primary's, is the root itself)."""
    return root if slot == 0 else root / str(slot)


def claim_slot(root: Path) -> tuple[int, int]:
    """A slot above 0 that no other process holds, and the open descriptor holding its lock (the kernel releases
    it with the process)."""
    slot = 1
    while True:
        folder = slot_folder(root, slot)
        private.make_dirs(folder)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            slot += 1
            continue
        return slot, fd


def _slots(root: Path) -> list[Path]:
    """The folders of the slots above 0 that exist."""
    try:
        return [root / name for name in sorted(os.listdir(root), key=_number) if name.isdigit() and name != "0"]
    except FileNotFoundError:
        return []


def _number(name: str) -> int:
    return int(name) if name.isdigit() else -1


def adopt_orphans(root: Path) -> tuple[int, list[int]]:
    """Move the entries of the slots no process holds into the root (the primary's slot), before the primary's
    replay; returns how many entries were moved and the slots taken over. Blocking."""
    moved, taken = 0, []
    for folder in _slots(root):
        try:
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process holds it and replays it itself
            taken.append(int(folder.name))
            names = [n for n in os.listdir(folder) if n.endswith((SUFFIX, SIDECAR))]
            for name in sorted(names, key=lambda n: n.endswith(SUFFIX)):  # sidecars first: never a file without
                os.rename(folder / name, root / name)
            if names:
                fsync_dir(root)
                fsync_dir(folder)
                moved += sum(1 for name in names if name.endswith(SUFFIX))
        finally:
            os.close(fd)
    return moved, taken


def waiting(root: Path) -> int:
    """Entries of every slot (acknowledged, not indexed yet, by any process of this server). Blocking."""
    count = 0
    for folder in (root, *_slots(root)):
        try:
            count += sum(1 for name in os.listdir(folder) if name.endswith(SUFFIX))
        except FileNotFoundError:
            continue
    return count


class Intake:
    """The intake folder of one server process (its slot: only this process writes and replays it); the refused
    entries of every slot go to the root's `refused/`."""

    def __init__(self, folder: Path, root: Path | None = None) -> None:
        self.folder = folder
        self.root = root or folder
        self.refused_folder = self.root / REFUSED
        self._made = False

    def keep(self, spooled: Spooled, origin: Origin) -> Entry:
        """Make a spooled instance durable in the intake (blocking: the association's thread). Raises OSError
        when it could not be (nothing is acknowledged then; the spool file is left to the caller)."""
        if not self._made:
            private.make_dirs(self.refused_folder)
            self._made = True
        now = time.time_ns()
        stem = f"{now:020d}.{uuid.uuid4().hex[:12]}"
        encoded = _encode(origin)
        name = f"{stem}.{encoded}{SUFFIX}"
        path = self.folder / name
        if len(name) > _NAME_MAX:
            path = self.folder / f"{stem}{SUFFIX}"
            sidecar = _sidecar(path)
            with open(sidecar, "wb", opener=private.opener) as fh:
                fh.write(encoded.encode("ascii"))
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_file(spooled.path)
        os.rename(spooled.path, path)
        fsync_dir(self.folder)  # the rename (and the sidecar) survive a crash from here on
        return Entry(path, spooled.size, spooled.sha256, origin, now)

    def link(self, entry: Entry, spool: Path) -> Path:
        """A second name for the entry's file in the spool folder, for the store to consume (the entry stays until
        its store has succeeded)."""
        target = spool / f"{uuid.uuid4().hex}.part"
        try:
            os.link(entry.path, target)
        except FileNotFoundError:
            private.make_dirs(spool)
            os.link(entry.path, target)
        return target

    def done(self, entry: Entry) -> None:
        """The entry is indexed (or was already): remove it."""
        for path in (entry.path, entry.sidecar()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def refuse(self, entry: Entry) -> Path:
        """Move an entry the store refused to `refused/`, for an operator."""
        private.make_dirs(self.refused_folder)
        target = self.refused_folder / entry.path.name
        os.rename(entry.path, target)
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry.sidecar(), self.refused_folder / entry.sidecar().name)
        fsync_dir(self.refused_folder)
        return target

    def entries(self) -> Iterator[Entry]:
        """The entries left (after a crash: acknowledged, maybe not indexed), oldest first; sidecars without their
        file are removed. Blocking."""
        try:
            names = sorted(os.listdir(self.folder))
        except FileNotFoundError:
            return
        present = set(names)
        for name in names:
            path = self.folder / name
            parts = name.split(".")
            if name.endswith(SIDECAR):
                if f"{parts[0]}.{parts[1]}{SUFFIX}" not in present:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)  # written before a rename that never happened: nothing was acknowledged
                continue
            if not name.endswith(SUFFIX) or len(parts) not in (3, 4):
                continue
            try:
                encoded = parts[2] if len(parts) == 4 else _sidecar(path).read_text("ascii")
                origin = _decode(encoded)
                yield Entry(path, path.stat().st_size, "", origin, int(parts[0]))
            except (OSError, ValueError):
                continue

    def refused_count(self) -> int:
        try:
            return sum(1 for name in os.listdir(self.refused_folder) if name.endswith(SUFFIX))
        except FileNotFoundError:
            return 0


@dataclass(frozen=True, slots=True)
class Identity:
    """What the checks before an answer compare: an instance's study, series, patient and bytes."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    patient_id: str | None
    issuer: str | None
    sha256: str


@dataclass(frozen=True, slots=True)
class Conflict:
    """Why an instance is refused before the answer: the C-STORE status and comment, and for a study filed under
    another patient, that patient (for the audit record only)."""

    status: int
    comment: str
    study_patient: tuple[str | None, str | None] | None = None


def patient_conflict(patient: tuple[str | None, str | None]) -> Conflict:
    return Conflict(CANNOT_UNDERSTAND, PATIENT_CONFLICT_COMMENT, patient)


def series_conflict(series_uid: str) -> Conflict:
    return Conflict(DATASET_MISMATCH, f"SeriesInstanceUID {series_uid} already belongs to another study")


DUPLICATE = Conflict(
    DUPLICATE_REJECTED,
    "an instance with this SOPInstanceUID and different content is already stored "
    "(the server is configured not to overwrite)",
)


class Pending:
    """The identities of the instances acknowledged and not indexed yet, shared by the association threads and
    the indexer (a lock; each call is short). An instance is reserved before the index is asked about it, and
    released once its store ended, so an instance checked after another's release finds it in the index."""

    def __init__(self, overwrite: bool) -> None:
        self.overwrite = overwrite
        self._lock = threading.Lock()
        self._studies: dict[str, tuple[tuple[str | None, str | None], int]] = {}
        self._series: dict[str, tuple[str, int]] = {}
        self._sops: dict[str, tuple[str, int]] = {}

    def __len__(self) -> int:
        with self._lock:
            return sum(n for _, n in self._sops.values())

    def reserve(self, ident: Identity) -> Conflict | None:
        """Reserve `ident`, or say which pending instance it contradicts (nothing reserved then)."""
        patient = (ident.patient_id, ident.issuer)
        with self._lock:
            study = self._studies.get(ident.study_uid)
            if study is not None and study[0] != patient:
                return patient_conflict(study[0])
            series = self._series.get(ident.series_uid)
            if series is not None and series[0] != ident.study_uid:
                return series_conflict(ident.series_uid)
            sop = self._sops.get(ident.sop_instance_uid)
            if sop is not None and sop[0] != ident.sha256 and ident.sha256 and sop[0] and not self.overwrite:
                return DUPLICATE
            self._studies[ident.study_uid] = (patient, (study[1] if study else 0) + 1)
            self._series[ident.series_uid] = (ident.study_uid, (series[1] if series else 0) + 1)
            self._sops[ident.sop_instance_uid] = (ident.sha256, (sop[1] if sop else 0) + 1)
        return None

    def release(self, ident: Identity) -> None:
        with self._lock:
            for table, key in (
                (self._studies, ident.study_uid),
                (self._series, ident.series_uid),
                (self._sops, ident.sop_instance_uid),
            ):
                held = table.get(key)
                if held is None:
                    continue
                if held[1] <= 1:
                    del table[key]
                else:
                    table[key] = (held[0], held[1] - 1)  # type: ignore[assignment]
