"""OpenTelemetry traces through a real uvicorn and a real OTLP/HTTP receiver: one server span
per request with perfmw's measurements, MongoDB child spans, events, exemplars, propagation."""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import socket
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from examples.fastapi_app import app as example
from fastapi import FastAPI, HTTPException
from motor.motor_asyncio import AsyncIOMotorClient
from opentelemetry import propagate
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import perfmw
from otlp_receiver import OtlpReceiver, ReceivedSpan
from perfmw.exporters.otlp import LoopFriendlySpanProcessor, OtlpHttpSender
from perfmw.exporters.tracing import _event_attributes
from perfmw.findings import Finding
from support import serve, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def memory_provider(
    sampler: Any = None, limits: SpanLimits | None = None
) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler, span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def line_of(function: Any, text: str) -> int:
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


def exemplar_trace_ids(exposition: str, name: str) -> set[str]:
    found = set()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.exemplar is not None:
                found.add(sample.exemplar.labels["trace_id"])
    return found


def openmetrics(client: httpx.Client) -> str:
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    return response.text


def servers(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [span for span in spans if span.kind == "SERVER"]


def test_n_plus_one_request_is_one_trace_in_the_otlp_receiver(
    receiver: OtlpReceiver, mongo_uri: str, registry: CollectorRegistry
) -> None:
    provider = perfmw.configure_tracing("registry", set_global=False)
    app = example.create_app(mongo_uri, registry=registry, tracer_provider=provider)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        response = client.get("/servers-with-agents")
        assert response.status_code == 200
        assert provider.force_flush()
        exposition = openmetrics(client)
    provider.shutdown()

    (span,) = servers(receiver.spans)
    assert span.name == "GET /servers-with-agents"
    assert span.resource["service.name"] == "registry"
    attributes = span.attributes
    assert attributes["http.request.method"] == "GET"
    assert attributes["http.route"] == "/servers-with-agents"
    assert attributes["http.response.status_code"] == 200
    assert attributes["url.path"] == "/servers-with-agents"
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["http.response.body.size"] == len(response.content)
    assert attributes["perfmw.db.queries"] == 21  # one find for the servers, 20 find_one
    assert attributes["perfmw.db.duration_ms"] > 0
    assert attributes["perfmw.cache.hits"] == 0
    assert attributes["perfmw.cache.misses"] == 0
    # No stall on a quiet machine. On a busy one the test process's own full collection can
    # stall this request: then the attribute says what its stall events say.
    stalls = [attrs["duration_ms"] for name, attrs in span.events if name == "perfmw.loop_stall"]
    assert attributes["perfmw.loop.stall_ms"] == pytest.approx(sum(stalls))
    assert span.status_code == 0

    (n_plus_one,) = [attrs for name, attrs in span.events if name == "perfmw.n_plus_one"]
    assert n_plus_one["collection"] == "agents"
    assert n_plus_one["operation"] == "find"
    assert n_plus_one["count"] == 20
    assert n_plus_one["code.filepath"] == "examples/fastapi_app/app.py"
    assert n_plus_one["code.lineno"] == line_of(
        example.create_app, 'server["agents"] = await agents.to_list()'
    )

    children = [s for s in receiver.spans if s.parent_span_id == span.span_id]
    assert len(children) == 21 == len(receiver.spans) - 1
    assert {s.kind for s in children} == {"CLIENT"}
    assert {s.trace_id for s in receiver.spans} == {span.trace_id}
    statements = sorted(s.attributes["db.query.text"] for s in children)
    assert statements == sorted(
        ["find registry.agents {server_id: ?} projection=[_id]"] * 20
        + ["find registry.servers {} sort={_id: 1} projection=[name]"]
    )

    assert exemplar_trace_ids(exposition, "http_server_request_duration_seconds_bucket") == {
        span.trace_id
    }
    assert exemplar_trace_ids(exposition, "db_client_operation_duration_seconds_bucket") == {
        span.trace_id
    }


def test_client_traceparent_is_continued(
    receiver: OtlpReceiver, mongo_uri: str, registry: CollectorRegistry
) -> None:
    provider = perfmw.configure_tracing(set_global=False)
    app = example.create_app(mongo_uri, registry=registry, tracer_provider=provider)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        response = client.get(
            "/servers/3/uncached",
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=x"},
        )
        assert response.status_code == 200
        assert provider.force_flush()
    provider.shutdown()

    (span,) = servers(receiver.spans)
    assert span.trace_id == TRACE_ID
    assert span.parent_span_id == PARENT_ID
    assert span.name == "GET /servers/{server_id}/uncached"
    (child,) = [s for s in receiver.spans if s.kind == "CLIENT"]
    assert (child.trace_id, child.parent_span_id) == (TRACE_ID, span.span_id)
    assert child.attributes["db.query.text"] == "find registry.servers {_id: ?}"


class CountingIds(RandomIdGenerator):
    """Span ids 1, 2, 3... and trace ids a 1.0 ratio samples: perfmw's own server spans use
    the provider's generator when it is not the SDK's default."""

    def __init__(self) -> None:
        self.span_ids = 0

    def generate_span_id(self) -> int:
        self.span_ids += 1
        return self.span_ids

    def generate_trace_id(self) -> int:
        return 0x77 << 64


@pytest.mark.parametrize("context_is_tuple", [True, False], ids=["tuple", "constructor"])
def test_perfmws_server_spans_take_the_providers_ids_and_the_callers_tracestate(
    receiver: OtlpReceiver,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    context_is_tuple: bool,
) -> None:
    """Built as a tuple or by SpanContext's constructor (an API release with another layout),
    a span's context says the same."""
    from perfmw.exporters import _lean_span

    monkeypatch.setattr(_lean_span, "CONTEXT_IS_TUPLE", context_is_tuple)
    provider = perfmw.configure_tracing(set_global=False)
    provider.id_generator = CountingIds()
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
    perf = perfmw.instrument(app, registry=registry, tracer_provider=provider)
    assert perf.tracing is not None and perf.tracing._lean is not None  # perfmw's own spans
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/").status_code == 200
        caller = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=x"}
        assert client.get("/", headers=caller).status_code == 200
        assert provider.force_flush()
    provider.shutdown()

    root, continued = servers(receiver.spans)
    assert (root.trace_id, root.span_id, root.parent_span_id) == (
        f"{0x77 << 64:032x}",
        f"{1:016x}",
        "",
    )
    assert root.trace_state == ""
    assert (continued.trace_id, continued.span_id) == (TRACE_ID, f"{2:016x}")
    assert (continued.parent_span_id, continued.trace_state) == (PARENT_ID, "vendor=x")


def test_unsampled_requests_export_nothing_and_carry_no_exemplar(
    mongo_uri: str, registry: CollectorRegistry
) -> None:
    provider, exporter = memory_provider(ParentBased(TraceIdRatioBased(0.1)))
    app = example.create_app(mongo_uri, registry=registry, tracer_provider=provider)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        # The caller decided not to sample: the parent-based sampler follows.
        response = client.get(
            "/servers/3/uncached", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}
        )
        assert response.status_code == 200
        exposition = openmetrics(client)
    assert exporter.get_finished_spans() == ()
    assert exemplar_trace_ids(exposition, "http_server_request_duration_seconds_bucket") == set()
    assert 'http_route="/servers/{server_id}/uncached"' in exposition


def propagation_app(registry: CollectorRegistry, provider: TracerProvider) -> Starlette:
    """Answers with the headers the request's code would propagate to the services it calls."""

    def outgoing(request: Any) -> JSONResponse:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return JSONResponse(carrier)

    app = Starlette(routes=[Route("/", outgoing)])
    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    return app


def test_an_unsampled_parent_is_continued_unsampled_with_its_tracestate(
    registry: CollectorRegistry,
) -> None:
    provider, exporter = memory_provider(ParentBased(TraceIdRatioBased(1.0)))
    with serve(propagation_app(registry, provider)) as server:
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00", "tracestate": "vendor=x"}
        outgoing = httpx.get(server.url, headers=headers).json()
    version, trace_id, span_id, flags = outgoing["traceparent"].split("-")
    # Same trace, a new span id of our own, still not sampled, the caller's tracestate kept.
    assert (version, trace_id, flags) == ("00", TRACE_ID, "00")
    assert span_id not in (PARENT_ID, "0" * 16)
    assert outgoing["tracestate"] == "vendor=x"
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(
    "traceparent",
    [
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-00",  # upper-case hex
        f"00-{'0' * 32}-{PARENT_ID}-00",  # the invalid trace id
        f"00-{TRACE_ID}-{'0' * 16}-00",  # the invalid parent id
        f"00-{TRACE_ID}-{PARENT_ID}-00-extra",  # version 00 has exactly four fields
        f"ff-{TRACE_ID}-{PARENT_ID}-00",  # the forbidden version
        f"00-{TRACE_ID[:-1]}g-{PARENT_ID}-00",  # not hex
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(
    traceparent: str, registry: CollectorRegistry
) -> None:
    provider, exporter = memory_provider(ParentBased(TraceIdRatioBased(1.0)))
    with serve(propagation_app(registry, provider)) as server:
        outgoing = httpx.get(server.url, headers={"traceparent": traceparent}).json()
    (span,) = exporter.get_finished_spans()  # a root, sampled at the ratio (1.0 here)
    assert span.parent is None
    trace_id = format(span.context.trace_id, "032x")
    assert trace_id != TRACE_ID.lower()
    assert span.context.trace_flags.sampled
    flags = f"{span.context.trace_flags:02x}"
    assert outgoing["traceparent"] == f"00-{trace_id}-{span.context.span_id:016x}-{flags}"


def test_the_providers_attribute_limits_hold_for_perfmws_attributes(
    registry: CollectorRegistry,
) -> None:
    limits = SpanLimits(max_span_attributes=10, max_span_attribute_length=4)
    provider, exporter = memory_provider(limits=limits)
    app = Starlette(routes=[Route("/items/{item_id}", lambda request: PlainTextResponse("hi"))])
    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    with serve(app) as server:
        assert httpx.get(server.url + "/items/12345").status_code == 200
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert len(span.attributes) == 10  # 5 at the start, 8 at the end: the oldest 3 dropped
    assert span.dropped_attributes == 3
    assert span.attributes["http.route"] == "/ite"  # values cut at 4 characters
    assert span.attributes["perfmw.db.queries"] == 0


def test_otel_asgi_middleware_outside_is_enriched_not_doubled(
    mongo_uri: str, registry: CollectorRegistry
) -> None:
    provider, exporter = memory_provider()
    app = example.create_app(mongo_uri, registry=registry, tracer_provider=provider)
    outer = OpenTelemetryMiddleware(app, tracer_provider=provider)  # wraps perfmw
    with serve(outer) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/servers/5/uncached").status_code == 200
        exposition = openmetrics(client)
    spans = exporter.get_finished_spans()
    # OTel's middleware outside perfmw also traces the scrape: its span is named after it.
    (span,) = [s for s in spans if s.kind.name == "SERVER" and s.name != "GET /metrics"]
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.asgi"
    assert span.name == "GET /servers/{server_id}/uncached"
    assert span.attributes is not None
    assert span.attributes["perfmw.db.queries"] == 1
    assert span.attributes["http.route"] == "/servers/{server_id}/uncached"
    (child,) = [s for s in spans if s.kind.name == "CLIENT"]
    assert child.parent is not None
    assert child.parent.span_id == span.context.span_id
    trace_id = format(span.context.trace_id, "032x")
    assert exemplar_trace_ids(exposition, "http_server_request_duration_seconds_bucket") == {
        trace_id
    }


def test_otel_asgi_middleware_inside_perfmw_adds_no_second_server_span(
    registry: CollectorRegistry,
) -> None:
    provider, exporter = memory_provider()

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    app = Starlette(
        routes=[Route("/hello/{name}", hello)],
        middleware=[Middleware(OpenTelemetryMiddleware, tracer_provider=provider)],
    )
    perfmw.instrument(app, registry=registry, tracer_provider=provider)  # outermost
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/hello/ada").status_code == 200
        assert client.get("/hello/bob").status_code == 200
    spans = exporter.get_finished_spans()
    server_spans = [s for s in spans if s.kind.name == "SERVER"]
    assert [s.name for s in server_spans] == ["GET /hello/{name}", "GET /hello/{name}"]
    assert {s.instrumentation_scope.name for s in server_spans if s.instrumentation_scope} == {
        "perfmw"
    }
    # OTel's own span became an INTERNAL child of ours, in the same trace.
    for server_span in server_spans:
        inner = [
            s
            for s in spans
            if s.parent is not None
            and s.parent.span_id == server_span.context.span_id
            and s.kind.name == "INTERNAL"
        ]
        assert inner


def app_with_clients(mongo_uri: str, *kinds: str) -> tuple[FastAPI, dict[str, Any]]:
    """A FastAPI app whose lifespan opens (and closes) the MongoDB clients named by `kinds`:
    "async" (AsyncMongoClient), "motor", "sync" (MongoClient)."""
    makers = {"async": AsyncMongoClient, "motor": AsyncIOMotorClient, "sync": MongoClient}
    clients: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for kind in kinds:
            clients[kind] = makers[kind](mongo_uri)
        yield
        for kind in kinds:
            closed = clients[kind].close()
            if inspect.isawaitable(closed):
                await closed

    return FastAPI(lifespan=lifespan), clients


def client_children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[str]:
    return sorted(
        str((s.attributes or {}).get("db.query.text"))
        for s in spans
        if s.kind.name == "CLIENT"
        and s.parent is not None
        and s.parent.span_id == parent.context.span_id
        and s.context.trace_id == parent.context.trace_id
    )


def test_async_motor_and_threadpool_sync_clients_parent_to_the_request_span(
    mongo_uri: str, registry: CollectorRegistry
) -> None:
    provider, exporter = memory_provider()
    app, clients = app_with_clients(mongo_uri, "async", "motor", "sync")

    @app.get("/async")
    async def with_async() -> dict[str, Any]:
        await clients["async"].registry.servers.find_one({"_id": 1})
        return {}

    @app.get("/motor")
    async def with_motor() -> dict[str, Any]:
        await clients["motor"].registry.servers.find_one({"_id": 2})
        return {}

    @app.get("/threadpool")
    def with_sync_in_threadpool() -> dict[str, Any]:  # FastAPI runs it in its threadpool
        clients["sync"].registry.servers.find_one({"_id": 3})
        return {}

    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for path in ("/async", "/motor", "/threadpool"):
            assert client.get(path).status_code == 200
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans if s.kind.name == "SERVER"}
    for path in ("/async", "/motor", "/threadpool"):
        assert client_children(spans, by_name[f"GET {path}"]) == [
            "find registry.servers {_id: ?}"
        ], path


def test_the_drivers_housekeeping_makes_no_span(
    mongo_uri: str, registry: CollectorRegistry
) -> None:
    provider, exporter = memory_provider()
    with MongoClient(mongo_uri) as setup:  # outside any request: no span of the provider's
        setup.registry.pages.insert_many([{"n": i} for i in range(10)])
    app, clients = app_with_clients(mongo_uri, "async")

    @app.get("/first")
    async def first_of_many() -> dict[str, Any]:
        cursor = clients["async"].registry.pages.find({}, batch_size=2)
        await cursor.next()
        await cursor.close()  # the server still holds the cursor: the driver kills it
        return {}

    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/first").status_code == 200
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.kind.name == "SERVER"]
    assert client_children(spans, request) == ["find registry.pages {}"]  # no killCursors
    assert [s.name for s in spans if s.kind.name == "CLIENT"] == ["registry.find"]


def test_pymongo_instrumented_by_the_user_makes_the_spans_and_perfmw_none(
    mongo_uri: str, registry: CollectorRegistry
) -> None:
    from opentelemetry.instrumentation.pymongo import PymongoInstrumentor

    provider, exporter = memory_provider()
    app, clients = app_with_clients(mongo_uri, "async")

    @app.get("/servers/{server_id}")
    async def server(server_id: int) -> dict[str, Any]:
        await clients["async"].registry.servers.find_one({"_id": server_id})
        return {}

    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    PymongoInstrumentor().instrument(tracer_provider=provider)  # the user's own set-up
    try:
        with serve(app) as server_, httpx.Client(base_url=server_.url) as client:
            assert client.get("/servers/1").status_code == 200
    finally:
        PymongoInstrumentor().uninstrument()
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.kind.name == "SERVER"]
    (find,) = [s for s in spans if s.name == "registry.find"]  # one span: theirs, no copy
    assert find.instrumentation_scope is not None
    assert find.instrumentation_scope.name == "opentelemetry.instrumentation.pymongo"
    assert find.parent is not None and find.parent.span_id == request.context.span_id


def test_suppressed_instrumentation_makes_no_mongodb_span(
    mongo_uri: str, registry: CollectorRegistry
) -> None:
    from opentelemetry import context as otel_context

    provider, exporter = memory_provider()
    app, clients = app_with_clients(mongo_uri, "async")

    @app.get("/quiet")
    async def quiet() -> dict[str, Any]:
        key = otel_context._SUPPRESS_INSTRUMENTATION_KEY
        token = otel_context.attach(otel_context.set_value(key, True))
        try:
            await clients["async"].registry.servers.find_one({"_id": 1})
        finally:
            otel_context.detach(token)
        await clients["async"].registry.servers.find_one({"_id": 2, "n": 1})
        return {}

    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    with serve(app) as server_, httpx.Client(base_url=server_.url) as client:
        assert client.get("/quiet").status_code == 200
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.kind.name == "SERVER"]
    assert client_children(spans, request) == ["find registry.servers {_id: ?, n: ?}"]


def test_spans_of_commands_never_answered_stay_within_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pymongo import monitoring

    from perfmw.exporters import _mongo_spans

    provider, exporter = memory_provider()
    monkeypatch.setattr(_mongo_spans, "MAX_OPEN_SPANS", 100)
    listener = _mongo_spans.SpanListener(_mongo_spans.STABLE)
    monkeypatch.setattr(listener, "_global", provider.get_tracer("perfmw"))
    address = ("127.0.0.1", 27017)
    for request_id in range(250):  # sent on a connection that died: no reply ever comes
        listener.started(
            monitoring.CommandStartedEvent({"find": "servers"}, "registry", request_id, address, 1)
        )
    assert len(listener._open) == 100
    assert min(key[0] for key in listener._open) == 150  # the oldest were dropped
    listener.succeeded(
        monitoring.CommandSucceededEvent(timedelta(0), {"ok": 1}, "find", 249, address, 1)
    )
    assert len(listener._open) == 99
    assert [s.name for s in exporter.get_finished_spans()] == ["registry.find"]


def test_capture_statement_keeps_values(mongo_uri: str, registry: CollectorRegistry) -> None:
    provider, exporter = memory_provider()
    settings = perfmw.Settings(capture_statement=True)
    app = example.create_app(
        mongo_uri, settings=settings, registry=registry, tracer_provider=provider
    )
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/servers/7/uncached").status_code == 200
    (child,) = [s for s in exporter.get_finished_spans() if s.kind.name == "CLIENT"]
    assert child.attributes is not None
    assert child.attributes["db.query.text"] == "find registry.servers {_id: 7}"


def test_server_errors_mark_the_span_and_record_the_exception(
    registry: CollectorRegistry,
) -> None:
    provider, exporter = memory_provider()
    app = FastAPI()

    @app.get("/boom")
    async def fail() -> None:
        raise RuntimeError("kaput")

    @app.get("/missing")
    async def not_found() -> None:
        raise HTTPException(status_code=404)

    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    with serve(app) as server:
        # uvicorn closes the connection after an unhandled error: one client per request.
        assert httpx.get(f"{server.url}/boom").status_code == 500
        assert httpx.get(f"{server.url}/missing").status_code == 404
        assert httpx.get(f"{server.url}/no/such/page").status_code == 404
    boom, missing, unmatched = exporter.get_finished_spans()
    assert boom.name == "GET /boom"
    assert boom.status.status_code.name == "ERROR"
    assert boom.attributes is not None
    assert boom.attributes["error.type"] == "RuntimeError"
    assert boom.attributes["http.response.status_code"] == 500
    assert [e.name for e in boom.events] == ["exception"]
    assert missing.status.status_code.name == "UNSET"
    assert missing.name == "GET /missing"
    assert unmatched.name == "GET"  # no route: the method alone, never the raw path
    assert unmatched.attributes is not None
    assert "http.route" not in unmatched.attributes
    assert unmatched.attributes["url.path"] == "/no/such/page"


def test_tracing_off_starts_no_span(registry: CollectorRegistry) -> None:
    provider, exporter = memory_provider()
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
    perf = perfmw.instrument(
        app, settings=perfmw.Settings(trace=False), registry=registry, tracer_provider=provider
    )
    assert perf.tracing is None
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/").status_code == 200
    assert exporter.get_finished_spans() == ()


def test_findings_become_span_events() -> None:
    stall = Finding(
        "loop_stall",
        "/reports/blocking",
        "app.py:120",
        0.25,
        {
            "cause": "blocking",
            "duration_seconds": 0.25,
            "stack": ["app.py:118 in a", "app.py:120 in b"],
        },
    )
    assert _event_attributes(stall) == {
        "cause": "blocking",
        "duration_ms": 250.0,
        "count": 1,
        "code.stacktrace": "app.py:118 in a\napp.py:120 in b",
        "code.filepath": "app.py",
        "code.lineno": 120,
    }
    slow = Finding(
        "slow_query",
        "/servers/by-owner",
        "src/app.py:7",
        0.3,
        {"collection": "servers", "operation": "find", "shape": "find servers {owner: ?}"},
    )
    assert _event_attributes(slow) == {
        "collection": "servers",
        "operation": "find",
        "shape": "find servers {owner: ?}",
        "count": 1,
        "duration_ms": 300.0,
        "code.filepath": "src/app.py",
        "code.lineno": 7,
    }


class KeptBodies(OtlpHttpSender):
    """A sender that keeps the request bodies it would post."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9/v1/traces")
        self.bodies: list[bytes] = []

    def send(self, body: bytes) -> bool:
        self.bodies.append(body)
        return True


class PublicOnly:
    """A span showing only its public properties."""

    def __init__(self, span: ReadableSpan) -> None:
        self._span = span

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._span, name)


def exported(spans: Sequence[Any]) -> bytes:
    """What configure_tracing()'s processor posts for `spans`, ended in this order."""
    sender = KeptBodies()
    room = len(spans) + 1  # all in one request
    processor = LoopFriendlySpanProcessor(sender, max_queue_size=room, max_export_batch_size=room)
    for span in spans:
        processor.on_end(span)
    assert processor.force_flush()
    processor.shutdown()
    (body,) = sender.bodies
    return body


def test_wire_encoding_decodes_like_the_otlp_exporters_encoding() -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
        encode_spans as exporter_encoding,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.trace import (
        Link,
        NonRecordingSpan,
        SpanContext,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
        set_span_in_context,
    )

    provider, exporter = memory_provider()
    tracers = [  # spans of two instrumentation scopes, interleaved
        provider.get_tracer("scope", "1.2", schema_url="https://opentelemetry.io/schemas/1"),
        provider.get_tracer("other"),
    ]
    remote = SpanContext(
        int(TRACE_ID, 16), int(PARENT_ID, 16), True, TraceFlags(1), TraceState([("a", "1")])
    )
    linked = SpanContext(int(TRACE_ID, 16), 7, True, TraceFlags(1))
    for n, kind in enumerate(("SERVER", "CLIENT", "INTERNAL")):
        span = tracers[n % 2].start_span(
            "GET /servers/{server_id}",
            context=set_span_in_context(NonRecordingSpan(remote)) if kind == "SERVER" else None,
            kind=getattr(SpanKind, kind),
            attributes={"url.path": "/servers/7", "server.port": 8000, "café": "ü"},
            links=[Link(linked, {"why": "batch"})],
        )
        span.set_attributes(
            {"n": -5, "ok": True, "ms": 1.25, "tags": ["a", "b"], "ids": [1, 2], "big": 2**62}
        )
        span.add_event("perfmw.n_plus_one", {"collection": "agents", "count": 20})
        span.set_status(Status(StatusCode.ERROR, "boom") if kind == "CLIENT" else StatusCode.OK)
        span.end()
    spans = exporter.get_finished_spans()
    ours, theirs = ExportTraceServiceRequest(), ExportTraceServiceRequest()
    ours.ParseFromString(exported(spans))
    theirs.ParseFromString(exporter_encoding(spans).SerializePartialToString())
    assert ours == theirs
    (resource_spans,) = ours.resource_spans
    assert [(s.scope.name, len(s.spans)) for s in resource_spans.scope_spans] == [
        ("scope", 2),
        ("other", 1),
    ]
    again = ExportTraceServiceRequest()  # attributes encoded before now come from the cache
    again.ParseFromString(exported(spans))
    assert again == theirs
    # A span that keeps its fields differently (another SDK release): its public properties.
    public = ExportTraceServiceRequest()
    public.ParseFromString(exported([PublicOnly(span) for span in spans]))
    assert public == theirs


class PlainFields:
    """A span keeping its fields as perfmw's LeanSpan does until the application adds to it:
    attributes in a plain dict, no events or links (empty tuples)."""

    def __init__(self, span: ReadableSpan) -> None:
        self._span = span
        self._attributes = dict(span.attributes or {})
        self._events = self._links = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._span, name)


def test_equal_values_of_other_types_and_plain_fields_encode_like_the_exporter() -> None:
    """1, True and 1.0 are one dict key: each still arrives as its own type, from the cache
    too; and a span's plain dict and tuples encode as the SDK's bounded containers do."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
        encode_spans as exporter_encoding,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    provider, exporter = memory_provider()
    tracer = provider.get_tracer("scope")
    values: list[Any] = [1, True, 1.0, "1", 0, False, 0.0, ["a"], 2.5, 1, True, 1.0]
    for n, value in enumerate(values):
        tracer.start_span("work", attributes={"v": value, "ms": n / 4, "n": n}).end()
    spans = exporter.get_finished_spans()
    theirs = ExportTraceServiceRequest()
    theirs.ParseFromString(exporter_encoding(spans).SerializePartialToString())
    for encoded in (exported(spans), exported([PlainFields(span) for span in spans])):
        ours = ExportTraceServiceRequest()
        ours.ParseFromString(encoded)
        assert ours == theirs
    (scope_spans,) = theirs.resource_spans[0].scope_spans
    kinds = [span.attributes[0].value.WhichOneof("value") for span in scope_spans.spans]
    assert kinds == [
        "int_value",
        "bool_value",
        "double_value",
        "string_value",
        "int_value",
        "bool_value",
        "double_value",
        "array_value",
        "double_value",
        "int_value",
        "bool_value",
        "double_value",
    ]
    assert [span.attributes[1].value.double_value for span in scope_spans.spans] == [
        n / 4 for n in range(len(values))
    ]


def test_the_cache_of_encoded_attributes_stays_bounded() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from perfmw.exporters import _otlp_wire

    provider, exporter = memory_provider()
    tracer = provider.get_tracer("scope")
    paths = [f"/servers/{n}" for n in range(_otlp_wire._PAIRS_LIMIT + 500)]  # none repeats
    for path in paths:
        tracer.start_span("GET /servers/{server_id}", attributes={"url.path": path}).end()
    decoded = ExportTraceServiceRequest()
    decoded.ParseFromString(exported(exporter.get_finished_spans()))
    (scope_spans,) = decoded.resource_spans[0].scope_spans
    assert [span.attributes[0].value.string_value for span in scope_spans.spans] == paths
    assert all(len(pairs) <= _otlp_wire._PAIRS_LIMIT for pairs in _otlp_wire._pairs.values())


def test_the_caches_of_encoded_keys_resources_and_scopes_stay_bounded() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.sdk.resources import Resource

    from perfmw.exporters import _otlp_wire

    services = [f"service-{n}" for n in range(_otlp_wire._RESOURCES_LIMIT + 10)]
    scopes = [f"scope-{n}" for n in range(_otlp_wire._SCOPES_LIMIT + 10)]
    keys = [f"key.{n}" for n in range(_otlp_wire._KEYS_LIMIT + 10)]
    spans = []
    for service in services:  # a resource each
        exporter = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        provider.get_tracer("scope").start_span("work").end()
        spans.extend(exporter.get_finished_spans())
    provider, exporter = memory_provider()
    for scope in scopes:
        provider.get_tracer(scope).start_span("work").end()
    tracer = provider.get_tracer("keys")
    for n, key in enumerate(keys):
        tracer.start_span("work", attributes={key: 1, f"{key}.ms": n + 0.5}).end()
    spans.extend(exporter.get_finished_spans())

    decoded = ExportTraceServiceRequest()
    decoded.ParseFromString(exported(spans))
    names = [
        resource.resource.attributes[0].value.string_value
        for resource in decoded.resource_spans
        if resource.resource.attributes[0].key == "service.name"
    ]
    assert names[: len(services)] == services
    scope_names = [scope.scope.name for r in decoded.resource_spans for scope in r.scope_spans]
    assert scope_names[-len(scopes) - 1 :] == [*scopes, "keys"]
    (keyed,) = (s for r in decoded.resource_spans for s in r.scope_spans if s.scope.name == "keys")
    assert [span.attributes[0].key for span in keyed.spans] == keys
    assert [span.attributes[1].value.double_value for span in keyed.spans] == [
        n + 0.5 for n in range(len(keys))
    ]
    assert len(_otlp_wire._resources) <= _otlp_wire._RESOURCES_LIMIT
    assert len(_otlp_wire._scopes) <= _otlp_wire._SCOPES_LIMIT
    assert len(_otlp_wire._keys) == _otlp_wire._KEYS_LIMIT
    assert len(_otlp_wire._double_prefixes) == _otlp_wire._KEYS_LIMIT


def test_configure_tracing_honours_otel_environment(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100")
    provider = perfmw.configure_tracing("registry", set_global=False)
    assert provider.resource.attributes["service.name"] == "from-env"
    assert provider.sampler.get_description().startswith("ParentBased{root:TraceIdRatioBased{0.1},")
    (processor,) = provider._active_span_processor._span_processors
    assert isinstance(processor, LoopFriendlySpanProcessor)
    assert processor.max_export_batch_size == 100
    assert processor.sender.endpoint == f"{receiver.endpoint}/v1/traces"
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("sampled", context=None) as span:
        pass
    assert provider.force_flush()
    provider.shutdown()
    sampled = span.get_span_context().trace_flags.sampled
    assert [s.name for s in receiver.spans] == (["sampled"] if sampled else [])

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        perfmw.configure_tracing(set_global=False)


def test_fastapi_native_telemetry_span_is_enriched_not_doubled(
    mongo_uri: str, registry: CollectorRegistry
) -> None:
    provider, exporter = memory_provider()
    app = FastAPI(telemetry={"tracer_provider": provider})  # FastAPI's own server span

    @app.get("/servers/{server_id}")
    async def get_server(server_id: int) -> dict[str, Any]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
        try:
            await client.registry.servers.find_one({"_id": server_id})
        finally:
            await client.close()
        return {}

    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/servers/4").status_code == 200
    spans = exporter.get_finished_spans()
    (span,) = [s for s in spans if s.kind.name == "SERVER"]
    assert span.name == "GET /servers/{server_id}"
    assert span.attributes is not None
    assert span.attributes["perfmw.db.queries"] == 1
    (find,) = [s for s in spans if s.name == "registry.find"]
    assert find.context.trace_id == span.context.trace_id


def test_loop_stall_and_blocking_call_events(mongo_uri: str, registry: CollectorRegistry) -> None:
    provider, exporter = memory_provider()
    app = example.create_app(mongo_uri, registry=registry, tracer_provider=provider)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/reports/blocking").status_code == 200
        assert client.get("/servers/legacy", params={"limit": 3}).status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"}

    blocking = spans["GET /reports/blocking"]
    assert blocking.attributes is not None
    assert blocking.attributes["perfmw.loop.stall_ms"] >= 100  # the 150 ms sleep, as seen
    (stall,) = [e.attributes for e in blocking.events if e.name == "perfmw.loop_stall"]
    assert stall is not None
    assert stall["duration_ms"] == blocking.attributes["perfmw.loop.stall_ms"]
    assert stall["code.filepath"] == "examples/fastapi_app/app.py"
    assert stall["code.lineno"] == line_of(example.create_app, "time.sleep(")
    assert "in render_report" in str(stall["code.stacktrace"])

    legacy = spans["GET /servers/legacy"]
    (call,) = [e.attributes for e in legacy.events if e.name == "perfmw.blocking_call"]
    assert call is not None
    assert call["kind"] == "pymongo-sync"
    assert call["code.filepath"] == "examples/fastapi_app/app.py"


def run_script(tmp_path: Path, text: str, *args: str) -> None:
    """Run `text` as a script in a fresh process (a process sets its global provider once),
    with the project and tests/ importable; fail with its stderr if it fails."""
    script = tmp_path / "script.py"
    script.write_text(text)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    result = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


GLOBAL_PROVIDER_SCRIPT = """
import sys

import httpx
from prometheus_client import CollectorRegistry

import perfmw
from examples.fastapi_app.app import create_app
from support import serve, wait_for

app = create_app(sys.argv[1], registry=CollectorRegistry())  # no provider exists yet
provider = perfmw.configure_tracing("registry")  # the global one, set after instrument()
with serve(app) as server:
    headers = {"traceparent": sys.argv[2]}
    assert httpx.get(server.url + "/servers/3/uncached", headers=headers).status_code == 200
assert provider.force_flush()
"""


def test_global_provider_set_after_instrument_is_used(
    receiver: OtlpReceiver, mongo_uri: str, tmp_path: Any
) -> None:
    """The usual set-up, in a fresh process (a process sets its global provider once)."""
    run_script(tmp_path, GLOBAL_PROVIDER_SCRIPT, mongo_uri, f"00-{TRACE_ID}-{PARENT_ID}-01")
    # FastAPI opens its own server span when a global provider exists: perfmw enriches it.
    (span,) = servers(receiver.spans)
    assert (span.trace_id, span.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert span.name == "GET /servers/{server_id}/uncached"
    assert span.attributes["perfmw.db.queries"] == 1
    assert span.resource["service.name"] == "registry"
    (find,) = [s for s in receiver.spans if s.name == "registry.find"]
    assert find.trace_id == TRACE_ID
    assert find.attributes["db.query.text"] == "find registry.servers {_id: ?}"


class AlternatingIds(RandomIdGenerator):
    """Trace ids a 0.5 ratio sampler samples, then drops, in turn."""

    def __init__(self) -> None:
        self.calls = 0

    def generate_trace_id(self) -> int:
        self.calls += 1
        low = 1 if self.calls % 2 else 0xFFFFFFFFFFFFFFFF  # below, then above, the 0.5 bound
        return (self.calls << 64) | low


def test_ratio_sampling_decides_on_the_trace_id_the_span_gets(
    mongo_uri: str, registry: CollectorRegistry
) -> None:
    exporter = InMemorySpanExporter()
    ids = AlternatingIds()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)), id_generator=ids)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = example.create_app(mongo_uri, registry=registry, tracer_provider=provider)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(4):
            assert client.get("/servers/3/uncached").status_code == 200
        exposition = openmetrics(client)
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.kind.name == "SERVER"]
    # Requests 1 and 3 drew sampled ids, 2 and 4 unsampled ones: only 1 and 3 are exported,
    # each with the id the decision was made on, and its MongoDB command under it.
    trace_ids = sorted(format(s.context.trace_id, "032x") for s in roots)
    assert trace_ids == [format((n << 64) | 1, "032x") for n in (1, 3)]
    assert sorted(format(s.context.trace_id, "032x") for s in spans if s.kind.name == "CLIENT") == (
        trace_ids
    )
    assert exemplar_trace_ids(exposition, "http_server_request_duration_seconds_bucket") <= set(
        trace_ids
    )


def test_an_unreachable_collector_costs_a_warning_not_the_request(
    monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    provider = perfmw.configure_tracing("registry", set_global=False)
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            assert client.get("/").status_code == 200
    assert provider.force_flush() is False  # the server stopped: every request's span ended
    provider.get_tracer("test").start_span("another").end()
    assert provider.force_flush() is False
    provider.shutdown()
    warnings = [r for r in caplog.records if "could not send spans" in r.getMessage()]
    assert len(warnings) == 1


def test_a_tracer_provider_that_is_not_one_fails_at_instrument(
    registry: CollectorRegistry,
) -> None:
    app = Starlette()
    with pytest.raises(ValueError, match="tracer_provider must be an OpenTelemetry TracerProvider"):
        perfmw.instrument(app, registry=registry, tracer_provider="jaeger")


def test_perf_shutdown_sends_the_spans_still_queued(
    receiver: OtlpReceiver, registry: CollectorRegistry
) -> None:
    provider = perfmw.configure_tracing("registry", set_global=False)
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
    perf = perfmw.instrument(app, registry=registry, tracer_provider=provider)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/").status_code == 200
    assert receiver.spans == []  # queued: the export runs every 5 s
    perf.shutdown()
    assert [span.name for span in receiver.spans] == ["GET /"]
    provider.shutdown()


class SpanWatcher(SpanProcessor):
    """Holds a weak reference to every span started, nothing more."""

    def __init__(self) -> None:
        self.started: list[weakref.ref[Any]] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started.append(weakref.ref(span))


def test_a_kept_alive_connection_does_not_keep_the_request_span_alive(
    registry: CollectorRegistry,
) -> None:
    """uvicorn's keep-alive timer captures the context its last send runs in; were the
    request's span in it, every span would outlive its request until the connection's next
    one, reach the oldest GC generation and make full collections land in the tail latency."""

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    provider = TracerProvider()
    watcher = SpanWatcher()
    provider.add_span_processor(watcher)
    app = Starlette(routes=[Route("/ok", ok)])
    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    gc.disable()  # freed by reference counting, or not at all
    try:
        with serve(app) as server, httpx.Client(base_url=server.url) as client:
            assert client.get("/ok").status_code == 200
            (span,) = watcher.started
            # The connection stays open: the server's keep-alive timer is pending.
            wait_for(lambda: span() is None, timeout=3, what="the request's span to be freed")
            assert client.get("/ok").status_code == 200  # the same connection still serves
    finally:
        gc.enable()


LATE_PROVIDER_SCRIPT = """
import time

import httpx
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import perfmw
from support import serve


async def ok(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/before", ok), Route("/after", ok)])
perfmw.instrument(app, registry=CollectorRegistry())
with serve(app) as server:
    assert httpx.get(server.url + "/before").status_code == 200  # no provider yet: no span
    provider = perfmw.configure_tracing("late")  # set while the app serves
    time.sleep(1.5)  # perfmw looks for a provider once a second
    assert httpx.get(server.url + "/after").status_code == 200
assert provider.force_flush()
"""


def test_a_global_provider_set_while_serving_is_used_within_a_second(
    receiver: OtlpReceiver, tmp_path: Any
) -> None:
    run_script(tmp_path, LATE_PROVIDER_SCRIPT)
    assert [span.name for span in servers(receiver.spans)] == ["GET /after"]


STABLE_NAMES = {
    "db.system.name",
    "db.namespace",
    "db.collection.name",
    "db.operation.name",
    "db.query.text",
    "server.address",
    "server.port",
}
OLD_NAMES = {
    "db.system",
    "db.name",
    "db.statement",
    "db.mongodb.collection",
    "net.peer.name",
    "net.peer.port",
}


def mongo_address(mongo_uri: str) -> tuple[str, int]:
    host, _, port = mongo_uri.removeprefix("mongodb://").split("/")[0].rpartition(":")
    return host, int(port)


def test_mongodb_spans_follow_the_stable_database_conventions(
    receiver: OtlpReceiver, mongo_uri: str, registry: CollectorRegistry
) -> None:
    provider = perfmw.configure_tracing("registry", set_global=False)
    app, clients = app_with_clients(mongo_uri, "async")

    @app.get("/servers/{server_id}")
    async def server(server_id: int) -> dict[str, Any]:
        await clients["async"].registry.servers.find_one({"_id": server_id})
        return {}

    @app.get("/broken")
    async def broken() -> dict[str, Any]:
        with pytest.raises(OperationFailure):
            await clients["async"].registry.command("noSuchCommand", 1)
        return {}

    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    with serve(app) as server_, httpx.Client(base_url=server_.url) as client:
        assert client.get("/servers/7").status_code == 200
        assert client.get("/broken").status_code == 200  # the failure is the app's to handle
        assert provider.force_flush()
    provider.shutdown()

    host, port = mongo_address(mongo_uri)
    (find,) = [s for s in receiver.spans if s.name == "registry.find"]
    assert find.kind == "CLIENT"
    assert find.attributes == {
        "db.system.name": "mongodb",
        "db.namespace": "registry",
        "db.collection.name": "servers",
        "db.operation.name": "find",
        "db.query.text": "find registry.servers {_id: ?}",
        "server.address": host,
        "server.port": port,
    }
    assert find.status_code == 0
    (failed,) = [s for s in receiver.spans if s.name == "registry.noSuchCommand"]
    assert failed.attributes == {
        "db.system.name": "mongodb",
        "db.namespace": "registry",
        "db.operation.name": "noSuchCommand",
        "db.query.text": "noSuchCommand registry.",
        "server.address": host,
        "server.port": port,
        "error.type": "CommandNotFound",
    }
    assert failed.status_code == 2  # ERROR


def test_capture_statement_puts_the_values_in_db_query_text(
    receiver: OtlpReceiver, mongo_uri: str, registry: CollectorRegistry
) -> None:
    provider = perfmw.configure_tracing("registry", set_global=False)
    app, clients = app_with_clients(mongo_uri, "async")

    @app.get("/servers/{server_id}")
    async def server(server_id: int) -> dict[str, Any]:
        await clients["async"].registry.servers.find_one({"_id": server_id})
        return {}

    settings = perfmw.Settings(capture_statement=True)
    perfmw.instrument(app, settings=settings, registry=registry, tracer_provider=provider)
    with serve(app) as server_, httpx.Client(base_url=server_.url) as client:
        assert client.get("/servers/7").status_code == 200
        assert provider.force_flush()
    provider.shutdown()
    (find,) = [s for s in receiver.spans if s.name == "registry.find"]
    assert find.attributes["db.query.text"] == "find registry.servers {_id: 7}"
    assert set(find.attributes) == STABLE_NAMES


OPT_IN_SCRIPT = """
import sys

import httpx
from prometheus_client import CollectorRegistry

import perfmw
from examples.fastapi_app.app import create_app
from support import serve

provider = perfmw.configure_tracing("registry")
app = create_app(sys.argv[1], registry=CollectorRegistry())
with serve(app) as server:
    assert httpx.get(server.url + "/servers/3/uncached").status_code == 200
assert provider.force_flush()
"""


@pytest.mark.parametrize(
    ("opt_in", "names"),
    [
        ("database", STABLE_NAMES),
        ("http, database", STABLE_NAMES),
        ("database/dup", STABLE_NAMES | OLD_NAMES),
        ("database,database/dup", STABLE_NAMES | OLD_NAMES),  # dup wins, as in the contrib
        ("http", STABLE_NAMES),  # no database entry: perfmw's default
    ],
)
def test_otel_semconv_stability_opt_in_chooses_the_names(
    opt_in: str,
    names: set[str],
    receiver: OtlpReceiver,
    mongo_uri: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", opt_in)
    run_script(tmp_path, OPT_IN_SCRIPT, mongo_uri)
    (find,) = [s for s in receiver.spans if s.name == "registry.find"]
    assert set(find.attributes) == names
    assert find.attributes["db.query.text"] == "find registry.servers {_id: ?}"
    if "db.statement" in names:  # the old names hold the same values as the stable ones
        host, port = mongo_address(mongo_uri)
        old = {name: find.attributes[name] for name in OLD_NAMES}
        assert old == {
            "db.system": "mongodb",
            "db.name": "registry",
            "db.statement": "find registry.servers {_id: ?}",
            "db.mongodb.collection": "servers",
            "net.peer.name": host,
            "net.peer.port": port,
        }
