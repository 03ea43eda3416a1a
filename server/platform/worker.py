"""The job worker as a plugin: listed after every plugin whose services handle jobs, it collects their `JobSet`s
when the app starts, keeps their periodic jobs scheduled and runs the queue (`server.platform.jobs`) until the app
stops. A server process that is not the primary (`HOUNSFIELD_WORKER` off) registers no worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from server.platform import dbwatch, jobs
from server.platform.database import DatabasePlugin
from server.platform.plugin import JobSet, ServicePlugin

log = logging.getLogger(__name__)
STOP_SECONDS = 10.0
"""How long a stopping worker waits for the jobs in hand; one cut off is run again (handlers are idempotent)."""


class WorkerPlugin(ServicePlugin):
    def __init__(
        self,
        database: DatabasePlugin,
        sources: Sequence[ServicePlugin],
        *,
        enabled: bool = True,
        poll_seconds: float = 5.0,
        pause_while: Callable[[], bool] | None = None,
    ) -> None:
        self.database = database
        self.sources = sources
        self.enabled = enabled
        self.poll_seconds = poll_seconds
        self.pause_while = pause_while
        """While true, derived jobs wait (free space below the watermark)."""
        self.worker: jobs.Worker | None = None

    def job_set(self) -> JobSet:
        """The union of the sources' job sets (a kind handled twice is a wiring error)."""
        union = JobSet()
        deferrals = []
        for source in self.sources:
            each = source.jobs()
            twice = union.handlers.keys() & each.handlers.keys()
            if twice:
                raise RuntimeError(f"job kinds handled by two plugins: {', '.join(sorted(twice))}")
            union.handlers.update(each.handlers)
            union.periodic += each.periodic
            union.at_start += each.at_start
            union.derived |= each.derived
            union.concurrency.update(each.concurrency)
            if each.deferral is not None:
                deferrals.append(each.deferral)
        if len(deferrals) > 1:
            raise RuntimeError("more than one plugin defers jobs to ingest")
        union.deferral = deferrals[0] if deferrals else None
        return union

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        if not self.enabled:
            return
        job_set = self.job_set()
        pool = self.database.pool

        async def schedule() -> None:
            async with pool.acquire() as conn:
                for periodic in job_set.periodic:
                    await jobs.schedule(
                        conn, periodic.kind, {"periodic": True}, dedupe_key="periodic", delay_seconds=periodic.seconds
                    )
                for statement in job_set.at_start:
                    await statement(conn)

        await dbwatch.when_reachable(schedule)
        pause = jobs.Pause(job_set.derived, self.pause_while) if self.pause_while is not None else None
        worker = self.worker = jobs.Worker(
            pool,
            job_set.handlers,
            poll_seconds=self.poll_seconds,
            deferral=job_set.deferral,
            pause=pause,
            concurrency=job_set.concurrency,
        )
        task = asyncio.create_task(worker.run(), name="hounsfield-worker")

        async def stop() -> None:
            worker.stop()
            try:
                await asyncio.wait_for(task, timeout=STOP_SECONDS)
            except (asyncio.CancelledError, TimeoutError):  # a job cut off is run again (handlers are idempotent)
                pass
            except Exception:  # logged, never a failed shutdown: what follows must still close
                log.exception("the job worker ended with an error")

        stack.push_async_callback(stop)
