"""`make demo`: the service registry under a bounded load, its performance report, then its
live dashboard until Ctrl-C.

    python -m examples.fastapi_app.demo          # embedded MongoDB; MONGODB_URI for a real one
    python -m examples.fastapi_app.demo --once   # exit after the report (CI)

Starts the example app on uvicorn (127.0.0.1, a free port), the embedded MongoDB behind a
latency proxy (1.5 ms a command; a MONGODB_URI is used as it is), sends the same number of
requests to every endpoint (each anti-pattern and its fixed twin) with a progress bar, prints
each fix's saving as its clients measured it beside the report's estimate, the report perfmw
writes from the service's own /metrics and /perfmw/findings, then the dashboard's address, and
serves it until Ctrl-C (not with --once); it stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import logging
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TextIO

import uvicorn
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient

import perfmw
from perfmw import report
from perfmw.settings import env_name

from .app import REGIONS, create_app, seed
from .latency import DELAY_SECONDS, port_of, through

REQUESTS_PER_ENDPOINT = 20
CONCURRENCY = 4
# Only the endpoints that block the loop are loaded `CONCURRENCY` at a time: blocking costs
# the other requests in flight, none alone. The others go one at a time, so that each
# measures its own time, not its turn at the stand-in MongoDB, which runs one command at a
# time (four clients at once queued there, and a gather's three reads gained nothing); and
# concurrent first lookups of one key in the cache would all miss, the hit rate depending on
# timing.
CONCURRENT = frozenset({"/reports/blocking", "/reports/threadpool", "/servers/legacy", "/servers"})


def endpoints(n: int = REQUESTS_PER_ENDPOINT) -> list[tuple[str, list[str]]]:
    """Every endpoint of the example app, each with the n paths the load run requests."""
    ids = [i % 4 for i in range(n)]  # a few hot servers: what a cache is for
    return [
        ("/servers-with-agents", ["/servers-with-agents"] * n),
        ("/servers-with-agents/batched", ["/servers-with-agents/batched"] * n),
        ("/dashboard", ["/dashboard"] * n),
        ("/dashboard/concurrent", ["/dashboard/concurrent"] * n),
        ("/reports/blocking", ["/reports/blocking"] * n),
        ("/reports/threadpool", ["/reports/threadpool"] * n),
        ("/servers/legacy", ["/servers/legacy"] * n),
        ("/servers", ["/servers"] * n),
        ("/servers/{id}/uncached", [f"/servers/{i}/uncached" for i in ids]),
        ("/servers/{id}", [f"/servers/{i}" for i in ids]),
        ("/servers/by-owner", [f"/servers/by-owner?owner=team-{i % 4}" for i in range(n)]),
        ("/servers/by-region", [f"/servers/by-region?region={REGIONS[i % 4]}" for i in range(n)]),
        ("/agents/export", ["/agents/export"] * n),
        ("/agents?limit=100", [f"/agents?limit=100&after=agent-{i % 10}" for i in range(n)]),
        ("/health", ["/health"] * n),
    ]


# Each anti-pattern, its fixed twin (as `endpoints` labels them), and the finding kind perfmw
# names it by (None: a cache, which perfmw measures by its hit rate, not as a finding).
PAIRS: list[tuple[str, str, str | None]] = [
    ("/servers-with-agents", "/servers-with-agents/batched", "n_plus_one"),
    ("/dashboard", "/dashboard/concurrent", "consecutive_queries"),
    ("/reports/blocking", "/reports/threadpool", "loop_stall"),
    ("/servers/legacy", "/servers", "blocking_call"),
    ("/servers/{id}/uncached", "/servers/{id}", None),
    ("/servers/by-owner", "/servers/by-region", "missing_index"),
    ("/agents/export", "/agents?limit=100", "unbounded_read"),
]


def measured_pairs(
    timings: dict[str, list[float]], analysis: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per pair: the median time a client waited for each twin (queueing behind a blocked loop
    included, which the server's own clock does not see), what the fix saved over the run (the
    medians' difference, once per request of the anti-pattern's) and what the report expected
    the fix to save (its recommendations of that kind on that route).

    Medians: on a shared machine one request in twenty may wait 100 ms for a CPU, which is
    the machine's, not the fix's.
    """
    pairs = []
    for anti, fixed, kind in PAIRS:
        before, after = timings.get(anti), timings.get(fixed)
        if not before or not after:
            continue
        expected = sum(
            item["saved_seconds"]
            for item in analysis["recommendations"]
            if item["route"] == anti and item["kind"] == kind
        )
        pairs.append(
            {
                "anti": anti,
                "fixed": fixed,
                "kind": kind,
                "before": statistics.median(before),
                "after": statistics.median(after),
                "measured": (statistics.median(before) - statistics.median(after)) * len(before),
                "expected": expected if kind is not None else None,
            }
        )
    return pairs


def pairs_table(pairs: list[dict[str, Any]]) -> str:
    """The pairs as the demo prints them: median before/after, saved measured vs expected, and
    their ratio (1.00: the report's estimate was exact)."""
    lines = [
        "Each fix against its anti-pattern (median per request; saved over the run):",
        f"  {'anti-pattern -> fix':<58} {'before':>9} {'after':>9} {'measured':>9} "
        f"{'expected':>9} {'ratio':>6}",
    ]
    for pair in pairs:
        expected = pair["expected"]
        ratio = f"{pair['measured'] / expected:.2f}" if expected else "-"
        lines.append(
            f"  {pair['anti'] + ' -> ' + pair['fixed']:<58} {_ms(pair['before']):>9} "
            f"{_ms(pair['after']):>9} {_ms(pair['measured']):>9} "
            f"{'-' if expected is None else _ms(expected):>9} {ratio:>6}"
        )
    return "\n".join(lines) + "\n"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def demo_settings(environ: dict[str, str] | None = None) -> perfmw.Settings:
    """PERFMW_* from the environment, with two defaults of the demo's own.

    explain_slow_queries is on, so that missing indexes show. slow_query_seconds is 2: the
    embedded MongoDB is a stand-in written in Python that takes 50-100 ms to page through the
    5,000 agents alone, and over a second under the demo's concurrent load on a busy machine
    (mongod takes a millisecond); its slowness is not the code's.
    """
    env = dict(os.environ if environ is None else environ)
    env.setdefault(env_name("explain_slow_queries"), "on")
    env.setdefault(env_name("slow_query_seconds"), "2.0")
    return perfmw.Settings.from_env(env)


_EMBEDDED = """\
import sys, tempfile
from secantus import SecantusDBServer
with tempfile.TemporaryDirectory() as storage, SecantusDBServer(storage_path=storage) as server:
    print(server.uri, flush=True)
    sys.stdin.read()  # until the demo closes our stdin
"""


@contextmanager
def embedded_mongodb(timeout: float = 60.0, delay: float | None = DELAY_SECONDS) -> Iterator[str]:
    """The embedded MongoDB in a child process, as a real one would be: yields its URI.

    In its own process its CPU is not the service's: the demo measures the service alone.
    Behind a `LatencyProxy` adding `delay` to each command (None: straight to it), as a
    MongoDB in another zone: on the same machine a round trip costs nothing, and a fix that
    saves round trips would save nothing. The proxy is a process of its own too, as a network
    is: no thread of it takes the service's interpreter lock.
    """
    with _child([sys.executable, "-c", _EMBEDDED], timeout) as printed:
        if not printed.startswith("mongodb://"):
            raise RuntimeError("the embedded MongoDB did not start")
        # A local throwaway server: if it is gone, clients that outlive it (at interpreter
        # exit, say) give up in 2 s rather than pymongo's default 30.
        separator = "&" if "?" in printed else ("?" if printed.endswith("/") else "/?")
        uri = f"{printed}{separator}serverSelectionTimeoutMS=2000"
        if delay is None:
            yield uri
            return
        proxy = [sys.executable, "-m", f"{__package__}.latency", str(port_of(uri)), str(delay)]
        with _child(proxy, timeout) as port:
            if not port.isdigit():
                raise RuntimeError("the latency proxy did not start")
            yield through(uri, int(port))


# The directory `examples` is in: a child started there imports this package as we do.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextmanager
def _child(command: list[str], timeout: float) -> Iterator[str]:
    """A child process that prints one line once it is ready and exits when its stdin closes:
    yields that line ("" if none came within `timeout`)."""
    # A session of its own: Ctrl-C is the demo's, which closes the child's stdin once the
    # service has closed its clients (a server stopped first keeps them waiting, and each
    # child would print a KeyboardInterrupt).
    child = subprocess.Popen(
        command,
        cwd=_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout)
        yield child.stdout.readline().strip() if ready else ""
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()


class Service:
    """The example app on uvicorn in a background thread, on a free port of 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self, timeout: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the example service did not start (see the log above)")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@contextmanager
def running(app: Any) -> Iterator[Service]:
    service = Service(app)
    service.start()
    try:
        yield service
    finally:
        service.stop()


class Progress:
    """A one-line progress bar, redrawn in place on a terminal, a line per step elsewhere."""

    def __init__(self, total: int, stream: TextIO, width: int = 30) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self.done = 0
        self.lock = threading.Lock()
        self.tty = stream.isatty()

    def advance(self, label: str) -> None:
        with self.lock:
            self.done += 1
            if self.tty or self.done == self.total:
                filled = self.width * self.done // self.total
                bar = "#" * filled + "-" * (self.width - filled)
                end = "\n" if self.done == self.total else ""
                line = f"\rload [{bar}] {self.done:>4}/{self.total} requests  {label:<32}"
                self.stream.write(line + end)
                self.stream.flush()


def drive(
    port: int,
    plan: list[tuple[str, list[str]]],
    progress: Progress,
    concurrency: int = CONCURRENCY,
    timings: dict[str, list[float]] | None = None,
) -> list[tuple[str, int]]:
    """Send every planned request, endpoint after endpoint (`CONCURRENT` ones `concurrency` at
    a time).

    Endpoints run one after another so that each one's measurements are its own: a request
    blocking the loop delays only requests of its own endpoint. Returns (path, status) of
    every request that did not answer 2xx; `timings` gets each endpoint's response times as
    its clients waited for them.
    """
    local = threading.local()
    opened: list[http.client.HTTPConnection] = []
    failures: list[tuple[str, int]] = []

    def get(label: str, path: str) -> None:
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection("127.0.0.1", port, 30)
            opened.append(connection)
        started = time.perf_counter()
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            status = response.status
            if timings is not None:
                timings.setdefault(label, []).append(time.perf_counter() - started)
        except (OSError, http.client.HTTPException):
            connection.close()
            local.connection = None
            status = 0
        if not 200 <= status < 300:
            failures.append((path, status))
        progress.advance(label)

    try:
        with ThreadPoolExecutor(concurrency, thread_name_prefix="demo-load") as pool:
            for label, paths in plan:
                if label in CONCURRENT:
                    list(pool.map(lambda path, label=label: get(label, path), paths))
                else:
                    for path in paths:
                        get(label, path)
    finally:
        for connection in opened:
            connection.close()
    return failures


def settle(
    url: str, token: str | None, quiet: float = 0.5, timeout: float = 5.0
) -> report.Snapshot:
    """A scrape taken once the findings stopped changing (explains run off the request path)."""
    deadline = time.monotonic() + timeout
    last = report.collect(url, token=token)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = report.collect(url, token=token)
        if [report.finding_key(f) for f in now.findings] == [
            report.finding_key(f) for f in last.findings
        ]:
            return now
        last = now
    return last


class _Collected(logging.Handler):
    """Holds perfmw's warnings during the load, to print them after the progress bar."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().splitlines()[0])


@contextmanager
def collected_warnings() -> Iterator[_Collected]:
    logger = logging.getLogger("perfmw")
    handler = _Collected()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def run_demo(
    out: TextIO,
    progress: TextIO,
    *,
    requests_per_endpoint: int = REQUESTS_PER_ENDPOINT,
    settings: perfmw.Settings | None = None,
    mongo_uri: str | None = None,
    on_ready: Callable[[Service], None] | None = None,
    hold: Callable[[Service], None] | None = None,
) -> str:
    """Start the service, load it, write the report to `out`; returns the report's Markdown.

    With `hold`, the dashboard's address is printed and the service serves until `hold(service)`
    returns (`until_interrupted`: Ctrl-C).
    """
    settings = settings if settings is not None else demo_settings()
    uri = mongo_uri or os.environ.get("MONGODB_URI")
    with contextlib.ExitStack() as stack:
        if uri:
            progress.write("starting the example service on MONGODB_URI...\n")
        else:
            progress.write("starting the embedded MongoDB and the example service...\n")
            uri = stack.enter_context(embedded_mongodb())
        markdown = _run(uri, settings, out, progress, requests_per_endpoint, on_ready, hold)
        # Let the closed clients be collected while the database still runs: clients perfmw
        # made for them (explain's) are closed when they go, and closing needs the server.
        gc.collect()
        return markdown


def _run(
    uri: str,
    settings: perfmw.Settings,
    out: TextIO,
    progress: TextIO,
    requests_per_endpoint: int,
    on_ready: Callable[[Service], None] | None,
    hold: Callable[[Service], None] | None,
) -> str:
    # Filled before the service starts, as a service's database is: seeding 5,000 agents on
    # its loop (building and encoding them, the collections that set off) stalled it for up to
    # 0.3 s on a busy machine, a start-up stall of no endpoint's in the demo's log.
    asyncio.run(_seeded(uri))
    registry = CollectorRegistry()
    app = create_app(uri, settings=settings, registry=registry)
    token = settings.access_token
    with collected_warnings() as warnings, running(app) as service:
        if on_ready is not None:
            on_ready(service)
        plan = endpoints(requests_per_endpoint)
        before = report.collect(service.url, token=token)
        started = time.monotonic()
        timings: dict[str, list[float]] = {}
        load = Progress(sum(len(p) for _, p in plan), progress)
        failures = drive(service.port, plan, load, timings=timings)
        elapsed = time.monotonic() - started
        after = settle(service.url, token)
        progress.write(
            f"{sum(len(p) for _, p in plan)} requests to {len(plan)} endpoints "
            f"in {elapsed:.1f} s against {service.url}\n"
        )
        for path, status in failures:
            progress.write(f"warning: GET {path} answered {status or 'nothing'}\n")
        if warnings.lines:
            progress.write("perfmw logged a warning per finding site (first line of each):\n")
            progress.writelines(f"  {line}\n" for line in warnings.lines)
        analysis = report.analyse(after, before)
        progress.write(pairs_table(measured_pairs(timings, analysis)))
        markdown = report.render_markdown(analysis)
        out.write(markdown)
        out.flush()
        if hold is not None:
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop serving, clean up
                progress.write(dashboard_line(service.url, settings))
                progress.flush()
                hold(service)
    perf = getattr(app, "_perfmw_perf", None)
    if isinstance(perf, perfmw.Perf):
        perf.shutdown()
    progress.write(
        "the service is stopped. The same for your own service: "
        "perfmw report --url http://127.0.0.1:8000, and its dashboard at "
        "http://127.0.0.1:8000/perfmw\n"
    )
    return markdown


async def _seeded(uri: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        await seed(client.registry)
    finally:
        await client.close()


def dashboard_line(url: str, settings: perfmw.Settings) -> str:
    """What the demo says of the dashboard once the report is printed."""
    if settings.dashboard_path is None:
        return f"The dashboard is off ({env_name('dashboard_path')}). Ctrl-C stops the service.\n"
    sign_in = f" (sign in with {env_name('access_token')})" if settings.access_token else ""
    return (
        f"Dashboard: {url}{settings.dashboard_path}{sign_in}\n"
        "The service goes on serving it, live. Ctrl-C stops it.\n"
    )


def until_interrupted(service: Service) -> None:
    """Wait for Ctrl-C or SIGTERM (KeyboardInterrupt, see `main`), or for the server to stop by
    itself."""
    while service.thread.is_alive():
        service.thread.join(0.5)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.fastapi_app.demo",
        description="The example service under load, its report, then its live dashboard.",
    )
    parser.add_argument(
        "--once", action="store_true", help="exit after the report instead of serving on"
    )
    once = parser.parse_args(argv).once
    # Ctrl-C and SIGTERM stop the demo whatever this process inherited: a shell that runs it in
    # the background without job control (a script, a CI step) starts it with SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupted)
    try:
        run_demo(sys.stdout, sys.stderr, hold=None if once else until_interrupted)
    except (report.ReportError, RuntimeError, ValueError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
