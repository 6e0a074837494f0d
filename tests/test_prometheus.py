"""The Prometheus sink: queued request observations are bounded and never lost."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import perfmw
from perfmw.exporters import prometheus
from perfmw.exporters.prometheus import sink_for
from support import request_count, sample


def instrumented_app(registry: CollectorRegistry) -> Starlette:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/a", ok), Route("/b", ok)])
    perfmw.instrument(app, settings=perfmw.Settings(trace=False), registry=registry)
    return app


async def get(app: Any, path: str) -> None:
    """One request through the ASGI app, in process."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    await app(scope, receive, send)


def requests_counted(registry: CollectorRegistry, route: str) -> float | None:
    return request_count(generate_latest(registry).decode(), route)


def test_the_queue_of_observations_stays_bounded_and_a_scrape_sees_them_all(
    registry: CollectorRegistry,
) -> None:
    app = instrumented_app(registry)
    sink = sink_for(registry)
    total = 10 * prometheus.FOLD_BATCH + 7

    async def drive() -> None:
        for _ in range(total):
            await get(app, "/a")
            assert len(sink.requests) < prometheus.FOLD_BATCH

    asyncio.run(drive())
    assert len(sink.requests) == 7
    assert requests_counted(registry, "/a") == total
    assert len(sink.requests) == 0


def test_observations_from_many_threads_during_scrapes_are_exact(
    registry: CollectorRegistry,
) -> None:
    app = instrumented_app(registry)
    done = threading.Event()

    def scrape_until_done() -> None:
        while not done.is_set():
            generate_latest(registry)

    async def requests() -> None:
        for _ in range(2_000):
            await get(app, "/b")

    scraper = threading.Thread(target=scrape_until_done)
    scraper.start()
    workers = [threading.Thread(target=asyncio.run, args=(requests(),)) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    scraper.join()
    text = generate_latest(registry).decode()
    assert requests_counted(registry, "/b") == 16_000
    assert (
        sample(
            text,
            "perfmw_request_db_queries_bucket",
            http_request_method="GET",
            http_route="/b",
            le="0.0",
        )
        == 16_000
    )
    assert (
        sample(
            text,
            "http_server_response_body_size_bytes_sum",
            http_request_method="GET",
            http_route="/b",
        )
        == 2 * 16_000
    )
