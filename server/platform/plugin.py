"""Each package joins the app as a Litestar plugin (house style 6; litestar `channels/plugin.py` is the model):
its routes, the narrow services its handlers receive by dependency injection, and a lifespan that opens those
services and closes them. `server/app.py` only lists the plugins; a plugin opens after those listed before it
(whose services it may use) and closes before them. Jobs are declared by what a plugin opened (`JobSet`) and run
by the worker plugin, listed after every source of jobs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from litestar.di import Provide
from litestar.plugins import InitPlugin

from server.platform import jobs

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.config.app import AppConfig
    from litestar.datastructures import State

    from server.platform.db import Connection

T = TypeVar("T")


class NotOpen(RuntimeError):
    """A service was asked for outside its plugin's lifespan (before the app started or after it stopped)."""


def opened(value: T | None, name: str) -> T:
    """`value`, which its plugin's lifespan opened; `NotOpen` naming the service outside it."""
    if value is None:
        raise NotOpen(f"{name} is not open: the app's lifespan has not started it")
    return value


@dataclass(frozen=True)
class Periodic:
    """A job the worker schedules at start (deduplicated, so that the server's processes keep one queued) and
    that reschedules itself every `seconds`."""

    kind: str
    seconds: float


@dataclass
class JobSet:
    """The jobs a plugin's services handle: `handlers` by kind, `periodic` ones to keep scheduled, `at_start`
    statements run once when the worker starts (e.g. a backfill queue), `derived` kinds (work that writes new
    blobs from stored ones: paused below the free-space watermark), `deferred` kinds (given way to ingest) and the
    `concurrency` of kinds whose jobs may run several at once."""

    handlers: dict[str, jobs.Handler] = field(default_factory=dict)
    periodic: list[Periodic] = field(default_factory=list)
    at_start: list[Callable[[Connection], Awaitable[Any]]] = field(default_factory=list)
    derived: frozenset[str] = frozenset()
    deferral: jobs.Deferral | None = None
    concurrency: dict[str, int] = field(default_factory=dict)
    """Kinds whose jobs may run this many at once (the others one at a time)."""


class ServicePlugin(InitPlugin):
    """The base of a package's plugin: `route_handlers()`, `dependencies()` (name -> the function returning the
    opened service) and `open(stack)` (open the services, registering their closing on `stack`). Those that
    handle jobs override `jobs()`."""

    def route_handlers(self) -> Iterable[Any]:
        return ()

    def dependencies(self) -> Mapping[str, Callable[[], Any]]:
        return {}

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the services; what is pushed on `stack` runs when the app stops, in reverse order."""

    def jobs(self) -> JobSet:
        return JobSet()

    def publish(self, state: State) -> None:
        """Put the services that guards, resource hooks and ASGI layers need (which dependency injection does not
        reach) in the app's state, each package under its own key with a typed accessor beside it."""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.extend(self.route_handlers())
        for name, get in self.dependencies().items():
            app_config.dependencies[name] = Provide(get, sync_to_thread=False)
        app_config.lifespan.append(self.lifespan)
        return app_config

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Litestar | None = None) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await self.open(stack)
            if app is not None:
                self.publish(app.state)
            yield


@contextlib.asynccontextmanager
async def opened_together(plugins: Iterable[ServicePlugin]) -> AsyncIterator[None]:
    """The plugins' services open in order without an HTTP app (a command such as `hounsfield import`), closed in
    reverse order."""
    async with contextlib.AsyncExitStack() as stack:
        for plugin in plugins:
            await stack.enter_async_context(plugin.lifespan())
        yield
