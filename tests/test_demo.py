"""`make demo`'s code path, headless: the printed report names every anti-pattern endpoint with
its finding kind and the line responsible, and none of the fixed endpoints; then `make demo` as
a person runs it: the dashboard's address, served until Ctrl-C."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from unittest import mock

import httpx
import pytest
from examples.fastapi_app import app as example
from examples.fastapi_app import demo
from pymongo import MongoClient

from perfmw import report
from perfmw.exporters import logs
from support import line_of, wait_for

ROOT = Path(__file__).resolve().parent.parent

# (route, finding kind, the source line the report must point at)
ANTI_PATTERNS = [
    ("/servers-with-agents", "n_plus_one", 'server["agents"] = await agents.to_list()'),
    # The first read of the run that could have started earlier: the second one.
    ("/dashboard", "consecutive_queries", "upgraded = await db().agents.count_documents("),
    ("/reports/blocking", "loop_stall", "# stands for a slow synchronous library call"),
    ("/servers/legacy", "blocking_call", "return list(cursor.limit(limit))"),
    ("/servers/by-owner", "missing_index", 'servers.find({"owner": owner}'),
    ("/agents/export", "unbounded_read", 'await db().agents.find({}, {"_id": 0}).to_list()'),
    ("/agents/export", "large_response", '@app.get("/agents/export")'),
]
ANTI_ROUTES = [
    "/servers-with-agents",
    "/dashboard",
    "/reports/blocking",
    "/servers/legacy",
    "/servers/by-owner",
    "/agents/export",
]
# The pairs whose measured saving is within 30 % of the report's expected one on every run.
WITHIN_30_PERCENT = ["/servers-with-agents"]
FIXED = [
    "/servers-with-agents/batched",
    "/dashboard/concurrent",
    "/reports/threadpool",
    "/servers",
    "/servers/{server_id}",
    "/servers/by-region",
    "/agents",
    "/health",
]


@dataclass
class Run:
    markdown: str
    progress: str
    service: demo.Service

    def section(self, title: str) -> str:
        start = self.markdown.index(f"\n## {title}\n")
        end = self.markdown.find("\n## ", start + 1)
        return self.markdown[start : end if end != -1 else None]

    def bottlenecks(self) -> set[tuple[str, str, str]]:
        """(route, kind, location) of every bottleneck the report lists."""
        found = re.findall(
            r"^### \d+\. .* \((\w+)\) on `([^`]+)`\n\n- \*\*Location:\*\* `([^`]+)`",
            self.section("Bottlenecks Identified"),
            flags=re.MULTILINE,
        )
        return {(route, kind, location) for kind, route, location in found}


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    out, progress = io.StringIO(), io.StringIO()
    services: list[demo.Service] = []
    # The embedded stand-in for MongoDB is written in Python: on a machine busy with other work
    # its paged, indexed reads of /agents took over the demo's 2 s, which is the stand-in's
    # slowness, not the code's. No anti-pattern here is a slow query, so none is judged on time.
    settings = demo.demo_settings({"PERFMW_SLOW_QUERY_SECONDS": "60"})
    # `make demo` starts in a process of its own: here, earlier tests of the same example app
    # logged its finding sites less than a minute ago, and each is logged once a minute.
    logs._last_logged.clear()
    markdown = demo.run_demo(out, progress, settings=settings, on_ready=services.append)
    assert out.getvalue() == markdown
    yield Run(markdown, progress.getvalue(), services[0])


def test_the_demo_prints_every_section_and_its_progress(run: Run) -> None:
    titles = [line[3:] for line in run.markdown.splitlines() if line.startswith("## ")]
    assert titles == list(report.SECTIONS)
    plan = demo.endpoints()
    total = sum(len(paths) for _, paths in plan)
    assert f"] {total:>4}/{total} requests" in run.progress
    assert f"{total} requests to {len(plan)} endpoints" in run.progress
    assert "warning: GET" not in run.progress  # every request answered 2xx
    # Every route of the example app was measured, 20 requests each.
    table = run.section("Current Performance")
    for route in [*ANTI_ROUTES, *FIXED, "/servers/{server_id}/uncached"]:
        assert re.search(rf"^\| `GET {re.escape(route)}` \| 20 \|", table, re.MULTILINE), route


@pytest.mark.parametrize(("route", "kind", "source"), ANTI_PATTERNS)
def test_every_anti_pattern_is_named_with_its_kind_and_line(
    run: Run, route: str, kind: str, source: str
) -> None:
    location = line_of(example.__file__, source)
    assert (route, kind, location) in run.bottlenecks()
    recommendations = run.section("Optimization Recommendations")
    assert f"on `{route}` at `{location}`" in recommendations


def test_the_findings_are_exactly_the_anti_patterns_on_every_run(run: Run) -> None:
    expected = {
        (route, kind, line_of(example.__file__, source)) for route, kind, source in ANTI_PATTERNS
    }
    assert run.bottlenecks() == expected


def test_perfmw_logged_one_sentence_per_finding(run: Run) -> None:
    logged = run.progress.split("perfmw logged a warning per finding site (first line of each):\n")
    assert len(logged) == 2
    lines = [line for line in logged[1].splitlines() if line.startswith("  perfmw: ")]
    sites = {
        "n_plus_one": "N+1 queries on /servers-with-agents: find on agents repeated 20 times at ",
        "consecutive_queries": "independent queries awaited one after another on /dashboard "
        "(servers, agents, incidents) at ",
        "loop_stall": "event loop stalled ",
        "blocking_call": "blocking call on /servers/legacy: pymongo-sync (find on servers) on "
        "the event loop's thread for ",
        "missing_index": "missing index on /servers/by-owner: find on servers scans the "
        "collection at ",
        "unbounded_read": "unbounded read on /agents/export: find on agents returned 5000 "
        "documents with no limit at ",
        "large_response": "large response on /agents/export: ",
    }
    assert len(lines) == len(ANTI_PATTERNS), lines
    for route, kind, source in ANTI_PATTERNS:
        [line] = [line for line in lines if line.startswith("  perfmw: " + sites[kind])]
        assert f"{route}" in line and line_of(example.__file__, source) in line, line
        assert "{'" not in line and "':" not in line  # a sentence, no raw dict


def test_every_fix_is_printed_beside_its_anti_pattern_measured_and_expected(run: Run) -> None:
    table = run.progress.split("Each fix against its anti-pattern")[1]
    rows = {
        match[0]: match[1:]
        for match in re.findall(
            r"^  (\S+) -> \S+ +([\d.]+) ms +([\d.]+) ms +(-?[\d.]+) ms +(-|[\d.]+ ms) +(\S+)$",
            table,
            re.MULTILINE,
        )
    }
    assert list(rows) == [anti for anti, _, _ in demo.PAIRS]
    for anti, _, kind in demo.PAIRS:
        before, after, measured, expected, ratio = rows[anti]
        assert float(measured) == pytest.approx((float(before) - float(after)) * 20, abs=2.5)
        assert (expected == "-") == (kind is None)
        if expected != "-" and float(expected[:-3]) > 0:
            assert float(ratio) == pytest.approx(float(measured) / float(expected[:-3]), abs=0.01)
    # The N+1's fix saves round trips only, which perfmw measured: its estimate holds within
    # 30 % (measured 0.86 to 1.17 of it over 20 runs, idle or under two CPU hogs). The others'
    # estimates are off by more than that against the stand-in MongoDB, for reasons of the
    # stand-in or of what perfmw cannot see (docs/troubleshooting.md, "The demo's fix table").
    for anti in WITHIN_30_PERCENT:
        measured, expected = float(rows[anti][2]), float(rows[anti][3][:-3])
        assert 0.7 * expected <= measured <= 1.3 * expected, (anti, measured, expected)
    # These fixes save a third or more of the request whatever the shared machine does
    # (medians over 20 runs: 0.06 to 0.65 of the anti-pattern's). The dashboard's gather
    # (0.51 to 0.93) and the async client (0.37 to 1.10) save less than two CPU hogs add to
    # the stand-in MongoDB's time: not asserted.
    for anti in (
        "/servers-with-agents",
        "/reports/blocking",
        "/servers/{id}/uncached",
        "/servers/by-owner",
        "/agents/export",
    ):
        before, after = float(rows[anti][0]), float(rows[anti][1])
        assert after < 0.8 * before, (anti, before, after)


def test_no_fixed_endpoint_is_named_as_a_problem(run: Run) -> None:
    named = {route for route, _, _ in run.bottlenecks()}
    # Work outside requests (startup) may stall the loop too; it is no endpoint.
    assert named - {"<background>"} <= set(ANTI_ROUTES), run.bottlenecks()
    for title in ("Bottlenecks Identified", "Optimization Recommendations"):
        text = run.section(title)
        for route in FIXED:
            assert f"`{route}`" not in text, (title, route)


def test_the_missing_index_is_recommended(run: Run) -> None:
    table = run.section("Index Recommendations")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == 1
    assert rows[0].startswith('| `servers` | `{"owner": 1}` | owner | ')
    assert "`/servers/by-owner`" in rows[0]
    for route in FIXED:
        assert f"`{route}`" not in table


def test_the_cache_shows_its_hits_and_the_uncached_twin_its_queries(run: Run) -> None:
    # 20 lookups of 4 hot servers, one at a time: 4 misses, then hits.
    caching = run.section("Caching")
    assert "| `servers` | 80% | 16 | 4 | 0 / 0 | 4 / 100 |" in caching
    assert "- `servers`: hits 80% of lookups: it is doing its job." in caching
    table = run.section("Current Performance")
    uncached = re.search(r"^\| `GET /servers/\{server_id\}/uncached` \|(.*)$", table, re.M)
    cached = re.search(r"^\| `GET /servers/\{server_id\}` \|(.*)$", table, re.M)
    assert uncached is not None and cached is not None
    assert uncached.group(1).split("|")[4].strip() == "1.00"  # a query every time
    assert cached.group(1).split("|")[4].strip() == "0.20"  # only the 4 misses


def test_the_demo_stops_what_it_started(run: Run) -> None:
    assert not run.service.thread.is_alive()
    assert run.service.sock.fileno() == -1  # closed
    started: list[subprocess.Popen[str]] = []
    popen = subprocess.Popen

    def spy(*args: Any, **kwargs: Any) -> subprocess.Popen[str]:
        child = popen(*args, **kwargs)
        started.append(child)
        return child

    with (
        mock.patch.object(demo.subprocess, "Popen", spy),
        demo.embedded_mongodb() as uri,
        MongoClient(uri) as client,
    ):
        assert client.admin.command("ping")["ok"] == 1
    # The database and the latency proxy in front of it, each in its own process: each
    # exited by itself when its stdin closed.
    assert [child.returncode for child in started] == [0, 0]


def test_the_progress_bar_redraws_in_place_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    bar = demo.Progress(4, terminal, width=8)
    for _ in range(4):
        bar.advance("/health")
    frames = terminal.getvalue().split("\r")[1:]
    assert [frame.split("]")[0] for frame in frames] == [
        "load [##------",
        "load [####----",
        "load [######--",
        "load [########",
    ]
    assert frames[-1].endswith("\n") and not frames[0].endswith("\n")
    # Not a terminal (a log, CI): the finished bar only, once.
    log = io.StringIO()
    bar = demo.Progress(4, log, width=8)
    for _ in range(4):
        bar.advance("/health")
    assert log.getvalue().count("load [") == 1


def test_make_demo_serves_the_dashboard_until_ctrl_c() -> None:
    """`python -m examples.fastapi_app.demo`, as `make demo` runs it: after the report, the
    dashboard's address; the dashboard answers there with the load's measurements; Ctrl-C (a
    real SIGINT) stops the service and everything it started, exiting 0. Started with SIGINT
    ignored, as a shell without job control starts a background job (a CI step, a script):
    the demo handles it all the same."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERFMW_")}
    env.pop("MONGODB_URI", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.fastapi_app.demo"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert process.stdout is not None and process.stderr is not None
    out: list[str] = []
    err: list[str] = []

    def read(stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    readers = [
        threading.Thread(target=read, args=(process.stdout, out), daemon=True),
        threading.Thread(target=read, args=(process.stderr, err), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:

        def address() -> str | None:
            if process.poll() is not None:
                raise AssertionError("the demo exited:\n" + "".join(err))
            return next((line for line in err if line.startswith("Dashboard: ")), None)

        line = wait_for(address, 300, "the dashboard's address", interval=0.2)
        url = line.split()[1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/perfmw", url), line
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "<title>perfmw dashboard</title>" in page.text
        measured = httpx.get(f"{url}/data.json", timeout=30).json()
        plan = demo.endpoints()
        assert measured["requests"] == sum(len(paths) for _, paths in plan)
        assert len(measured["routes"]) == len(plan)
        assert process.poll() is None  # still serving
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=120) == 0, "".join(err)
        except subprocess.TimeoutExpired:
            raise AssertionError("no exit 120 s after Ctrl-C:\n" + "".join(err)) from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for reader in readers:
            reader.join(timeout=10)
        process.stdout.close()
        process.stderr.close()
    titles = [line[3:].strip() for line in out if line.startswith("## ")]
    assert titles == list(report.SECTIONS)
    assert err[-1].startswith("the service is stopped.")
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)


def test_once_exits_after_the_report_and_the_address_is_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held: list[Any] = []
    monkeypatch.setattr(demo, "run_demo", lambda out, progress, **kw: held.append(kw["hold"]))
    assert demo.main(["--once"]) == 0
    assert demo.main([]) == 0
    assert held == [None, demo.until_interrupted]
    settings = demo.demo_settings({})
    assert demo.dashboard_line("http://127.0.0.1:8123", settings) == (
        "Dashboard: http://127.0.0.1:8123/perfmw\n"
        "The service goes on serving it, live. Ctrl-C stops it.\n"
    )
    signed = demo.demo_settings({"PERFMW_ACCESS_TOKEN": "t"})
    assert "/perfmw (sign in with PERFMW_ACCESS_TOKEN)\n" in demo.dashboard_line("u", signed)
