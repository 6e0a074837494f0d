"""`perfmw report`: the analysis over recorded metrics and findings, and the command line
against real services (unreachable, refused token, nothing found, json, compare)."""

from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from markdown_it import MarkdownIt
from prometheus_client import CollectorRegistry

import perfmw
from perfmw import report
from perfmw.__main__ import main
from perfmw._report_advice import advice
from support import serve, wait_for


def _labels(**labels: str) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


def _histogram(name: str, buckets: dict[str, float], total: float, **labels: str) -> str:
    """One histogram series in the text exposition: cumulative buckets, count, sum."""
    lines = [f"{name}_bucket{{{_labels(**labels, le=le)}}} {n}" for le, n in buckets.items()]
    lines.append(f"{name}_count{{{_labels(**labels)}}} {buckets['+Inf']}")
    lines.append(f"{name}_sum{{{_labels(**labels)}}} {total}")
    return "\n".join(lines)


def _duration(route: str, status: str, buckets: list[float], total: float) -> str:
    bounds = ("0.01", "0.025", "0.05", "0.1", "+Inf")
    return _histogram(
        "http_server_request_duration_seconds",
        dict(zip(bounds, buckets, strict=True)),
        total,
        http_request_method="GET",
        http_route=route,
        http_response_status_code=status,
    )


def _per_request(name: str, route: str, count: float, total: float) -> str:
    return _histogram(name, {"+Inf": count}, total, http_request_method="GET", http_route=route)


AGENTS, BLOCKING = "/servers-with-agents", "/reports/blocking"
# A recorded exposition: two routes, a watched cache, stalls.
METRICS = "\n".join(
    [
        "# TYPE http_server_request_duration_seconds histogram",
        _duration(AGENTS, "200", [0, 50, 90, 100, 100], 3.0),
        _duration(BLOCKING, "200", [0, 0, 0, 0, 8], 1.6),
        _duration(BLOCKING, "500", [2, 2, 2, 2, 2], 0.01),
        "# TYPE perfmw_request_db_queries histogram",
        _per_request("perfmw_request_db_queries", AGENTS, 100, 2100),
        _per_request("perfmw_request_db_queries", BLOCKING, 10, 0),
        "# TYPE perfmw_request_db_seconds histogram",
        _per_request("perfmw_request_db_seconds", AGENTS, 100, 2.4),
        _per_request("perfmw_request_db_seconds", BLOCKING, 10, 0),
        "# TYPE perfmw_event_loop_stalls_total counter",
        f'perfmw_event_loop_stalls_total{{http_route="{BLOCKING}",cause="blocking"}} 8.0',
        "# TYPE perfmw_cache_requests_total counter",
        'perfmw_cache_requests_total{cache="servers",result="hit"} 30.0',
        'perfmw_cache_requests_total{cache="servers",result="miss"} 10.0',
        'perfmw_cache_requests_total{cache="sessions",result="hit"} 1.0',
        'perfmw_cache_requests_total{cache="sessions",result="miss"} 9.0',
        "# TYPE perfmw_cache_evictions_total counter",
        'perfmw_cache_evictions_total{cache="sessions",reason="capacity"} 7.0',
        'perfmw_cache_evictions_total{cache="sessions",reason="expired"} 0.0',
        "# TYPE perfmw_cache_size gauge",
        'perfmw_cache_size{cache="servers"} 10.0',
        'perfmw_cache_size{cache="sessions"} 2.0',
        "# TYPE perfmw_cache_max_size gauge",
        'perfmw_cache_max_size{cache="servers"} 100.0',
        'perfmw_cache_max_size{cache="sessions"} 2.0',
        "",
    ]
)

FINDINGS: list[dict[str, Any]] = [
    {
        "kind": "n_plus_one",
        "route": "/servers-with-agents",
        "count": 100,
        "total_seconds": 2.0,
        "location": "app/servers.py:42",
        "detail": {
            "collection": "agents",
            "operation": "find",
            "shape": '{"server_id": ?}',
            "repetitions": 20,
        },
        "first_seen": 1_700_000_000.0,
        "last_seen": 1_700_000_060.0,
    },
    {
        "kind": "loop_stall",
        "route": "/reports/blocking",
        "count": 8,
        "total_seconds": 1.2,
        "location": "app/reports.py:7",
        "detail": {
            "cause": "blocking",
            "duration_seconds": 0.15,
            "stack": ["app/reports.py:12 in report", "app/reports.py:7 in render"],
        },
        "first_seen": 1_700_000_000.0,
        "last_seen": 1_700_000_060.0,
    },
    {
        "kind": "missing_index",
        "route": "/servers/by-owner",
        "count": 1,
        "total_seconds": 0.05,
        "location": "app/servers.py:80",
        "detail": {
            "collection": "servers",
            "operation": "find",
            "shape": '{"owner": ?}',
            "index": [["owner", 1]],
        },
        "first_seen": 1_700_000_000.0,
        "last_seen": 1_700_000_000.0,
    },
]


def snapshot(
    metrics: str = METRICS, findings: list[dict[str, Any]] | None = None, at: float = 1000.0
) -> report.Snapshot:
    found = FINDINGS if findings is None else findings
    return report.Snapshot("http://svc:8000", at, report.parse_samples(metrics), found, 4242)


def section(markdown: str, title: str) -> str:
    """The body of one `## title` section."""
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = [(0.01, 0.0), (0.025, 50.0), (0.05, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert report.quantile(0.5, buckets) == pytest.approx(0.025)
    assert report.quantile(0.99, buckets) == pytest.approx(0.095)
    assert report.quantile(0.25, buckets) == pytest.approx(0.0175)
    # Past the last finite bucket the highest finite bound is all we know.
    assert report.quantile(0.5, [(0.1, 0.0), (float("inf"), 4.0)]) == 0.1
    assert report.quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_current_performance_per_route() -> None:
    doc = report.analyse(snapshot())
    rows = {row["route"]: row for row in doc["routes"]}
    agents = rows["/servers-with-agents"]
    assert agents["requests"] == 100
    assert agents["errors"] == 0
    assert agents["p50_seconds"] == pytest.approx(0.025)
    assert agents["p99_seconds"] == pytest.approx(0.095)
    assert agents["queries_per_request"] == pytest.approx(21.0)
    assert agents["db_share"] == pytest.approx(0.8)
    assert agents["rate_per_second"] is None  # one scrape, no process start time
    blocking = rows["/reports/blocking"]
    assert (blocking["requests"], blocking["errors"], blocking["stalls"]) == (10, 2, 8)
    assert blocking["queries_per_request"] == 0
    markdown = report.render_markdown(doc)
    table = section(markdown, "Current Performance")
    assert (
        "| `GET /servers-with-agents` | 100 | n/a | 25 ms | 95 ms | 21.00 | 80% | 0 | 0 | 75 ms |"
        in table
    )
    assert (
        "| `GET /reports/blocking` | 10 | n/a | 100 ms | 100 ms | 0.00 | 0% | 2 | 8 | 100 ms |"
        in table
    )
    assert "the process that answered (pid 4242)" in table
    assert "--interval 30" in table


def test_every_section_in_order_with_locations_and_evidence() -> None:
    markdown = report.render_markdown(report.analyse(snapshot()))
    positions = [markdown.index(f"\n## {title}\n") for title in report.SECTIONS]
    assert positions == sorted(positions)
    bottlenecks = section(markdown, "Bottlenecks Identified")
    assert "### 1. N+1 queries: `find` on `agents` repeated 20 times (n_plus_one)" in bottlenecks
    assert "- **Location:** `app/servers.py:42`" in bottlenecks
    assert "- **Impact:** 2.00 s in total, 20 ms per occurrence, 67% of the route's time" in (
        bottlenecks
    )
    assert (
        "seen 100 requests, 2.00 s; operation find; collection agents; repetitions 20; "
        'shape `{"server_id": ?}`'
    ) in bottlenecks
    assert "### 2. Event loop stalled (blocking) (loop_stall) on `/reports/blocking`" in (
        bottlenecks
    )
    assert "seen 8 stalls, 1.20 s; latest 150 ms; cause blocking" in bottlenecks


def test_the_library_function_a_line_called_is_named_beside_it() -> None:
    found = [
        {**FINDINGS[1], "via": "argon2.low_level.verify_secret"},
        {**FINDINGS[1], "location": None, "via": "fastapi.encoders.jsonable_encoder"},
    ]
    bottlenecks = section(
        report.render_markdown(report.analyse(snapshot(findings=found))), "Bottlenecks Identified"
    )
    location = FINDINGS[1]["location"]
    assert f"- **Location:** `{location}` via `argon2.low_level.verify_secret`" in bottlenecks
    assert (
        "- **Location:** unknown (no application frame was found) via "
        "`fastapi.encoders.jsonable_encoder`"
    ) in bottlenecks
    assert "innermost frame `app/reports.py:7 in render`" in bottlenecks


def test_recommendations_are_ordered_by_time_saved() -> None:
    doc = report.analyse(snapshot())
    saved = [(r["kind"], round(r["saved_seconds"], 3)) for r in doc["recommendations"]]
    # N+1: 19 of 20 round trips saved; the stall: all of it; the scan: 90% of it.
    assert saved == [("n_plus_one", 1.9), ("loop_stall", 1.2), ("missing_index", 0.045)]
    text = section(report.render_markdown(doc), "Optimization Recommendations")
    first = text.index("1. **N+1 queries")
    assert first < text.index("2. **Event loop stalled") < text.index("3. **Collection scan")
    assert "   - Current pattern: one `find` on `agents` per item" in text
    assert "   - Proposed pattern: one query for all the items (`$in`" in text
    assert "   - Expected impact: about 1.90 s saved (20 round trips become one)" in text
    assert "   - Complexity: low" in text


def test_index_recommendations_table() -> None:
    text = section(report.render_markdown(report.analyse(snapshot())), "Index Recommendations")
    assert "| Collection | Index | Fields | Purpose |" in text
    assert (
        '| `servers` | `{"owner": 1}` | owner | removes the collection scan of '
        "`/servers/by-owner` at app/servers.py:80 (1x) |"
    ) in text


def test_a_duplicate_read_is_advised_to_be_read_once() -> None:
    duplicate = {
        "kind": "duplicate_read",
        "route": "/me",
        "count": 10,
        "total_seconds": 0.03,
        "location": "api/deps.py:103",
        "detail": {
            "collection": "users",
            "operation": "find",
            "shape": "find app.users {_id: ?}",
            "repetitions": 2,
            "first_location": "api/deps.py:88",
        },
        "first_seen": 1_700_000_000.0,
        "last_seen": 1_700_000_060.0,
    }
    markdown = report.render_markdown(report.analyse(snapshot(findings=[duplicate])))
    bottlenecks = section(markdown, "Bottlenecks Identified")
    assert "### 1. Duplicate read: `find` on `users` sent 2 times (duplicate_read) on `/me`" in (
        bottlenecks
    )
    assert (
        "seen 10 requests, 30 ms; operation find; collection users; repetitions 2; "
        "first read at api/deps.py:88; shape `find app.users {_id: ?}`"
    ) in bottlenecks
    text = section(markdown, "Optimization Recommendations")
    assert (
        "1. **Duplicate read: `find` on `users` sent 2 times** on `/me` at `api/deps.py:103`"
        in (text)
    )
    assert (
        "   - Current pattern: the same `find` on `users` with shape `find app.users {_id: ?}` "
        "with the same values 2 times in one request, first at `api/deps.py:88`"
    ) in text
    assert (
        "   - Proposed pattern: read it once and pass it down (to the code that reads it "
        "again, or as a request-scoped dependency)"
    ) in text
    assert "   - Expected impact: about 30 ms saved (the time of every read but the first)" in text
    assert "Reading once: the code that read it again sees the document" in section(
        markdown, "Trade-offs"
    )
    assert "No index to recommend" in section(markdown, "Index Recommendations")


def test_caching_hit_rates_and_advice() -> None:
    doc = report.analyse(snapshot())
    rates = {c["cache"]: c["hit_rate"] for c in doc["caches"]}
    assert rates == {"servers": 0.75, "sessions": 0.1}
    text = section(report.render_markdown(doc), "Caching")
    assert "| `servers` | 75% | 30 | 10 | 0 / 0 | 10 / 100 |" in text
    assert "| `sessions` | 10% | 1 | 9 | 7 / 0 | 2 / 2 |" in text
    assert (
        "- `sessions`: hits only 10%, and 7 entries were pushed out for room: raise maxsize."
        in (text)
    )


def test_verification_and_trade_offs_follow_the_findings() -> None:
    markdown = report.render_markdown(report.analyse(snapshot()))
    verification = section(markdown, "Verification")
    assert (
        "perfmw report --url http://svc:8000 --interval 60 --format json --out before.json"
    ) in verification
    assert "perfmw report --compare before.json after.json" in verification
    assert 'http_server_request_duration_seconds_bucket{http_route="/reports/blocking"}' in (
        verification
    )
    assert "assert_max_queries" in verification
    trade_offs = section(markdown, "Trade-offs")
    assert "Batching with `$in`" in trade_offs
    assert "Indexes: each one slows inserts" in trade_offs


def test_nothing_found_is_said_plainly_in_every_section() -> None:
    markdown = report.render_markdown(report.analyse(snapshot("", [])))
    assert [line for line in markdown.splitlines() if line.startswith("## ")] == [
        f"## {title}" for title in report.SECTIONS
    ]
    assert "No request was measured" in section(markdown, "Current Performance")
    assert "No bottleneck found" in section(markdown, "Bottlenecks Identified")
    assert "No optimization to recommend" in section(markdown, "Optimization Recommendations")
    assert "No index to recommend" in section(markdown, "Index Recommendations")
    assert "No cache is watched" in section(markdown, "Caching")
    assert "nothing to trade off" in section(markdown, "Trade-offs")


def test_two_scrapes_report_only_what_happened_between() -> None:
    before_metrics = METRICS.replace(
        _duration(AGENTS, "200", [0, 50, 90, 100, 100], 3.0),
        _duration(AGENTS, "200", [0, 20, 36, 40, 40], 1.2),
    ).replace(
        _per_request("perfmw_request_db_queries", AGENTS, 100, 2100),
        _per_request("perfmw_request_db_queries", AGENTS, 40, 840),
    )
    before_findings = [dict(FINDINGS[0], count=40, total_seconds=0.8), FINDINGS[1]]
    before = snapshot(before_metrics, before_findings, at=1000.0)
    doc = report.analyse(snapshot(at=1030.0), before)
    rows = {row["route"]: row for row in doc["routes"]}
    assert rows["/servers-with-agents"]["requests"] == 60
    assert rows["/servers-with-agents"]["rate_per_second"] == pytest.approx(2.0)
    assert "/reports/blocking" not in rows  # no request there between the scrapes
    assert [(f["kind"], f["count"]) for f in doc["findings"]] == [
        ("n_plus_one", 60),
        ("missing_index", 1),
    ]
    assert doc["window_seconds"] == pytest.approx(30.0)


def test_two_scrapes_count_only_the_wait_for_the_loop_between_them() -> None:
    # The stalls between the scrapes: 5 of them, 0.75 s; the other requests waited
    # 3.0 s for them (delayed_seconds grows like total_seconds, the rest is the latest's).
    def stalls(count: int, seconds: float, delayed: float, waiting: int) -> dict[str, Any]:
        detail = dict(FINDINGS[1]["detail"], delayed_seconds=delayed, requests_waiting=waiting)
        return dict(FINDINGS[1], count=count, total_seconds=seconds, detail=detail)

    before = snapshot(findings=[stalls(3, 0.45, 1.5, 2)], at=1000.0)
    doc = report.analyse(snapshot(findings=[stalls(8, 1.2, 4.5, 3)], at=1030.0), before)
    (finding,) = doc["findings"]
    assert (finding["count"], round(finding["total_seconds"], 9)) == (5, 0.75)
    assert (finding["detail"]["delayed_seconds"], finding["detail"]["requests_waiting"]) == (3.0, 3)
    (recommended,) = doc["recommendations"]
    assert round(recommended["saved_seconds"], 9) == 3.0
    evidence = "- **Evidence:** seen 5 stalls, 750 ms; latest 150 ms; the other requests "
    assert evidence + "waited 3.00 s; cause blocking;" in report.render_markdown(doc)


def test_compare_table_with_changes_in_percent(tmp_path: Path) -> None:
    before = report.analyse(snapshot())
    fixed = METRICS.replace(
        _per_request("perfmw_request_db_queries", AGENTS, 100, 2100),
        _per_request("perfmw_request_db_queries", AGENTS, 100, 200),
    )
    after = report.analyse(snapshot(fixed, []))
    (tmp_path / "before.json").write_text(report.render_json(before))
    (tmp_path / "after.json").write_text(report.render_json(after))
    text = report.render_compare(
        report.load_report(str(tmp_path / "before.json")),
        report.load_report(str(tmp_path / "after.json")),
    )
    assert (
        "| `GET /servers-with-agents` | 25 ms | 25 ms | +0% | 95 ms | 95 ms | +0% "
        "| 21.00 | 2.00 | -90% | 0 | 0 |"
    ) in text
    assert "| `servers` | 75% | 75% | +0% |" in text
    assert "Findings: 3 before, 0 after." in text


def test_parse_errors_are_one_line() -> None:
    with pytest.raises(report.ReportError, match="did not answer a Prometheus exposition"):
        report.parse_samples("this is { not prometheus\n")


# The command line against real services.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PERFMW_ACCESS_TOKEN"}
    return subprocess.run(
        [*(command or [sys.executable, "-m", "perfmw"]), "report", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def quiet_app(registry: CollectorRegistry, **settings: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/fast")
    async def fast() -> dict[str, str]:
        return {"ok": "yes"}

    perfmw.instrument(app, settings=perfmw.Settings(**settings), registry=registry)
    return app


def test_unreachable_service_is_one_line_no_traceback() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    script = Path(sys.executable).parent / "perfmw"  # the installed console script
    for result in (run_cli("--url", url), run_cli("--url", url, command=[str(script)])):
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr == (
            f"perfmw report: cannot reach {url}/metrics: [Errno 111] Connection refused\n"
        )


def test_refused_token_is_one_line_no_traceback(registry: CollectorRegistry) -> None:
    app = quiet_app(registry, access_token="s3cret")
    with serve(app) as server:
        missing = run_cli("--url", server.url)
        wrong = run_cli("--url", server.url, "--token", "nope")
        right = run_cli("--url", server.url, "--token", "s3cret")
    assert missing.returncode == wrong.returncode == 1
    assert missing.stderr == (
        f"perfmw report: {server.url}/metrics answered 401 Unauthorized: "
        "it needs a token (--token)\n"
    )
    assert wrong.stderr == (
        f"perfmw report: {server.url}/metrics answered 401 Unauthorized: "
        "the token given was refused\n"
    )
    assert right.returncode == 0, right.stderr
    assert "## Current Performance" in right.stdout


def test_service_with_no_findings_says_so(
    registry: CollectorRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = quiet_app(registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(5):
            assert client.get("/fast").status_code == 200
        assert main(["report", "--url", server.url]) == 0
        markdown = capsys.readouterr().out
        out = tmp_path / "now.json"
        assert main(["report", "--url", server.url, "--format", "json", "--out", str(out)]) == 0
        assert capsys.readouterr().out == ""
    assert "No bottleneck found: perfmw recorded no finding in this window." in markdown
    assert "No optimization to recommend: nothing was found to fix." in markdown
    assert "| `GET /fast` | 5 | n/a |" in markdown
    document = json.loads(out.read_text())
    assert document["perfmw_report"] == report.FORMAT_VERSION
    assert document["findings"] == []
    assert [(r["route"], r["requests"]) for r in document["routes"]] == [("/fast", 5)]
    assert document["pid"] == os.getpid()


def test_interval_measures_the_rate_between_two_scrapes(
    registry: CollectorRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    app = quiet_app(registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        client.get("/fast")  # before the window: not counted
        timer = threading.Timer(0.3, lambda: [client.get("/fast") for _ in range(4)])
        timer.start()
        assert main(["report", "--url", server.url, "--interval", "1", "--format", "json"]) == 0
        timer.join()
    document = json.loads(capsys.readouterr().out)
    [row] = document["routes"]
    assert row["requests"] == 4
    assert row["rate_per_second"] == pytest.approx(4 / document["window_seconds"])
    assert 1.0 <= document["window_seconds"] < 5


def test_compare_reads_json_reports_and_rejects_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.json"
    path.write_text(report.render_json(report.analyse(snapshot())))
    assert main(["report", "--compare", str(path), str(path)]) == 0
    assert "| `GET /reports/blocking` |" in capsys.readouterr().out
    (tmp_path / "r.md").write_text("# a markdown report\n")
    assert main(["report", "--compare", str(path), str(tmp_path / "r.md")]) == 1
    err = capsys.readouterr().err
    assert err == f"perfmw report: {tmp_path / 'r.md'} is not JSON: write it with --format json\n"
    missing = tmp_path / "missing.json"
    assert main(["report", "--compare", str(path), str(missing)]) == 1
    assert capsys.readouterr().err == (
        f"perfmw report: cannot read {missing}: No such file or directory\n"
    )


def test_starved_stalls_are_the_machine_not_a_bottleneck() -> None:
    starved = {
        "kind": "loop_stall",
        "route": "/health",
        "count": 2,
        "total_seconds": 0.3,
        "location": "app/main.py:3",
        "detail": {"cause": "starved", "duration_seconds": 0.15, "stack": []},
        "first_seen": 1.0,
        "last_seen": 2.0,
    }
    doc = report.analyse(snapshot(findings=[*FINDINGS, starved]))
    assert [b["kind"] for b in doc["bottlenecks"]] == ["n_plus_one", "loop_stall", "missing_index"]
    assert "/health" not in {r["route"] for r in doc["recommendations"]}
    assert doc["starved"] == {"stalls": 2, "seconds": 0.3, "routes": ["/health"], "causes": {}}
    markdown = report.render_markdown(doc)
    assert "`/health`" not in section(markdown, "Bottlenecks Identified")
    assert "starved of CPU in 2 stalls (300 ms in total, during `/health`)" in section(
        markdown, "Current Performance"
    )


def test_stalls_the_machine_caused_are_told_from_the_metrics_apart_from_the_codes() -> None:
    machine = "\n".join(
        [
            "# TYPE perfmw_event_loop_stalls_total counter",
            f'perfmw_event_loop_stalls_total{{http_route="{BLOCKING}",cause="blocking"}} 8.0',
            'perfmw_event_loop_stalls_total{http_route="<background>",cause="starved"} 3.0',
            'perfmw_event_loop_stalls_total{http_route="<background>",cause="throttled"} 2.0',
            'perfmw_event_loop_stalls_total{http_route="<background>",cause="cpu"} 1.0',
            "",
        ]
    )
    metrics = METRICS.replace(
        "# TYPE perfmw_event_loop_stalls_total counter\n"
        f'perfmw_event_loop_stalls_total{{http_route="{BLOCKING}",cause="blocking"}} 8.0\n',
        machine,
    )
    doc = report.analyse(snapshot(metrics))
    assert doc["starved"] == {
        "stalls": 5,
        "seconds": None,
        "routes": ["<background>"],
        "causes": {"starved": 3, "throttled": 2},
    }
    assert {r["route"]: r["stalls"] for r in doc["routes"]} == {AGENTS: 0, BLOCKING: 8}
    assert "starved of CPU in 5 stalls (3 starved, 2 throttled, during `<background>`)" in section(
        report.render_markdown(doc), "Current Performance"
    )


def test_a_change_that_saves_no_server_time_says_what_it_saves() -> None:
    large = {
        "kind": "large_response",
        "route": "/export",
        "count": 4,
        "total_seconds": 0.8,
        "location": "app/export.py:10",
        "detail": {"bytes": 700 * 1024, "problems": ["uncompressed"], "method": "GET"},
        "first_seen": 1.0,
        "last_seen": 2.0,
    }
    text = section(
        report.render_markdown(report.analyse(snapshot(findings=[large]))),
        "Optimization Recommendations",
    )
    assert "1. **Large response (700 KiB)** on `/export` at `app/export.py:10`" in text
    assert "   - Current pattern: 700 KiB sent without Content-Encoding" in text
    assert "   - Proposed pattern: compress it (`GZipMiddleware`)" in text
    assert "   - Expected impact: bytes on the wire and the clients' time, not the server's" in text


def test_a_service_without_findings_endpoint_still_gets_its_metrics(
    registry: CollectorRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    app = quiet_app(registry, findings_path=None)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/fast").status_code == 200
        assert main(["report", "--url", server.url]) == 0
    markdown = capsys.readouterr().out
    assert "| `GET /fast` | 1 | n/a |" in markdown
    assert "Not known: the service serves no findings endpoint" in section(
        markdown, "Bottlenecks Identified"
    )


def test_findings_of_several_workers_add_up_per_site() -> None:
    worker_a = [dict(FINDINGS[0], count=30, total_seconds=0.6, last_seen=10.0)]
    worker_b = [
        dict(FINDINGS[0], count=70, total_seconds=1.4, first_seen=5.0, last_seen=20.0),
        FINDINGS[1],
    ]
    merged = report.merge_findings([worker_a, worker_b])
    assert [(f["kind"], f["count"], f["total_seconds"]) for f in merged] == [
        ("n_plus_one", 100, pytest.approx(2.0)),
        ("loop_stall", 8, 1.2),
    ]
    assert (merged[0]["first_seen"], merged[0]["last_seen"]) == (5.0, 20.0)
    doc = report.analyse(report.Snapshot("http://svc:8000", 1.0, {}, merged, 11, True, [11, 12]))
    assert "The findings merge what 2 workers answered (pids 11, 12)" in (
        report.render_markdown(doc)
    )


def test_probing_one_worker_several_times_counts_it_once(
    registry: CollectorRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    app = FastAPI()

    @app.get("/big")
    async def big() -> str:
        return "x" * 100_000  # a large_response finding per request

    perfmw.instrument(app, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            assert client.get("/big").status_code == 200
        assert main(["report", "--url", server.url, "--probes", "4", "--format", "json"]) == 0
        assert main(["report", "--url", server.url, "--probes", "0"]) == 2
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["pids"] == [os.getpid()]
    assert [(f["kind"], f["count"]) for f in document["findings"]] == [("large_response", 3)]
    assert err == "perfmw report: --probes must be between 1 and 100, got 0\n"


def test_usage_errors_exit_2_and_failures_at_run_time_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: arguments are checked first
    usage = [
        (["--url", url, "--job", "api"], "--job and --selector go with --prometheus"),
        (["--url", url, "--interval", "-1"], "--interval must be >= 0, got -1.0"),
        (["--url", url, "--interval", "inf"], "--interval must be >= 0, got inf"),
        (["--url", url, "--probes", "101"], "--probes must be between 1 and 100, got 101"),
        (["--url", url, "--timeout", "0"], "--timeout must be > 0, got 0.0"),
        (
            ["--url", "127.0.0.1:8000"],
            "--url must start with http:// or https://, got '127.0.0.1:8000'",
        ),
        (
            ["--url", "http://127.0.0.1:port"],
            "cannot ask http://127.0.0.1:port/metrics: nonnumeric port: 'port'",
        ),
    ]
    for args, message in usage:
        assert main(["report", *args]) == 2, args
        assert capsys.readouterr() == ("", f"perfmw report: {message}\n")
    path = tmp_path / "r.json"
    path.write_text(report.render_json(report.analyse(snapshot())))
    out = tmp_path / "missing" / "out.md"
    assert main(["report", "--compare", str(path), str(path), "--out", str(out)]) == 1
    assert capsys.readouterr() == (
        "",
        f"perfmw report: cannot write {out}: No such file or directory\n",
    )
    with pytest.raises(SystemExit) as exited:  # argparse's own usage errors: status 2 too
        main(["report", "--url", url, "--probes", "many"])
    assert exited.value.code == 2
    assert "argument --probes: invalid int value: 'many'" in capsys.readouterr().err


def test_compare_refuses_report_files_of_the_wrong_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.json"
    document = json.loads(report.render_json(report.analyse(snapshot())))
    good.write_text(json.dumps(document))
    bad = tmp_path / "bad.json"
    cases = [
        ({**document, "routes": [{"route": "/x"}]}, 'holds routes[0] with no "method"'),
        (
            {**document, "caches": [{"cache": "users", "hit_rate": "75%"}]},
            'holds caches[0].hit_rate that is the string "75%", not a number or null',
        ),
        ({**document, "routes": "none"}, 'holds routes that is the string "none", not a list'),
        (
            {**document, "perfmw_report": 2},
            "is a perfmw report of format 2; this perfmw reads format 1",
        ),
        ({"routes": []}, "is not a perfmw JSON report: write it with --format json"),
        ([document], "is not a perfmw JSON report: write it with --format json"),
    ]
    for content, problem in cases:
        bad.write_text(json.dumps(content))
        assert main(["report", "--compare", str(good), str(bad)]) == 1
        assert capsys.readouterr() == ("", f"perfmw report: {bad} {problem}\n")
    bad.write_text("[" * 10_000 + "]" * 10_000)
    assert main(["report", "--compare", str(bad), str(good)]) == 1
    assert capsys.readouterr().err == (
        f"perfmw report: {bad} holds JSON nested deeper than 64 levels\n"
    )


# What the application names is shown as text, never as markup: a report rendered by a Markdown
# viewer runs none of it.

HOSTILE = "<script>alert(1)</script>\n`x``|<img src=x onerror=alert(1)>"
_MARKDOWN = MarkdownIt("commonmark").enable("table")


def assert_no_html(markdown: str) -> str:
    """The HTML a CommonMark (+ tables) viewer makes of `markdown`, which must hold none of its
    own: no raw HTML token, no tag the text did not write."""
    tokens = _MARKDOWN.parse(markdown)
    for token in [*tokens, *(child for t in tokens for child in t.children or ())]:
        assert token.type not in ("html_block", "html_inline"), token
    rendered = _MARKDOWN.render(markdown)
    assert "<script" not in rendered and "<img" not in rendered
    return rendered


def shown(value: str) -> str:
    """How the HTML shows a string of the application: on one line, as text."""
    return html.escape(value.replace("\n", "\\n"), quote=False).replace('"', "&quot;")


HOSTILE_APP = """
import time

import perfmw
from fastapi import FastAPI


def build(route, registry, mongo_uri, collection, field):
    app = FastAPI()

    @app.get(route)
    async def hostile():
        for n in range(6):
            await app.state.db[collection].find_one({field: n})
        time.sleep(0.15)
        return "done"

    perfmw.instrument(app, registry=registry)
    from pymongo import AsyncMongoClient

    app.state.db = AsyncMongoClient(mongo_uri)["report"]
    return app
"""


def test_the_applications_strings_are_text_in_the_markdown_report(
    registry: CollectorRegistry,
    mongo_uri: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real app whose route, collection, query field and source file (its findings' location
    and stack frames) hold HTML, backticks, `|` and a line break."""
    folder = (
        tmp_path / "`|\n<script>alert(1)<"
    )  # with the file name: .../<script>alert(1)</script>...
    folder.mkdir()
    source = folder / "script><img src=x onerror=alert(1)>.py"
    source.write_text(HOSTILE_APP)
    spec = importlib.util.spec_from_file_location("hostile_app", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    route, collection = "/r/" + HOSTILE, "<img src=x onerror=alert(1)>`|"
    app = module.build(route, registry, mongo_uri, collection, HOSTILE)
    with serve(app) as server:
        path = urllib.parse.quote(route, safe="/")
        assert httpx.get(server.url + path, timeout=30).status_code == 200

        def found() -> bool:  # a stall is settled by the watchdog, maybe after the response
            kinds = {
                f["kind"] for f in httpx.get(server.url + "/perfmw/findings").json()["findings"]
            }
            return kinds == {"n_plus_one", "loop_stall"}

        wait_for(found, 30, "the N+1 and the stall found")
        assert main(["report", "--url", server.url, "--format", "json"]) == 0
        document = json.loads(capsys.readouterr().out)
        assert main(["report", "--url", server.url]) == 0
        markdown = capsys.readouterr().out
    found = {f["kind"]: f for f in document["findings"]}
    assert {f["route"] for f in found.values()} == {route}
    location = found["loop_stall"]["location"]
    assert "<script>alert(1)</script><img src=x onerror=alert(1)>.py:" in location
    assert found["loop_stall"]["detail"]["stack"][-1] == f"{location} in hostile"
    shape = found["n_plus_one"]["detail"]["shape"]
    assert shape == f"find report.{collection} {{{HOSTILE}: ?}}"
    rendered = assert_no_html(markdown)
    # Each of them still reads as it is, a line break shown as \n.
    assert f"<td><code>GET {shown(route)}</code></td>" in rendered  # the table's | unescaped
    assert f"on <code>{shown(route)}</code></h3>" in rendered
    assert f"<li><strong>Location:</strong> <code>{shown(location)}</code></li>" in rendered
    assert f"innermost frame <code>{shown(location)} in hostile</code>" in rendered
    assert f"shape <code>{shown(shape)}</code>" in rendered
    assert f"N+1 queries: <code>find</code> on <code>{shown(collection)}</code>" in rendered
    assert f"http_route={shown(json.dumps(route))}" in rendered  # a PromQL string


def test_strings_the_real_app_cannot_hold_are_text_too() -> None:
    """Cache names, `via`, index keys, evidence and unknown kinds, from a recorded scrape; and a
    report file's routes and caches in the before/after table."""
    label = HOSTILE.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    metrics = METRICS + "\n".join(
        [
            "# TYPE perfmw_cache_requests_total counter",
            f'perfmw_cache_requests_total{{cache="{label}",result="hit"}} 3.0',
            "",
        ]
    )
    findings = [
        {**FINDINGS[0], "via": HOSTILE},
        {**FINDINGS[2], "detail": {**FINDINGS[2]["detail"], "index": [[HOSTILE, 1]]}},
        {**FINDINGS[1], "detail": {"cause": HOSTILE, "stack": [HOSTILE]}},
        {
            "kind": "unbounded_read",
            "route": HOSTILE,
            "count": 1,
            "location": HOSTILE,
            "detail": {"operation": HOSTILE, "collection": HOSTILE, "missing": [HOSTILE]},
        },
        {"kind": "blocking_call", "route": "/b", "count": 1, "detail": {"kind": HOSTILE}},
        {"kind": "large_response", "route": "/l", "count": 1, "detail": {"problems": [HOSTILE]}},
        {"kind": HOSTILE, "route": "/k", "count": 1, "detail": {HOSTILE: HOSTILE}},
    ]
    doc = report.analyse(snapshot(metrics, findings))
    rendered = assert_no_html(report.render_markdown(doc))
    assert f"<td><code>{shown(HOSTILE)}</code></td>" in rendered  # the cache
    assert f"<li><code>{shown(HOSTILE)}</code>: hits 100% of lookups" in rendered
    assert f"via <code>{shown(HOSTILE)}</code>" in rendered
    assert f"<td>{shown(HOSTILE)}</td>" in rendered  # the index's field
    assert f"Event loop stalled ({shown(HOSTILE)})" in rendered
    assert f"without {shown(HOSTILE)}" in rendered
    before = report.analyse(snapshot(metrics.replace(AGENTS, label)))
    compared = report.render_compare(before, doc)
    assert_no_html(compared)
    assert f"<td><code>GET {shown(HOSTILE)}</code></td>" in _MARKDOWN.render(compared)


def test_the_version_is_the_installed_distributions() -> None:
    installed = importlib.metadata.version("perfmw")
    done = subprocess.run(
        [sys.executable, "-m", "perfmw", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"perfmw {installed}\n", "")
    assert perfmw.__version__ == installed


@pytest.mark.parametrize(
    ("cause", "proposed", "complexity"),
    [
        (
            "gc",
            "`gc.freeze()` once start-up has built its long-lived objects, fewer reference cycles "
            "per request, and a higher `gc.set_threshold` if young collections are frequent",
            "medium",
        ),
        (
            "blocking",
            "move it off the loop: `await run_in_threadpool(fn)` / `asyncio.to_thread(fn)`, an "
            "async library, or make the endpoint a plain `def`",
            "low",
        ),
        (
            "cpu",
            "run it in a process pool (`loop.run_in_executor(ProcessPoolExecutor(), fn)`), or cut "
            "it into steps with `await asyncio.sleep(0)` between them; a thread does not help "
            "while it holds the GIL",
            "medium",
        ),
        (
            "starved",
            "no change to the code: give the worker more CPU (fewer processes per core, a less "
            "busy host) and look at what else runs there",
            "capacity, not code",
        ),
        (
            "throttled",
            "no change to the code: raise the CPU limit (or drop it and keep the request), or "
            "run fewer worker processes in the container",
            "capacity, not code",
        ),
    ],
)
def test_a_stall_is_advised_by_its_cause(cause: str, proposed: str, complexity: str) -> None:
    stall = {"kind": "loop_stall", "total_seconds": 0.3, "detail": {"cause": cause}}
    found = advice(stall)
    assert found["title"] == f"Event loop stalled ({cause})"
    assert found["proposed"] == proposed
    assert found["complexity"] == complexity


@pytest.mark.parametrize(
    ("cause", "delayed", "saved", "basis"),
    [
        (
            "blocking",
            0.9,
            0.9,
            "the other requests waiting during the stalls, 3 at the latest one, waited for the "
            "loop; the work itself still takes its time, off the loop",
        ),
        (
            "gc",
            0.9,
            1.2,
            "the other requests waiting during the stalls, 3 at the latest one, waited for the "
            "loop, and the collections' own time is given back",
        ),
        ("cpu", 0.1, 0.3, "the whole stall is given back to the other requests"),
        ("blocking", None, 0.3, "the whole stall is given back to the other requests"),
    ],
)
def test_a_stall_is_expected_to_give_back_the_other_requests_wait(
    cause: str, delayed: float | None, saved: float, basis: str
) -> None:
    # The stalls took 0.3 s. The requests counted waited `delayed` for them; a count may miss
    # some, so the wait is at least the stalls' own time (all there is for Prometheus's
    # findings, which carry no count).
    detail: dict[str, Any] = {"cause": cause}
    if delayed is not None:
        detail.update(delayed_seconds=delayed, requests_waiting=3)
    found = advice({"kind": "loop_stall", "total_seconds": 0.3, "detail": detail})
    assert (round(found["saved"], 9), found["basis"]) == (saved, basis)


@pytest.mark.parametrize(
    ("detail", "saved", "basis"),
    [
        (
            {"delayed_seconds": 0.12, "requests_waiting": 3},
            0.12,
            "the other requests waiting during the calls, 3 at the latest one, waited for the "
            "loop; the calls themselves still take their time, off the loop",
        ),
        # No other request in flight (or a finding without the count): the calls' own time.
        (
            {"delayed_seconds": 0.0, "requests_waiting": 0},
            0.04,
            "the loop no longer waits for these calls",
        ),
        ({}, 0.04, "the loop no longer waits for these calls"),
    ],
)
def test_a_blocking_call_is_expected_to_give_back_the_other_requests_wait(
    detail: dict[str, Any], saved: float, basis: str
) -> None:
    found = advice(
        {
            "kind": "blocking_call",
            "total_seconds": 0.04,
            "detail": {"kind": "pymongo-sync", **detail},
        }
    )
    assert (round(found["saved"], 9), found["basis"]) == (saved, basis)


@pytest.mark.parametrize(
    ("count", "detail", "saved", "basis"),
    [
        # Two scans of 20 ms on the server, each examining 1000 documents to return 100.
        (
            2,
            {"docs_examined": 1000, "docs_returned": 100, "execution_seconds": 0.02},
            0.036,
            "the scan examined 1000 documents to return 100: an index reads only the matching "
            "ones, saving 90% of the server's 20 ms per query; the round trip and the results "
            "stay",
        ),
        # The server's time is more than the app measured (explain ran on a busier moment):
        # never more than the queries' own time.
        (
            2,
            {"docs_examined": 1000, "docs_returned": 0, "execution_seconds": 0.2},
            0.05,
            "the scan examined 1000 documents to return 0: an index reads only the matching "
            "ones, saving 100% of the server's 200 ms per query; the round trip and the results "
            "stay",
        ),
        # No executionStats (the server did not say, or a finding from Prometheus).
        (2, {}, 0.045, "an index scan reads only the matching entries; assumed 90% of its time"),
        (
            2,
            {"docs_examined": 0, "docs_returned": 0, "execution_seconds": 0.0},
            0.045,
            "an index scan reads only the matching entries; assumed 90% of its time",
        ),
    ],
)
def test_a_missing_index_is_expected_to_save_the_documents_the_scan_examined_in_vain(
    count: int, detail: dict[str, Any], saved: float, basis: str
) -> None:
    found = advice(
        {
            "kind": "missing_index",
            "count": count,
            "total_seconds": 0.05,
            "detail": {"collection": "servers", "index": [["owner", 1]], **detail},
        }
    )
    assert (round(found["saved"], 9), found["basis"]) == (saved, basis)
