"""The performance report: a running service's metrics and findings, written up as an analysis.

    perfmw report --url http://127.0.0.1:8000                  # Markdown on stdout
    perfmw report --url ... --format json --out before.json    # the same data, for --compare
    perfmw report --compare before.json after.json             # the before/after table

It reads `/metrics` (parsed with prometheus_client's parser) and `/perfmw/findings` over plain
urllib, so it runs wherever perfmw is installed, and builds one JSON-ready document (`analyse`)
that both formats render. Every section is always written, saying so when it found nothing,
so two reports compare section by section. The texts live beside it: `_report_advice.py` (what
each finding means and what to do about it), `_report_markdown.py` (the sections). What it reads
is checked first (`_report_input.py`): an answer or file that is not what perfmw writes is a
ReportError naming it and what was wrong, never an exception from deep inside the analysis.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ._report_advice import advice, index_keys, ms, pct
from ._report_escape import code, text
from ._report_input import (
    FINDINGS,
    REPORT,
    Malformed,
    NotJson,
    check_sample,
    load,
    parse,
    read_capped,
)
from ._report_markdown import SECTIONS, render_markdown, route_name
from .findings import detail_since, finding_key, merge
from .record import MACHINE_CAUSES

FORMAT_VERSION = 1
__all__ = [
    "FORMAT_VERSION",
    "SECTIONS",
    "ReportError",
    "Snapshot",
    "UsageError",
    "analyse",
    "collect",
    "finding_key",
    "load_report",
    "merge_findings",
    "parse_samples",
    "quantile",
    "render_compare",
    "render_json",
    "render_markdown",
]
SampleKey = tuple[str, frozenset[tuple[str, str]]]


class ReportError(Exception):
    """A failure the command line prints as one line (unreachable service, refused token...)."""


class UsageError(ReportError):
    """Arguments that cannot work together or are out of range (exit status 2, not 1)."""


# Reading the service.


@dataclass
class Snapshot:
    """What one scrape of a service returned."""

    url: str
    taken_at: float
    samples: dict[SampleKey, float]
    findings: list[dict[str, Any]] = field(default_factory=list)
    pid: int | None = None
    findings_served: bool = True
    pids: list[int] = field(default_factory=list)  # every worker whose findings were merged
    # Read from a Prometheus server: its URL, the matchers and window (`perfmw report` flags).
    prometheus: dict[str, str] | None = None


def fetch(url: str, headers: Mapping[str, str], timeout: float, subject: str) -> bytes:
    """The body at `url`, MAX_BYTES at most. urllib's HTTPError is raised as it is, for the
    caller's words; every other failure is a ReportError naming `subject` (the URL, or
    "Prometheus at ..."), or a UsageError when `url` cannot be asked at all."""
    try:
        request = urllib.request.Request(url, headers=dict(headers))
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return read_capped(response)
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as exc:
        raise ReportError(f"cannot reach {subject}: {exc.reason}") from None
    except Malformed as exc:
        raise ReportError(f"{subject} answered {exc}") from None
    except (http.client.InvalidURL, ValueError) as exc:  # a port that is no number, say
        raise UsageError(f"cannot ask {url}: {exc}") from None
    except http.client.HTTPException as exc:  # what answered does not speak HTTP
        raise ReportError(f"{subject} did not answer HTTP ({type(exc).__name__})") from None
    except OSError as exc:  # a timeout, a connection reset
        raise ReportError(f"cannot reach {subject}: {exc}") from None


def _get(url: str, token: str | None, timeout: float, missing_ok: bool = False) -> bytes | None:
    """The body at `url`; None for a 404 when `missing_ok`; ReportError on any failure."""
    headers = {"Accept": "text/plain; version=0.0.4", "User-Agent": "perfmw-report"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        return fetch(url, headers, timeout, url)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            given = "the token given was refused" if token else "it needs a token (--token)"
            raise ReportError(f"{url} answered 401 Unauthorized: {given}") from None
        if exc.code == 404 and missing_ok:
            return None
        raise ReportError(f"{url} answered {exc.code} {exc.reason}") from None


def parse_samples(exposition: str, source: str = "the metrics endpoint") -> dict[SampleKey, float]:
    """Every sample of a Prometheus text exposition, keyed by (sample name, labels); ReportError
    naming `source` when it is none, or a series the analysis reads has a value it cannot use."""
    found: dict[SampleKey, float] = {}
    try:
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                if sample.name in SERIES:
                    check_sample(sample.name, sample.labels, sample.value)
                found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    except Malformed as exc:
        raise ReportError(f"{source} answered {exc}") from None
    except ValueError as exc:
        raise ReportError(f"{source} did not answer a Prometheus exposition: {exc}") from None
    return found


def collect(
    base_url: str,
    *,
    token: str | None = None,
    metrics_path: str = "/metrics",
    findings_path: str | None = "/perfmw/findings",
    timeout: float = 10.0,
    probes: int = 1,
) -> Snapshot:
    """Scrape a service's metrics and findings endpoints; ReportError when that fails.

    Each worker process keeps its own findings: `probes` > 1 asks the findings endpoint that
    many times (a new connection each, which a multi-worker server hands to any worker) and
    merges what each worker answered.
    """
    base = base_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"--url must start with http:// or https://, got {base_url!r}")
    taken_at = time.time()
    exposition = _get(base + metrics_path, token, timeout)
    assert exposition is not None
    samples = parse_samples(exposition.decode("utf-8", "replace"), base + metrics_path)
    by_pid: dict[int | None, list[dict[str, Any]]] = {}
    served = findings_path is not None
    merged: list[int] = []  # the workers an answer already merged (multiprocess mode)
    for _ in range(max(1, probes) if served else 0):
        # A service may serve metrics only (findings_path=None): the report still has those.
        raw = _get(f"{base}{findings_path}", token, timeout, True)
        if raw is None:
            served = False
            break
        try:
            document = load(raw, FINDINGS)
        except Malformed as exc:
            raise ReportError(f"{base}{findings_path} answered {exc}") from None
        findings = document["findings"]
        answered = document.get("pids", [])
        if len(answered) > 1:
            # Every worker's findings in one answer (multiprocess mode): nothing to add.
            by_pid, merged = {document.get("pid"): findings}, answered
            break
        by_pid[document.get("pid")] = findings
    pids = merged or [pid for pid in by_pid if isinstance(pid, int)]
    return Snapshot(
        base,
        taken_at,
        samples,
        merge_findings(list(by_pid.values())),
        pids[0] if pids else None,
        served,
        pids,
    )


def merge_findings(per_worker: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One list of findings from several workers' lists: the same site's counts and times add up."""
    return merge(per_worker)


# Analysis: from one snapshot (totals since the process started) or the difference of two
# (what happened between them), to the report's document.


def _delta_findings(
    after: list[dict[str, Any]], before: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    earlier = {finding_key(f): f for f in before}
    kept = []
    for finding in after:
        old = earlier.get(finding_key(finding))
        if old is not None:
            finding = {
                **finding,
                "count": finding.get("count", 0) - old.get("count", 0),
                "total_seconds": finding.get("total_seconds", 0.0) - old.get("total_seconds", 0.0),
                "detail": detail_since(finding.get("detail"), old.get("detail")),
            }
        if finding.get("count", 0) > 0:
            kept.append(finding)
    return kept


def _is_gauge(name: str) -> bool:
    return name in GAUGES


GAUGES = frozenset(
    {
        "http_server_active_requests",
        "perfmw_cache_size",
        "perfmw_cache_max_size",
        "perfmw_event_loop_lag_seconds",
        "db_client_connection_count",
        "process_start_time_seconds",
    }
)
#: The samples the analysis reads: counted over the report's window (counters and histogram
#: series; `_report_prometheus` asks Prometheus for their increase)...
COUNTED = (
    "http_server_request_duration_seconds_count",
    "http_server_request_duration_seconds_sum",
    "http_server_request_duration_seconds_bucket",
    "perfmw_request_db_queries_count",
    "perfmw_request_db_queries_sum",
    "perfmw_request_db_seconds_count",
    "perfmw_request_db_seconds_sum",
    "perfmw_event_loop_stalls_total",
    "perfmw_blocking_calls_total",
    "perfmw_cache_requests_total",
    "perfmw_cache_evictions_total",
    "perfmw_n_plus_one_total",
    "perfmw_findings_total",
    "perfmw_finding_seconds_total",
)
#: ...and read as they are now (gauges).
CURRENT = ("perfmw_cache_size", "perfmw_cache_max_size")
#: Every sample the analysis reads, and so checks in `parse_samples`.
SERIES = frozenset((*COUNTED, *CURRENT, "process_start_time_seconds"))


def _delta_samples(
    after: dict[SampleKey, float], before: dict[SampleKey, float]
) -> dict[SampleKey, float]:
    return {
        key: value if _is_gauge(key[0]) else value - before.get(key, 0.0)
        for key, value in after.items()
    }


def _series(
    samples: Mapping[SampleKey, float], name: str
) -> Iterable[tuple[dict[str, str], float]]:
    for (sample_name, labels), value in samples.items():
        if sample_name == name:
            yield dict(labels), value


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all we know
            if cumulative == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return lower


def _route_table(samples: Mapping[SampleKey, float], window: float | None) -> list[dict[str, Any]]:
    duration: dict[tuple[str, str], dict[str, Any]] = {}
    for labels, value in _series(samples, "http_server_request_duration_seconds_count"):
        key = (labels.get("http_request_method", ""), labels.get("http_route", ""))
        row = duration.setdefault(key, {"requests": 0.0, "errors": 0.0, "sum": 0.0})
        row["requests"] += value
        if labels.get("http_response_status_code", "").startswith("5"):
            row["errors"] += value
    for labels, value in _series(samples, "http_server_request_duration_seconds_sum"):
        key = (labels.get("http_request_method", ""), labels.get("http_route", ""))
        if key in duration:
            duration[key]["sum"] += value
    buckets: dict[tuple[str, str], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in _series(samples, "http_server_request_duration_seconds_bucket"):
        key = (labels.get("http_request_method", ""), labels.get("http_route", ""))
        buckets[key][float(labels["le"])] += value

    def per_route(name: str) -> dict[tuple[str, str], float]:
        found: dict[tuple[str, str], float] = defaultdict(float)
        for labels, value in _series(samples, name):
            found[(labels.get("http_request_method", ""), labels.get("http_route", ""))] += value
        return found

    query_sum = per_route("perfmw_request_db_queries_sum")
    query_count = per_route("perfmw_request_db_queries_count")
    db_sum = per_route("perfmw_request_db_seconds_sum")
    has_db_time = any(name == "perfmw_request_db_seconds_count" for name, _ in samples)
    stalls: dict[str, float] = defaultdict(float)
    for labels, value in _series(samples, "perfmw_event_loop_stalls_total"):
        if labels.get("cause") not in MACHINE_CAUSES:  # the code's stalls, on its routes
            stalls[labels.get("http_route", "")] += value
    blocking: dict[str, float] = defaultdict(float)
    for labels, value in _series(samples, "perfmw_blocking_calls_total"):
        blocking[labels.get("http_route", "")] += value

    rows = []
    for (method, route), row in duration.items():
        requests = row["requests"]
        if requests <= 0:
            continue
        key = (method, route)
        cumulative = list(buckets[key].items())
        queries = query_sum[key] / query_count[key] if query_count.get(key) else None
        db_share = None
        if has_db_time and row["sum"] > 0:
            db_share = min(1.0, db_sum[key] / row["sum"])
        rows.append(
            {
                "method": method,
                "route": route,
                "requests": int(requests),
                "errors": int(row["errors"]),
                "rate_per_second": requests / window if window else None,
                "mean_seconds": row["sum"] / requests,
                "total_seconds": row["sum"],
                "p50_seconds": quantile(0.5, cumulative),
                "p95_seconds": quantile(0.95, cumulative),
                "p99_seconds": quantile(0.99, cumulative),
                "queries_per_request": queries,
                "db_share": db_share,
                "stalls": int(stalls.get(route, 0)),
                "blocking_calls": int(blocking.get(route, 0)),
            }
        )
    rows.sort(key=lambda r: (-r["total_seconds"], r["route"], r["method"]))
    return rows


def _cache_table(samples: Mapping[SampleKey, float]) -> list[dict[str, Any]]:
    caches: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return caches.setdefault(
            name,
            {
                "cache": name,
                "hits": 0,
                "misses": 0,
                "hit_rate": None,
                "evictions": {"capacity": 0, "expired": 0},
                "size": None,
                "max_size": None,
            },
        )

    for labels, value in _series(samples, "perfmw_cache_requests_total"):
        cache = entry(labels.get("cache", ""))
        if labels.get("result") == "hit":
            cache["hits"] += int(value)
        elif labels.get("result") == "miss":
            cache["misses"] += int(value)
    for labels, value in _series(samples, "perfmw_cache_evictions_total"):
        reason = labels.get("reason", "")
        evictions = entry(labels.get("cache", ""))["evictions"]
        evictions[reason] = evictions.get(reason, 0) + int(value)
    for labels, value in _series(samples, "perfmw_cache_size"):
        entry(labels.get("cache", ""))["size"] = value
    for labels, value in _series(samples, "perfmw_cache_max_size"):
        entry(labels.get("cache", ""))["max_size"] = value
    for cache in caches.values():
        lookups = cache["hits"] + cache["misses"]
        cache["hit_rate"] = cache["hits"] / lookups if lookups else None
    return sorted(caches.values(), key=lambda c: str(c["cache"]))


def _starved(finding: Mapping[str, Any]) -> bool:
    """A stall the machine caused (from a perfmw that still made findings of them)."""
    detail = finding.get("detail") or {}
    return finding.get("kind") == "loop_stall" and detail.get("cause") in MACHINE_CAUSES


def _machine_stalls(
    samples: Mapping[SampleKey, float], findings: list[dict[str, Any]]
) -> dict[str, Any]:
    """Stalls of a loop kept from running (`starved`, `throttled`): counted, not the code's."""
    causes: dict[str, int] = defaultdict(int)
    routes: set[str] = set()
    for labels, value in _series(samples, "perfmw_event_loop_stalls_total"):
        cause = labels.get("cause", "")
        if cause in MACHINE_CAUSES and value > 0:
            causes[cause] += int(value)
            routes.add(labels.get("http_route", ""))
    found = [f for f in findings if _starved(f)]
    if found:  # the findings tell their time and routes too
        return {
            "stalls": sum(int(f.get("count") or 0) for f in found),
            "seconds": sum(float(f.get("total_seconds") or 0.0) for f in found),
            "routes": sorted({str(f.get("route")) for f in found}),
            "causes": dict(causes),
        }
    return {
        "stalls": sum(causes.values()),
        "seconds": None,
        "routes": sorted(routes),
        "causes": dict(causes),
    }


def _time_by_route(routes: list[dict[str, Any]]) -> dict[str, float]:
    found: dict[str, float] = defaultdict(float)
    for row in routes:
        found[row["route"]] += row["total_seconds"]
    return found


def analyse(
    after: Snapshot,
    before: Snapshot | None = None,
    *,
    window: float | None = None,
    measured: str | None = None,
) -> dict[str, Any]:
    """The report's data: per-route performance, caches, findings and the advice built on them.

    From one scrape (totals since the process started), the difference of two, or a snapshot
    already counted over a `window` of seconds (`measured` says which, as Prometheus's is).
    """
    if window is not None:
        samples = after.samples
        findings = [dict(f) for f in after.findings]
        measured = measured or f"over the last {window:g} s"
    elif before is not None:
        samples = _delta_samples(after.samples, before.samples)
        findings = _delta_findings(after.findings, before.findings)
        window = max(after.taken_at - before.taken_at, 1e-9)
        measured = "between two scrapes"
    else:
        samples = after.samples
        findings = [dict(f) for f in after.findings]
        started = next((v for (n, _), v in samples.items() if n == "process_start_time_seconds"), 0)
        window = after.taken_at - started if started else None
        measured = "since the process started"
    routes = _route_table(samples, window)
    route_time = _time_by_route(routes)
    findings.sort(key=lambda f: -float(f.get("total_seconds") or 0.0))
    bottlenecks = []
    for finding in findings:
        if _starved(finding):
            continue
        found = advice(finding)
        spent = route_time.get(str(finding.get("route")), 0.0)
        total = float(finding.get("total_seconds") or 0.0)
        bottlenecks.append(
            {
                **{k: finding.get(k) for k in ("kind", "route", "location", "via", "count")},
                "total_seconds": total,
                "detail": finding.get("detail") or {},
                "route_share": total / spent if spent > 0 else None,
                "title": found["title"],
                "current": found["current"],
                "proposed": found["proposed"],
                "saved_seconds": found["saved"],
                "saving_basis": found["basis"],
                "complexity": found["complexity"],
            }
        )
    recommendations = sorted(bottlenecks, key=lambda b: -b["saved_seconds"])
    indexes: dict[tuple[str, str], dict[str, Any]] = {}
    for finding in findings:
        if finding.get("kind") != "missing_index":
            continue
        detail = finding.get("detail") or {}
        keys = index_keys(detail.get("index"))
        if not keys:
            continue
        key = (str(detail.get("collection", "?")), json.dumps(dict(keys)))
        entry = indexes.setdefault(
            key,
            {"collection": key[0], "index": dict(keys), "fields": [k for k, _ in keys], "for": []},
        )
        entry["for"].append(
            {
                "route": finding.get("route"),
                "location": finding.get("location"),
                "shape": detail.get("shape"),
                "count": finding.get("count"),
            }
        )
    return {
        "perfmw_report": FORMAT_VERSION,
        "url": after.url,
        "pid": after.pid,
        "pids": after.pids or ([after.pid] if after.pid is not None else []),
        "findings_served": after.findings_served,
        "prometheus": after.prometheus,
        "taken_at": after.taken_at,
        "window_seconds": window,
        "measured": measured,
        "requests": sum(r["requests"] for r in routes),
        "routes": routes,
        "caches": _cache_table(samples),
        "findings": findings,
        "bottlenecks": bottlenecks,
        "recommendations": recommendations,
        "indexes": list(indexes.values()),
        "starved": _machine_stalls(samples, findings),
    }


def render_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n"


# Before / after.


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "n/a"
    if before == 0:
        return "0%" if after == 0 else "new"
    return f"{(after - before) / before * 100:+.0f}%"


def load_report(path: str) -> dict[str, Any]:
    """A report written with --format json; ReportError when it is not one."""
    try:
        with open(path, "rb") as handle:
            raw = read_capped(handle)
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Malformed as exc:
        raise ReportError(f"{path} holds {exc}") from None
    try:
        document = parse(raw)
        if not isinstance(document, dict) or "perfmw_report" not in document:
            raise ReportError(f"{path} is not a perfmw JSON report: write it with --format json")
        REPORT.check(document, "")
    except NotJson:
        raise ReportError(f"{path} is not JSON: write it with --format json") from None
    except Malformed as exc:
        raise ReportError(f"{path} holds {exc}") from None
    if document["perfmw_report"] != FORMAT_VERSION:
        raise ReportError(
            f"{path} is a perfmw report of format {document['perfmw_report']}; this perfmw "
            f"reads format {FORMAT_VERSION}"
        )
    return document


def render_compare(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """The before/after table of the same routes and caches, with the change in percent."""
    old = {(r["method"], r["route"]): r for r in before.get("routes", [])}
    new = {(r["method"], r["route"]): r for r in after.get("routes", [])}
    lines = [
        f"# Before / after: {text(before.get('url', '?'))} -> {text(after.get('url', '?'))}",
        "",
        "| Route | p50 before | p50 after | change | p99 before | p99 after | change | "
        "Queries/req before | after | change | Stalls before | after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = [k for k in old if k in new] + [k for k in new if k not in old]
    keys += [k for k in old if k not in new]
    if not keys:
        lines.append("| (no route measured in either report) |||||||||||")
    for key in keys:
        a, b = old.get(key, {}), new.get(key, {})

        def q(row: Mapping[str, Any]) -> str:
            value = row.get("queries_per_request")
            return "n/a" if value is None else f"{value:.2f}"

        lines.append(
            f"| {route_name({'method': key[0], 'route': key[1]}, cell=True)} "
            f"| {ms(a.get('p50_seconds'))} | {ms(b.get('p50_seconds'))} "
            f"| {_change(a.get('p50_seconds'), b.get('p50_seconds'))} "
            f"| {ms(a.get('p99_seconds'))} | {ms(b.get('p99_seconds'))} "
            f"| {_change(a.get('p99_seconds'), b.get('p99_seconds'))} "
            f"| {q(a)} | {q(b)} "
            f"| {_change(a.get('queries_per_request'), b.get('queries_per_request'))} "
            f"| {a.get('stalls', 'n/a')} | {b.get('stalls', 'n/a')} |"
        )
    old_caches = {c["cache"]: c for c in before.get("caches", [])}
    new_caches = {c["cache"]: c for c in after.get("caches", [])}
    lines += ["", "| Cache | Hit rate before | Hit rate after | change |", "|---|---:|---:|---:|"]
    names = list(old_caches) + [n for n in new_caches if n not in old_caches]
    if not names:
        lines.append("| (no cache watched in either report) | | | |")
    for name in names:
        a, b = old_caches.get(name, {}), new_caches.get(name, {})
        lines.append(
            f"| {code(name, cell=True)} | {pct(a.get('hit_rate'))} | {pct(b.get('hit_rate'))} | "
            f"{_change(a.get('hit_rate'), b.get('hit_rate'))} |"
        )
    found_before = len(before.get("findings", []))
    found_after = len(after.get("findings", []))
    lines += ["", f"Findings: {found_before} before, {found_after} after."]
    return "\n".join(lines) + "\n"
