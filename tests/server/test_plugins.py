"""The packages' plugins as `server/app.py` wires them, opened without an HTTP server (as `hounsfield import`
opens them): what follows a store and in which order, the jobs each handles, and services that exist only while
their plugin's lifespan runs."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from server.app import plugins
from server.platform.database import DatabasePlugin
from server.platform.plugin import JobSet, NotOpen, ServicePlugin, opened_together
from server.platform.worker import WorkerPlugin
from server.settings import Settings
from tests.conftest import app_dsn

EVERY_JOB = {
    "audit.checkpoint",
    "breakglass.alert",
    "blob.gc",
    "blob.delete",
    "dimse.route",
    "rendition",
    "fhir.sync",
    "fhir.reindex",
    "fhir.notify",
    "fhir.deliver",
    "inference.series_quiet",
    "inference.run",
}


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    base: dict[str, object] = dict(data_dir=tmp_path / "data", db_pool_min=1, db_pool_max=2, dimse_enabled=False)
    return Settings.from_env({}).with_overrides(**{**base, **overrides})


def _modules(listeners: tuple[object, ...]) -> list[str]:
    return [getattr(listener, "__module__", "?") for listener in listeners]


def test_what_follows_a_store_is_bound_in_order(tmp_path: Path) -> None:
    wired = plugins(_settings(tmp_path))
    assert _modules(wired.dicomweb.listeners) == [
        "fhir.sync",  # the ImagingStudy follows the index
        "dicomweb.dimse.routing",
        "inference.dispatch",
        "dicomweb.retrieve.renditions",
    ]
    off = plugins(_settings(tmp_path, inference_enabled=False))
    assert "inference.dispatch" not in _modules(off.dicomweb.listeners)
    assert _modules(off.fhir.write_hooks) == ["fhir.subscriptions"]
    assert _modules(wired.fhir.write_hooks) == ["fhir.subscriptions", "inference.monitoring"]


def test_every_job_kind_has_one_handler_once_the_plugins_opened(dsn: str, tmp_path: Path) -> None:
    wired = plugins(_settings(tmp_path, worker_enabled=False), dsn=app_dsn(dsn))

    async def main() -> None:
        async with opened_together(wired):
            job_set = wired.worker.job_set()
            assert set(job_set.handlers) == EVERY_JOB
            assert {p.kind for p in job_set.periodic} == {"audit.checkpoint", "blob.gc"}
            assert job_set.derived == {"rendition", "inference.run"}  # wait below the free-space watermark
            assert job_set.deferral is not None and job_set.deferral.kinds == {"rendition"}
            assert wired.worker.worker is None  # HOUNSFIELD_WORKER off: nothing runs the queue here
        with pytest.raises(NotOpen):
            wired.dicomweb.store  # noqa: B018 - closed with its plugin

    asyncio.run(main())


def test_a_service_exists_only_while_its_plugin_runs(dsn: str, tmp_path: Path) -> None:
    database = DatabasePlugin(_settings(tmp_path), dsn=app_dsn(dsn))
    with pytest.raises(NotOpen, match="database pool is not open"):
        database.pool  # noqa: B018

    async def main() -> None:
        async with database.lifespan():
            async with database.pool.acquire() as conn:
                assert await conn.fetchval("SELECT 1") == 1
        with pytest.raises(NotOpen):
            database.pool  # noqa: B018

    asyncio.run(main())


class _Handles(ServicePlugin):
    """A plugin that handles one job kind (what each package's plugin declares)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def jobs(self) -> JobSet:
        async def handle(_job: object) -> None:
            return None

        return JobSet(handlers={self.kind: handle})


def test_a_job_kind_two_plugins_handle_is_a_wiring_error(tmp_path: Path) -> None:
    database = DatabasePlugin(_settings(tmp_path))
    worker = WorkerPlugin(database, [_Handles("blob.gc"), _Handles("fhir.sync"), _Handles("blob.gc")])
    with pytest.raises(RuntimeError, match=r"handled by two plugins: blob\.gc"):
        worker.job_set()
    assert set(WorkerPlugin(database, [_Handles("a"), _Handles("b")]).job_set().handlers) == {"a", "b"}


def test_the_worker_stops_with_the_app(dsn: str, tmp_path: Path) -> None:
    """With the worker on, it runs while the plugins are open and is stopped (its task ended) when they close."""
    wired = plugins(_settings(tmp_path, worker_poll_seconds=0.2), dsn=app_dsn(dsn))

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(opened_together(wired))
            assert wired.worker.worker is not None
            running = [t for t in asyncio.all_tasks() if t.get_name() == "hounsfield-worker"]
            assert len(running) == 1
        await asyncio.sleep(0)
        assert running[0].done()

    asyncio.run(main())
