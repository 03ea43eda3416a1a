"""OpenTelemetry: traces and metrics, configured once per process from `Settings.otel_exporter`.

- `none` (the default): real SDK providers with no exporter; spans are not even recorded until a span processor is
  attached (a sampler drops them, and asyncpg is only instrumented from then on: per-query spans cost ~13% of
  ingest CPU, and wrapping each query even with spans dropped still showed in profiles), metrics still count;
- `console`: spans and metrics printed to stdout (for a quick look);
- `otlp`: OTLP/HTTP to `OTEL_EXPORTER_OTLP_ENDPOINT` (the standard OTEL_* variables apply).

What is instrumented: every HTTP request (Litestar's OpenTelemetry plugin around the ASGI app; one server span
per request, no per-chunk receive/send spans, so large STOW-RS uploads cost one span); every asyncpg query
(statement text only: our SQL is static and parameters are never recorded); blob store operations where callers
wrap them in `blob_span`; and two STOW-RS metrics (`record_stored`, `record_part_size`).

No PHI in telemetry: QIDO-RS and WADO-URI carry patient names and UIDs in the query string, so the query string
is hidden from the instrumentation (it never sees it; the application still does) and span names use the route
template (`GET /dicom-web/studies/{study}`), not the concrete path. Request and response headers (tokens) are
not captured.

OpenTelemetry's global providers can be set once per process; `configure` therefore builds the providers on
its first call and returns the same `Telemetry` afterwards (tests create many apps in one process).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from litestar.enums import ScopeType
from litestar.middleware.base import DefineMiddleware
from litestar.plugins.opentelemetry import (
    OpenTelemetryConfig,
    OpenTelemetryInstrumentationMiddleware,
)
from litestar.plugins.opentelemetry import OpenTelemetryPlugin as _LitestarPlugin
from litestar.types import ASGIApp, Receive, Scope, Send
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased, Sampler, SamplingResult

from server.platform.diskspace import FreeSpace
from server.platform.logs import route_template

log = logging.getLogger(__name__)


class TelemetrySettings(Protocol):
    """What telemetry reads of the server's settings (`server.settings.Settings` has it)."""

    @property
    def otel_exporter(self) -> str: ...


SERVICE_NAME = "hounsfield"
INSTRUMENTATION_NAME = "hounsfield"
_SAVED_QUERY = "hounsfield.query_string"


class _Provider(TracerProvider):
    """A tracer provider that knows whether anything consumes its spans (a span processor was attached), and
    runs `on_listened` callbacks then (asyncpg is instrumented only from that moment: wrapping every query costs
    event-loop time even when the spans are dropped)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listened = False
        self.on_listened: list[Callable[[TracerProvider], None]] = []

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.listened = True
        callbacks, self.on_listened = self.on_listened, []
        for callback in callbacks:
            callback(self)

    def when_listened(self, callback: Callable[[TracerProvider], None]) -> None:
        if self.listened:
            callback(self)
        else:
            self.on_listened.append(callback)


class _WhenListened(Sampler):
    """Record spans (parent-based, always on) only once the provider has a span processor: with no exporter,
    spans would be built, timed and dropped for nothing on every request and query."""

    def __init__(self) -> None:
        self.provider: _Provider | None = None
        self._on = ParentBased(ALWAYS_ON)

    def should_sample(self, parent_context: Any, trace_id: int, name: str, *args: Any, **kwargs: Any) -> SamplingResult:
        if self.provider is None or not self.provider.listened:
            return SamplingResult(Decision.DROP)
        return self._on.should_sample(parent_context, trace_id, name, *args, **kwargs)

    def get_description(self) -> str:
        return "HounsfieldWhenListened"


@dataclass(frozen=True, slots=True)
class Telemetry:
    """The process's providers and the instruments Hounsfield records itself."""

    exporter: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracer: trace.Tracer
    instances_stored: Counter
    stow_part_size: Histogram
    metered: bool = False
    """A metric reader consumes the meter provider's measurements (the SDK takes readers only when it is built)."""
    disk_sources: list[FreeSpace] = field(default_factory=list)
    """The free-space watermarks of the servers open in this process (`watch_free_space`), observed by the
    `hounsfield.disk.free` and `hounsfield.disk.low` gauges."""

    @property
    def observed(self) -> bool:
        """Something consumes what the HTTP instrumentation would make: a span processor (attached at any time)
        or a metric reader. When nothing does, requests bypass the instrumentation altogether."""
        provider = self.tracer_provider
        return self.metered or not isinstance(provider, _Provider) or provider.listened

    @classmethod
    def build(
        cls,
        exporter: str = "none",
        *,
        span_exporter: SpanExporter | None = None,
        metric_readers: tuple[MetricReader, ...] = (),
    ) -> Telemetry:
        """Providers for `exporter` (`none`, `console`, `otlp`); extra exporters/readers are for tests."""
        resource = Resource.create({"service.name": SERVICE_NAME})
        readers = list(metric_readers)
        exporters: list[SpanExporter] = [span_exporter] if span_exporter is not None else []
        if exporter == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        elif exporter != "none":
            raise ValueError(f"unknown OpenTelemetry exporter {exporter!r}")
        sampler = _WhenListened()
        tracer_provider = _Provider(resource=resource, sampler=sampler)
        sampler.provider = tracer_provider
        for span_out in exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(span_out))
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        meter = meter_provider.get_meter(INSTRUMENTATION_NAME)
        sources: list[FreeSpace] = []
        meter.create_observable_gauge(
            "hounsfield.disk.free",
            callbacks=[functools.partial(_disk_points, sources, low=False)],
            unit="By",
            description="Free space on each volume the server writes to (data folder, spool, blob store, database)",
        )
        meter.create_observable_gauge(
            "hounsfield.disk.low",
            callbacks=[functools.partial(_disk_points, sources, low=True)],
            unit="1",
            description="1 while the volume is below the free-space watermark (ingest refused, derived work paused)",
        )
        return cls(
            exporter=exporter,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            tracer=tracer_provider.get_tracer(INSTRUMENTATION_NAME),
            instances_stored=meter.create_counter(
                "hounsfield.instances.stored",
                unit="{instance}",
                description="SOP instances newly stored or replaced (STOW-RS and other ingest paths)",
            ),
            stow_part_size=meter.create_histogram(
                "hounsfield.stow.part.size",
                unit="By",
                description="Size of each STOW-RS multipart part",
            ),
            metered=bool(readers),
            disk_sources=sources,
        )

    def record_stored(self, n: int = 1) -> None:
        if n:
            self.instances_stored.add(n)

    def record_part_size(self, size: int) -> None:
        self.stow_part_size.record(size)

    def watch_free_space(self, space: FreeSpace) -> Callable[[], None]:
        """Observe `space` in the disk gauges; returns the function that stops observing it."""
        self.disk_sources.append(space)
        return functools.partial(_forget, self.disk_sources, space)

    @contextlib.contextmanager
    def blob_span(self, op: str, key: str) -> Iterator[trace.Span]:
        """A client span around one blob store operation. `key` is a blob key (UIDs and a hash, no PHI)."""
        with self.tracer.start_as_current_span(
            f"blob.{op}",
            kind=trace.SpanKind.CLIENT,
            attributes={"hounsfield.blob.operation": op, "hounsfield.blob.key": key},
        ) as span:
            yield span


_lock = threading.Lock()
_current: Telemetry | None = None


def configure(settings: TelemetrySettings) -> Telemetry:
    """Set up telemetry for this process (first call) and return it; later calls return the same object.

    The first call also installs the providers as OpenTelemetry's global ones and instruments asyncpg."""
    global _current
    with _lock:
        if _current is not None:
            if settings.otel_exporter != _current.exporter:
                log.warning(
                    "OpenTelemetry is already configured with exporter %r; %r ignored",
                    _current.exporter,
                    settings.otel_exporter,
                )
            return _current
        tel = Telemetry.build(settings.otel_exporter)
        trace.set_tracer_provider(tel.tracer_provider)
        metrics.set_meter_provider(tel.meter_provider)
        if isinstance(tel.tracer_provider, _Provider):
            tel.tracer_provider.when_listened(_instrument_asyncpg)
        _current = tel
        return tel


def current() -> Telemetry | None:
    return _current


def _instrument_asyncpg(provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    instrumentor = AsyncPGInstrumentor(capture_parameters=False)  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=provider)


def record_stored(n: int = 1) -> None:
    """Count instances newly stored (call once per stored instance or with a batch count)."""
    if _current is not None:
        _current.record_stored(n)


def _disk_points(sources: list[FreeSpace], _options: CallbackOptions, *, low: bool) -> Iterator[Observation]:
    for space in list(sources):
        try:
            readings = space.readings()
        except OSError:
            continue
        for reading in readings:
            value = int(reading.low) if low else reading.free
            yield Observation(value, {"hounsfield.disk.volume": reading.name})


def _forget(sources: list[FreeSpace], space: FreeSpace) -> None:
    with contextlib.suppress(ValueError):
        sources.remove(space)


def watch_free_space(space: FreeSpace) -> Callable[[], None]:
    """Report `space` in the `hounsfield.disk.*` gauges of this process's telemetry; returns the function that
    stops it (a no-op before `configure`, as in the import command)."""
    if _current is None:
        return lambda: None
    return _current.watch_free_space(space)


def record_part_size(size: int) -> None:
    """Record the size in bytes of one STOW-RS part."""
    if _current is not None:
        _current.record_part_size(size)


@contextlib.contextmanager
def blob_span(op: str, key: str) -> Iterator[trace.Span]:
    """`with blob_span("put", key): ...` around a blob store call; a no-op span before `configure`."""
    if _current is None:
        yield trace.INVALID_SPAN
        return
    with _current.blob_span(op, key) as span:
        yield span


# --- HTTP requests -------------------------------------------------------------------------------------------


def _span_details(scope: Scope) -> tuple[str, dict[str, Any]]:
    """The initial span name: the method only. The route template is known after routing (see `_Routed`)."""
    method = str(scope.get("method") or scope.get("type", "")).strip()
    return method or "HTTP", {}


class _Routed:
    """Inside the OpenTelemetry middleware: gives the application its query string back and, when the response
    starts, names the server span after the matched route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw: MutableMapping[str, Any] = scope  # type: ignore[assignment]
        if _SAVED_QUERY in raw:
            raw["query_string"] = raw.pop(_SAVED_QUERY)
        span = trace.get_current_span()
        if not span.is_recording() or scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return

        async def named_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                template = raw.get("path_template")
                if template:
                    route = route_template(str(template))
                    span.update_name(f"{scope.get('method', '')} {route}".strip())
                    span.set_attribute("http.route", route)
            await send(message)

        await self.app(scope, receive, named_send)


class PrivacyMiddleware(OpenTelemetryInstrumentationMiddleware):
    """Litestar's OpenTelemetry middleware, with the query string hidden from the instrumentation. With nothing
    to consume spans or metrics (the `none` exporter and no span processor attached), a request goes straight
    to the application: the instrumentation would build attributes, a dropped span and metric points for
    nothing, a measurable share of a QIDO-RS request's CPU."""

    def __init__(self, app: ASGIApp, config: OpenTelemetryConfig) -> None:
        super().__init__(app=_Routed(app), config=config)
        self.plain = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tel = _current
        if tel is not None and not tel.observed:
            await self.plain(scope, receive, send)
            return
        raw: MutableMapping[str, Any] = scope  # type: ignore[assignment]
        raw[_SAVED_QUERY] = raw.get("query_string", b"")
        raw["query_string"] = b""
        await self.open_telemetry_middleware(scope, receive, send)  # type: ignore[arg-type]


class OpenTelemetryPlugin(_LitestarPlugin):
    """Litestar's plugin, applying our middleware to the whole app (404s included).

    The class name matters: Litestar finds this plugin by the name `OpenTelemetryPlugin`."""

    @property
    def middleware(self) -> DefineMiddleware:
        return self.config.middleware


def litestar_plugin(settings: TelemetrySettings) -> _LitestarPlugin:
    """The plugin `create_app` registers: request spans and HTTP server metrics on this process's providers."""
    tel = configure(settings)
    config = OpenTelemetryConfig(
        tracer_provider=tel.tracer_provider,
        meter_provider=tel.meter_provider,
        scope_span_details_extractor=_span_details,
        exclude_spans=["receive", "send"],
        scopes={ScopeType.HTTP},
        middleware_class=PrivacyMiddleware,
    )
    return OpenTelemetryPlugin(config)
