"""The MongoDB source on the installed pymongo, the oldest supported (4.4) as well as the newest,
and the tracing beside the installed OpenTelemetry instrumentations.

`make compat` runs this file in .venv-oldest too, so it uses only what pymongo 4.4 and motor 3.2
have: MongoClient and motor, no AsyncMongoClient (tests/test_mongo.py covers that one).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pymongo
import pytest
from fastapi import FastAPI
from motor.motor_asyncio import AsyncIOMotorClient
from prometheus_client import CollectorRegistry
from pymongo import MongoClient, monitoring

import perfmw
from otlp_receiver import OtlpReceiver, ReceivedSpan
from perfmw import explain, mongo
from perfmw._report_advice import advice
from perfmw.loop import sockets
from support import label_values, line_of, pool_label, sample, serve, wait_for, waited_and_spent

OLD_POOL_EVENTS = not hasattr(monitoring.ConnectionCheckedOutEvent, "duration")


@pytest.fixture
def db_name(mongo_uri: str) -> Iterator[str]:
    name = "c" + uuid.uuid4().hex[:10]
    yield name
    with MongoClient(mongo_uri) as client:
        client.drop_database(name)


class _Checkouts(monitoring.ConnectionPoolListener):
    """Counts checkouts as pymongo reports them, to compare with the histogram."""

    def __init__(self) -> None:
        self.done = 0

    def connection_checked_out(self, event: Any) -> None:
        self.done += 1

    def __getattr__(self, name: str) -> Any:
        return lambda event: None


def test_pool_waits_are_measured_on_the_installed_pymongo(
    mongo_uri: str, db_name: str, registry: CollectorRegistry
) -> None:
    app = FastAPI()
    checkouts = _Checkouts()
    perfmw.instrument(app, registry=registry)
    client: MongoClient[Any] = MongoClient(mongo_uri, maxPoolSize=1, event_listeners=[checkouts])
    client[db_name].agents.insert_many([{"n": i} for i in range(5000)])

    @app.get("/count")
    def count() -> int:  # Starlette's threadpool: ten at once queue for the one connection
        return client[db_name].agents.count_documents({})

    async def run(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            responses = await asyncio.gather(*(http.get("/count") for _ in range(10)))
        assert [r.json() for r in responses] == [5000] * 10

    with client, serve(app) as server:
        asyncio.run(run(server.url))
        exposition = httpx.get(server.url + "/metrics", timeout=10).text
        done = checkouts.done  # before the client's close checks one out for endSessions

    pool = pool_label(mongo_uri)
    # Every checkout pymongo reported is one wait: the seeding's (outside any request: to every
    # live registry) and the ten requests', and none raised inside perfmw.
    assert done == 11
    assert sample(exposition, "db_client_connection_wait_time_seconds_count", **pool) == 11
    waited, commands = waited_and_spent(exposition, pool)
    # One at a time: the k-th request waits for the k-1 before it (about 45 commands' time,
    # against the 10 of the commands themselves).
    assert waited > commands


def test_sync_driver_on_the_loop_is_a_blocking_call_and_motor_is_not(
    mongo_uri: str, db_name: str, registry: CollectorRegistry
) -> None:
    app = FastAPI()
    perfmw.instrument(app, registry=registry)
    sync: MongoClient[Any] = MongoClient(mongo_uri)
    motor = AsyncIOMotorClient(mongo_uri)

    @app.get("/sync-on-loop")
    async def sync_on_loop() -> int:
        sync[db_name].items.insert_one({"n": 1})  # blocks the loop for the round trip
        return len(list(sync[db_name].items.find({})))

    @app.get("/sync-in-thread")
    def sync_in_thread() -> int:
        return len(list(sync[db_name].items.find({})))

    @app.get("/motor")
    async def with_motor() -> int:
        return len(await motor[db_name].items.find({}).to_list(None))

    with sync, serve(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/sync-on-loop").json() == 1
        assert http.get("/sync-in-thread").json() == 1
        assert http.get("/motor").json() == 1
        exposition = http.get("/metrics").text
        found = http.get("/perfmw/findings").json()["findings"]
    motor.close()

    assert label_values(exposition, "perfmw_blocking_calls_total", "http_route") == {
        "/sync-on-loop"
    }
    blocking = sample(
        exposition, "perfmw_blocking_calls_total", http_route="/sync-on-loop", kind="pymongo-sync"
    )
    assert blocking == 2
    assert sorted(
        (f["route"], f["location"], f["count"]) for f in found if f["kind"] == "blocking_call"
    ) == [
        ("/sync-on-loop", line_of(__file__, "blocks the loop for the round trip"), 1),
        ("/sync-on-loop", line_of(__file__, "return len(list(sync[db_name].items.find({})))"), 1),
    ]


def test_a_blocking_call_counts_the_requests_that_waited_for_it(
    mongo_uri: str, db_name: str, registry: CollectorRegistry
) -> None:
    # Two requests wait for an event while a third sends a sync count on the loop, and a request
    # the server has read is not started yet (a request cycle's task, as uvicorn makes one per
    # request): all three are held up for the whole call, which moving it off the loop gives back.
    app = FastAPI()
    perfmw.instrument(app, registry=registry)
    sync: MongoClient[Any] = MongoClient(mongo_uri)
    arrived: list[int] = []
    release = asyncio.Event()

    @app.get("/waiting")
    async def waiting() -> str:
        arrived.append(1)
        await release.wait()
        return "done"

    async def run_asgi() -> None:  # named as uvicorn's request cycle is
        return None

    @app.get("/sync-on-loop")
    async def sync_on_loop() -> int:
        read = asyncio.create_task(run_asgi())
        found = sync[db_name].items.count_documents({})  # holds up the three waiting
        release.set()
        await read
        return found

    async def run(url: str) -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            held = [asyncio.create_task(http.get("/waiting")) for _ in range(2)]
            while len(arrived) < 2:
                await asyncio.sleep(0.01)
            blocking = await http.get("/sync-on-loop")
            return [blocking.json()] + [(await r).json() for r in held]

    with sync, serve(app) as server:
        assert asyncio.run(run(server.url)) == [0, "done", "done"]
        found = httpx.get(server.url + "/perfmw/findings", timeout=10).json()["findings"]
    [call] = [f for f in found if f["kind"] == "blocking_call"]
    assert call["location"] == line_of(__file__, "holds up the three waiting")
    assert call["detail"]["requests_waiting"] == 3
    assert call["detail"]["delayed_seconds"] == pytest.approx(3 * call["total_seconds"])
    # The report expects the fix to give back the others' wait, not the call's own time.
    advised = advice(call)
    assert advised["saved"] == pytest.approx(3 * call["total_seconds"])
    assert advised["basis"] == (
        "the other requests waiting during the calls, 3 at the latest one, waited for the loop; "
        "the calls themselves still take their time, off the loop"
    )


def test_a_blocking_call_counts_the_requests_unread_in_their_connections(
    mongo_uri: str, db_name: str, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two clients send a request on their open connections while a sync count holds the loop:
    # the server reads neither until the loop runs again, and only the kernel knows they wait.
    # The count is held (in a command listener, inside the call's duration) until the kernel
    # shows both, then 50 ms more. A second call at once from the same line is given that
    # reading, scaled to its own duration: the sockets are read once a second per call site.
    monkeypatch.setattr(mongo, "_unread_sites", {})
    monkeypatch.setattr(mongo, "UNREAD_SAMPLE_SECONDS", 3600.0)
    app = FastAPI()
    perfmw.instrument(app, registry=registry)
    in_call = threading.Event()

    class HoldUntilUnread(monitoring.CommandListener):
        armed = True

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            if event.command_name != "aggregate" or not self.armed:
                return
            self.armed = False
            in_call.set()
            deadline = time.monotonic() + 20
            while len(sockets.arrivals(time.perf_counter())) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.05)

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            return None

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            return None

    sync: MongoClient[Any] = MongoClient(mongo_uri, event_listeners=[HoldUntilUnread()])

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    @app.get("/sync-on-loop")
    async def sync_on_loop() -> list[list[float]]:
        for _ in range(2):
            sync[db_name].items.count_documents({})  # keeps two requests unread
        calls = perfmw.current_request().blocking_calls  # type: ignore[union-attr]
        return [
            [c.duration_seconds, c.detail["requests_waiting"], c.detail["delayed_seconds"]]
            for c in calls
        ]

    def sent_during_the_call(http: httpx.Client) -> str:
        in_call.wait(20)
        return str(http.get("/ping").json())

    with sync, serve(app) as server, ThreadPoolExecutor(2) as pool:
        others = [httpx.Client(base_url=server.url, timeout=30) for _ in range(2)]
        assert [http.get("/ping").json() for http in others] == ["pong", "pong"]  # connected
        pinged = [pool.submit(sent_during_the_call, http) for http in others]
        (first, first_waiting, first_delayed), (second, second_waiting, second_delayed) = httpx.get(
            server.url + "/sync-on-loop", timeout=30
        ).json()
        assert [done.result(timeout=30) for done in pinged] == ["pong", "pong"]
        for http in others:
            http.close()
    # Each waited from its arrival to the call's end, within the call as the driver timed it:
    # 50 ms at least (to the kernel's tick) where its clock runs while its listeners do, the
    # whole call where it starts after them (older pymongo). The second call's share is the
    # first one's rate over its own time.
    assert first_waiting == 2
    assert min(2 * 0.04, 2 * first) - 1e-9 <= first_delayed <= 2 * first + 1e-9
    assert second_waiting == 2
    assert second_delayed == pytest.approx(first_delayed / first * second)


def test_missing_index_advice_with_a_sync_client(
    mongo_uri: str, db_name: str, registry: CollectorRegistry
) -> None:
    app = FastAPI()
    settings = perfmw.Settings(explain_slow_queries=True, slow_query_seconds=0.0)
    perfmw.instrument(app, settings=settings, registry=registry)
    client: MongoClient[Any] = MongoClient(mongo_uri)
    client[db_name].servers.insert_many([{"owner": f"team-{i % 5}"} for i in range(50)])

    @app.get("/by-owner")
    def by_owner(owner: str) -> int:
        return len(list(client[db_name].servers.find({"owner": owner})))

    def missing_indexes(url: str) -> list[dict[str, Any]]:
        found = httpx.get(url + "/perfmw/findings", timeout=10).json()["findings"]
        return [f for f in found if f["kind"] == "missing_index"]

    with client, serve(app) as server:
        for owner in ("team-1", "team-2"):
            assert httpx.get(f"{server.url}/by-owner?owner={owner}", timeout=30).json() == 10
            wait_for(lambda: not explain._pending and explain._jobs.empty())
        [found] = wait_for(lambda: missing_indexes(server.url))
    assert (found["route"], found["detail"]["index"]) == ("/by-owner", [["owner", 1]])


def test_what_an_old_pymongo_lacks_is_noted_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = (
        [
            f"perfmw: pymongo {pymongo.version} reports no duration on connection pool events "
            "(added in pymongo 4.7): perfmw measures connection wait times from the "
            "check-out-started event instead"
        ]
        if OLD_POOL_EVENTS
        else []
    )
    assert pymongo.version_tuple >= (4, 7) or OLD_POOL_EVENTS
    monkeypatch.setattr(mongo, "_noted", False)
    with caplog.at_level(logging.INFO, logger="perfmw"):
        perfmw.mongo_listeners()
        mongo.register_listeners()
        perfmw.mongo_listeners()
    assert [r.getMessage() for r in caplog.records if "pymongo" in r.getMessage()] == expected


def test_mongodb_spans_have_the_stable_names_on_the_installed_releases(
    mongo_uri: str, db_name: str, registry: CollectorRegistry
) -> None:
    """perfmw's own listener makes the MongoDB spans, with the stable names and nothing else,
    on each pymongo and OpenTelemetry SDK release (opentelemetry-instrumentation-pymongo is not
    installed in the compat venvs)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = FastAPI()
    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    client: MongoClient[Any] = MongoClient(mongo_uri)

    @app.get("/servers/{server_id}")
    def server(server_id: int) -> int:  # the threadpool, with the sync driver
        client[db_name].servers.find_one({"_id": server_id})
        with pytest.raises(pymongo.errors.OperationFailure):
            client[db_name].command("noSuchCommand", 1)
        return server_id

    with client, serve(app) as server_:
        assert httpx.get(server_.url + "/servers/7", timeout=30).json() == 7
        host, port = client.address or ("", 0)
    spans = {s.name: s for s in exporter.get_finished_spans() if s.kind.name == "CLIENT"}
    common = {
        "db.system.name": "mongodb",
        "db.namespace": db_name,
        "server.address": host,
        "server.port": port,
    }
    assert dict(spans[f"{db_name}.find"].attributes or {}) == {
        **common,
        "db.collection.name": "servers",
        "db.operation.name": "find",
        "db.query.text": f"find {db_name}.servers {{_id: ?}}",
    }
    assert dict(spans[f"{db_name}.noSuchCommand"].attributes or {}) == {
        **common,
        "db.operation.name": "noSuchCommand",
        "db.query.text": f"noSuchCommand {db_name}.",
        "error.type": "CommandNotFound",
    }


def test_next_to_fastapi_instrumentor_one_server_span_has_the_children(
    mongo_uri: str, db_name: str, registry: CollectorRegistry
) -> None:
    """`make compat` installs opentelemetry-instrumentation-fastapi of each venv's time; in
    .venv-newest its newest release, beside perfmw."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = FastAPI()
    clients: list[AsyncIOMotorClient[Any]] = []

    @app.get("/servers/{server_id}")
    async def server(server_id: int) -> int:
        await clients[0][db_name].servers.find_one({"_id": server_id})
        return server_id

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)  # before perfmw, as usual
    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    clients.append(AsyncIOMotorClient(mongo_uri))  # created once the tracing is on
    try:
        with serve(app) as server_:
            for server_id in (1, 2):
                response = httpx.get(f"{server_.url}/servers/{server_id}", timeout=30)
                assert response.json() == server_id
    finally:
        clients[0].close()
        FastAPIInstrumentor.uninstrument_app(app)
    spans = exporter.get_finished_spans()
    assert sorted((s.name, s.kind.name) for s in spans) == [
        ("GET /servers/{server_id}", "SERVER"),
        ("GET /servers/{server_id}", "SERVER"),
        (f"{db_name}.find", "CLIENT"),
        (f"{db_name}.find", "CLIENT"),
    ]
    for request in (s for s in spans if s.kind.name == "SERVER"):
        assert request.instrumentation_scope is not None
        assert request.instrumentation_scope.name == "perfmw"
        (child,) = [
            s
            for s in spans
            if s.parent is not None
            and s.parent.span_id == request.context.span_id
            and s.context.trace_id == request.context.trace_id
        ]
        assert child.kind.name == "CLIENT"
        assert (child.attributes or {})["db.query.text"] == f"find {db_name}.servers {{_id: ?}}"


def server_spans(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [span for span in spans if span.kind == "SERVER"]


def lean_app(provider: Any, clients: list[AsyncIOMotorClient[Any]], db_name: str) -> FastAPI:
    """A route that uses its request's span as applications do: attributes, an event, an
    exception, a status, a span of its own and a MongoDB query."""
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    app = FastAPI()

    @app.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, Any]:
        span = trace.get_current_span()
        span.set_attribute("order.id", order_id)
        span.set_attributes({"order.region": "eu", "order.express": True})
        span.add_event("order.loaded", {"lines": 3})
        span.record_exception(ValueError("no stock"), {"sku": "A-1"})
        span.set_status(Status(StatusCode.ERROR, "out of stock"))
        with provider.get_tracer("app").start_as_current_span("price"):
            await clients[0][db_name].servers.find_one({"_id": order_id})
        return {}

    return app


def lean_then_sdk(
    app: FastAPI,
    provider: Any,
    receiver: OtlpReceiver,
    path: str,
    headers: dict[str, str] | None = None,
) -> tuple[list[ReceivedSpan], list[ReceivedSpan]]:
    """The spans of `path` served twice: with configure_tracing()'s provider as it is (perfmw's
    own request span), then with a processor of the application's added (the SDK's span). The
    first request's span never reaches the SDK."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    with serve(app) as server_, httpx.Client(base_url=server_.url, headers=headers) as client:
        assert client.get(path).status_code == 200
        assert provider.force_flush()
        lean = list(receiver.spans)
        provider.add_span_processor(SimpleSpanProcessor(memory))
        assert client.get(path).status_code == 200
        assert provider.force_flush()
    provider.shutdown()
    sdk = receiver.spans[len(lean) :]
    (sdk_request,) = server_spans(sdk)
    seen = [s for s in memory.get_finished_spans() if s.kind.name == "SERVER"]
    assert [format(s.context.span_id, "016x") for s in seen] == [sdk_request.span_id]
    return lean, sdk


def comparable(span: ReceivedSpan) -> dict[str, Any]:
    """What a span says, without its ids, times and measured durations."""
    timed = ("perfmw.db.duration_ms", "perfmw.loop.stall_ms", "server.port")
    return {
        "name": span.name,
        "kind": span.kind,
        "scope": span.scope,
        "resource": span.resource,
        "attributes": {k: v for k, v in span.attributes.items() if k not in timed},
        "events": [
            (name, {k: v for k, v in attrs.items() if k != "exception.stacktrace"})
            for name, attrs in span.events
        ],
        "status": (span.status_code, span.status_message),
        "dropped_attributes": span.dropped_attributes,
    }


def test_perfmws_own_request_span_says_what_the_sdks_says(
    receiver: OtlpReceiver, mongo_uri: str, db_name: str, registry: CollectorRegistry
) -> None:
    """configure_tracing()'s provider exports only through perfmw's processor, so the request's
    span is perfmw's own (_lean_span.py); once the application adds a processor, the SDK's.
    Both arrive the same, and the application's span calls on them all land."""
    provider = perfmw.configure_tracing("shop", set_global=False)
    clients: list[AsyncIOMotorClient[Any]] = []
    app = lean_app(provider, clients, db_name)
    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    clients.append(AsyncIOMotorClient(mongo_uri))  # created once the tracing is on
    try:
        lean, sdk = lean_then_sdk(app, provider, receiver, "/orders/7")
    finally:
        clients[0].close()

    (lean_request,) = server_spans(lean)
    (sdk_request,) = server_spans(sdk)
    assert comparable(lean_request) == comparable(sdk_request)
    said = comparable(lean_request)
    assert said["scope"] == "perfmw"
    assert {k: said["attributes"][k] for k in ("order.id", "order.region", "order.express")} == {
        "order.id": 7,
        "order.region": "eu",
        "order.express": True,
    }
    assert said["events"][:2] == [
        ("order.loaded", {"lines": 3}),
        (
            "exception",
            {
                "exception.type": "ValueError",
                "exception.message": "no stock",
                "exception.escaped": "False",
                "sku": "A-1",
            },
        ),
    ]
    assert said["status"] == (2, "out of stock")
    for spans, request in ((lean, lean_request), (sdk, sdk_request)):
        (price,) = [s for s in spans if s.name == "price"]
        assert price.parent_span_id == request.span_id
        assert price.trace_id == request.trace_id
        (find,) = [s for s in spans if s.name == f"{db_name}.find"]
        assert find.parent_span_id == price.span_id


def test_perfmws_own_span_continues_a_callers_sampled_trace_as_the_sdk_does(
    receiver: OtlpReceiver, registry: CollectorRegistry
) -> None:
    provider = perfmw.configure_tracing("shop", set_global=False)
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, Any]:
        return {}

    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01", "tracestate": "vendor=a1,other=b2"}
    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    (lean,), (sdk,) = map(server_spans, lean_then_sdk(app, provider, receiver, "/ping", headers))
    assert comparable(lean) == comparable(sdk)
    for span in (lean, sdk):
        assert (span.trace_id, span.parent_span_id) == (trace_id, parent_id)
        assert span.trace_state == "vendor=a1,other=b2"
    assert lean.span_id != sdk.span_id


def test_perfmws_own_request_span_keeps_the_providers_attribute_count_limit(
    receiver: OtlpReceiver, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import trace

    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "16")
    provider = perfmw.configure_tracing("shop", set_global=False)
    app = FastAPI()

    @app.get("/tags")
    async def tags() -> dict[str, Any]:
        span = trace.get_current_span()
        for n in range(10):
            span.set_attribute(f"tag.{n}", n)
        return {}

    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    (lean,), (sdk,) = map(server_spans, lean_then_sdk(app, provider, receiver, "/tags"))
    assert comparable(lean) == comparable(sdk)
    # 5 at the start, 10 of the app's, 8 at the end: the newest 16 kept, as the SDK keeps them.
    assert lean.dropped_attributes == 7
    assert sorted(lean.attributes) == sorted(
        [f"tag.{n}" for n in range(2, 10)]
        + [
            "http.response.status_code",
            "http.response.body.size",
            "perfmw.db.queries",
            "perfmw.db.duration_ms",
            "perfmw.cache.hits",
            "perfmw.cache.misses",
            "perfmw.loop.stall_ms",
            "http.route",
        ]
    )


def test_with_a_value_length_limit_the_request_span_is_the_sdks_and_keeps_it(
    receiver: OtlpReceiver, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import trace

    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "8")
    provider = perfmw.configure_tracing("shop", set_global=False)
    app = FastAPI()

    @app.get("/note")
    async def note() -> dict[str, Any]:
        trace.get_current_span().set_attribute("note", "a long note the limit cuts")
        return {}

    perfmw.instrument(app, registry=registry, tracer_provider=provider)
    with serve(app) as server_, httpx.Client(base_url=server_.url) as client:
        assert client.get("/note").status_code == 200
        assert provider.force_flush()
    provider.shutdown()
    (request,) = server_spans(receiver.spans)
    assert request.attributes["note"] == "a long n"
    assert request.attributes["http.route"] == "/note"
