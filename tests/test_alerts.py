"""The shipped Prometheus rules and Grafana dashboard, checked with the real promtool.

docs/prometheus/alerts.yml must load (`promtool check rules`) and pass its unit tests
(`promtool test rules`: every alert fires on a bad series and stays quiet on a healthy one);
every alert has the annotations and runbook section an on-call engineer needs; every query of
docs/grafana/perfmw-dashboard.json is valid PromQL over metric names perfmw exports.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from perfmw.exporters.prometheus import PrometheusSink
from prometheus_server import tool

DOCS = Path(__file__).resolve().parent.parent / "docs"
RULES = DOCS / "prometheus" / "alerts.yml"
RULE_TESTS = DOCS / "prometheus" / "alerts.test.yml"
DASHBOARD = DOCS / "grafana" / "perfmw-dashboard.json"
RUNBOOK = DOCS / "alerts.md"

#: DESIGN.md's metric table: name -> type (samples of histograms: _bucket, _sum, _count).
EXPORTED = {
    "http_server_request_duration_seconds": "histogram",
    "http_server_active_requests": "gauge",
    "http_server_response_body_size_bytes": "histogram",
    "perfmw_request_db_queries": "histogram",
    "perfmw_request_db_seconds": "histogram",
    "db_client_operation_duration_seconds": "histogram",
    "db_client_connection_wait_time_seconds": "histogram",
    "db_client_connection_count": "gauge",
    "perfmw_n_plus_one": "counter",
    "perfmw_slow_queries": "counter",
    "perfmw_event_loop_stalls": "counter",
    "perfmw_event_loop_stall_seconds": "histogram",
    "perfmw_event_loop_lag_seconds": "gauge",
    "perfmw_gc_pause_seconds": "histogram",
    "perfmw_blocking_calls": "counter",
    "perfmw_cache_requests": "counter",
    "perfmw_cache_evictions": "counter",
    "perfmw_cache_size": "gauge",
    "perfmw_cache_max_size": "gauge",
    "perfmw_internal_errors": "counter",
    "perfmw_findings": "counter",
    "perfmw_finding_seconds": "counter",
}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
SAMPLE_NAMES = {name + suffix for name, kind in EXPORTED.items() for suffix in SUFFIXES[kind]}

#: A metric name right before a selector's `{` or a range's `[`, or alone (not a function call).
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:[{\[]|$)")
#: Grafana's variables, replaced by values that keep the expression's meaning.
VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".+",
    "$route": ".+",
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def rules() -> list[dict[str, Any]]:
    """The rules of alerts.yml with their annotations, read from its fixed layout (no YAML
    parser needed; `promtool check rules` proves the file loads and counts the same rules)."""
    found: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for line in RULES.read_text().splitlines():
        match = re.match(r"\s+- (alert|record): (\S+)$", line)
        if match:
            current = {"kind": match[1], "name": match[2], "annotations": {}, "labels": {}}
            found.append(current)
            continue
        field = re.match(r"\s+(summary|description|runbook_url|severity): ?(.*)$", line)
        if field and current is not None:
            current["annotations"][field[1]] = field[2]
    return found


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if rule["kind"] == "alert"]


def test_rules_load_with_promtool() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests() -> None:
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    # Each alert has a firing case and an empty (quiet) case.
    text = RULE_TESTS.read_text()
    for alert in alerts():
        cases = re.findall(
            rf"alertname: {alert['name']}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\n  - name|\Z)",
            text,
            re.S,
        )
        assert any(case.strip() == "[]" for case in cases) or len(cases) >= 2, alert["name"]
        assert any("exp_labels" in case for case in cases), f"{alert['name']} never fires"


def test_the_issue_s_alerts_are_all_there() -> None:
    names = {alert["name"] for alert in alerts()}
    assert names == {
        "PerfmwEventLoopStalls",
        "PerfmwEventLoopStallOverOneSecond",
        "PerfmwEventLoopStarved",
        "PerfmwEventLoopLagHigh",
        "PerfmwNPlusOneQueries",
        "PerfmwRequestLatencyP99High",
        "PerfmwMongoPoolWaitHigh",
        "PerfmwCacheHitRateLow",
        "PerfmwInternalErrors",
    }
    records = {rule["name"] for rule in rules() if rule["kind"] == "record"}
    assert "job_cache:perfmw_cache_hit_ratio:rate5m" in records
    assert "job_http_route:http_server_request_duration_seconds:p99_rate5m" in records


def test_every_alert_has_summary_description_with_labels_and_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", runbook, re.M)
    }
    for alert in alerts():
        annotations = alert["annotations"]
        assert annotations.get("summary"), alert["name"]
        assert "severity" in annotations, alert["name"]
        # Folded descriptions (>-) continue on the following lines: read the rule's block.
        block = RULES.read_text().split(f"alert: {alert['name']}\n", 1)[1].split("- alert:")[0]
        description = block.split("description:", 1)[1].split("runbook_url:")[0]
        assert "{{ $labels." in description and "{{ $value" in description, alert["name"]
        anchor = alert["name"].lower()
        assert annotations["runbook_url"] == f'"docs/alerts.md#{anchor}"'
        assert anchor in headings, f"docs/alerts.md has no section for {alert['name']}"


def test_rule_metric_names_are_the_exported_ones() -> None:
    records = {rule["name"] for rule in rules() if rule["kind"] == "record"}
    exprs = re.findall(
        r"expr: ?\|?(.*?)(?=\n\s+(?:for|labels):|\n\s+- (?:record|alert):|\n  - name|\Z)",
        RULES.read_text(),
        re.S,
    )
    assert len(exprs) == len(rules())
    used = {name for expr in exprs for name in SELECTOR.findall(expr)}
    used -= {"by", "on", "without", "ignoring"}
    assert used, "no selector found"
    assert used <= SAMPLE_NAMES | records, used - SAMPLE_NAMES - records


def test_design_table_matches_the_sink() -> None:
    sink = PrometheusSink()
    assert {family.name for family in sink._families} <= set(EXPORTED)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and template variable of the dashboard."""
    document = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in document["panels"]:
        for target in panel.get("targets", ()):
            queries.append((panel["title"], target["expr"]))
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(selector, label) is Grafana's: its selector is the PromQL part.
            inner = re.fullmatch(r"label_values\((.*), *\w+\)", variable["query"]["query"])
            assert inner is not None, variable
            queries.append((f"${variable['name']}", inner[1]))
    return queries


def substitute(expr: str) -> str:
    for variable, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_dashboard_covers_the_issue_s_panels() -> None:
    document = json.loads(DASHBOARD.read_text())
    assert document["uid"] == "perfmw"
    used = {name for _, expr in dashboard_queries() for name in SELECTOR.findall(expr)}
    for needed in (
        "http_server_request_duration_seconds_count",  # request rate
        "http_server_request_duration_seconds_bucket",  # p50/p99 per route
        "perfmw_request_db_queries_sum",  # queries per request
        "perfmw_n_plus_one_total",
        "db_client_operation_duration_seconds_sum",  # DB time per collection
        "perfmw_event_loop_stalls_total",
        "perfmw_event_loop_lag_seconds",
        "perfmw_cache_requests_total",  # hit rate
        "db_client_connection_wait_time_seconds_bucket",  # pool wait
        "perfmw_findings_total",  # findings by location
        "perfmw_finding_seconds_total",
    ):
        assert needed in used, needed


def test_every_dashboard_query_is_valid_promql_over_exported_names(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for index, (title, expr) in enumerate(queries):
        names = set(SELECTOR.findall(expr)) - {"by", "on", "without", "ignoring"}
        assert names, f"{title}: no metric selector in {expr}"
        assert names <= SAMPLE_NAMES, f"{title}: not exported: {names - SAMPLE_NAMES}"
        lines.append(f"      - record: dashboard:query_{index}")
        lines.append(f"        expr: {json.dumps(substitute(expr))}")
    rule_file = tmp_path / "dashboard.rules.yml"
    rule_file.write_text("\n".join(lines) + "\n")
    checked = promtool("check", "rules", str(rule_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(queries)} rules found" in checked.stdout


@pytest.mark.parametrize("bad", ['sum(rate(foo{job=~".+"}[5m])', "perfmw_event_loop_lag_seconds >"])
def test_promtool_rejects_broken_promql(tmp_path: Path, bad: str) -> None:
    """The check above would catch a broken dashboard query."""
    rule_file = tmp_path / "broken.rules.yml"
    rule_file.write_text(
        f"groups:\n  - name: g\n    rules:\n      - record: r\n        expr: {json.dumps(bad)}\n"
    )
    assert promtool("check", "rules", str(rule_file)).returncode != 0
