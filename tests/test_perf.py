"""instrument(), the Perf handle, track(): wiring an app, and records outside HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest

import perfmw
from support import request_count, serve


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    return app


def requests_counted(registry: CollectorRegistry, route: str = "/ping") -> float | None:
    return request_count(generate_latest(registry).decode(), route)


def test_instrument_is_idempotent_per_app(registry: CollectorRegistry) -> None:
    app = make_app()
    first = perfmw.instrument(app, registry=registry)
    assert perfmw.instrument(app, registry=registry) is first
    with serve(app) as server:
        httpx.get(server.url + "/ping")
    assert requests_counted(registry) == 1  # measured once, not once per instrument() call


def test_rebuilt_apps_share_a_registry_without_duplicated_timeseries(
    registry: CollectorRegistry,
) -> None:
    apps = [make_app() for _ in range(3)]
    for app in apps:
        perfmw.instrument(app, registry=registry)  # must not raise "Duplicated timeseries"
    for app in apps:
        with serve(app) as server:
            httpx.get(server.url + "/ping")
    assert requests_counted(registry) == 3


def test_each_app_measures_into_its_own_registry() -> None:
    first, second = make_app(), make_app()
    first_registry, second_registry = CollectorRegistry(), CollectorRegistry()
    perfmw.instrument(first, registry=first_registry)
    perfmw.instrument(second, registry=second_registry)
    with serve(first) as one, serve(second) as two:
        for _ in range(2):
            httpx.get(one.url + "/ping")
        for _ in range(5):
            httpx.get(two.url + "/ping")
        # each app's /metrics serves its own registry
        assert request_count(httpx.get(two.url + "/metrics").text, "/ping") == 5
    assert requests_counted(first_registry) == 2
    assert requests_counted(second_registry) == 5


def test_instrument_rejects_what_it_cannot_wrap() -> None:
    async def bare_asgi(scope: object, receive: object, send: object) -> None:
        return None

    with pytest.raises(ValueError, match="PerfMiddleware"):
        perfmw.instrument(bare_asgi)
    with pytest.raises(ValueError, match="registry"):
        perfmw.instrument(make_app(), registry="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Settings"):
        perfmw.instrument(make_app(), settings={"trace": False})  # type: ignore[arg-type]


def test_perf_middleware_wraps_any_asgi_app(registry: CollectorRegistry) -> None:
    async def plain(scope: dict[str, object], receive: object, send: object) -> None:
        assert scope["type"] in ("http", "lifespan")
        if scope["type"] == "lifespan":
            return
        record = perfmw.current_request()
        assert record is not None and record.path == "/anything"
        await send({"type": "http.response.start", "status": 204, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    app = perfmw.PerfMiddleware(plain, registry=registry)
    with serve(app, lifespan="off") as server:
        assert httpx.get(server.url + "/anything").status_code == 204
        metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200
    # no router: no template to name, so the request is grouped, never labelled by raw path
    assert request_count(metrics.text, "<unmatched>", "204") == 1


def test_track_opens_a_record_outside_http(registry: CollectorRegistry) -> None:
    perf = perfmw.Perf(registry=registry)
    try:
        assert perfmw.current_request() is None
        with perfmw.track("nightly-job") as record:
            assert perfmw.current_request() is record
            assert record.route == "nightly-job"
            time.sleep(0.02)
        assert perfmw.current_request() is None
        assert record.closed
        assert record.duration_seconds is not None and record.duration_seconds >= 0.02
    finally:
        perf.shutdown()


def test_track_works_in_async_code_and_nests(registry: CollectorRegistry) -> None:
    perf = perfmw.Perf(registry=registry)

    async def job() -> None:
        async with perfmw.track("refresh-cache") as outer:
            assert perfmw.current_request() is outer
            async with perfmw.track("refresh-cache.page") as inner:
                assert perfmw.current_request() is inner
                await asyncio.sleep(0)
            assert perfmw.current_request() is outer

    try:
        asyncio.run(job())
        assert perfmw.current_request() is None
    finally:
        perf.shutdown()


def test_track_needs_a_name() -> None:
    with pytest.raises(ValueError, match="name"):
        perfmw.track("")


def test_records_of_perfmws_own_endpoints_count_their_stalls_and_make_no_finding(
    registry: CollectorRegistry,
) -> None:
    from perfmw.record import RequestRecord, Stall

    perf = perfmw.Perf(
        perfmw.Settings(metrics_path="/m", findings_path="/f", dashboard_path="/d"),
        registry=registry,
    )
    assert perf.own_routes == {"/m", "/f", "/d", "/d/data.json"}
    for route in [*sorted(perf.own_routes), "/app"]:
        # "background": a stall settled once its endpoint had answered gets a record of its own.
        record = RequestRecord(route, "", "", "background", perf)
        record.stalls.append(Stall(0.256, "bin/uvicorn:8", cause="gc"))
        perf.finish(record)
    perf.shutdown()
    assert [(f.kind, f.route) for f in perf.findings.snapshot()] == [("loop_stall", "/app")]
    exposition = generate_latest(registry).decode()
    for route in ("/m", "/f", "/d", "/d/data.json", "/app"):
        line = f'perfmw_event_loop_stalls_total{{cause="gc",http_route="{route}"}} 1.0'
        assert line in exposition
