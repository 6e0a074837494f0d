"""The MongoDB source against the embedded MongoDB wire server, through a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from operator import attrgetter
from pathlib import Path
from typing import Any

import bson
import httpx
import pytest
from benchmarks.mongo_listeners import record_events
from bson.raw_bson import RawBSONDocument
from examples.fastapi_app.app import create_app
from examples.fastapi_app.latency import LatencyProxy, port_of
from fastapi import BackgroundTasks, FastAPI
from motor.motor_asyncio import AsyncIOMotorClient
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient, MongoClient, monitoring
from pymongo.errors import OperationFailure, WaitQueueTimeoutError

import perfmw
from perfmw import _guard, explain, mongo
from perfmw._report_advice import advice, ms
from perfmw.detectors.mongo import UNBOUNDED_BYTES
from support import line_of, pool_label, sample, serve, wait_for, waited_and_spent

APP_SOURCE = Path("examples/fastapi_app/app.py")
HERE = Path(__file__).relative_to(Path.cwd()) if Path(__file__).is_absolute() else Path(__file__)


def findings(url: str, kind: str | None = None) -> list[dict[str, Any]]:
    found = httpx.get(url + "/perfmw/findings", timeout=10).json()["findings"]
    return [f for f in found if kind is None or f["kind"] == kind]


@pytest.fixture(scope="module")
def example(mongo_uri: str) -> Iterator[Any]:
    """The example service (seeded once), served by uvicorn with its own registry."""
    app = create_app(
        mongo_uri, settings=perfmw.Settings(server_timing=True), registry=CollectorRegistry()
    )
    with serve(app) as server:
        yield server


@pytest.fixture
def db_name() -> str:
    return "t" + uuid.uuid4().hex[:10]


# N+1


def test_n_plus_one_loop_is_flagged_with_the_line_of_the_loop(example: Any) -> None:
    response = httpx.get(example.url + "/servers-with-agents", timeout=30)
    assert response.status_code == 200
    assert 'desc="21 queries"' in response.headers["server-timing"]
    [found] = [
        f for f in findings(example.url, "n_plus_one") if f["route"] == "/servers-with-agents"
    ]
    assert found["location"] == line_of(APP_SOURCE, 'server["agents"] = await agents.to_list()')
    assert found["detail"] == {
        "collection": "agents",
        "operation": "find",
        "shape": "find registry.agents {server_id: ?} projection=[_id]",
        "repetitions": 20,
    }


def test_n_plus_one_is_counted_per_route_collection_and_operation(example: Any) -> None:
    labels = {
        "http_route": "/servers-with-agents",
        "db_collection_name": "agents",
        "db_operation_name": "find",
    }

    def counted() -> float:
        exposition = httpx.get(example.url + "/metrics", timeout=10).text
        return sample(exposition, "perfmw_n_plus_one_total", **labels) or 0.0

    before = counted()
    assert httpx.get(example.url + "/servers-with-agents", timeout=30).status_code == 200
    assert counted() == before + 1


def test_in_and_lookup_twins_are_not_flagged(example: Any, mongo_uri: str) -> None:
    response = httpx.get(example.url + "/servers-with-agents/batched", timeout=30)
    assert response.status_code == 200
    assert 'desc="2 queries"' in response.headers["server-timing"]
    # (a slow_query may show up on a loaded machine: the claim here is about N+1 and runs)
    batched = [f for f in findings(example.url) if f["route"] == "/servers-with-agents/batched"]
    assert [f for f in batched if f["kind"] != "slow_query"] == []
    # The $lookup version: one aggregate.
    with perfmw.track("lookup") as record, MongoClient(mongo_uri) as client:
        client.registry.servers.aggregate(
            [
                {"$sort": {"_id": 1}},
                {"$limit": 20},
                {
                    "$lookup": {
                        "from": "agents",
                        "localField": "_id",
                        "foreignField": "server_id",
                        "as": "agents",
                    }
                },
            ]
        ).to_list()
    assert record.db_queries == 1
    assert record.queries[0].shape == "aggregate registry.servers [$sort, $limit, $lookup agents]"
    assert [f for f in record.findings if f.kind != "slow_query"] == []


@contextlib.asynccontextmanager
async def clients_for(mongo_uri: str, clients: dict[str, Any], **options: Any) -> Any:
    """AsyncMongoClient, motor and a sync client (given the listeners twice) for an app."""
    clients["async"] = AsyncMongoClient(mongo_uri, **options)
    clients["motor"] = AsyncIOMotorClient(mongo_uri, **options)
    # Created after instrument() and given the listeners too: every event arrives twice.
    clients["sync"] = MongoClient(mongo_uri, event_listeners=perfmw.mongo_listeners(), **options)
    try:
        yield
    finally:
        await clients["async"].close()
        clients["motor"].close()
        clients["sync"].close()


def gather_app(mongo_uri: str, registry: CollectorRegistry) -> FastAPI:
    clients: dict[str, Any] = {}
    app = FastAPI(lifespan=lambda app: clients_for(mongo_uri, clients))

    @app.get("/gather/{driver}")
    async def gathered(driver: str) -> int:
        agents = clients[driver].registry.agents
        found = await asyncio.gather(*(agents.find_one({"server_id": i}) for i in range(20)))
        return len(found)

    @app.get("/motor-loop")
    async def motor_loop() -> int:
        agents = clients["motor"].registry.agents
        for i in range(6):
            await agents.find_one({"server_id": i})
        return 6

    perfmw.instrument(app, registry=registry)
    return app


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_gather_of_20_find_one_is_flagged(
    example: Any, mongo_uri: str, registry: Any, loop: str
) -> None:
    with serve(gather_app(mongo_uri, registry), loop=loop) as server:
        for driver in ("async", "motor"):
            assert httpx.get(f"{server.url}/gather/{driver}", timeout=30).json() == 20
        assert httpx.get(f"{server.url}/motor-loop", timeout=30).json() == 6
        found = findings(server.url, "n_plus_one")
    gather_line = line_of(HERE, "await asyncio.gather(*(agents.find_one(")
    by_site = {(f["route"], f["location"]): (f["count"], f["detail"]["repetitions"]) for f in found}
    assert by_site == {
        ("/gather/{driver}", gather_line): (2, 20),  # two requests (one per driver), one site
        ("/motor-loop", line_of(HERE, 'await agents.find_one({"server_id": i})')): (1, 6),
    }


# A query that only waited behind a loop stall


def stalled_reply_app(mongo_uri: str, registry: CollectorRegistry, **settings: Any) -> FastAPI:
    clients: dict[str, Any] = {}
    app = FastAPI(lifespan=lambda app: clients_for(mongo_uri, clients))

    @app.get("/stalled-reply")
    async def stalled_reply() -> str:
        servers = clients["async"].registry.servers
        await servers.find_one({})  # a pooled connection, ready
        query = asyncio.create_task(servers.find_one({"name": "a"}))
        record = perfmw.current_request()
        assert record is not None
        while len(record.queries) < 2:  # the command is on its way to the server...
            await asyncio.sleep(0)
        time.sleep(0.3)  # ...and the loop blocks before it can read the reply
        await query
        return "done"

    perfmw.instrument(app, settings=perfmw.Settings(**settings), registry=registry)
    return app


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_query_that_waited_behind_a_stall_is_not_a_slow_query(
    mongo_uri: str, registry: Any, loop: str
) -> None:
    with serve(stalled_reply_app(mongo_uri, registry), loop=loop) as server:
        assert httpx.get(f"{server.url}/stalled-reply", timeout=30).json() == "done"
        found = findings(server.url)
    # A full collection of the test process's heap (the suite's size decides it) is a real gc
    # stall of whichever request runs then: not the one this test makes.
    found = [f for f in found if not (f["kind"] == "loop_stall" and f["detail"]["cause"] == "gc")]
    assert [f["kind"] for f in found] == ["loop_stall"]  # the stall, and no slow_query
    assert found[0]["location"] == line_of(HERE, "# ...and the loop blocks before it can read")


def test_a_slow_query_says_how_much_of_it_was_the_stalled_loop(
    mongo_uri: str, registry: Any
) -> None:
    app = stalled_reply_app(mongo_uri, registry, slow_query_seconds=0.0)  # every query is slow
    with serve(app) as server:
        assert httpx.get(f"{server.url}/stalled-reply", timeout=30).json() == "done"
        found = findings(server.url, "slow_query")
    behind = [f for f in found if f["detail"]["shape"] == "find registry.servers {name: ?}"]
    (slow,) = behind
    waited = slow["detail"]["loop_stall_seconds"]
    assert 0.29 <= waited <= slow["detail"]["duration_seconds"]
    assert slow["total_seconds"] == pytest.approx(slow["detail"]["duration_seconds"] - waited)
    assert slow["total_seconds"] < 0.05  # what the server took


# Exact attribution under concurrency


def counting_app(mongo_uri: str, db_name: str, registry: CollectorRegistry) -> FastAPI:
    clients: dict[str, Any] = {}
    app = FastAPI(lifespan=lambda app: clients_for(mongo_uri, clients, maxPoolSize=20))

    @app.get("/async/{n}")
    async def with_async(n: int) -> int:
        items = clients["async"][db_name].items
        for i in range(n):
            await items.find_one({"_id": i})
        return n

    @app.get("/motor/{n}")
    async def with_motor(n: int) -> int:
        items = clients["motor"][db_name].items
        for i in range(n):
            await items.find_one({"_id": i})
        return n

    @app.get("/sync/{n}")
    def with_sync(n: int) -> int:
        items = clients["sync"][db_name].items
        for i in range(n):
            items.find_one({"_id": i})
        return n

    perfmw.instrument(app, settings=perfmw.Settings(server_timing=True), registry=registry)
    return app


def test_300_concurrent_requests_are_counted_exactly(
    mongo_uri: str, db_name: str, registry: Any
) -> None:
    with MongoClient(mongo_uri) as client:
        client[db_name].items.insert_many([{"_id": i} for i in range(10)])
    plan = [(driver, i % 6) for i in range(100) for driver in ("async", "motor", "sync")]

    async def run(url: str) -> list[tuple[str, int, str]]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
            responses = await asyncio.gather(*(http.get(f"/{d}/{n}") for d, n in plan))
        return [(r.url.path, r.json(), r.headers["server-timing"]) for r in responses]

    with serve(counting_app(mongo_uri, db_name, registry)) as server:
        results = asyncio.run(run(server.url))
        exposition = httpx.get(server.url + "/metrics", timeout=10).text
    for (driver, n), (path, answered, timing) in zip(plan, results, strict=True):
        assert (path, answered) == (f"/{driver}/{n}", n)
        noun = "query" if n == 1 else "queries"
        assert f'desc="{n} {noun}"' in timing, (path, timing)
    per_route = sum(n for _d, n in plan if _d == "async")
    for driver in ("async", "motor", "sync"):
        labels = {"http_request_method": "GET", "http_route": f"/{driver}/{{n}}"}
        assert sample(exposition, "perfmw_request_db_queries_sum", **labels) == per_route
        assert sample(exposition, "perfmw_request_db_queries_count", **labels) == 100
    finds = {
        "db_system_name": "mongodb",
        "db_operation_name": "find",
        "db_collection_name": "items",
    }
    assert (
        sample(exposition, "db_client_operation_duration_seconds_count", **finds) == 3 * per_route
    )
    # The same durations reach the per-command histogram and the requests' DB time.
    db_seconds = sum(
        sample(
            exposition,
            "perfmw_request_db_seconds_sum",
            http_request_method="GET",
            http_route=f"/{driver}/{{n}}",
        )
        or 0.0
        for driver in ("async", "motor", "sync")
    )
    command_seconds = sample(exposition, "db_client_operation_duration_seconds_sum", **finds)
    assert db_seconds == pytest.approx(command_seconds, rel=1e-9)
    assert "perfmw_blocking_calls_total{" not in exposition  # threadpool sync calls are fine


# Consecutive queries, unbounded reads, sync client on the loop


def test_sequential_dashboard_reads_are_consecutive_queries(mongo_uri: str) -> None:
    # Each read at least 5 ms (a delayed round trip): two of them are the 5 ms worth reporting
    # whatever the machine does, where reads of the local stand-in took 2 to 9 ms.
    with (
        LatencyProxy("127.0.0.1", port_of(mongo_uri), delay=0.005) as proxy,
        serve(create_app(proxy.uri(mongo_uri), registry=CollectorRegistry())) as example,
    ):
        for path in ("/dashboard", "/dashboard/concurrent"):
            assert httpx.get(example.url + path, timeout=30).status_code == 200
        found = [f for f in findings(example.url, "consecutive_queries")]
    assert [f["route"] for f in found] == ["/dashboard"]
    detail = found[0]["detail"]
    assert detail["collections"] == ["servers", "agents", "incidents"]
    assert [q["shape"] for q in detail["queries"]] == [
        "aggregate registry.servers [$match {status: ?}, $group]",
        "aggregate registry.agents [$match {version: ?}, $group]",
        "aggregate registry.incidents [$match {open: ?}, $group]",
    ]
    durations = [q["duration_seconds"] for q in detail["queries"]]
    assert detail["saving_seconds"] == pytest.approx(sum(durations) - max(durations))
    assert found[0]["location"] == line_of(
        APP_SOURCE, "upgraded = await db().agents.count_documents("
    )


def test_reply_bytes_use_a_documents_size_measured_again_when_it_may_matter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mongo, "_document_bytes", {})
    small, big = {"_id": 1, "name": "x" * 10}, {"_id": 2, "name": "x" * 100_000}
    small_size, big_size = len(bson.encode(small)), len(bson.encode(big))
    shape = "find db.items {}"
    assert mongo._batch_bytes(shape, [small, small]) == 2 * small_size
    # Later batches of the shape are estimated from that size, measured again every 32nd one...
    for _ in range(mongo._REMEASURE):
        assert mongo._batch_bytes(shape, [big, big]) == 2 * small_size
    assert mongo._batch_bytes(shape, [big, big]) == 2 * big_size
    # ...and on a batch whose estimate comes within a quarter of an unbounded read's bytes.
    other = "find db.other {}"
    assert mongo._batch_bytes(other, [small, small]) == 2 * small_size
    many = [big] + [small] * (UNBOUNDED_BYTES // 4 // small_size)
    assert mongo._batch_bytes(other, many) == len(many) * big_size
    raw = RawBSONDocument(bson.encode(big))
    assert mongo._batch_bytes(other, [raw, raw]) == 2 * big_size  # a raw reply has its size


def test_document_sizes_are_kept_for_a_bounded_number_of_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mongo, "_document_bytes", {})
    monkeypatch.setattr(mongo, "_MAX_SIZED_SHAPES", 10)
    for i in range(25):
        mongo._batch_bytes(f"find db.c{i} {{}}", [{"_id": i}, {"_id": i}])
    assert 0 < len(mongo._document_bytes) <= 10


def test_unread_readings_are_kept_for_a_bounded_number_of_call_sites(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each blocking call site keeps its latest reading of the kernel's unread requests: here
    # (a synthetic reading) one request, arrived 4 ms before the 10 ms call ended.
    monkeypatch.setattr(mongo, "_unread_sites", {})
    monkeypatch.setattr(mongo, "_MAX_UNREAD_SITES", 10)
    monkeypatch.setattr(mongo.sockets, "arrivals", lambda now: [now - 0.004])
    for i in range(25):
        waiting, waited = mongo._unread(f"app.py:{i}", 0.01)
        assert (waiting, waited) == (1, pytest.approx(0.004))
    assert 0 < len(mongo._unread_sites) <= 10
    assert "app.py:24" in mongo._unread_sites


def test_driver_kinds_are_kept_for_a_bounded_number_of_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Which driver (sync, async or neither) each file's code is, asked of every command's stack.
    monkeypatch.setattr(mongo, "_driver_files", {})
    monkeypatch.setattr(mongo, "_MAX_DRIVER_FILES", 10)
    for i in range(25):
        code = compile("sys._getframe()", f"/srv/app/generated_{i}.py", "eval")
        frame = eval(code, {"sys": sys})
        assert mongo._from_sync_driver(frame) is False  # the test's frames: no driver's
    assert 0 < len(mongo._driver_files) <= 10
    assert mongo._driver_files["/srv/app/generated_24.py"] == mongo._NEUTRAL


# The same read twice in one request


def duplicate_app(mongo_uri: str, db_name: str, registry: CollectorRegistry) -> FastAPI:
    clients: dict[str, Any] = {}
    app = FastAPI(lifespan=lambda app: clients_for(mongo_uri, clients))

    def users() -> Any:
        return clients["async"][db_name].users

    async def current_user(user_id: int) -> Any:
        return await users().find_one({"_id": user_id})  # the dependency's read

    @app.get("/profile/{user_id}")
    async def profile(user_id: int) -> str:
        user = await current_user(user_id)
        again = await users().find_one({"_id": user_id})  # the handler's read of it again
        return f"{user['name']} {again['name']}"

    @app.get("/profile/{user_id}/once")
    async def profile_once(user_id: int) -> str:
        user = await current_user(user_id)
        return f"{user['name']} {user['name']}"

    @app.get("/pair")
    async def pair() -> list[str]:  # the same shape, other values: no duplicate
        first, second = await current_user(1), await current_user(2)
        return [first["name"], second["name"]]

    @app.get("/rename/{user_id}")
    async def rename(user_id: int) -> str:  # read, write, read: the second read is fresh
        await current_user(user_id)
        await users().update_one({"_id": user_id}, {"$set": {"name": "renamed"}})
        return str((await users().find_one({"_id": user_id}))["name"])

    perfmw.instrument(app, registry=registry)
    return app


def test_the_same_read_twice_is_a_duplicate_read_with_both_lines(
    mongo_uri: str, db_name: str, registry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with MongoClient(mongo_uri) as sync:
        sync[db_name].users.insert_many([{"_id": i, "name": f"u{i}"} for i in (1, 2)])
    first = line_of(HERE, 'return await users().find_one({"_id": user_id})')
    again = line_of(HERE, 'again = await users().find_one({"_id": user_id})')
    with serve(duplicate_app(mongo_uri, db_name, registry)) as server:
        with caplog.at_level(logging.WARNING, logger="perfmw"):
            assert httpx.get(server.url + "/profile/1", timeout=30).json() == "u1 u1"
        [found] = findings(server.url, "duplicate_read")
        # The first read, the first of its shape in the request, was located as it was sent.
        assert (found["location"], found["detail"]["first_location"]) == (again, first)
        assert httpx.get(server.url + "/profile/2", timeout=30).json() == "u2 u2"
        [found] = findings(server.url, "duplicate_read")
        exposition = httpx.get(server.url + "/metrics", timeout=10).text
    assert (found["route"], found["count"], found["location"]) == ("/profile/{user_id}", 2, again)
    assert found["detail"] == {
        "collection": "users",
        "operation": "find",
        "shape": f"find {db_name}.users {{_id: ?}}",
        "repetitions": 2,
        "first_location": first,
    }
    labels = {"kind": "duplicate_read", "http_route": "/profile/{user_id}", "location": again}
    assert sample(exposition, "perfmw_findings_total", **labels) == 2
    logged = [r.getMessage() for r in caplog.records if "duplicate read" in r.getMessage()]
    assert logged == [
        f"perfmw: duplicate read on /profile/{{user_id}}: find on users sent 2 times with the "
        f"same values, again at {again} via pymongo.asynchronous.collection.AsyncCollection."
        f"find_one (first at {first}): read it once and pass it down"
    ]


def test_a_read_done_once_other_values_or_a_read_after_a_write_are_no_duplicates(
    mongo_uri: str, db_name: str, registry: Any
) -> None:
    with MongoClient(mongo_uri) as sync:
        sync[db_name].users.insert_many([{"_id": i, "name": f"u{i}"} for i in (1, 2)])
    with serve(duplicate_app(mongo_uri, db_name, registry)) as server:
        assert httpx.get(server.url + "/profile/1/once", timeout=30).json() == "u1 u1"
        assert httpx.get(server.url + "/pair", timeout=30).json() == ["u1", "u2"]
        assert httpx.get(server.url + "/rename/2", timeout=30).json() == "renamed"
        assert findings(server.url, "duplicate_read") == []


# Reads that depend on each other


def test_a_read_filtering_on_what_the_previous_returned_is_not_consecutive(
    mongo_uri: str, db_name: str, registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from perfmw.detectors.mongo import consecutive_queries

    # Every reply hashed however fast the embedded server answers, and every saving counted:
    # what is tested is which reads depend on which, not how long they took.
    monkeypatch.setattr(mongo, "REPLY_HASH_MIN_SECONDS", 0.0)
    perfmw.Perf(registry=registry)
    mongo.register_listeners()
    with MongoClient(mongo_uri) as client:
        db = client[db_name]
        db.tokens.insert_one({"token": "t-1", "login": "ada"})
        db.accounts.insert_one({"login": "ada", "plan": "pro"})
        db.plans.insert_one({"name": "pro"})
        with perfmw.track("session") as dependent:
            token = db.tokens.find_one({"token": "t-1"})
            assert token is not None
            account = db.accounts.find_one({"login": token["login"]})
            assert account is not None
            db.plans.find_one({"name": account["plan"]})
        with perfmw.track("overview") as independent:
            db.tokens.find_one({"token": "t-1"})
            db.plans.find_one({"name": "pro"})  # nothing the token held: it could run beside
    assert consecutive_queries("session", dependent.queries, min_saving=0.0) == []
    [found] = consecutive_queries("overview", independent.queries, min_saving=0.0)
    assert found.detail["collections"] == ["tokens", "plans"]
    assert found.location == line_of(HERE, 'db.plans.find_one({"name": "pro"})')


def test_export_without_limit_is_an_unbounded_read(example: Any) -> None:
    assert len(httpx.get(example.url + "/agents/export", timeout=30).json()) == 5000
    assert httpx.get(example.url + "/agents?limit=100", timeout=30).status_code == 200
    [found] = findings(example.url, "unbounded_read")
    assert found["route"] == "/agents/export"
    assert found["location"] == line_of(APP_SOURCE, 'await db().agents.find({}, {"_id": 0})')
    assert found["detail"]["documents"] == 5000
    assert found["detail"]["missing"] == ["limit"]
    assert found["detail"]["shape"] == "find registry.agents {} projection=[_id]"


def test_sync_client_in_async_endpoint_is_a_blocking_call(example: Any) -> None:
    assert httpx.get(example.url + "/servers/legacy", timeout=30).status_code == 200
    [found] = findings(example.url, "blocking_call")
    assert found["route"] == "/servers/legacy"
    assert found["location"] == line_of(APP_SOURCE, "return list(cursor.limit(limit))")
    # No other request was in flight: none waited for the loop meanwhile.
    assert found["detail"] == {
        "kind": "pymongo-sync",
        "operation": "find",
        "collection": "servers",
        "requests_waiting": 0,
        "delayed_seconds": 0.0,
    }
    exposition = httpx.get(example.url + "/metrics", timeout=10).text
    assert (
        sample(
            exposition,
            "perfmw_blocking_calls_total",
            http_route="/servers/legacy",
            kind="pymongo-sync",
        )
        == 1
    )


# Missing indexes


def explains_done() -> bool:
    return not explain._pending and explain._jobs.empty()


def test_unindexed_filter_gets_a_missing_index_until_it_is_created(
    mongo_uri: str, db_name: str, registry: Any
) -> None:
    clients: dict[str, Any] = {}
    app = FastAPI(lifespan=lambda app: clients_for(mongo_uri, clients))

    @app.get("/by-owner")
    async def by_owner(owner: str) -> int:
        servers = clients["async"][db_name].servers
        found = await servers.find({"owner": owner}).to_list()
        return len(found)

    settings = perfmw.Settings(explain_slow_queries=True, slow_query_seconds=0.0)
    perfmw.instrument(app, settings=settings, registry=registry)
    with MongoClient(mongo_uri) as sync:
        sync[db_name].servers.insert_many(
            [{"name": f"s{i}", "owner": f"team-{i % 5}"} for i in range(50)]
        )
        with serve(app) as server:
            assert httpx.get(server.url + "/by-owner?owner=team-1", timeout=30).json() == 10
            assert wait_for(explains_done)
            assert httpx.get(server.url + "/by-owner?owner=team-2", timeout=30).json() == 10
            [found] = wait_for(lambda: findings(server.url, "missing_index"))
            assert found["route"] == "/by-owner"
            assert found["location"] == line_of(HERE, 'await servers.find({"owner": owner})')
            assert found["detail"]["collection"] == "servers"
            assert found["detail"]["operation"] == "find"
            assert found["detail"]["index"] == [["owner", 1]]
            assert found["detail"]["stage"] == "COLLSCAN"
            # The scan run once (executionStats): what an index would save of the server's time.
            detail = found["detail"]
            assert (detail["docs_examined"], detail["docs_returned"]) == (50, 10)
            scanned = detail["execution_seconds"]
            advised = advice(found)
            assert advised["saved"] == pytest.approx(
                min(found["total_seconds"], found["count"] * scanned * 0.8)
            )
            assert advised["basis"] == (
                "the scan examined 50 documents to return 10: an index reads only the matching "
                f"ones, saving 80% of the server's {ms(scanned)} per query; the round trip and "
                "the results stay"
            )

            sync[db_name].servers.create_index("owner")
            assert findings(server.url, "missing_index") == []
            for owner in ("team-3", "team-4"):
                assert httpx.get(server.url + f"/by-owner?owner={owner}", timeout=30).json() == 10
                assert wait_for(explains_done)
            assert findings(server.url, "missing_index") == []
            assert findings(server.url, "slow_query")  # still slow (threshold 0), now indexed


def test_writes_and_reads_without_a_filter_get_no_index_advice(
    mongo_uri: str, db_name: str, registry: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from perfmw.__main__ import main

    clients: dict[str, Any] = {}
    app = FastAPI(lifespan=lambda app: clients_for(mongo_uri, clients))

    @app.post("/events")
    async def add_events() -> int:
        events = clients["async"][db_name].events
        await events.insert_one({"kind": "login"})
        await events.insert_one({"kind": "logout"})
        return await events.count_documents({})

    settings = perfmw.Settings(explain_slow_queries=True, slow_query_seconds=0.0)
    perfmw.instrument(app, settings=settings, registry=registry)
    with serve(app) as server:
        for added in (2, 4, 6):  # each shape sent again: explained if it could be
            assert httpx.post(server.url + "/events", timeout=30).json() == added
            assert wait_for(explains_done)
        # Every command is slow at a threshold of 0; none is a collection scan to index.
        assert sorted({f["kind"] for f in findings(server.url)}) == ["slow_query"]
        assert main(["report", "--url", server.url]) == 0
    markdown = capsys.readouterr().out
    indexes = markdown.split("\n## Index Recommendations\n", 1)[1].split("\n## ", 1)[0]
    assert indexes.strip() == (
        "No index to recommend: no collection scan was found. (perfmw looks for them when "
        "`explain_slow_queries` is on.)"
    )
    # Not even explained: an insert, and a count of everything, have nothing an index serves.
    assert [shape for shape in explain._verdicts if f" {db_name}." in shape] == []
    assert explain.state(f"insert {db_name}.events") == explain.NEVER


def test_a_silenced_site_gets_no_missing_index_either(
    mongo_uri: str, db_name: str, registry: Any
) -> None:
    clients: dict[str, Any] = {}
    app = FastAPI(lifespan=lambda app: clients_for(mongo_uri, clients))

    @app.get("/by-team")
    async def by_team(team: str) -> int:
        return len(await clients["async"][db_name].servers.find({"team": team}).to_list())

    settings = perfmw.Settings(
        explain_slow_queries=True, slow_query_seconds=0.0, silenced_locations=(str(HERE),)
    )
    perfmw.instrument(app, settings=settings, registry=registry)
    with MongoClient(mongo_uri) as sync:
        sync[db_name].servers.insert_many([{"team": f"t{i % 3}"} for i in range(30)])
        with serve(app) as server:
            for team in ("t1", "t2", "t0"):
                assert httpx.get(server.url + f"/by-team?team={team}", timeout=30).json() == 10
                assert wait_for(explains_done)
            assert findings(server.url) == []


def test_a_server_that_cannot_explain_is_not_an_internal_error(
    mongo_uri: str, db_name: str, registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(client: Any, database: str, body: Any) -> Any:
        raise OperationFailure("explain is not supported")

    monkeypatch.setattr(explain, "_run_explain", refuse)
    clients: dict[str, Any] = {}
    app = FastAPI(lifespan=lambda app: clients_for(mongo_uri, clients))

    @app.get("/by-colour")
    async def by_colour(colour: str) -> int:
        return len(await clients["async"][db_name].things.find({"colour": colour}).to_list())

    settings = perfmw.Settings(explain_slow_queries=True, slow_query_seconds=0.0)
    perfmw.instrument(app, settings=settings, registry=registry)
    with serve(app) as server:
        assert httpx.get(server.url + "/by-colour?colour=red", timeout=30).json() == 0
        assert wait_for(explains_done)
        assert findings(server.url, "missing_index") == []
    shape = f"find {db_name}.things {{colour: ?}}"
    assert explain._verdicts[shape].stage == "error: explain is not supported"


# Pool


def test_pool_wait_with_one_connection_and_ten_requests(
    example: Any, mongo_uri: str, registry: Any
) -> None:
    # (the example service seeded registry.agents with the 5,000 agents counted here)
    clients: dict[str, Any] = {}
    app = FastAPI(lifespan=lambda app: clients_for(mongo_uri, clients, maxPoolSize=1))

    @app.get("/count")
    async def count() -> int:
        # Counting 5,000 agents holds the only connection for tens of milliseconds.
        return int(await clients["async"].registry.agents.count_documents({}))

    perfmw.instrument(app, registry=registry)

    async def run(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            responses = await asyncio.gather(*(http.get("/count") for _ in range(10)))
        assert {r.json() for r in responses} == {5000}

    with serve(app) as server:
        asyncio.run(run(server.url))
        exposition = httpx.get(server.url + "/metrics", timeout=10).text
    pool = pool_label(mongo_uri)
    assert sample(exposition, "db_client_connection_wait_time_seconds_count", **pool) == 10
    waited, commands = waited_and_spent(exposition, pool)
    # One at a time: the k-th request waits for the k-1 before it (about 45 commands' time).
    assert waited > 2 * commands
    used = sample(
        exposition, "db_client_connection_count", db_client_connection_state="used", **pool
    )
    assert used == 0


class _Checkouts(monitoring.ConnectionPoolListener):
    """Counts checkouts as pymongo reports them, to compare with the histogram."""

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0

    def connection_checked_out(self, event: Any) -> None:
        self.done += 1

    def connection_check_out_failed(self, event: Any) -> None:
        self.failed += 1

    def __getattr__(self, name: str) -> Any:
        return lambda event: None


def test_failed_checkouts_are_waits_too(example: Any, mongo_uri: str, registry: Any) -> None:
    perf = perfmw.Perf(registry=registry)  # (counting the example's 5,000 agents takes a while)
    mongo.register_listeners()
    checkouts = _Checkouts()
    options = {"maxPoolSize": 1, "waitQueueTimeoutMS": 5, "event_listeners": [checkouts]}
    with MongoClient(mongo_uri, **options) as client:
        agents = client.registry.agents
        agents.find_one({})  # the one connection exists

        def hold() -> None:
            for _ in range(10):  # each count holds the only connection for tens of ms
                with contextlib.suppress(WaitQueueTimeoutError):
                    agents.count_documents({})

        holder = threading.Thread(target=hold)
        holder.start()
        while holder.is_alive():
            with contextlib.suppress(WaitQueueTimeoutError):
                agents.find_one({"_id": 0})
            time.sleep(0.002)
        holder.join()
    waits = registry.get_sample_value(
        "db_client_connection_wait_time_seconds_count", pool_label(mongo_uri)
    )
    assert checkouts.failed > 0
    assert waits == checkouts.done + checkouts.failed
    perf.shutdown()


# What counts


def test_housekeeping_is_not_counted_and_getmore_folds_into_its_query(
    mongo_uri: str, db_name: str, registry: Any
) -> None:
    perfmw.Perf(registry=registry)
    with MongoClient(mongo_uri) as client:
        client[db_name].items.insert_many([{"_id": i, "v": "x" * 10} for i in range(50)])
        with perfmw.track("job") as record:
            client.admin.command("ping")
            rows = list(client[db_name].items.find({"v": "x" * 10}).batch_size(10))
    assert len(rows) == 50
    [query] = record.queries
    assert (query.operation, query.collection, query.documents) == ("find", "items", 50)
    assert query.shape == f"find {db_name}.items {{v: ?}}"
    assert query.duration_seconds > 0


def test_a_failed_command_is_still_a_query(mongo_uri: str) -> None:
    mongo.register_listeners()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    with perfmw.track("failing") as record, pytest.raises(OperationFailure):
        client.registry.servers.find_one({"owner": {"$nosuchoperator": 1}})
    client.close()
    [query] = record.queries
    assert (query.failed, query.shape) == (
        True,
        "find registry.servers {owner: {$nosuchoperator: ?}}",
    )


def test_commands_of_background_tasks_count_under_the_route_that_scheduled_them(
    mongo_uri: str, db_name: str, registry: Any
) -> None:
    clients: dict[str, Any] = {}
    app = FastAPI(lifespan=lambda app: clients_for(mongo_uri, clients))

    async def audit() -> None:
        for i in range(6):
            await clients["async"][db_name].audit.find_one({"event": i})  # background loop

    @app.get("/with-audit")
    async def with_audit(tasks: BackgroundTasks) -> int:
        tasks.add_task(audit)
        return 1

    perfmw.instrument(app, settings=perfmw.Settings(server_timing=True), registry=registry)
    background = {"http_request_method": "GET", "http_route": "/with-audit (background)"}
    with serve(app) as server:
        response = httpx.get(server.url + "/with-audit", timeout=30)
        assert 'desc="0 queries"' in response.headers["server-timing"]
        exposition = wait_for(
            lambda: (
                text
                if sample(
                    text := httpx.get(server.url + "/metrics", timeout=10).text,
                    "perfmw_request_db_queries_count",
                    **background,
                )
                else None
            )
        )
        found = findings(server.url, "n_plus_one")
    route = {"http_request_method": "GET", "http_route": "/with-audit"}
    assert sample(exposition, "perfmw_request_db_queries_sum", **route) == 0
    assert sample(exposition, "perfmw_request_db_queries_sum", **background) == 6
    assert sample(exposition, "perfmw_request_db_queries_count", **background) == 1
    assert [(f["route"], f["location"]) for f in found] == [
        ("/with-audit (background)", line_of(HERE, "# background loop"))
    ]
    labels = {
        "http_route": "/with-audit (background)",
        "db_collection_name": "audit",
        "db_operation_name": "find",
    }
    assert sample(exposition, "perfmw_n_plus_one_total", **labels) == 1
    # Not an HTTP request of its own: no request duration under that label.
    assert (
        sample(
            exposition,
            "http_server_request_duration_seconds_count",
            http_response_status_code="200",
            **background,
        )
        is None
    )


def test_each_command_counted_once_with_both_registrations(mongo_uri: str) -> None:
    mongo.register_listeners()
    listeners = perfmw.mongo_listeners()
    with MongoClient(mongo_uri, event_listeners=listeners) as client, perfmw.track("x") as record:
        client.registry.servers.find_one({"_id": 1})
        client.registry.servers.find_one({"_id": 2})
    assert record.db_queries == 2


def test_commands_outside_requests_are_measured(mongo_uri: str, registry: Any) -> None:
    perf = perfmw.Perf(registry=registry)
    mongo.register_listeners()
    with MongoClient(mongo_uri) as client:
        client.registry.incidents.find_one({"severity": 1})
    exposition = registry.get_sample_value(
        "db_client_operation_duration_seconds_count",
        {
            "db_system_name": "mongodb",
            "db_operation_name": "find",
            "db_collection_name": "incidents",
        },
    )
    assert exposition == 1
    perf.shutdown()


# Faults


@pytest.mark.faults
def test_a_failing_listener_never_breaks_the_query(
    example: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("injected")

    before = _guard.error_counts["mongo"]
    monkeypatch.setattr(mongo, "shape_of", broken)
    response = httpx.get(example.url + "/servers/1/uncached", timeout=30)
    assert response.status_code == 200
    assert response.json()["_id"] == 1
    assert _guard.error_counts["mongo"] > before
    exposition = httpx.get(example.url + "/metrics", timeout=10).text
    assert (sample(exposition, "perfmw_internal_errors_total", component="mongo") or 0) > 0


# assert_max_queries


def test_assert_max_queries_with_testclient_lists_shapes_and_locations(
    mongo_uri: str, registry: Any
) -> None:
    app = FastAPI()

    @app.get("/three")
    def three() -> int:
        with MongoClient(mongo_uri) as client:
            for i in range(3):
                client.registry.servers.find_one({"_id": i})
        return 3

    perfmw.instrument(app, registry=registry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette asks for httpx2 for its TestClient
        from starlette.testclient import TestClient
    with TestClient(app) as http:
        with perfmw.testing.assert_max_queries(3):
            assert http.get("/three").json() == 3
        with pytest.raises(AssertionError) as raised, perfmw.testing.assert_max_queries(2):
            http.get("/three")
    location = line_of(HERE, 'client.registry.servers.find_one({"_id": i})')
    assert str(raised.value) == (
        "expected at most 2 MongoDB queries, 3 were sent:\n"
        + "\n".join(f"  {i}. find registry.servers {{_id: ?}}  at {location}" for i in (1, 2, 3))
    )


def test_assert_max_queries_async(mongo_uri: str, registry: Any) -> None:
    app = FastAPI()
    clients: dict[str, Any] = {}

    @app.get("/two")
    async def two() -> int:
        await clients["async"].registry.servers.find_one({"_id": 1})
        await clients["async"].registry.agents.find_one({"server_id": 1})
        return 2

    perfmw.instrument(app, registry=registry)

    async def run() -> None:
        clients["async"] = AsyncMongoClient(mongo_uri)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            async with perfmw.testing.assert_max_queries(2) as seen:
                assert (await http.get("/two")).json() == 2
            assert [q.collection for q in seen.queries] == ["servers", "agents"]
            with contextlib.suppress(AssertionError):
                async with perfmw.testing.assert_max_queries(1):
                    await http.get("/two")
                raise RuntimeError("assert_max_queries(1) did not fail")
        await clients["async"].close()

    asyncio.run(run())


def test_location_format_is_path_and_line() -> None:
    assert re.fullmatch(r".+\.py:\d+", line_of(APP_SOURCE, "def create_app("))


def test_the_listener_reads_events_from_their_slots_and_gets_what_the_properties_give(
    mongo_uri: str,
) -> None:
    # The listener reads pymongo's private slots for speed; a pymongo that renames them must be
    # noticed here (perfmw then falls back to the properties, slower but right).
    pairs = record_events(mongo_uri)  # find_one, find and count_documents, as sent
    started, succeeded = zip(*pairs, strict=True)
    assert mongo._SLOTTED
    readers = (
        (started, attrgetter(*mongo._STARTED_SLOTS), mongo._STARTED_FIELDS),
        (succeeded, attrgetter(*mongo._SUCCEEDED_SLOTS), mongo._SUCCEEDED_FIELDS),
    )
    for events, read, properties in readers:
        assert {e.command_name for e in events} == {"find", "aggregate"}
        for event in events:
            assert read(event) == tuple(getattr(event, name) for name in properties)
