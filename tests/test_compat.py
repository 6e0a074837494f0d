"""The MongoDB source on the installed pymongo, the oldest supported (4.4) as well as the newest,
and the tracing beside the installed OpenTelemetry instrumentations.

`make compat` runs this file in .venv-oldest too, so it uses only what pymongo 4.4 and motor 3.2
have: MongoClient and motor, no AsyncMongoClient (tests/test_mongo.py covers that one).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pymongo
import pytest
from fastapi import FastAPI
from motor.motor_asyncio import AsyncIOMotorClient
from prometheus_client import CollectorRegistry
from pymongo import MongoClient, monitoring

import perfmw
from perfmw import explain, mongo
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
