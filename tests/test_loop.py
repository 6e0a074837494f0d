"""The loop monitor against real blocking code in a real uvicorn server (asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import dataclasses
import gc
import http.client
import inspect
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import perfmw
from perfmw import loop as loop_monitor
from perfmw import perf as perf_module
from perfmw._frames import format_location
from perfmw.loop import monitor as monitor_module
from perfmw.loop.monitor import HEARTBEAT_SECONDS
from perfmw.record import BACKGROUND, MACHINE_CAUSES, RequestRecord
from support import label_values, line_of, sample, samples, serve, serve_script

LOOPS = ["asyncio", "uvloop"]
measured: dict[str, float] = {}  # what the endpoints measured themselves


def spin(seconds: float) -> int:
    """A CPU-bound loop: `seconds` of this thread's CPU time, however long the kernel makes it."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        n += 1
    return n


SPIN_LINES = {
    format_location(__file__, inspect.getsourcelines(spin)[1] + i)
    for i in range(len(inspect.getsourcelines(spin)[0]))
}


async def sleepy(request: Request) -> Response:
    seconds = int(request.path_params["ms"]) / 1000
    started = time.perf_counter()
    time.sleep(seconds)  # blocks the loop
    measured[request.url.path] = time.perf_counter() - started
    return PlainTextResponse("slept")


async def cpu(request: Request) -> Response:
    started = time.thread_time()
    spin(0.3)
    measured["/cpu"] = time.thread_time() - started
    return PlainTextResponse("computed")


async def wait(request: Request) -> Response:
    state = request.app.state
    state.in_flight += 1
    await asyncio.sleep(float(request.query_params.get("s", "0.5")))
    return PlainTextResponse("waited")


async def queued(request: Request) -> Response:
    state = request.app.state
    state.in_flight += 1
    await state.gate.wait()  # every waiter wakes in the same turn of the loop
    time.sleep(0.15)  # blocks once the gate opens
    return PlainTextResponse("slept")


async def hold(request: Request) -> Response:
    state = request.app.state
    state.held.set()
    state.sent.wait(10)  # blocks the loop until the other request is in its socket
    time.sleep(0.2)
    return PlainTextResponse("held")


async def open_gate(request: Request) -> Response:
    request.app.state.gate.set()
    return PlainTextResponse("opened")


async def in_flight(request: Request) -> Response:
    return JSONResponse(request.app.state.in_flight)


async def collect(request: Request) -> Response:
    started = time.thread_time()
    gc.collect()  # a full collection over the large graph
    measured["/gc"] = time.thread_time() - started  # its CPU time
    return PlainTextResponse("collected")


def late_blocker() -> None:
    time.sleep(0.2)  # blocks after the response


async def after_response(request: Request) -> Response:
    loop = asyncio.get_running_loop()
    if request.query_params.get("context") == "none":
        loop.call_later(0.05, late_blocker, context=contextvars.Context())
    else:
        loop.call_later(0.05, late_blocker)  # inherits the finished request's context
    return PlainTextResponse("scheduled")


def tiny() -> None:
    end = time.thread_time() + 0.00002
    while time.thread_time() < end:
        pass


async def flood(request: Request) -> Response:
    loop = asyncio.get_running_loop()
    for _ in range(15_000):
        loop.call_soon(tiny)
    return PlainTextResponse("flooded")


async def churn(request: Request) -> Response:
    async def tiny_task(i: int) -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return i

    n = int(request.query_params.get("n", "200"))
    done = await asyncio.gather(*(tiny_task(i) for i in range(n)))
    return PlainTextResponse(str(len(done)))


class Capture:
    """Keeps each request's record (the test looks at it once perfmw has finished it)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        record = perfmw.current_request()
        if record is not None and captured is not None:
            captured.append(record)
        await self.app(scope, receive, send)


captured: list[RequestRecord] | None = None


class Passthrough(BaseHTTPMiddleware):
    """Runs the endpoint in a child task (anyio task group)."""

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        return response


def make_app(base_http_middleware: bool = False, **settings: Any) -> tuple[Starlette, perfmw.Perf]:
    app = Starlette(
        routes=[
            Route("/sleep/{ms}", sleepy),
            Route("/cpu", cpu),
            Route("/wait", wait),
            Route("/in-flight", in_flight),
            Route("/queued", queued),
            Route("/open", open_gate),
            Route("/hold", hold),
            Route("/gc", collect),
            Route("/after-response", after_response),
            Route("/flood", flood),
            Route("/churn", churn),
        ],
        middleware=[Middleware(Capture)]
        + ([Middleware(Passthrough)] if base_http_middleware else []),
    )
    app.state.in_flight = 0
    app.state.gate = asyncio.Event()  # bound to the loop at its first wait (Python 3.10+)
    app.state.held, app.state.sent = threading.Event(), threading.Event()
    perf = perfmw.instrument(
        app, settings=perfmw.Settings(**settings), registry=CollectorRegistry()
    )
    return app, perf


@pytest.fixture
def finished() -> Iterator[list[RequestRecord]]:
    """The records of the requests served while the test runs, and of stalls outside them."""
    global captured
    records: list[RequestRecord] = []

    def hook(perf: perfmw.Perf, record: RequestRecord) -> None:
        if record.kind != "http":
            records.append(record)

    captured = records
    perf_module._finish_hooks.append(hook)
    yield records
    perf_module._finish_hooks.remove(hook)
    captured = None


def settle(records: list[RequestRecord], route: str, n: int = 1) -> list[RequestRecord]:
    """The records of `route`, once `n` of them have finished."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [r for r in records if r.route == route and r.closed]
        if len(found) >= n:
            return found
        time.sleep(0.01)
    raise AssertionError(f"{n} records of {route} did not finish: {records}")


def stalls_of(records: list[RequestRecord]) -> list[tuple[str, str, str | None]]:
    """The code's stalls (a loaded machine may add `starved` ones, on <background>)."""
    return [
        (r.route, s.cause, s.location)
        for r in records
        for s in r.stalls
        if s.cause not in MACHINE_CAUSES
    ]


def described(records: list[RequestRecord]) -> str:
    """Every stall with what was measured of it: a failure's message, whole."""
    return "\n".join(
        f"{r.route} {s.cause} {s.location} "
        + str(
            {
                k: round(v, 4) if isinstance(v, float) else v
                for k, v in dataclasses.asdict(s.signals).items()
                if k != "busy"
            }
            if s.signals
            else None
        )
        for r in records
        for s in r.stalls
    )


def machine_stalls_are_background(records: list[RequestRecord]) -> None:
    for record in records:
        for stall in record.stalls:
            if stall.cause in MACHINE_CAUSES:
                assert record.route == BACKGROUND, (record, stall)
                assert stall.signals is not None
                assert stall.signals.own < 0.1, stall.signals  # its own part was no stall


@pytest.mark.parametrize("loop", LOOPS)
def test_sleep_in_an_endpoint_is_reported_with_its_length_route_and_line(
    loop: str, finished: list[RequestRecord]
) -> None:
    app, perf = make_app()
    with serve(app, loop=loop) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/in-flight").status_code == 200  # monitor started, loop warm
        time.sleep(0.1)
        for ms in (150, 300, 1000):
            finished.clear()
            assert client.get(f"/sleep/{ms}").text == "slept"
            (record,) = settle(finished, "/sleep/{ms}")
            time.sleep(0.05)  # the next beat
            true = measured[f"/sleep/{ms}"]
            assert stalls_of(finished) == [
                ("/sleep/{ms}", "blocking", line_of(__file__, "# blocks the loop"))
            ]
            (stall,) = record.stalls
            # The stall holds the sleep, its start known within half a beat; beyond the sleep
            # only the time the kernel or another thread kept the loop thread from running.
            assert stall.signals is not None
            assert stall.duration_seconds >= true - HEARTBEAT_SECONDS / 2 - 0.001
            extra = stall.duration_seconds - true
            assert extra <= 0.02 + stall.signals.kept_off, (ms, stall, true)
            assert stall.signals.cpu < 0.02  # asleep: off the CPU
            assert stall.stack[-1].startswith(line_of(__file__, "# blocks the loop") + " in sleepy")
        metrics = client.get("/metrics").text
    perf.shutdown()
    route = {"http_route": "/sleep/{ms}"}
    assert sample(metrics, "perfmw_event_loop_stalls_total", **route, cause="blocking") == 3
    assert sample(metrics, "perfmw_event_loop_stall_seconds_count") == 3
    assert sample(metrics, "perfmw_event_loop_stall_seconds_bucket", le="0.25") == 1
    assert sample(metrics, "perfmw_event_loop_stall_seconds_bucket", le="0.5") == 2
    (finding,) = [f for f in perf.findings.snapshot() if f.kind == "loop_stall"]
    assert (finding.route, finding.location, finding.count) == (
        "/sleep/{ms}",
        line_of(__file__, "# blocks the loop"),
        3,
    )
    assert finding.detail["cause"] == "blocking"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_cpu_bound_loop_is_cause_cpu_located_in_its_function(
    loop: str, finished: list[RequestRecord]
) -> None:
    app, perf = make_app()
    with serve(app, loop=loop) as server, httpx.Client(base_url=server.url) as client:
        client.get("/in-flight")
        time.sleep(0.1)
        finished.clear()
        assert client.get("/cpu").text == "computed"
        (record,) = settle(finished, "/cpu")
        time.sleep(0.05)
    perf.shutdown()
    (stall,) = record.stalls
    assert stall.cause == "cpu"
    assert stall.location in SPIN_LINES
    # The kernel's count of the loop thread's CPU agrees with the handler's own clock.
    assert stall.signals is not None
    assert stall.signals.cpu >= measured["/cpu"] - HEARTBEAT_SECONDS / 2, (stall.signals, measured)
    assert stall.duration_seconds >= measured["/cpu"] - HEARTBEAT_SECONDS / 2
    assert stalls_of(finished) == [("/cpu", "cpu", stall.location)]


def fire_while_in_flight(url: str, n: int, blocking_path: str) -> None:
    """`n` requests to /wait in flight at once, then one blocking request among them."""

    async def run() -> None:
        limits = httpx.Limits(max_connections=n + 5)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            waiting = [asyncio.create_task(client.get("/wait?s=1.0")) for _ in range(n)]
            deadline = time.monotonic() + 10
            while (await client.get("/in-flight")).json() < n:
                assert time.monotonic() < deadline, "requests did not get in flight"
                await asyncio.sleep(0.01)
            assert (await client.get(blocking_path)).status_code == 200
            for response in await asyncio.gather(*waiting):
                assert response.text == "waited"

    asyncio.run(run())


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """The test process's heap (hundreds of tests' objects) moved out of the collector's reach:
    a full collection of it can take over the stall threshold and is a real `gc` stall of
    whichever request is running, which is not what the test is about."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("frozen_heap")
@pytest.mark.parametrize("base_http_middleware", [False, True], ids=["direct", "child-task"])
@pytest.mark.parametrize("loop", LOOPS)
def test_only_the_blocking_request_among_50_in_flight_gets_the_stall(
    loop: str, base_http_middleware: bool, finished: list[RequestRecord]
) -> None:
    app, perf = make_app(base_http_middleware)
    with serve(app, loop=loop) as server:
        fire_while_in_flight(server.url, 50, "/sleep/300")
        settle(finished, "/wait", 50)
        settle(finished, "/sleep/{ms}")
        time.sleep(0.05)
        metrics = httpx.get(server.url + "/metrics").text
    perf.shutdown()
    assert stalls_of(finished) == [
        ("/sleep/{ms}", "blocking", line_of(__file__, "# blocks the loop"))
    ], described(finished)
    assert [r.stalls for r in finished if r.route == "/wait"] == [[]] * 50
    machine_stalls_are_background(finished)
    assert (
        sample(
            metrics, "perfmw_event_loop_stalls_total", http_route="/sleep/{ms}", cause="blocking"
        )
        == 1
    )
    assert sample(metrics, "perfmw_event_loop_stall_seconds_count") == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_requests_blocking_the_loop_back_to_back_are_a_stall_each(
    loop: str, finished: list[RequestRecord]
) -> None:
    # Four requests wake in the same turn of the loop and block it one after the other: the
    # loop never answers the monitor between them, and each request still gets its own stall.
    app, perf = make_app()

    async def run(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            waiting = [asyncio.create_task(client.get("/queued")) for _ in range(4)]
            deadline = time.monotonic() + 10
            while (await client.get("/in-flight")).json() < 4:
                assert time.monotonic() < deadline, "requests did not get in flight"
                await asyncio.sleep(0.01)
            assert (await client.get("/open")).text == "opened"
            assert [r.text for r in await asyncio.gather(*waiting)] == ["slept"] * 4

    with serve(app, loop=loop) as server:
        asyncio.run(run(server.url))
        settle(finished, "/queued", 4)
        time.sleep(0.05)  # the next beat
        metrics = httpx.get(server.url + "/metrics").text
    perf.shutdown()
    line = line_of(__file__, "# blocks once the gate opens")
    parts = sorted(
        (s for r in finished for s in r.stalls if s.location == line), key=lambda s: s.started_at
    )
    assert len(parts) == 4, described(finished)
    # A loaded machine may keep the loop thread off its CPU in a part: that part is the
    # machine's then (on <background>), and still a part of its own.
    machine = [s for s in parts if s.cause in MACHINE_CAUSES]
    code = 4 - len(machine)
    assert stalls_of(finished) == [("/queued", "blocking", line)] * code, described(finished)
    for stall in parts:
        assert stall.signals is not None
        assert stall.duration_seconds >= 0.15 - HEARTBEAT_SECONDS / 2 - 0.001
        assert stall.duration_seconds <= 0.17 + stall.signals.kept_off, described(finished)
    # Each waited for the ones before it: 3 requests waited for the first stall, none for the last.
    assert [s.requests_waiting for s in parts] == [3, 2, 1, 0]
    route = {"http_route": "/queued"}
    assert sample(metrics, "perfmw_event_loop_stalls_total", **route, cause="blocking") == code


@pytest.mark.parametrize("loop", LOOPS)
def test_requests_sent_or_read_while_the_loop_is_blocked_are_counted_with_their_wait(
    loop: str, finished: list[RequestRecord]
) -> None:
    # Three requests sent while /hold blocks the loop wait unread in their connections, where
    # no middleware sees them, each at least the 0.2 s the loop stays blocked after. The loop
    # then reads all three in one turn and runs them one after the other: each blocking
    # request's stall is waited for by those read but not started yet.
    app, perf = make_app()
    with serve(app, loop=loop) as server:
        others = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in "abc"]
        for other in others:
            other.request("GET", "/in-flight")  # accepted while the loop is free, kept alive
            assert other.getresponse().read() == b"0"
        blocking = threading.Thread(target=httpx.get, args=(server.url + "/hold",))
        blocking.start()
        try:
            assert app.state.held.wait(10)
            for other in others:
                other.request("GET", "/sleep/300")  # sent while the loop is blocked
        finally:
            app.state.sent.set()
            blocking.join(30)
        assert [other.getresponse().read() for other in others] == [b"slept"] * 3
        for other in others:
            other.close()
        settle(finished, "/sleep/{ms}", 3)
        time.sleep(0.05)  # the next beat
    perf.shutdown()
    stalls = sorted((s for r in finished for s in r.stalls), key=lambda s: s.started_at)
    assert len(stalls) == 4, described(finished)
    held, *sleeps = stalls
    assert held.requests_waiting == 3, described(finished)
    assert 3 * (0.2 - 0.01) <= held.delayed_seconds <= 3 * held.duration_seconds
    assert [s.requests_waiting for s in sleeps] == [2, 1, 0], described(finished)
    assert [round(s.delayed_seconds / s.duration_seconds, 9) for s in sleeps] == [2, 1, 0]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_forced_full_collection_is_a_stall_caused_by_gc(
    loop: str, finished: list[RequestRecord]
) -> None:
    graph: list[Any] = []
    while True:  # a graph whose full collection computes well over the threshold
        graph.extend([{}, {}, {}, {}] for _ in range(500_000))
        started = time.thread_time()
        gc.collect()
        if time.thread_time() - started > 0.2:
            break
    app, perf = make_app()
    try:
        with serve(app, loop=loop) as server, httpx.Client(base_url=server.url) as client:
            client.get("/in-flight")
            time.sleep(0.1)
            finished.clear()
            assert client.get("/gc").text == "collected"
            (record,) = settle(finished, "/gc")
            deadline = time.monotonic() + 2  # pauses are handed to the sinks by the watchdog
            while True:
                metrics = client.get("/metrics").text
                if sample(metrics, "perfmw_gc_pause_seconds_count", generation="2"):
                    break
                assert time.monotonic() < deadline, "no generation 2 pause exported"
                time.sleep(0.05)
    finally:
        del graph
        perf.shutdown()
    assert [(r.route, len(r.stalls)) for r in finished] == [("/gc", 1)]
    (stall,) = record.stalls
    assert (stall.cause, stall.location) == ("gc", line_of(__file__, "# a full collection"))
    # The collection's time on the CPU, as the handler's own clock measured it.
    assert abs(stall.gc_seconds - measured["/gc"]) <= 0.005 + 0.05 * measured["/gc"]
    assert stall.duration_seconds >= measured["/gc"] - HEARTBEAT_SECONDS / 2
    assert stalls_of(finished) == [("/gc", "gc", stall.location)]
    assert sample(metrics, "perfmw_event_loop_stalls_total", http_route="/gc", cause="gc") == 1
    collections = sample(metrics, "perfmw_gc_pause_seconds_count", generation="2")
    assert collections is not None and collections >= 1
    (finding,) = [f for f in perf.findings.snapshot() if f.kind == "loop_stall"]
    assert finding.detail["cause"] == "gc"
    assert finding.detail["gc_seconds"] == pytest.approx(stall.gc_seconds, abs=1e-6)


@pytest.mark.parametrize("loop", LOOPS)
def test_stalls_after_the_response_or_outside_requests_get_their_own_record(
    loop: str, finished: list[RequestRecord]
) -> None:
    # A plain callback's context cannot be read from another thread under uvloop: there a
    # stall in a callback the finished request scheduled goes to <background>, as one outside
    # any request does. Under asyncio it keeps the request's route.
    route = "/after-response" if loop == "asyncio" else BACKGROUND
    app, perf = make_app()
    with serve(app, loop=loop) as server, httpx.Client(base_url=server.url) as client:
        client.get("/after-response")
        settle(finished, route, 2 if route == "/after-response" else 1)
        client.get("/after-response?context=none")
        settle(finished, BACKGROUND, 1 if route == "/after-response" else 2)
        metrics = client.get("/metrics").text
    perf.shutdown()
    blocker = line_of(__file__, "# blocks after the response")
    assert stalls_of(finished) == [(route, "blocking", blocker), (BACKGROUND, "blocking", blocker)]
    assert [r.kind for r in finished if r.stalls] == ["background", "background"]
    assert [r.stalls for r in finished if r.kind == "http"] == [[], []]
    stalls = {
        dict(labels)["http_route"]: value
        for (name, labels), value in samples(metrics).items()
        if name == "perfmw_event_loop_stalls_total"
    }
    assert stalls == ({route: 1, BACKGROUND: 1} if route != BACKGROUND else {BACKGROUND: 2})
    # A background record feeds the stall metrics, never the HTTP ones.
    requests = sample(
        metrics,
        "http_server_request_duration_seconds_count",
        http_request_method="GET",
        http_route="/after-response",
        http_response_status_code="200",
    )
    assert requests == 2


class SlowScrape:
    """A collector that blocks the loop while it is read, when armed (as a long collection
    during a scrape does)."""

    def __init__(self) -> None:
        self.armed = False

    def collect(self) -> list[Any]:
        if self.armed:
            self.armed = False
            time.sleep(0.3)  # blocks the scrape
        return []


@pytest.mark.parametrize("path", ["/metrics", "/perfmw/data.json"])
def test_a_stall_in_perfmws_own_endpoint_is_counted_on_its_path_and_never_a_finding(
    path: str, finished: list[RequestRecord], caplog: pytest.LogCaptureFixture
) -> None:
    app, perf = make_app()
    scrape = SlowScrape()
    perf.registry.register(scrape)  # type: ignore[arg-type]
    with (
        caplog.at_level(logging.WARNING, logger="perfmw"),
        serve(app) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        client.get("/in-flight")
        time.sleep(0.1)
        scrape.armed = True
        assert client.get(path).status_code == 200
        settle(finished, path)
        time.sleep(0.05)
        metrics = client.get("/metrics").text
        findings = client.get("/perfmw/findings").json()["findings"]
    perf.shutdown()
    assert stalls_of(finished) == [(path, "blocking", line_of(__file__, "# blocks the scrape"))]
    assert sample(metrics, "perfmw_event_loop_stalls_total", http_route=path, cause="blocking") == 1
    assert findings == []
    assert perf.findings.snapshot() == []
    assert [r.getMessage() for r in caplog.records] == []  # nothing said about the app
    # perfmw's endpoints are still not measured as requests.
    assert label_values(metrics, "http_server_request_duration_seconds_count", "http_route") == {
        "/in-flight"
    }


def test_many_small_callbacks_are_saturation_blamed_on_no_request(
    finished: list[RequestRecord],
) -> None:
    app, perf = make_app()
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        client.get("/in-flight")
        time.sleep(0.1)
        client.get("/flood")
        settle(finished, BACKGROUND)
        time.sleep(0.05)
    perf.shutdown()
    assert [(route, cause) for route, cause, _ in stalls_of(finished)] == [
        (BACKGROUND, "saturation")
    ]
    machine_stalls_are_background(finished)


def test_a_thread_holding_the_gil_stalls_the_loop_and_is_named(
    finished: list[RequestRecord],
) -> None:
    app, perf = make_app()
    switch_interval = sys.getswitchinterval()
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        client.get("/in-flight")
        time.sleep(0.1)
        finished.clear()
        sys.setswitchinterval(0.3)  # the hog keeps the GIL 300 ms at a time
        try:
            hog = threading.Thread(target=spin, args=(1.0,), name="gil-hog")
            hog.start()
            hog.join()
        finally:
            sys.setswitchinterval(switch_interval)
        time.sleep(0.1)
    perf.shutdown()
    stalls = [(r.route, s.cause, s.signals) for r in finished for s in r.stalls]
    assert stalls, "the stall was not seen"
    # The loop thread waited for the GIL while a thread of its own process held it: the code's
    # doing, never the machine's, blamed on no request since the loop ran none. Where the
    # process's clock shows the hog's computing, the cause is `cpu`, the hog's (the clock can
    # lag a running thread's time: then the GIL counts as the loop thread's own, `blocking`).
    # A loaded machine may add stalls of its own (`starved`, their own part no stall), and may
    # keep the hog itself off the CPUs while it holds the GIL: then the stall is the machine's.
    machine_stalls_are_background(finished)
    code = [(route, cause, s) for route, cause, s in stalls if cause not in MACHINE_CAUSES]
    # The code's part is what the machine did not add; the threads did most of a `cpu` one.
    computed = [s for _, _, s in stalls if s is not None and s.threads >= 0.5 * s.duration]
    assert all(s.by_threads >= 0.5 * s.duration for s in computed), stalls
    assert {route for route, *_ in code} <= {BACKGROUND}, stalls
    assert {cause for _, cause, _ in code} <= {"cpu", "blocking"}, stalls
    by_threads = [s for _, cause, s in code if cause == "cpu"]
    assert all(
        s is not None and s.by_threads >= 0.5 * (s.duration - s.by_machine) for s in by_threads
    ), described(finished)


libc_holding_the_gil = ctypes.PyDLL(None)  # its calls keep the GIL held


async def c_sleep(request: Request) -> Response:
    libc_holding_the_gil.usleep(300_000)  # C code that blocks holding the GIL
    return PlainTextResponse("slept")


def test_c_code_that_blocks_holding_the_gil_is_blocking_not_starved(
    finished: list[RequestRecord],
) -> None:
    # The watchdog waits for the GIL the whole stall, as it would behind another thread; but
    # no other thread computed: the loop thread held it itself, by its code's doing.
    app = Starlette(routes=[Route("/c-sleep", c_sleep)], middleware=[Middleware(Capture)])
    perf = perfmw.instrument(app, registry=CollectorRegistry())
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        client.get("/metrics")
        time.sleep(0.1)
        finished.clear()
        for _ in range(3):
            assert client.get("/c-sleep").text == "slept"
        settle(finished, "/c-sleep", 3)
        time.sleep(0.1)
    perf.shutdown()
    stalls = [(s.cause, s.signals) for r in finished for s in r.stalls]
    # One each; those the watchdog could not sample go to <background>, with the same cause.
    assert [cause for cause, _ in stalls] == ["blocking"] * 3, stalls


def test_a_stall_is_logged_once_per_location(
    finished: list[RequestRecord], caplog: pytest.LogCaptureFixture
) -> None:
    app = Starlette(routes=[Route("/log-me/{ms}", sleepy)], middleware=[Middleware(Capture)])
    perf = perfmw.instrument(app, registry=CollectorRegistry())
    with caplog.at_level(logging.WARNING, logger="perfmw"):
        with serve(app) as server, httpx.Client(base_url=server.url) as client:
            for _ in range(3):
                client.get("/log-me/150")
            served = settle(finished, "/log-me/{ms}", 3)
        perf.shutdown()
    logged = [r.getMessage() for r in caplog.records if "event loop stalled" in r.getMessage()]
    assert len(logged) == 1
    assert "(blocking) on /log-me/{ms} at " + line_of(__file__, "# blocks the loop") in logged[0]
    assert line_of(__file__, "# blocks the loop") + " in sleepy" in logged[0]  # the stack
    # One stall each (a loaded machine may add `starved` ones of its own, on <background>).
    assert [len(r.stalls) for r in served] == [1, 1, 1]


def test_lag_gauge_is_exported_and_small_when_healthy() -> None:
    app, perf = make_app()
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        client.get("/in-flight")
        time.sleep(0.2)
        metrics = client.get("/metrics").text
    perf.shutdown()
    lag = sample(metrics, "perfmw_event_loop_lag_seconds")
    # The latest beat's lateness (exact values: test_loop_monitor.py); a stall would be >= 0.1.
    assert lag is not None and 0 <= lag < 0.1


def wait_for_watchdogs(n: int) -> None:
    deadline = time.monotonic() + 3
    while loop_monitor.running_watchdogs() != n:
        assert time.monotonic() < deadline, loop_monitor.running_watchdogs()
        time.sleep(0.01)


def test_one_monitor_per_loop_stopped_by_shutdown_or_loop_close() -> None:
    baseline = loop_monitor.running_watchdogs()
    first, second = (
        perfmw.Perf(registry=CollectorRegistry()),
        perfmw.Perf(registry=CollectorRegistry()),
    )

    async def both() -> None:
        first.on_loop()
        second.on_loop()
        loop = asyncio.get_running_loop()
        monitor = loop_monitor.monitor_for(loop)
        assert monitor is not None and monitor.perfs == [first, second]
        assert loop_monitor.running_watchdogs() == baseline + 1
        first.shutdown()
        assert loop_monitor.monitor_for(loop) is monitor  # the second app still uses it
        second.shutdown()
        assert loop_monitor.monitor_for(loop) is None
        wait_for_watchdogs(baseline)
        third = perfmw.Perf(registry=CollectorRegistry())
        third.on_loop()  # not shut down: stops when the loop closes
        assert loop_monitor.running_watchdogs() == baseline + 1

    asyncio.run(both())
    wait_for_watchdogs(baseline)


def test_several_loops_in_several_threads_each_get_their_monitor(
    finished: list[RequestRecord],
) -> None:
    baseline = loop_monitor.running_watchdogs()
    apps = [make_app() for _ in range(3)]
    servers = [
        serve(app, loop=loop)
        for (app, _), loop in zip(apps, ["asyncio", "uvloop", "asyncio"], strict=True)
    ]
    urls = [s.__enter__().url for s in servers]
    try:
        for url in urls:
            assert httpx.get(url + "/in-flight").status_code == 200
        assert loop_monitor.running_watchdogs() == baseline + 3
        assert httpx.get(urls[1] + "/sleep/200").text == "slept"
        settle(finished, "/sleep/{ms}")
        time.sleep(0.05)
        scraped = [httpx.get(url + "/metrics").text for url in urls]
    finally:
        for s in servers:
            s.__exit__(None, None, None)
    wait_for_watchdogs(baseline)  # no leak once the loops closed
    stalls = [
        sample(text, "perfmw_event_loop_stalls_total", http_route="/sleep/{ms}", cause="blocking")
        for text in scraped
    ]
    assert stalls == [None, 1, None]
    for _, perf in apps:
        perf.shutdown()


def test_an_app_served_again_on_a_new_loop_is_monitored_again(
    finished: list[RequestRecord],
) -> None:
    app, perf = make_app()
    baseline = loop_monitor.running_watchdogs()
    for loop in LOOPS:
        # The previous loop's watchdog notices within a threshold that its loop closed.
        wait_for_watchdogs(baseline)
        finished.clear()
        with serve(app, loop=loop) as server, httpx.Client(base_url=server.url) as client:
            client.get("/in-flight")
            client.get("/sleep/150")
            settle(finished, "/sleep/{ms}")
        assert [len(r.stalls) for r in finished if r.route == "/sleep/{ms}"] == [1]
    perf.shutdown()


# --- Stalls inside library code: located at the application's line that called it ---


@contextlib.contextmanager
def blocking_libraries() -> Iterator[dict[str, Any]]:
    """A route per library, each blocking the loop inside it for over 0.2 s, with the cause and
    the `via` it is reported with."""
    import json as json_module
    import subprocess as subprocess_module
    import warnings

    import argon2.low_level
    import bcrypt
    from pymongo import MongoClient

    with warnings.catch_warnings():  # passlib imports the deprecated `crypt` module
        warnings.simplefilter("ignore", DeprecationWarning)
        from passlib.context import CryptContext

    passwords = CryptContext(schemes=["pbkdf2_sha256"], pbkdf2_sha256__rounds=1_200_000)
    salt = bcrypt.gensalt(rounds=13)
    # Indented: json's Python encoder, whose bytecode lets the watchdog take the GIL and sample
    # inside json.dumps (the C encoder holds it until it returns, when the stack has moved on).
    big = [{"id": i, "name": "x" * 20, "tags": ["a", "b"]} for i in range(80_000)]
    unreachable = MongoClient("mongodb://127.0.0.1:9", serverSelectionTimeoutMS=300, connect=False)

    async def argon2_route(request: Request) -> Response:
        argon2.low_level.hash_secret(  # argon2 on the loop
            b"pw", b"somesalt1234", 3, 131072, 4, 32, argon2.low_level.Type.ID
        )
        return PlainTextResponse("hashed")

    async def bcrypt_route(request: Request) -> Response:
        bcrypt.hashpw(b"pw", salt)  # bcrypt on the loop
        return PlainTextResponse("hashed")

    async def passlib_route(request: Request) -> Response:
        passwords.hash("pw")  # passlib on the loop
        return PlainTextResponse("hashed")

    async def json_route(request: Request) -> Response:
        body = json_module.dumps(big, indent=1)  # json.dumps of a huge object on the loop
        return PlainTextResponse(str(len(body)))

    async def subprocess_route(request: Request) -> Response:
        subprocess_module.run(["sleep", "0.3"], check=True)  # subprocess on the loop
        return PlainTextResponse("ran")

    async def pymongo_route(request: Request) -> Response:
        with contextlib.suppress(Exception):
            unreachable.db.servers.find_one({})  # sync pymongo on the loop
        return PlainTextResponse("gave up")

    yield {
        "argon2": (argon2_route, "blocking", "argon2.low_level.hash_secret"),
        "bcrypt": (bcrypt_route, "cpu", None),  # a Rust function: no Python frame below
        "passlib": (passlib_route, "cpu", "passlib.context.CryptContext.hash"),
        "json": (json_route, "cpu", "json.dumps"),
        "subprocess": (subprocess_route, "blocking", "subprocess.run"),
        "pymongo": (pymongo_route, "blocking", f"{SYNC_COLLECTION}.find_one"),
    }
    unreachable.close()


SYNC_COLLECTION = "pymongo.synchronous.collection.Collection"
MARKERS = {
    "argon2": "# argon2 on the loop",
    "bcrypt": "# bcrypt on the loop",
    "passlib": "# passlib on the loop",
    "json": "# json.dumps of a huge object on the loop",
    "subprocess": "# subprocess on the loop",
    "pymongo": "# sync pymongo on the loop",
}


def test_a_stall_inside_a_library_is_located_at_the_application_line_that_called_it(
    finished: list[RequestRecord],
) -> None:
    with blocking_libraries() as libraries:
        located, seen = stalls_in_libraries(libraries, finished)
    expected = {
        name: (line_of(__file__, MARKERS[name]), cause, via)
        for name, (_, cause, via) in libraries.items()
    }
    assert seen == expected
    assert located == {f"/lib/{name}": site for name, site in expected.items()}


def stalls_in_libraries(libraries: dict[str, Any], finished: list[RequestRecord]) -> Any:
    """Each library route once: its stall's (location, cause, via), and its finding's."""
    app = Starlette(
        routes=[Route(f"/lib/{name}", route) for name, (route, _, _) in libraries.items()],
        middleware=[Middleware(Capture)],
    )
    perf = perfmw.instrument(app, registry=CollectorRegistry())
    seen: dict[str, tuple[str | None, str, str | None]] = {}
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        client.get("/metrics")
        for name in libraries:
            finished.clear()
            assert client.get(f"/lib/{name}").status_code == 200
            (record,) = settle(finished, f"/lib/{name}")
            time.sleep(0.05)
            stalls = [s for s in record.stalls if s.cause not in MACHINE_CAUSES]
            assert len(stalls) == 1, (name, record.stalls, [(r.route, r.stalls) for r in finished])
            (stall,) = stalls
            seen[name] = (stall.location, stall.cause, stall.via)
            assert not any(line.startswith(os.sep) for line in stall.stack), stall.stack
        findings = httpx.get(server.url + "/perfmw/findings").json()["findings"]
    perf.shutdown()
    located = {
        f["route"]: (f["location"], f["detail"]["cause"], f["via"])
        for f in findings
        if f["kind"] == "loop_stall"
    }
    return located, seen


# --- Load without a stall of the code's; a cgroup's quota that throttles the loop ---

ASYNC_APP = """
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

import perfmw
from test_loop import churn, wait  # the endpoints of the in-process tests

app = Starlette(routes=[Route("/churn", churn), Route("/wait", wait)])
app.state.in_flight = 0
perfmw.instrument(app)
uvicorn.run(app, fd=int(sys.argv[1]), log_level="warning")
"""

LOAD_SECONDS = 60.0


# The load generator runs in its own process, as real clients do: in the server's process it
# would compete for the GIL and be part of what it measures.
LOAD_CLIENT = """
import asyncio, json, sys, time
import httpx

async def get(client, path, counts):
    # A kept-alive connection the server closes as it is reused is a client's to retry.
    for attempt in range(5):
        try:
            return (await client.get(path)).text
        except httpx.TransportError:
            counts["retried"] += 1
            if attempt == 4:
                raise

async def worker(client, end, n, counts):
    while time.monotonic() < end:
        text = await get(client, f"/churn?n={n}", counts)
        assert text == str(n), text
        counts["tasks"] += n
        assert await get(client, "/wait?s=0.005", counts) == "waited"
        counts["requests"] += 2

async def main(url, seconds, concurrency, n):
    counts = {"requests": 0, "tasks": 0, "retried": 0}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        end = time.monotonic() + seconds
        await asyncio.gather(*(worker(client, end, n, counts) for _ in range(concurrency)))
    print(json.dumps(counts))

asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""


def load(url: str, seconds: float, concurrency: int = 20, tasks: int = 200) -> dict[str, int]:
    client = subprocess.run(
        [sys.executable, "-c", LOAD_CLIENT, url, str(seconds), str(concurrency), str(tasks)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    assert client.returncode == 0, client.stderr[-3000:]
    counts: dict[str, int] = json.loads(client.stdout)
    return counts


def stall_counts(metrics: str) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["http_route"], dict(labels)["cause"]): value
        for (name, labels), value in samples(metrics).items()
        if name == "perfmw_event_loop_stalls_total"
    }


def test_a_minute_of_heavy_purely_async_load_reports_no_stall_of_the_code(
    tmp_path: Path,
) -> None:
    """Thousands of tiny tasks and many concurrent requests: the loop is busy, never stalled.

    On a loaded machine the kernel may keep the loop thread off the CPU now and then: those
    stalls are counted as the machine's, on <background>, and never become findings.
    """
    with serve_script(ASYNC_APP, tmp_path) as url:
        counts = load(url, LOAD_SECONDS)
        metrics = httpx.get(url + "/metrics").text
        findings = httpx.get(url + "/perfmw/findings").json()["findings"]
    assert counts["tasks"] >= 100_000, counts
    assert [f for f in findings if f["kind"] == "loop_stall"] == []
    assert sample(metrics, "perfmw_event_loop_stall_seconds_count") == 0
    machine = {(BACKGROUND, cause) for cause in MACHINE_CAUSES}
    assert set(stall_counts(metrics)) <= machine, stall_counts(metrics)


@contextlib.contextmanager
def cpu_quota(quota: float, period: float) -> Iterator[str]:
    """A child of this process's CPU cgroup allowed `quota` seconds of CPU per `period`."""
    from perfmw.loop.kernel import CgroupCpu

    paths = CgroupCpu.discover().paths
    if not paths:
        pytest.skip("this kernel exposes no CPU cgroup (cpu.stat) to the process")
    group = os.path.join(os.path.dirname(paths[0]), f"perfmw-test-{os.getpid()}")
    try:
        os.mkdir(group)
        if os.path.exists(os.path.join(group, "cpu.max")):  # cgroup v2
            with open(os.path.join(group, "cpu.max"), "w") as limit:
                limit.write(f"{round(quota * 1e6)} {round(period * 1e6)}")
        else:
            with open(os.path.join(group, "cpu.cfs_period_us"), "w") as limit:
                limit.write(str(round(period * 1e6)))
            with open(os.path.join(group, "cpu.cfs_quota_us"), "w") as limit:
                limit.write(str(round(quota * 1e6)))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.rmdir(group)
        pytest.skip(
            f"cannot make a CPU cgroup here (needs root on cgroup v1, or delegation): {exc}"
        )
    try:
        yield group
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(group)
                break
            except OSError:  # its processes are still exiting
                assert time.monotonic() < deadline, f"{group} could not be removed"
                time.sleep(0.05)


def test_a_loop_kept_off_by_the_cgroup_quota_is_throttled_and_no_finding(
    tmp_path: Path,
) -> None:
    # 50 ms of CPU every 500 ms, which a busy process in the same cgroup uses up at once: the
    # service's loop then waits for the next period, 450 ms at a time.
    with cpu_quota(0.05, 0.5) as group, serve_script(ASYNC_APP, tmp_path, cgroup=group) as url:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            with open(os.path.join(group, "cgroup.procs"), "w") as procs:
                procs.write(str(hog.pid))
            counts = load(url, 3.0, concurrency=2, tasks=10)
        finally:
            hog.kill()
            hog.wait()
        metrics = httpx.get(url + "/metrics", timeout=30).text
        findings = httpx.get(url + "/perfmw/findings", timeout=30).json()["findings"]
    assert counts["requests"] > 0
    stalls = stall_counts(metrics)
    assert stalls.get((BACKGROUND, "throttled"), 0) >= 1, stalls
    assert set(stalls) <= {(BACKGROUND, cause) for cause in MACHINE_CAUSES}, stalls
    assert sample(metrics, "perfmw_event_loop_stall_seconds_count") == 0
    assert [f for f in findings if f["kind"] == "loop_stall"] == []


# --- Multithreaded C code on the loop: the process's own threads took the CPUs ---


async def argon2_parallel(request: Request) -> Response:
    import argon2.low_level

    process, thread = time.process_time(), time.thread_time()
    # 6 passes over 64 MiB in 4 lanes: well over the 100 ms threshold (3 passes once took 99 ms
    # in a full run on 2 CPUs, and the request had no stall).
    argon2.low_level.hash_secret_raw(  # multithreaded argon2 on the loop
        b"pw", b"somesalt1234", 6, 65536, 4, 32, argon2.low_level.Type.ID
    )
    measured["/argon2-workers"] = (time.process_time() - process) - (time.thread_time() - thread)
    return PlainTextResponse("hashed")


def test_multithreaded_argon2_on_the_loop_is_the_codes_stall_on_its_route(
    finished: list[RequestRecord],
) -> None:
    """argon2 with 4 lanes: the loop thread waits for its own C worker threads, which compute.

    Its stalls are the code's (a finding on the route, at the line that hashed, via argon2),
    with the workers' CPU in the evidence, however busy the machine is.
    """
    app = Starlette(routes=[Route("/hash", argon2_parallel)], middleware=[Middleware(Capture)])
    perf = perfmw.instrument(app, registry=CollectorRegistry())
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        client.get("/metrics")
        time.sleep(0.1)
        for _ in range(3):
            finished.clear()
            assert client.get("/hash").text == "hashed"
            (record,) = settle(finished, "/hash")
            time.sleep(0.05)
            (stall,) = [s for s in record.stalls if s.cause not in MACHINE_CAUSES]
            assert (stall.cause, stall.location, stall.via) == (
                "blocking",
                line_of(__file__, "# multithreaded argon2 on the loop"),
                "argon2.low_level.hash_secret_raw",
            )
            # The workers' CPU (ended threads: counted by the process's clock, unnamed).
            assert stall.signals is not None
            assert stall.signals.threads >= 0.5 * measured["/argon2-workers"], stall.signals
            assert monitor_module.UNNAMED in [t.name for t in stall.signals.busy]
        findings = client.get("/perfmw/findings").json()["findings"]
    perf.shutdown()
    (finding,) = [f for f in findings if f["kind"] == "loop_stall"]
    assert (finding["route"], finding["count"], finding["detail"]["cause"]) == (
        "/hash",
        3,
        "blocking",
    )
    assert finding["via"] == "argon2.low_level.hash_secret_raw"
    assert finding["detail"]["threads_seconds"] > 0
