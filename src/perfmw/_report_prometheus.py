"""The report's data from a Prometheus server: every replica it scrapes, as one service.

    perfmw report --prometheus http://prometheus:9090 --job api --since 1h

Each metric the report reads is asked of Prometheus's HTTP query API (Thanos and Mimir answer the
same API): counters and histograms as what they counted over the window, summed over the series
of every replica by the analysis; gauges as they are now. The result is the same `Snapshot` a
scrape of one service gives, so `analyse` writes the same report. Findings come from
`perfmw_findings_total` and `perfmw_finding_seconds_total`: their kind, route, line, count and
time (their stacks and examples stay in each worker).

What a counter counted over the window is its value at the end less its value at the start, or
its value at the end for a series born within the window (a replica started since), so that the
totals are exact; a series that went back to 0 (a restarted process) counts from its reset.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.parse
from collections import defaultdict
from typing import Any

from ._report_input import (
    PROMETHEUS_ANSWER,
    Malformed,
    NotJson,
    check_sample,
    load,
    parse,
)
from .report import COUNTED, CURRENT, ReportError, SampleKey, Snapshot, UsageError, fetch

#: A finding counted with no application line (see exporters/prometheus.py).
UNKNOWN_LOCATION = "<unknown>"
_DURATION = re.compile(r"^([1-9][0-9]*)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def window_seconds(since: str) -> float:
    """`--since` as seconds: a whole number and a unit, `90s`, `30m`, `1h`, `7d`, `2w`."""
    found = _DURATION.match(since)
    if found is None:
        raise UsageError(f"--since must be a duration such as 30m, 1h or 7d, got {since!r}")
    return int(found[1]) * _SECONDS[found[2]]


def selector_for(job: str | None, selector: str | None) -> str:
    """The label matchers every query carries: `{job="api"}`, or the user's own."""
    if selector is not None:
        selector = selector.strip()
        if not (selector.startswith("{") and selector.endswith("}")):
            raise UsageError(f"--selector must be label matchers in braces, got {selector!r}")
        return selector
    if job is not None:
        return "{job=" + json.dumps(job) + "}"
    return ""


def counted_expr(name: str, selector: str, since: str) -> str:
    series = f"{name}{selector}"
    latest = f"last_over_time({series}[{since}])"
    return f"({latest} - ({series} offset {since})) >= 0 or {latest}"


class Prometheus:
    """Instant queries against one Prometheus HTTP API; ReportError for every bad answer."""

    def __init__(self, url: str, timeout: float) -> None:
        base = url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise UsageError(f"--prometheus must start with http:// or https://, got {url!r}")
        self.url = base
        self.timeout = timeout

    def query(self, expr: str) -> list[dict[str, Any]]:
        address = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        subject = f"Prometheus at {self.url}"
        try:
            raw = fetch(address, {"User-Agent": "perfmw-report"}, self.timeout, subject)
        except urllib.error.HTTPError as exc:
            raise ReportError(self._refused(exc, expr)) from None
        try:
            document = load(raw, PROMETHEUS_ANSWER)
        except NotJson:
            raise ReportError(f"{subject} did not answer its query API's JSON to {expr}") from None
        except Malformed as exc:
            raise ReportError(f"{subject} answered {exc} to {expr}") from None
        if document["status"] != "success" or "data" not in document:
            raise ReportError(f"{subject} did not answer its query API's JSON to {expr}")
        if document["data"]["resultType"] != "vector":
            raise ReportError(f"{subject} answered no instant vector to {expr}")
        result: list[dict[str, Any]] = document["data"]["result"]
        return result

    def _refused(self, exc: urllib.error.HTTPError, expr: str) -> str:
        try:
            document = parse(exc.read(64 * 1024))
        except (Malformed, OSError, http.client.HTTPException):  # no reason, or none readable
            document = None
        why = document.get("error") if isinstance(document, dict) else None
        if isinstance(why, str) and exc.code in (400, 422):
            return f"Prometheus at {self.url} rejected the query {expr}: {why}"
        reason = f": {why}" if isinstance(why, str) else ""
        return f"Prometheus at {self.url} answered {exc.code} {exc.reason}{reason}"


def _value(item: dict[str, Any]) -> float:
    return float(item["value"][1])  # a finite number in a string: PROMETHEUS_ANSWER says so


def collect_prometheus(
    url: str,
    *,
    job: str | None = None,
    selector: str | None = None,
    since: str = "1h",
    timeout: float = 10.0,
) -> tuple[Snapshot, float]:
    """The service's snapshot over the last `since`, and the window in seconds."""
    window = window_seconds(since)
    matchers = selector_for(job, selector)
    prometheus = Prometheus(url, timeout)
    samples: dict[SampleKey, float] = defaultdict(float)
    series: dict[str, list[dict[str, Any]]] = {}
    for name in COUNTED + CURRENT:
        expr = counted_expr(name, matchers, since) if name in COUNTED else f"{name}{matchers}"
        series[name] = prometheus.query(expr)
        for item in series[name]:
            labels = {k: v for k, v in item["metric"].items() if k != "__name__"}
            try:
                check_sample(name, labels, _value(item))
            except Malformed as exc:
                raise ReportError(
                    f"Prometheus at {prometheus.url} answered {exc} to {expr}"
                ) from None
            samples[(name, frozenset(labels.items()))] += _value(item)
    if not series["http_server_request_duration_seconds_count"]:
        raise ReportError(
            f"Prometheus at {prometheus.url} has no perfmw metrics for "
            f"{matchers or 'any job'} over the last {since}: check --job or --selector, and "
            "that Prometheus scrapes the service's /metrics"
        )
    findings = _findings(series)
    source = {"url": prometheus.url, "selector": matchers, "since": since}
    snapshot = Snapshot(prometheus.url, time.time(), dict(samples), findings, None, True, [])
    snapshot.prometheus = source
    return snapshot, window


def _findings(series: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The findings the counters tell, enriched with what other counters say of their route."""
    sites: dict[tuple[str, str, str], dict[str, Any]] = {}
    for name, field in (("perfmw_findings_total", "count"), ("perfmw_finding_seconds_total", "t")):
        for item in series[name]:
            labels = item["metric"]
            key = (labels.get("kind", ""), labels.get("http_route", ""), labels.get("location", ""))
            site = sites.setdefault(key, {"count": 0.0, "t": 0.0})
            site[field] += _value(item)
    stalls = _by_route(series["perfmw_event_loop_stalls_total"], ("cause",))
    repeated = _by_route(
        series["perfmw_n_plus_one_total"], ("db_collection_name", "db_operation_name")
    )
    found = []
    for (kind, route, location), site in sites.items():
        count = round(site["count"])
        if count <= 0:
            continue
        detail: dict[str, Any] = {}
        if kind == "loop_stall" and len(stalls.get(route, ())) == 1:
            (detail["cause"],) = stalls[route][0]
        if kind == "n_plus_one" and len(repeated.get(route, ())) == 1:
            detail["collection"], detail["operation"] = repeated[route][0]
        found.append(
            {
                "kind": kind,
                "route": route,
                "count": count,
                "total_seconds": site["t"],
                "location": None if location == UNKNOWN_LOCATION else location,
                "via": None,
                "detail": detail,
                "first_seen": 0.0,
                "last_seen": 0.0,
            }
        )
    return sorted(found, key=lambda f: -float(f["total_seconds"]))


def _by_route(
    items: list[dict[str, Any]], names: tuple[str, ...]
) -> dict[str, list[tuple[str, ...]]]:
    """Per route, the distinct values of `names` whose series counted something."""
    found: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for item in items:
        if _value(item) > 0:
            labels = item["metric"]
            found[labels.get("http_route", "")].add(tuple(labels.get(n, "") for n in names))
    return {route: sorted(values) for route, values in found.items()}
