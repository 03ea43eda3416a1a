"""OpenTelemetry: request spans named by route, no query string values (PHI) anywhere, database spans,
blob spans and the STOW-RS metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from server.platform import telemetry
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

SECRET = "SECRETPATIENT"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Collect the spans of this process's tracer provider (configured once per process)."""
    tel = telemetry.configure(Settings.from_env({}))
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    tel.tracer_provider.add_span_processor(processor)
    yield exporter
    exporter.shutdown()  # the processor stays registered but exports nothing more


def _wait_for(exporter: InMemorySpanExporter, predicate: Any, timeout: float = 5.0) -> list[ReadableSpan]:
    # The server span ends just after the last body chunk is sent, so the client can see the response first.
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in exporter.get_finished_spans() if predicate(s)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _all_text(span: ReadableSpan) -> str:
    values = [span.name, *(str(v) for v in (span.attributes or {}).values())]
    for event in span.events:
        values.extend(str(v) for v in (event.attributes or {}).values())
    return " ".join(values)


def test_request_span_has_method_and_route_and_no_query_values(spans: InMemorySpanExporter, server: Any) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/healthz", params={"PatientName": f"{SECRET}^JOHN", "token": SECRET}).status_code == 200
        # A route with a path parameter, whatever it answers while QIDO/WADO are being built.
        http.get("/dicom-web/studies/1.2.3/series", params={"PatientName": SECRET})

    health = _wait_for(spans, lambda s: s.kind == SpanKind.SERVER and s.name == "GET /healthz")
    assert health, [s.name for s in spans.get_finished_spans()]
    attrs = dict(health[0].attributes or {})
    assert attrs.get("http.route") == "/healthz"
    assert attrs.get("http.method", attrs.get("http.request.method")) == "GET"
    assert attrs.get("http.status_code", attrs.get("http.response.status_code")) == 200

    servers = _wait_for(spans, lambda s: s.kind == SpanKind.SERVER and "/dicom-web" in _all_text(s))
    assert servers
    for span in spans.get_finished_spans():
        text = _all_text(span)
        assert SECRET not in text, (span.name, span.attributes)
        assert "PatientName" not in text and "token=" not in text


def test_route_template_names_the_span(spans: InMemorySpanExporter, make_server: Any) -> None:
    from litestar import get
    from litestar.params import FromPath, FromQuery

    assert telemetry.route_template("/dicom-web/studies/{study:str}/series/{series:str}") == (
        "/dicom-web/studies/{study}/series/{series}"
    )

    @get("/probe/{item:str}", sync_to_thread=False)
    def probe(item: FromPath[str]) -> dict[str, str]:
        return {"item": item}

    # A small app with the same plugin: span names use the template, never the concrete value.
    from litestar import Litestar
    from litestar.testing import TestClient

    app = Litestar(route_handlers=[probe], plugins=[telemetry.litestar_plugin(Settings.from_env({}))])
    with TestClient(app) as client:
        assert client.get(f"/probe/{SECRET}", params={"q": SECRET}).json() == {"item": SECRET}
    found = _wait_for(spans, lambda s: s.kind == SpanKind.SERVER and s.name == "GET /probe/{item}")
    assert found
    assert found[0].attributes is not None and found[0].attributes.get("http.route") == "/probe/{item}"
    assert all(SECRET not in s.name for s in spans.get_finished_spans())
    # The query string still reached the application (only the instrumentation is blind to it).
    seen: dict[str, str] = {}

    @get("/echo", sync_to_thread=False)
    def echo(q: FromQuery[str]) -> dict[str, str]:
        seen["q"] = q
        return {"q": q}

    app = Litestar(route_handlers=[echo], plugins=[telemetry.litestar_plugin(Settings.from_env({}))])
    with TestClient(app) as client:
        assert client.get("/echo", params={"q": "abc"}).json() == {"q": "abc"}
    assert seen == {"q": "abc"}


def test_database_spans_record_statements_without_parameters(spans: InMemorySpanExporter, http: httpx.Client) -> None:
    assert http.get("/readyz").status_code == 200
    db = _wait_for(
        spans,
        lambda s: s.kind == SpanKind.CLIENT and (s.attributes or {}).get("db.system") in {"postgresql", "postgres"},
    )
    assert db, [s.name for s in spans.get_finished_spans()]
    assert all("db.statement.parameters" not in (s.attributes or {}) for s in db)


def test_blob_span(spans: InMemorySpanExporter) -> None:
    with telemetry.blob_span("put", "1.2/3.4/5.6/abc.dcm"):
        pass
    found = _wait_for(spans, lambda s: s.name == "blob.put")
    assert found and found[0].attributes is not None
    assert found[0].attributes["hounsfield.blob.key"] == "1.2/3.4/5.6/abc.dcm"
    assert found[0].kind == SpanKind.CLIENT


def test_metrics_counter_and_histogram() -> None:
    reader = InMemoryMetricReader()
    tel = telemetry.Telemetry.build("none", metric_readers=(reader,))
    tel.record_stored(3)
    tel.record_stored(2)
    tel.record_part_size(1000)
    tel.record_part_size(3000)
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, Any] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                found[metric.name] = metric.data.data_points[0]
    assert found["hounsfield.instances.stored"].value == 5
    hist = found["hounsfield.stow.part.size"]
    assert hist.count == 2 and hist.sum == 4000
    tel.meter_provider.shutdown()
    tel.tracer_provider.shutdown()


def test_module_functions_are_safe_to_call() -> None:
    telemetry.configure(Settings.from_env({}))
    telemetry.record_stored(1)
    telemetry.record_part_size(10)
    assert telemetry.current() is telemetry.configure(Settings.from_env({}))


def test_exporter_choices() -> None:
    for name in ("none", "console", "otlp"):
        tel = telemetry.Telemetry.build(name)
        tel.meter_provider.shutdown(timeout_millis=1000)
        tel.tracer_provider.shutdown()
    with pytest.raises(ValueError):
        telemetry.Telemetry.build("zipkin")


def test_spans_are_not_recorded_until_something_consumes_them() -> None:
    """With no exporter (the default) spans are dropped at the sampler: no cost per request and query."""
    tel = telemetry.Telemetry.build("none")
    with tel.tracer.start_as_current_span("unheard") as span:
        assert not span.is_recording()
    exporter = InMemorySpanExporter()
    tel.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tel.tracer.start_as_current_span("heard") as span:
        assert span.is_recording()
        with tel.tracer.start_as_current_span("child") as child:
            assert child.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["child", "heard"]
    built = telemetry.Telemetry.build("console")  # a configured exporter is listened to from the start
    with built.tracer.start_as_current_span("exported") as span:
        assert span.is_recording()
    built.tracer_provider.shutdown()
    built.meter_provider.shutdown()


def test_asyncpg_is_instrumented_only_once_spans_are_consumed() -> None:
    """In a fresh process (instrumentation is process-wide): not wrapped with no exporter, wrapped when a span
    processor is attached."""
    import subprocess
    import sys

    script = """
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from server.platform import telemetry
from server.settings import Settings
tel = telemetry.configure(Settings.from_env({}))
print(AsyncPGInstrumentor().is_instrumented_by_opentelemetry)
tel.tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
print(AsyncPGInstrumentor().is_instrumented_by_opentelemetry)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_requests_bypass_the_instrumentation_only_while_nothing_observes() -> None:
    """With the `none` exporter nothing consumes request spans or HTTP metrics, so requests skip the
    instrumentation (`PrivacyMiddleware`); a span processor attached later, or a metric reader, turns it on."""
    tel = telemetry.Telemetry.build("none")
    assert not tel.observed
    tel.tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert tel.observed
    metered = telemetry.Telemetry.build("none", metric_readers=(InMemoryMetricReader(),))
    assert metered.observed
    for made in (tel, metered):
        made.meter_provider.shutdown()
        made.tracer_provider.shutdown()


def test_inference_metrics_reach_the_configured_exporter() -> None:
    """`inference.monitoring` records on the process's meter provider once `configure` set it (the instruments are
    made at import, through OpenTelemetry's global proxy): with the console exporter, a separate process's runs
    come out as `hounsfield.inference.*` metrics with their attributes."""
    code = textwrap.dedent(
        """
        from server.platform import telemetry
        from server.settings import Settings
        tel = telemetry.configure(Settings.from_env({"HOUNSFIELD_OTEL_EXPORTER": "console"}))
        from inference import monitoring
        monitoring.record_run("lungs", "1.0.0", False, "succeeded", 12.5, {"lung_fraction": 0.25, "label": "x"})
        monitoring.record_run("lungs", "1.0.0", False, "succeeded", 7.5, {"lung_fraction": 0.75})
        monitoring.record_run("lungs", "2.0.0", True, "failed", None, {})
        tel.meter_provider.shutdown()
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    points: dict[str, list[dict[str, Any]]] = {}
    for doc in _json_documents(run.stdout):
        for rm in doc["resource_metrics"]:
            for sm in rm["scope_metrics"]:
                for metric in sm["metrics"]:
                    points.setdefault(metric["name"], []).extend(metric["data"]["data_points"])
    runs = {(p["attributes"]["version"], p["attributes"]["outcome"], p["attributes"]["shadow"]): p["value"]
            for p in points["hounsfield.inference.runs"]}  # fmt: skip
    assert runs == {("1.0.0", "succeeded", False): 2, ("2.0.0", "failed", True): 1}
    [latency] = points["hounsfield.inference.latency"]
    assert (latency["count"], latency["sum"]) == (2, 20.0)
    [output] = points["hounsfield.inference.output"]
    assert output["attributes"]["measurement"] == "lung_fraction" and output["sum"] == 1.0


def _json_documents(text: str) -> list[dict[str, Any]]:
    """The console exporter's output: JSON documents one after another."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while (at := _skip_space(text, at)) < len(text):
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at
