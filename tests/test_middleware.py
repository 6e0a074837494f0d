"""PerfMiddleware through a real uvicorn server: routes, durations, bodies, failures."""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
import threading
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route

import perfmw
from perfmw import _guard
from perfmw.record import RequestRecord
from support import hammer, label_values, request_count, sample, serve


def scrape(client: httpx.Client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.text


def test_counts_per_route_template_and_unmatched(registry: CollectorRegistry) -> None:
    app = FastAPI()

    @app.get("/servers/{server_id}")
    async def get_server(server_id: int) -> dict[str, int]:
        return {"id": server_id}

    @app.post("/servers")
    async def create_server() -> dict[str, str]:
        return {"ok": "yes"}

    perfmw.instrument(app, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for i in range(7):
            assert client.get(f"/servers/{i}").status_code == 200
        for _ in range(3):
            assert client.post("/servers").status_code == 200
        for i in range(4):
            assert client.get(f"/wp-admin/{i}.php").status_code == 404
        assert client.get("/servers/not-a-number").status_code == 422
        text = scrape(client)

    assert request_count(text, "/servers/{server_id}") == 7
    assert request_count(text, "/servers", method="POST") == 3
    assert request_count(text, "<unmatched>", "404") == 4
    assert request_count(text, "/servers/{server_id}", "422") == 1
    assert label_values(text, "http_server_request_duration_seconds_count", "http_route") == {
        "/servers/{server_id}",
        "/servers",
        "<unmatched>",
    }
    # /metrics itself is excluded from what is measured
    assert request_count(text, "/metrics") is None
    body_count = sample(
        text,
        "perfmw_request_db_queries_count",
        http_request_method="GET",
        http_route="/servers/{server_id}",
    )
    assert body_count == 8
    assert sample(text, "http_server_active_requests", http_request_method="GET") == 0


def test_excluded_paths_exclude_what_lies_below_them(registry: CollectorRegistry) -> None:
    app = FastAPI()

    @app.get("/{path:path}")
    async def anything(path: str) -> dict[str, str]:
        return {"path": path}

    settings = perfmw.Settings(exclude_paths=("/static", "/health/", "/metrics"))
    perfmw.instrument(app, settings=settings, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for path in ("/static", "/static/", "/static/css/app.css", "/health", "/health/live"):
            assert client.get(path).json() == {"path": path.removeprefix("/")}
        for path in ("/statics", "/healthy", "/api/static/x"):  # not below an excluded path
            assert client.get(path).status_code == 200
        text = scrape(client)

    assert request_count(text, "/{path:path}") == 3
    assert label_values(text, "http_server_request_duration_seconds_count", "http_route") == {
        "/{path:path}"
    }


def test_ten_thousand_raw_paths_stay_within_max_routes(registry: CollectorRegistry) -> None:
    async def endpoint(request: Any) -> PlainTextResponse:
        return PlainTextResponse("x")

    routes = [Route(f"/t{i}/{{item}}", endpoint) for i in range(150)]
    app = Starlette(routes=routes)
    perfmw.instrument(app, settings=perfmw.Settings(max_routes=100), registry=registry)

    paths = [
        f"/t{i // 2 % 150}/{i}" if i % 2 else f"/scan/{i}/{random.random()}" for i in range(10_000)
    ]
    with serve(app) as server:
        statuses = hammer(server.port, paths)
        text = httpx.get(server.url + "/metrics").text
    assert sorted(statuses) == [200] * 5_000 + [404] * 5_000

    routes_seen = label_values(text, "http_server_request_duration_seconds_count", "http_route")
    assert len(routes_seen) == 100 + 2
    assert {"<other>", "<unmatched>"} <= routes_seen
    total = sum(
        request_count(text, route, "200" if route != "<unmatched>" else "404") or 0.0
        for route in routes_seen
    )
    assert total == 10_000


def test_concurrent_requests_keep_their_own_records(registry: CollectorRegistry) -> None:
    app = FastAPI()
    records: dict[str, tuple[RequestRecord, float]] = {}

    @app.get("/fast/{key}")
    @app.get("/slow/{key}")
    async def sleeper(key: str, delay: float) -> dict[str, str]:
        record = perfmw.current_request()
        assert record is not None
        await asyncio.sleep(delay)
        records[key] = (record, delay)
        return {"key": key}

    perfmw.instrument(app, registry=registry)
    delays = {f"k{i}": random.uniform(0.0, 0.3) for i in range(200)}

    async def drive(url: str) -> None:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            responses = await asyncio.gather(
                *(
                    client.get(f"/{'slow' if i % 2 else 'fast'}/{key}", params={"delay": delay})
                    for i, (key, delay) in enumerate(delays.items())
                )
            )
        assert all(response.status_code == 200 for response in responses)

    with serve(app) as server:
        asyncio.run(drive(server.url))

    assert len({id(record) for record, _ in records.values()}) == 200
    overheads = []
    for i, key in enumerate(delays):
        record, delay = records[key]
        assert record.path == f"/{'slow' if i % 2 else 'fast'}/{key}"
        assert record.route == ("/slow/{key}" if i % 2 else "/fast/{key}")
        assert record.status_code == 200
        assert record.duration_seconds is not None
        assert delay <= record.duration_seconds  # never a shorter neighbour's
        overheads.append(record.duration_seconds - delay)
    # Nor longer neighbours': the typical request took its own sleep and not much more (the
    # loop queues the 200 wake-ups, by 0.14 s at the median on the oldest Starlette, and a
    # loaded machine may hold up a few by far more).
    assert statistics.median(overheads) < 0.25, sorted(overheads)


def test_streaming_passes_chunk_by_chunk_and_counts_bytes(registry: CollectorRegistry) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    first_chunk_seen = threading.Event()
    records: list[RequestRecord] = []

    async def stream() -> Any:
        yield chunk
        # If perfmw buffered the body, the client would never see the first chunk and this
        # would time out.
        for _ in range(500):
            if first_chunk_seen.is_set():
                break
            await asyncio.sleep(0.01)
        assert first_chunk_seen.is_set(), "the first chunk was held back"
        for _ in range(9):
            yield chunk

    app = FastAPI()

    @app.get("/download")
    async def download() -> StreamingResponse:
        record = perfmw.current_request()
        assert record is not None
        records.append(record)
        return StreamingResponse(stream(), media_type="application/octet-stream")

    perfmw.instrument(app, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        received = bytearray()
        with client.stream("GET", "/download") as response:
            for part in response.iter_bytes():
                received += part
                first_chunk_seen.set()
        text = scrape(client)

    assert bytes(received) == chunk * 10
    assert records[0].response_bytes == 10 * len(chunk) == 10_485_760
    assert (
        sample(
            text,
            "http_server_response_body_size_bytes_sum",
            http_request_method="GET",
            http_route="/download",
        )
        == 10_485_760
    )


def test_websocket_and_lifespan_pass_through(registry: CollectorRegistry) -> None:
    events: list[str] = []

    async def startup() -> None:
        events.append("startup")

    app = FastAPI(on_startup=[startup], on_shutdown=[lambda: events.append("shutdown")])

    @app.websocket("/echo")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        assert perfmw.current_request() is None  # only HTTP requests get a record
        while True:
            message = await websocket.receive_text()
            if message == "bye":
                await websocket.close()
                return
            await websocket.send_text(message.upper())

    perfmw.instrument(app, registry=registry)
    with serve(app) as server:
        ws_url = server.url.replace("http://", "ws://") + "/echo"
        replies = asyncio.run(_websocket_echo(ws_url, ["hello", "perf"]))
        assert replies == ["HELLO", "PERF"]
        assert events == ["startup"]
    assert events == ["startup", "shutdown"]


async def _websocket_echo(url: str, messages: list[str]) -> list[str]:
    from websockets.asyncio.client import connect

    replies = []
    async with connect(url) as websocket:
        for message in messages:
            await websocket.send(message)
            replies.append(str(await websocket.recv()))
        await websocket.send("bye")
    return replies


class Boom(Exception):
    pass


def test_app_exception_reaches_the_caller_unchanged(registry: CollectorRegistry) -> None:
    raised = Boom("the app's own error")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise raised

    wrapped = perfmw.PerfMiddleware(app, registry=registry)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "root_path": ""}
    with pytest.raises(Boom) as caught:
        asyncio.run(wrapped(scope, receive, send))
    assert caught.value is raised
    assert sent == []
    assert request_count(_exposition(registry), "<unmatched>", "500") == 1


def test_unhandled_exception_is_a_500_through_uvicorn(registry: CollectorRegistry) -> None:
    app = FastAPI()

    @app.get("/explode/{n}")
    async def explode(n: int) -> None:
        raise Boom(n)

    perfmw.instrument(app, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/explode/1").status_code == 500
        # uvicorn closes the connection after an unhandled error: scrape on a new one
        assert request_count(httpx.get(server.url + "/metrics").text, "/explode/{n}", "500") == 1


def test_background_tasks_are_not_part_of_the_duration(registry: CollectorRegistry) -> None:
    done = threading.Event()
    records: list[RequestRecord] = []

    async def after() -> None:
        assert perfmw.current_request() is None  # the request is over
        await asyncio.sleep(0.5)
        done.set()

    app = FastAPI()

    @app.get("/signup")
    async def signup() -> JSONResponse:
        record = perfmw.current_request()
        assert record is not None
        records.append(record)
        return JSONResponse({"ok": True}, background=BackgroundTask(after))

    perfmw.instrument(app, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/signup").status_code == 200
        assert done.wait(5)
    duration = records[0].duration_seconds
    assert duration is not None and duration < 0.25


def test_client_disconnect_mid_stream_is_recorded(registry: CollectorRegistry) -> None:
    records: list[RequestRecord] = []
    finished = threading.Event()

    async def endless() -> Any:
        try:
            while True:
                yield b"x" * 65536
                await asyncio.sleep(0.01)
        finally:
            finished.set()

    app = FastAPI()

    @app.get("/feed")
    async def feed() -> StreamingResponse:
        record = perfmw.current_request()
        assert record is not None
        records.append(record)
        return StreamingResponse(endless())

    perfmw.instrument(app, registry=registry)
    with serve(app) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /feed HTTP/1.1\r\nHost: test\r\n\r\n")
            assert sock.recv(65536)
        assert finished.wait(5)
        deadline = time.monotonic() + 5
        while not records[0].closed and time.monotonic() < deadline:
            time.sleep(0.01)
        record = records[0]
        assert record.closed
        assert record.disconnected
        assert record.status_code == 200
        assert record.response_bytes > 0
        # the server is unaffected
        assert httpx.get(server.url + "/metrics").status_code == 200


def test_mounted_apps_and_preflight_use_templates(registry: CollectorRegistry) -> None:
    api = FastAPI()

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    app = Starlette(routes=[Mount("/files", routes=[]), Mount("/api/v1", app=api)])
    app.add_middleware(CORSMiddleware, allow_origins=["https://example.com"], allow_methods=["GET"])
    perfmw.instrument(app, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/api/v1/items/3").status_code == 200
        preflight = client.options(
            "/api/v1/items/4",
            headers={
                "Origin": "https://example.com",
                "Access-Control-Request-Method": "GET",
            },
        )
        assert preflight.status_code == 200
        # a preflight is answered by the CORS middleware before routing: still its template
        assert client.options("/api/v1/nowhere", headers=preflight.request.headers).status_code
        text = scrape(client)
    assert request_count(text, "/api/v1/items/{item_id}") == 1
    assert request_count(text, "/api/v1/items/{item_id}", method="OPTIONS") == 1
    assert request_count(text, "<unmatched>", method="OPTIONS") == 1


def test_unknown_methods_are_grouped(registry: CollectorRegistry) -> None:
    app = FastAPI()
    perfmw.instrument(app, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for method in ("FOO", "BAR", "PROPFIND"):
            client.request(method, "/x")
        text = scrape(client)
    assert label_values(
        text, "http_server_request_duration_seconds_count", "http_request_method"
    ) == {"_OTHER"}


def test_server_timing_keeps_the_apps_own_header(registry: CollectorRegistry) -> None:
    app = FastAPI()

    @app.get("/timed")
    async def timed() -> JSONResponse:
        return JSONResponse({}, headers={"Server-Timing": "render;dur=1.5"})

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        return {}

    perfmw.instrument(app, settings=perfmw.Settings(server_timing=True), registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        timed_header = client.get("/timed").headers["server-timing"]
        plain_header = client.get("/plain").headers["server-timing"]
    assert timed_header.startswith('render;dur=1.5, db;dur=0.0;desc="0 queries", ')
    parts = plain_header.split(", ")
    assert parts[0] == 'db;dur=0.0;desc="0 queries"'
    assert parts[1] == 'cache;desc="0 hit 0 miss"'
    assert parts[2].startswith("app;dur=")
    assert float(parts[2].removeprefix("app;dur=")) >= 0


def test_server_timing_is_off_by_default(registry: CollectorRegistry) -> None:
    app = FastAPI()

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        return {}

    perfmw.instrument(app, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert "server-timing" not in client.get("/plain").headers


@pytest.mark.faults
def test_a_failing_sink_never_changes_the_response(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"status": "fine"}

    perf = perfmw.instrument(app, settings=perfmw.Settings(server_timing=True), registry=registry)

    def broken(*args: Any) -> None:
        raise RuntimeError("sink down")

    class BrokenQueue:
        append = staticmethod(broken)

        def __len__(self) -> int:
            return 0

    monkeypatch.setattr(perf.sink, "requests", BrokenQueue())
    monkeypatch.setattr("perfmw.middleware.server_timing_value", broken)
    before = _guard.error_counts["finish"], _guard.error_counts["middleware"]
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            response = client.get("/ok")
            assert response.status_code == 200
            assert response.json() == {"status": "fine"}
            assert "server-timing" not in response.headers
        text = scrape(client)
    assert _guard.error_counts["finish"] - before[0] == 3
    assert _guard.error_counts["middleware"] - before[1] == 3
    assert (sample(text, "perfmw_internal_errors_total", component="finish") or 0) >= 3


def _exposition(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()
