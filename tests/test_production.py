"""The production path, end to end, with the real servers (docs/production.md).

The example app runs under `uvicorn --workers 2` in multiprocess mode against the embedded
MongoDB, protected by an access token; a real Prometheus scrapes it every second with the
shipped rules (`for:` shortened) and a bearer `authorization`, and a second job scrapes it
without the token. What a user sees through Prometheus's HTTP API is asserted: the request count
summed over both workers, stalls on the blocking route only, the loop-stall alert firing, the
unauthenticated scrape refused with 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from prometheus_server import PrometheusServer, free_port, stop_process, tool
from support import sample, wait_for
from test_alerts import RULES, dashboard_queries, substitute

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t0ken-for-prometheus"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BLOCKING = "/reports/blocking"
BLOCK_SECONDS = 0.3
#: Requests that do not block: three routes, ten times each.
FAST = [path for i in range(10) for path in ("/health", "/servers?limit=5", f"/servers/{i}")]
FAST_ROUTES = {"/health", "/servers", "/servers/{server_id}"}
BLOCKING_REQUESTS = 7
SERVED = {
    "http_request_method": "GET",
    "http_route": "/servers/{server_id}",
    "http_response_status_code": "200",
}
N = len(FAST) + BLOCKING_REQUESTS


@dataclass
class Production:
    url: str
    prometheus: PrometheusServer
    master_pid: int
    multiproc_dir: Path
    worker_pids: set[int] = field(default_factory=set)


def get(url: str, path: str, **headers: str) -> httpx.Response:
    """One request on a new connection, so that the kernel hands it to either worker."""
    return httpx.get(url + path, headers={"Connection": "close", **headers}, timeout=10)


def seed_database(mongo_uri: str) -> None:
    """Seed once before the workers start, so that they do not race to seed it."""
    from examples.fastapi_app.app import seed
    from pymongo import AsyncMongoClient

    async def run() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
        try:
            await seed(client.registry)
        finally:
            await client.close()

    asyncio.run(run())


def start_workers(
    mongo_uri: str, multiproc_dir: Path, port: int, log: Any
) -> subprocess.Popen[Any]:
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir),
        "MONGODB_URI": mongo_uri,
        "PERFMW_ACCESS_TOKEN": TOKEN,
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app.app:app", "--workers", "2"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def prometheus_config(target: str, rule_file: Path) -> dict[str, Any]:
    static = [{"targets": [target]}]
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_file)],
        "scrape_configs": [
            {
                "job_name": "api",
                "authorization": {"type": "Bearer", "credentials": TOKEN},
                "static_configs": static,
            },
            {"job_name": "api-no-token", "static_configs": static},
        ],
    }


def shipped_rules_with_short_for() -> str:
    """alerts.yml as shipped, every `for:` shortened to 1 s so the test need not wait minutes."""
    text, count = re.subn(r"(?m)^(\s+for: )\S+$", r"\g<1>1s", RULES.read_text())
    assert count == 9, count
    return text


@pytest.fixture(scope="module")
def production(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    tool("prometheus")  # installs or skips (loudly) before anything starts
    directory = tmp_path_factory.mktemp("production")
    multiproc_dir = directory / "multiproc"
    multiproc_dir.mkdir()
    seed_database(mongo_uri)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app_log = (directory / "uvicorn.log").open("w")
    workers = start_workers(mongo_uri, multiproc_dir, port, app_log)
    prometheus: PrometheusServer | None = None
    try:
        # Ready when both workers have answered (the findings endpoint is not measured).
        pids: set[int] = set()

        def both_workers() -> bool:
            if workers.poll() is not None:
                raise RuntimeError((directory / "uvicorn.log").read_text())
            with contextlib.suppress(httpx.TransportError):
                pids.add(get(url, "/perfmw/findings", **AUTH).json()["pid"])
            return len(pids) == 2

        wait_for(both_workers, 30, what="both uvicorn workers")
        rule_file = directory / "alerts.yml"
        rule_file.write_text(shipped_rules_with_short_for())
        prometheus = PrometheusServer(
            prometheus_config(f"127.0.0.1:{port}", rule_file), directory / "prometheus"
        )
        prometheus.wait_ready()
        stack = Production(url, prometheus, workers.pid, multiproc_dir, pids)
        drive(stack)
        yield stack
    finally:
        if prometheus is not None:
            prometheus.stop()
        stop_process(workers)
        app_log.close()


def drive(stack: Production) -> None:
    """N requests; the blocking ones after Prometheus saw the first, so rate() sees them all."""
    for path in FAST:
        assert get(stack.url, path).status_code == 200, path
    blocking = f"{BLOCKING}?seconds={BLOCK_SECONDS}"
    assert get(stack.url, blocking).status_code == 200
    stalls = f'sum(perfmw_event_loop_stalls_total{{job="api",http_route="{BLOCKING}"}})'
    with contextlib.suppress(AssertionError):  # asserted with its own message below
        stack.prometheus.wait_for("the first stall", lambda: stack.prometheus.value(stalls), 10)
    for _ in range(BLOCKING_REQUESTS - 1):
        assert get(stack.url, blocking).status_code == 200
    total = 'sum(http_server_request_duration_seconds_count{job="api"})'
    seen: list[float | None] = []

    def all_counted() -> bool:
        seen.append(stack.prometheus.value(total))
        return seen[-1] == N

    with contextlib.suppress(AssertionError):  # asserted with its own message below
        stack.prometheus.wait_for(f"{N} requests in Prometheus", all_counted, 15)


def test_request_count_summed_over_both_workers_equals_n(production: Production) -> None:
    prometheus = production.prometheus
    total = prometheus.value('sum(http_server_request_duration_seconds_count{job="api"})')
    assert total == N
    by_route = {
        result["metric"]["http_route"]: float(result["value"][1])
        for result in prometheus.query(
            'sum by (http_route) (http_server_request_duration_seconds_count{job="api"})'
        )
    }
    assert by_route == {
        "/health": 10,
        "/servers": 10,
        "/servers/{server_id}": 10,
        BLOCKING: BLOCKING_REQUESTS,
    }
    # Both workers wrote measurements: each has its own mmap file of histograms.
    files = {path.name for path in production.multiproc_dir.glob("histogram_*.db")}
    assert files == {f"histogram_{pid}.db" for pid in production.worker_pids}
    assert production.master_pid not in production.worker_pids


def test_gauges_and_scrape_time_readings_add_up_over_workers(production: Production) -> None:
    prometheus = production.prometheus
    # livesum: nothing in flight now, one series (no pid label).
    assert prometheus.query('http_server_active_requests{job="api"}')[0]["value"][1] == "0"
    # livemax: the worst worker's lag, one series.
    assert len(prometheus.query('perfmw_event_loop_lag_seconds{job="api"}')) == 1
    # The cache is read at scrape time in each worker: its counters are summed over both
    # (ten distinct ids, ten misses), its capacity too (each worker has a cache of 100).
    lookups = prometheus.query('perfmw_cache_requests_total{job="api",cache="servers"}')
    assert {r["metric"]["result"]: float(r["value"][1]) for r in lookups} == {"hit": 0, "miss": 10}
    assert prometheus.value('perfmw_cache_max_size{job="api",cache="servers"}') == 200


def test_stalls_on_the_blocking_route_only(production: Production) -> None:
    prometheus = production.prometheus
    stalls = {
        result["metric"]["http_route"]: float(result["value"][1])
        for result in prometheus.query(
            'sum by (http_route) (perfmw_event_loop_stalls_total{job="api"})'
        )
    }
    assert stalls.get(BLOCKING, 0) >= 1, stalls
    # The other routes driven: none stalled (a stall at worker startup would be <background>).
    others = {route: stalls.get(route, 0) for route in FAST_ROUTES}
    assert others == dict.fromkeys(FAST_ROUTES, 0), stalls
    # Every stall was one of the 300 ms blocks: none reached a second.
    over_one_second = prometheus.value(
        'sum(perfmw_event_loop_stall_seconds_count{job="api"})'
        ' - sum(perfmw_event_loop_stall_seconds_bucket{job="api",le=~"1(\\\\.0)?"})'
    )
    assert over_one_second == 0


def test_loop_stall_alert_fires_for_the_blocking_route(production: Production) -> None:
    prometheus = production.prometheus

    def firing() -> list[dict[str, Any]]:
        return [
            alert
            for alert in prometheus.api("alerts")["alerts"]
            if alert["labels"]["alertname"] == "PerfmwEventLoopStalls"
            and alert["state"] == "firing"
        ]

    alerts = prometheus.wait_for("PerfmwEventLoopStalls firing", firing, timeout=20)
    routes = {alert["labels"]["http_route"] for alert in alerts}
    assert BLOCKING in routes and not routes & FAST_ROUTES, routes
    alerts = [alert for alert in alerts if alert["labels"]["http_route"] == BLOCKING]
    alert = alerts[0]
    assert alert["labels"]["job"] == "api"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == f"Event loop stalls on {BLOCKING} (api)"
    assert alert["annotations"]["runbook_url"] == "docs/alerts.md#perfmweventloopstalls"
    stalled = [a for a in prometheus.api("alerts")["alerts"] if "OverOneSecond" in str(a)]
    assert stalled == []


def test_token_protected_scrape_works_and_unauthenticated_gets_401(
    production: Production,
) -> None:
    prometheus = production.prometheus
    assert prometheus.value('up{job="api"}') == 1
    targets = {
        target["labels"]["job"]: target for target in prometheus.api("targets")["activeTargets"]
    }
    assert targets["api"]["health"] == "up"
    refused = prometheus.wait_for(
        "the tokenless scrape to be refused",
        lambda: targets_of(prometheus)["api-no-token"]["lastError"],
        timeout=10,
    )
    assert "401" in refused
    assert prometheus.value('up{job="api-no-token"}') == 0
    # The same, as curl would see it.
    refused_here = get(production.url, "/metrics")
    assert refused_here.status_code == 401
    assert refused_here.headers["www-authenticate"] == 'Bearer realm="perfmw"'
    assert get(production.url, "/metrics", Authorization="Bearer wrong").status_code == 401
    assert get(production.url, "/perfmw/findings").status_code == 401
    scraped = get(production.url, "/metrics", **AUTH)
    assert scraped.status_code == 200
    assert "http_server_request_duration_seconds_bucket" in scraped.text


def targets_of(prometheus: PrometheusServer) -> dict[str, dict[str, Any]]:
    return {t["labels"]["job"]: t for t in prometheus.api("targets")["activeTargets"]}


def worker_files(multiproc_dir: Path) -> dict[int, dict[str, Any]]:
    """Each worker's own findings file, by its pid (the first app of each worker: `_0_`)."""
    found = {}
    for path in multiproc_dir.glob("perfmw_findings_0_*.json"):
        with contextlib.suppress(ValueError):  # being replaced right now: read it next time
            document = json.loads(path.read_text())
            found[document["pid"]] = document
    return found


def blocking_count(findings: list[dict[str, Any]]) -> float:
    return sum(f["count"] for f in findings if f["kind"] == "loop_stall" and f["route"] == BLOCKING)


@contextlib.contextmanager
def two_workers(mongo_uri: str, multiproc_dir: Path, log_path: Path) -> Iterator[tuple[str, Any]]:
    """`uvicorn --workers 2` on the directory; yields (url, the master process) once both
    workers answer."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("a") as log:
        workers = start_workers(mongo_uri, multiproc_dir, port, log)
        try:
            pids: set[int] = set()

            def both() -> bool:
                if workers.poll() is not None:
                    raise RuntimeError(log_path.read_text())
                with contextlib.suppress(httpx.TransportError):
                    pids.add(get(url, "/perfmw/findings", **AUTH).json()["pid"])
                return len(pids) == 2

            wait_for(both, 30, what="both uvicorn workers")
            yield url, workers
        finally:
            stop_process(workers)


def test_every_worker_answers_with_the_findings_of_all_workers(
    mongo_uri: str, tmp_path: Path
) -> None:
    seed_database(mongo_uri)
    multiproc_dir = tmp_path / "multiproc"
    multiproc_dir.mkdir()
    with two_workers(mongo_uri, multiproc_dir, tmp_path / "uvicorn.log") as (url, _):
        counts: list[float] = []
        for sent in range(1, 60):  # until each worker has served one (each has its own file)
            assert get(url, f"{BLOCKING}?seconds=0.15").status_code == 200

            def written(sent: int = sent) -> bool:
                files = worker_files(multiproc_dir)
                counts[:] = [blocking_count(d["findings"]) for d in files.values()]
                return sum(counts) == sent  # each worker's file within a second

            wait_for(written, 10, what=f"{sent} stalls in the workers' files")
            if len(counts) == 2 and all(counts):
                break
        answers: list[dict[str, Any]] = []

        def both_answered() -> bool:  # each request a new connection, taken by either worker
            answers.append(get(url, "/perfmw/findings", **AUTH).json())
            return {a["pid"] for a in answers} == set(worker_files(multiproc_dir))

        wait_for(both_answered, 60, what="an answer from each worker", interval=0.01)
        files = worker_files(multiproc_dir)
    assert {a["pid"] for a in answers} == set(files)  # both workers answered...
    for answer in answers:  # ...each with the findings of both, summed
        assert set(answer["pids"]) == set(files)
        assert blocking_count(answer["findings"]) == sent
        (stall,) = [f for f in answer["findings"] if f["kind"] == "loop_stall"]
        assert stall["detail"]["cause"] == "blocking"
        assert stall["count"] == sent


def test_a_restarted_service_counts_exactly_what_it_served(mongo_uri: str, tmp_path: Path) -> None:
    """SIGTERM right after the last request: the workers' lifespan shutdown copies their last
    counts and findings, with no code in the application."""
    seed_database(mongo_uri)
    multiproc_dir = tmp_path / "multiproc"
    multiproc_dir.mkdir()
    log = tmp_path / "uvicorn.log"
    with two_workers(mongo_uri, multiproc_dir, log) as (url, workers):
        for i in range(20):
            assert get(url, f"/servers/{i % 5}").status_code == 200
        assert get(url, f"{BLOCKING}?seconds=0.15").status_code == 200
        os.killpg(workers.pid, signal.SIGTERM)  # at once: before the next one-second copy
        workers.wait(30)
    with two_workers(mongo_uri, multiproc_dir, log) as (url, _):
        metrics = get(url, "/metrics", **AUTH).text
        findings = get(url, "/perfmw/findings", **AUTH).json()["findings"]
    assert sample(metrics, "http_server_request_duration_seconds_count", **SERVED) == 20
    assert blocking_count(findings) == 1


def test_every_dashboard_query_runs_against_the_scraped_service(production: Production) -> None:
    prometheus = production.prometheus
    empty = []
    for title, expr in dashboard_queries():
        if not prometheus.query(substitute(expr)):  # asserts status "success"
            empty.append(title)
    # The request panels have data from this very run.
    for title in ("Request rate per route", "Latency p50 / p99 per route", "$job", "$route"):
        assert title not in empty, title


def gunicorn_config() -> str:
    """The `gunicorn.conf.py` block of docs/production.md, as a user would save it."""
    text = (ROOT / "docs" / "production.md").read_text()
    blocks = re.findall(r"^```python\n(# gunicorn\.conf\.py.*?)^```$", text, re.M | re.S)
    assert len(blocks) == 1
    return str(blocks[0])


def metric_total(url: str, route: str) -> float:
    text = get(url, "/metrics", **AUTH).text
    pattern = (
        r'^http_server_request_duration_seconds_count\{[^}]*http_route="'
        + re.escape(route)
        + r'"[^}]*\} (\S+)$'
    )
    return sum(float(value) for value in re.findall(pattern, text, re.M))


def test_gunicorn_child_exit_hook_forgets_a_killed_worker(mongo_uri: str, tmp_path: Path) -> None:
    """The documented gunicorn config: a worker killed with SIGKILL has its live gauges
    removed by the `child_exit` hook, its counts stay in the sum, a new worker takes over."""
    seed_database(mongo_uri)
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(gunicorn_config())
    multiproc_dir = tmp_path / "multiproc"  # created (emptied) by the config's on_starting
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir),
        "MONGODB_URI": mongo_uri,
        "PERFMW_ACCESS_TOKEN": TOKEN,
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "gunicorn", "-c", str(config), "--workers", "2"]
    command += ["--bind", f"127.0.0.1:{port}", "--log-level", "warning"]
    command += ["examples.fastapi_app.app:app"]
    with (tmp_path / "gunicorn.log").open("w") as log:
        server = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            pids: set[int] = set()

            def answering() -> bool:
                if server.poll() is not None:
                    raise RuntimeError((tmp_path / "gunicorn.log").read_text())
                with contextlib.suppress(httpx.TransportError):
                    pids.add(get(url, "/perfmw/findings", **AUTH).json()["pid"])
                return len(pids) >= 2

            wait_for(answering, 30, what="both gunicorn workers")
            for _ in range(10):
                assert get(url, "/health").status_code == 200
            # Each worker copies its counts to its files within a second.
            wait_for(lambda: metric_total(url, "/health") == 10, 10, what="10 requests in /metrics")
            victim = sorted(pids)[0]
            live_file = multiproc_dir / f"gauge_livesum_{victim}.db"
            wait_for(live_file.exists, 10, what="the victim's live gauges file")
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: not live_file.exists(), 10, what="child_exit to remove it")
            assert (multiproc_dir / f"histogram_{victim}.db").exists()  # its counts stay
            assert metric_total(url, "/health") == 10
            # gunicorn replaced the worker; the service answers on.
            assert get(url, "/health").status_code == 200
            wait_for(lambda: metric_total(url, "/health") == 11, 10, what="11 requests")
        finally:
            stop_process(server)


def test_multiprocess_directory_set_too_late_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """prometheus-client was imported without it: perfmw says so instead of exporting nothing."""
    from perfmw.exporters.prometheus import PrometheusSink

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp")
    with pytest.raises(ValueError, match="was set after prometheus_client was imported"):
        PrometheusSink()


def test_multiprocess_directory_must_exist(tmp_path: Path) -> None:
    script = "import perfmw, fastapi; perfmw.instrument(fastapi.FastAPI())"
    missing = tmp_path / "missing"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(missing), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert f"ValueError: PROMETHEUS_MULTIPROC_DIR='{missing}' is not a directory" in done.stderr


SHUTDOWN_SCRIPT = """
import asyncio, os
import httpx, perfmw
from fastapi import FastAPI

app = FastAPI()

@app.get("/ping")
async def ping() -> str:
    return "pong"

perf = perfmw.instrument(app)

async def main() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for _ in range(3):
            await client.get("/ping")

asyncio.run(main())
perf.shutdown()
os._exit(0)  # as a worker ended by a signal: no atexit, no second chance to copy
"""


def test_shutdown_copies_a_worker_s_last_counts(tmp_path: Path) -> None:
    """perf.shutdown() flushes: counts reach the directory even if the process then dies."""
    from prometheus_client.multiprocess import MultiProcessCollector

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_SCRIPT], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    counts = [
        sample.value
        for metric in MultiProcessCollector(None, path=str(tmp_path)).collect()
        for sample in metric.samples
        if sample.name == "http_server_request_duration_seconds_count"
    ]
    assert counts == [3]
