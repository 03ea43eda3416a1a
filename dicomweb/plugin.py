"""DICOMweb and DICOM networking as a plugin: the routes under /dicom-web, WADO-URI and the DIMSE routing status;
the blob store, the ingest service, retrieval and rendering; the DICOM Application Entity when it is on; the
jobs that follow a store (DIMSE routing, renditions) and keep the store clean (orphan blobs, deletions).

Dependencies: `blobs` (BlobStore), `store` (StoreService), `retrieve` (RetrieveService), `render`
(RenderService), `space` (FreeSpace: the free-space watermark), `intake` (the C-STORE Indexer, None without the
DICOM AE)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from litestar import Router

from authz.plugin import AuthzPlugin
from dicomweb.blobs import BlobStore
from dicomweb.blobs.fs import FileSystemBlobStore
from dicomweb.dimse import routes as dimse_routes
from dicomweb.dimse import routing
from dicomweb.dimse.indexer import Indexer, open_indexer
from dicomweb.dimse.node import Node
from dicomweb.dimse.service import open_dimse
from dicomweb.ingest.activity import IngestActivity
from dicomweb.ingest.events import Listener
from dicomweb.ingest.gc import blob_delete_handler, gc_handler
from dicomweb.ingest.service import StoreService
from dicomweb.ingest.spool import Spooler
from dicomweb.retrieve import renditions
from dicomweb.retrieve.rendered import RenderService
from dicomweb.retrieve.renditions import Renditions
from dicomweb.retrieve.service import RetrieveService
from dicomweb.routes import qido, rendered, stow, wado, wadouri
from dicomweb.routes.common import DICOMWEB_ROOT
from dicomweb.settings import DicomwebSettings
from server.platform import telemetry
from server.platform.database import DatabasePlugin
from server.platform.diskspace import FreeSpace
from server.platform.jobs import Deferral
from server.platform.plugin import JobSet, Periodic, ServicePlugin, opened

GC_JOB = "blob.gc"
DELETE_JOB = "blob.delete"


async def open_blob_store(settings: DicomwebSettings) -> BlobStore:
    """S3 when the storage URL is `s3://`, else the filesystem store under `settings.blob_dir`."""
    if settings.s3 is not None:
        from dicomweb.blobs.s3 import S3BlobStore  # aiobotocore only when S3 is configured

        s3 = S3BlobStore(settings.s3)
        await s3.open()
        return s3
    return FileSystemBlobStore(settings.blob_dir)


@dataclass(frozen=True)
class Opened:
    """What the request services are built from once the plugin opened."""

    settings: DicomwebSettings
    pool: asyncpg.Pool
    blobs: BlobStore
    space: FreeSpace


DICOMWEB_ROUTES = (stow.ROUTES, qido.ROUTES, wado.ROUTES, rendered.ROUTES)
"""The route modules under /dicom-web (rendered: PS3.18 10.4). A new DICOMweb service is a route module here and
its service in `SERVICES`."""

SERVICES: dict[str, Callable[[Opened], Any]] = {
    "retrieve": lambda o: RetrieveService(o.pool, o.blobs, Renditions(o.pool, o.blobs, o.settings.spool_dir, o.space)),
    "render": lambda o: RenderService(o.pool, o.blobs),
}
"""The services route handlers receive, by dependency name (built once when the plugin opens)."""


class DicomwebPlugin(ServicePlugin):
    def __init__(
        self,
        settings: DicomwebSettings,
        database: DatabasePlugin,
        authz: AuthzPlugin,
        *,
        listeners: Sequence[Listener] = (),
        blobs: BlobStore | None = None,
    ) -> None:
        self.settings = settings
        self.database = database
        self.authz = authz
        self.listeners = tuple(listeners)
        """What follows each store, in order, inside its index transaction (FHIR sync, routing, dispatch...)."""
        self.given_blobs = blobs
        """A blob store to use as is (tests); None: opened from the settings."""
        self._blobs: BlobStore | None = None
        self._store: StoreService | None = None
        self._indexer: Indexer | None = None
        self._services: dict[str, Any] = {}
        self._jobs = JobSet()

    @property
    def blobs(self) -> BlobStore:
        return opened(self._blobs, "the blob store")

    @property
    def store(self) -> StoreService:
        return opened(self._store, "the ingest service")

    @property
    def space(self) -> FreeSpace:
        space = self.store.space
        assert space is not None  # the plugin always gives its store the watermark
        return space

    def route_handlers(self) -> Iterable[Any]:
        routes = [handler for module in DICOMWEB_ROUTES for handler in module]
        return [
            Router(path=DICOMWEB_ROOT, route_handlers=routes, tags=["DICOMweb"]),
            *wadouri.ROUTES,
            *dimse_routes.ROUTES,
        ]

    def dependencies(self) -> Mapping[str, Callable[[], Any]]:
        provided: dict[str, Callable[[], Any]] = {
            "blobs": lambda: self.blobs,
            "store": lambda: self.store,
            "space": lambda: self.space,
            "intake": lambda: self._indexer,
        }
        for name in SERVICES:
            provided[name] = self._provider(name)
        return provided

    def _provider(self, name: str) -> Callable[[], Any]:
        def provide() -> Any:
            return opened(self._services.get(name), f"the {name} service")

        return provide

    def jobs(self) -> JobSet:
        return self._jobs

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        settings, pool = self.settings, self.database.pool
        blobs = self.given_blobs
        if blobs is None:
            blobs = await open_blob_store(settings)
            stack.push_async_callback(blobs.close)
        self._blobs = blobs
        space = FreeSpace.of_settings(settings)  # HOUNSFIELD_MIN_FREE_BYTES / _PERCENT (server/platform/diskspace.py)
        stack.callback(telemetry.watch_free_space(space))  # hounsfield.disk.* gauges while the server runs
        store = self._store = StoreService(
            pool,
            blobs,
            spool=Spooler(settings.spool_dir, settings.max_instance_bytes, space),  # refused below the watermark
            overwrite=settings.overwrite,
            bulk_threshold=settings.bulkdata_threshold,
            listeners=self.listeners,
            compression=settings.store_compression,  # HOUNSFIELD_STORE_COMPRESSION (dicomweb/pixels/compress.py)
            activity=IngestActivity(settings.data_dir / "ingest.activity"),  # shared by the server's processes
        )
        built = Opened(settings, pool, blobs, space)
        self._services = {name: build(built) for name, build in SERVICES.items()}
        stack.callback(self._forget)
        audit = self.authz.audit
        deferral = self._deferral(store)
        self._jobs = JobSet(
            handlers={
                GC_JOB: gc_handler(
                    pool, blobs, settings.gc_grace_seconds, settings.gc_interval_seconds, settings.spool_dir
                ),
                DELETE_JOB: blob_delete_handler(pool, blobs),
                routing.ROUTE_JOB: routing.route_handler(
                    pool, blobs, audit, settings.dimse, settings.dimse_ae_title, float(settings.dimse_timeout_seconds)
                ),
                renditions.RENDITION_JOB: renditions.job_handler(
                    pool,
                    blobs,
                    settings.renditions,
                    settings.spool_dir,
                    space,
                    busy=deferral.busy if deferral else None,
                ),
            },
            periodic=[Periodic(GC_JOB, settings.gc_interval_seconds)],
            derived=frozenset({renditions.RENDITION_JOB}),  # writes new blobs: waits below the watermark
            deferral=deferral,
        )
        if settings.dimse_enabled:
            indexer = self._indexer = await open_indexer(stack, settings, store, audit)  # replays what was left
            early = indexer if settings.dimse_early_ack else None
            node = Node(asyncio.get_running_loop(), settings, pool, store, blobs, audit, self.authz.policy, early)
            dimse = await open_dimse(node)  # None without configured peers
            if dimse is not None:
                stack.push_async_callback(dimse.stop)  # before the audit trail and pool close

    def _deferral(self, store: StoreService) -> Deferral | None:
        """Rendition jobs give way to the ingest of this server's processes (`HOUNSFIELD_RENDITIONS_IDLE_MS`)."""
        settings = self.settings
        if settings.renditions_idle_seconds <= 0:
            return None
        return Deferral(
            frozenset({renditions.RENDITION_JOB}),
            functools.partial(store.activity.busy_for, settings.renditions_idle_seconds),
            settings.renditions_max_wait_seconds,
        )

    def _forget(self) -> None:
        self._store, self._blobs, self._services, self._indexer = None, None, {}, None


def ingest_listeners(settings: DicomwebSettings) -> list[Listener]:
    """DICOMweb's own listeners to a store: DIMSE auto-routing rules and renditions encoded ahead of requests."""
    return [routing.routing_hook(settings.dimse), renditions.ingest_hook(settings.renditions)]
