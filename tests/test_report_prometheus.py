"""`perfmw report --prometheus`: one report of every replica, from a real Prometheus server.

Two separate instrumented services (the example app, one uvicorn each) on 127.0.0.1, scraped
by a real Prometheus under one job: the report's totals are the sums of what both served.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from perfmw.__main__ import main
from prometheus_server import PrometheusServer, free_port, stop_process, tool
from support import line_of, wait_for
from test_production import seed_database

ROOT = Path(__file__).resolve().parent.parent
APP_SOURCE = Path("examples/fastapi_app/app.py")
# What each replica serves: (path, times).
TRAFFIC = {
    "a": [("/health", 12), ("/servers-with-agents", 3), ("/reports/blocking?seconds=0.15", 2)],
    "b": [("/health", 8), ("/servers-with-agents", 2), ("/reports/blocking?seconds=0.15", 1)],
}
ROUTES = {"/health": 20, "/servers-with-agents": 5, "/reports/blocking": 3}


@dataclass
class Fleet:
    prometheus: PrometheusServer
    replicas: list[str]


def replica(mongo_uri: str, log: Any) -> tuple[str, subprocess.Popen[Any]]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PERFMW_")},
        "MONGODB_URI": mongo_uri,
        "PYTHONPATH": str(ROOT),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app.app:app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return f"127.0.0.1:{port}", process


@pytest.fixture(scope="module")
def fleet(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tool("prometheus")
    directory = tmp_path_factory.mktemp("fleet")
    seed_database(mongo_uri)
    log = (directory / "uvicorn.log").open("w")
    started = [replica(mongo_uri, log) for _ in TRAFFIC]
    prometheus: PrometheusServer | None = None
    try:
        for target, process in started:

            def answering(target: str = target, process: Any = process) -> bool:
                if process.poll() is not None:
                    raise RuntimeError((directory / "uvicorn.log").read_text())
                with contextlib.suppress(httpx.TransportError):
                    return httpx.get(f"http://{target}/health", timeout=5).status_code == 200
                return False

            wait_for(answering, 30, what=f"the replica at {target}")
        targets = [target for target, _ in started]
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "api", "static_configs": [{"targets": targets}]}],
        }
        prometheus = PrometheusServer(config, directory / "prometheus")
        prometheus.wait_ready()
        for target, (_, traffic) in zip(targets, TRAFFIC.items(), strict=True):
            for path, times in traffic:
                for _ in range(times):
                    assert httpx.get(f"http://{target}{path}", timeout=30).status_code == 200
        served = sum(ROUTES.values()) + len(targets)  # each replica's /health check above
        total = 'sum(http_server_request_duration_seconds_count{job="api"})'
        stalls = 'sum(perfmw_findings_total{job="api",kind="loop_stall"})'
        prometheus.wait_for(
            "every request and stall in Prometheus",
            lambda: prometheus.value(total) == served and prometheus.value(stalls) == 3,
            timeout=30,
        )
        yield Fleet(prometheus, targets)
    finally:
        if prometheus is not None:
            prometheus.stop()
        for _, process in started:
            stop_process(process)
        log.close()


def report(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_report_of_two_replicas_sums_what_both_served(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = report(
        "--prometheus", fleet.prometheus.url, "--job", "api", "--format", "json", capsys=capsys
    )
    assert (code, err) == (0, "")
    doc = json.loads(out)
    requests = {row["route"]: row["requests"] for row in doc["routes"]}
    assert requests == {**ROUTES, "/health": ROUTES["/health"] + len(fleet.replicas)}
    rows = {row["route"]: row for row in doc["routes"]}
    assert rows["/reports/blocking"]["stalls"] == 3
    assert rows["/servers-with-agents"]["queries_per_request"] == pytest.approx(21.0)
    assert rows["/reports/blocking"]["p50_seconds"] > 0.1
    assert rows["/reports/blocking"]["p95_seconds"] >= rows["/reports/blocking"]["p50_seconds"]
    found = {(f["kind"], f["route"], f["location"]): f for f in doc["findings"]}
    n_plus_one = found[
        (
            "n_plus_one",
            "/servers-with-agents",
            line_of(APP_SOURCE, 'server["agents"] = await agents.to_list()'),
        )
    ]
    assert n_plus_one["count"] == 5
    assert n_plus_one["detail"] == {"collection": "agents", "operation": "find"}
    stall = found[
        ("loop_stall", "/reports/blocking", line_of(APP_SOURCE, "# stands for a slow synchronous"))
    ]
    assert stall["count"] == 3 and stall["detail"] == {"cause": "blocking"}
    # Three stalls of 0.15 s, each known within half a heartbeat (10 ms).
    assert 0.42 <= stall["total_seconds"] < 1.5
    assert doc["measured"] == "over the last 1h, every replica Prometheus scrapes"
    assert doc["window_seconds"] == 3600


def test_the_markdown_report_of_the_fleet(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = report(
        "--prometheus",
        fleet.prometheus.url,
        "--selector",
        '{job="api"}',
        "--since",
        "30m",
        capsys=capsys,
    )
    assert (code, err) == (0, "")
    assert "every replica Prometheus scrapes" in out
    assert "| `GET /reports/blocking` | 3 |" in out
    assert "Event loop stalled (blocking) (loop_stall) on `/reports/blocking`" in out


@contextlib.contextmanager
def answering(status: int, body: bytes, content_type: str) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering every GET the same way."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def failure(capsys: pytest.CaptureFixture[str], *args: str, status: int = 1) -> str:
    code, out, err = report(*args, capsys=capsys)
    assert (code, out) == (status, "")
    assert err.count("\n") == 1 and err.startswith("perfmw report: "), err
    return err.removeprefix("perfmw report: ").strip()


def test_bad_answers_are_one_line_and_exit_1(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    assert failure(capsys, "--prometheus", down).startswith(f"cannot reach Prometheus at {down}: ")
    url = fleet.prometheus.url
    rejected = failure(capsys, "--prometheus", url, "--selector", '{job=~"("}')
    assert rejected.startswith(f"Prometheus at {url} rejected the query "), rejected
    assert failure(capsys, "--prometheus", url, "--job", "nothing") == (
        f'Prometheus at {url} has no perfmw metrics for {{job="nothing"}} over the last 1h: '
        "check --job or --selector, and that Prometheus scrapes the service's /metrics"
    )
    unavailable = json.dumps({"status": "error", "error": "too many queries"}).encode()
    with answering(503, unavailable, "application/json") as busy:
        assert failure(capsys, "--prometheus", busy) == (
            f"Prometheus at {busy} answered 503 Service Unavailable: too many queries"
        )
    with answering(200, b"<html>a login page</html>", "text/html") as page:
        assert failure(capsys, "--prometheus", page).startswith(
            f"Prometheus at {page} did not answer its query API's JSON to "
        )


def test_bad_arguments_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = "http://127.0.0.1:1"  # never asked: the arguments are refused first
    assert failure(capsys, "--prometheus", url, "--since", "an hour", status=2) == (
        "--since must be a duration such as 30m, 1h or 7d, got 'an hour'"
    )
    assert failure(capsys, "--prometheus", url, "--selector", 'job="api"', status=2) == (
        "--selector must be label matchers in braces, got 'job=\"api\"'"
    )
    assert failure(capsys, "--prometheus", "prometheus:9090", status=2) == (
        "--prometheus must start with http:// or https://, got 'prometheus:9090'"
    )
    assert failure(capsys, "--url", url, "--job", "api", status=2) == (
        "--job and --selector go with --prometheus"
    )
