"""The performance report: a running service's metrics and findings, written up as an analysis.

    perfmw report --url http://127.0.0.1:8000                  # Markdown on stdout
    perfmw report --url ... --format json --out before.json    # the same data, for --compare
    perfmw report --compare before.json after.json             # the before/after table

It reads `/metrics` (parsed with prometheus_client's parser) and `/perfmw/findings` over plain
urllib, so it runs wherever perfmw is installed, and builds one JSON-ready document (`analyse`)
that both formats render. Every section is always written, saying so when it found nothing,
so two reports compare section by section.
"""

from __future__ import annotations

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

FORMAT_VERSION = 1
SECTIONS = (
    "Current Performance",
    "Bottlenecks Identified",
    "Optimization Recommendations",
    "Index Recommendations",
    "Caching",
    "Verification",
    "Trade-offs",
)

SampleKey = tuple[str, frozenset[tuple[str, str]]]


class ReportError(Exception):
    """A failure the command line prints as one line (unreachable service, refused token...)."""


# Reading the service.


@dataclass
class Snapshot:
    """What one scrape of a service returned."""

    url: str
    taken_at: float
    samples: dict[SampleKey, float]
    findings: list[dict[str, Any]] = field(default_factory=list)
    pid: int | None = None


def _get(url: str, token: str | None, timeout: float) -> bytes:
    headers = {"Accept": "text/plain; version=0.0.4", "User-Agent": "perfmw-report"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            given = "the token given was refused" if token else "it needs a token (--token)"
            raise ReportError(f"{url} answered 401 Unauthorized: {given}") from None
        raise ReportError(f"{url} answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ReportError(f"cannot reach {url}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise ReportError(f"cannot reach {url}: {exc}") from None


def parse_samples(exposition: str) -> dict[SampleKey, float]:
    """Every sample of a Prometheus text exposition, keyed by (sample name, labels)."""
    found: dict[SampleKey, float] = {}
    try:
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    except ValueError as exc:
        raise ReportError(
            f"the metrics endpoint did not answer a Prometheus exposition: {exc}"
        ) from None
    return found


def collect(
    base_url: str,
    *,
    token: str | None = None,
    metrics_path: str = "/metrics",
    findings_path: str | None = "/perfmw/findings",
    timeout: float = 10.0,
) -> Snapshot:
    """Scrape a service's metrics and findings endpoints; ReportError when that fails."""
    base = base_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ReportError(f"--url must start with http:// or https://, got {base_url!r}")
    taken_at = time.time()
    text = _get(base + metrics_path, token, timeout).decode("utf-8", "replace")
    samples = parse_samples(text)
    findings: list[dict[str, Any]] = []
    pid = None
    if findings_path is not None:
        raw = _get(base + findings_path, token, timeout)
        try:
            document = json.loads(raw)
            findings = list(document["findings"])
            pid = document.get("pid")
        except (ValueError, KeyError, TypeError):
            raise ReportError(
                f"{base + findings_path} did not answer perfmw findings JSON"
            ) from None
    return Snapshot(base, taken_at, samples, findings, pid)


# Analysis: from one snapshot (totals since the process started) or the difference of two
# (what happened between them), to the report's document.


def finding_key(finding: Mapping[str, Any]) -> tuple[Any, ...]:
    detail = finding.get("detail") or {}
    return (finding.get("kind"), finding.get("route"), finding.get("location"), detail.get("shape"))


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


# What each finding kind means for the report: its title, the pattern to replace, the fix,
# how much of its measured time the fix would save (an estimate, stated as such), complexity.


def _reps(detail: Mapping[str, Any]) -> int:
    for key in ("repetitions", "queries", "count"):
        value = detail.get(key)
        if isinstance(value, (int, float)) and value >= 1:
            return int(value)
    return 1


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.01:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds * 1000:.1f} ms"


def _code(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=False)
    return "`" + str(text).replace("`", "'").replace("|", "\\|") + "`"


def _where(finding: Mapping[str, Any]) -> str:
    location = finding.get("location")
    return _code(location) if location else "unknown (no application frame was found)"


def _advice(finding: Mapping[str, Any]) -> dict[str, Any]:
    """Title, current/proposed pattern, saving estimate, complexity for one finding."""
    kind = finding.get("kind", "")
    detail: Mapping[str, Any] = finding.get("detail") or {}
    total = float(finding.get("total_seconds") or 0.0)
    collection = detail.get("collection", "?")
    operation = detail.get("operation", "?")
    shape = detail.get("shape")
    shape_text = f" with shape {_code(shape)}" if shape else ""
    if kind == "n_plus_one":
        reps = _reps(detail)
        return {
            "title": f"N+1 queries: `{operation}` on `{collection}` repeated {reps} times",
            "current": f"one `{operation}` on `{collection}` per item{shape_text}, "
            f"{reps} per request",
            "proposed": "one query for all the items (`$in` on the field that varies, or an "
            "aggregate with `$lookup`), joined in memory",
            "saved": total * (reps - 1) / reps,
            "basis": f"{reps} round trips become one",
            "complexity": "low",
        }
    if kind == "consecutive_queries":
        queries = detail.get("queries")
        reads = len(queries) if isinstance(queries, list) and queries else _reps(detail)
        collections = detail.get("collections") or [collection]
        return {
            "title": "Sequential independent queries on "
            + ", ".join(f"`{c}`" for c in collections),
            "current": f"{reads if reads > 1 else 'several'} independent reads awaited one "
            "after another",
            "proposed": "start them together with `asyncio.gather(...)`; the request then waits "
            "for the slowest one only",
            # The finding's cost is already the avoidable part: all but the slowest read.
            "saved": total,
            "basis": "the time of all but the slowest read",
            "complexity": "low",
        }
    if kind == "slow_query":
        return {
            "title": f"Slow `{operation}` on `{collection}`",
            "current": f"`{operation}` on `{collection}`{shape_text} slower than "
            "slow_query_seconds",
            "proposed": "an index matching the filter and sort (see Index Recommendations), a "
            "narrower filter or a projection",
            "saved": total * 0.5,
            "basis": "assumed half of its time; re-measure after the change",
            "complexity": "medium",
        }
    if kind == "missing_index":
        index = _index_text(detail.get("index"))
        return {
            "title": f"Collection scan on `{collection}`: no index for the filter",
            "current": f"`{operation}` on `{collection}`{shape_text} scans the whole "
            "collection (COLLSCAN)",
            "proposed": f"create the index {_code(index)} on `{collection}`",
            "saved": total * 0.9,
            "basis": "an index scan reads only the matching entries; assumed 90% of its time",
            "complexity": "low",
        }
    if kind == "unbounded_read":
        missing = detail.get("missing") or detail.get("problems") or []
        if isinstance(missing, str):
            missing = [missing]
        docs = detail.get("documents")
        returned = f" returning {int(docs)} documents" if isinstance(docs, (int, float)) else ""
        without = " and ".join(str(m) for m in missing) or "a limit or a projection"
        fraction = 0.9 if isinstance(docs, (int, float)) and docs > 1000 else 0.5
        return {
            "title": f"Unbounded read on `{collection}`",
            "current": f"`{operation}` on `{collection}`{returned} without {without}",
            "proposed": "paginate (`limit` + a range on the sort key, `?limit=100`) and project "
            "only the fields the client needs",
            "saved": total * fraction,
            "basis": "a page of 100 instead of the whole collection; estimate",
            "complexity": "medium (the API's clients page through results)",
        }
    if kind == "loop_stall":
        cause = detail.get("cause", "blocking")
        return {
            "title": f"Event loop stalled ({cause})",
            "current": "synchronous work on the event loop inside `async def`: every request in "
            "flight waits for it",
            "proposed": "move it off the loop: `await run_in_threadpool(fn)` / "
            "`asyncio.to_thread(fn)`, an async library, or make the endpoint a plain `def`",
            "saved": total,
            "basis": "the whole stall is given back to the other requests",
            "complexity": "low",
        }
    if kind == "blocking_call":
        what = detail.get("kind", "blocking call")
        return {
            "title": f"Blocking call on the event loop ({what})",
            "current": "a synchronous `MongoClient` called inside `async def`: the loop waits "
            "for the network"
            if what == "pymongo-sync"
            else f"a blocking `{what}` call inside `async def`",
            "proposed": "`pymongo.AsyncMongoClient` (or motor) with `await`, or declare the "
            "endpoint with plain `def` so it runs in the threadpool",
            "saved": total,
            "basis": "the loop no longer waits for these calls",
            "complexity": "medium",
        }
    if kind == "large_response":
        size = detail.get("bytes")
        problems = detail.get("problems") or []
        proposed = []
        if "uncompressed" in problems:
            proposed.append("compress it (`GZipMiddleware`)")
        if "no_cache_headers" in problems:
            proposed.append("send `Cache-Control` or an `ETag` so clients can reuse it")
        kib = f"{size / 1024:.0f} KiB" if isinstance(size, (int, float)) else "a large body"
        return {
            "title": f"Large response ({kib})",
            "current": f"{kib} sent "
            + " and ".join(
                {
                    "uncompressed": "without Content-Encoding",
                    "no_cache_headers": "without Cache-Control or ETag",
                }.get(p, str(p))
                for p in problems
            ),
            "proposed": "; ".join(proposed) or "paginate or compress it",
            "saved": 0.0,
            "basis": "bytes on the wire and the clients' time, not the server's",
            "complexity": "low",
        }
    return {
        "title": f"{kind}",
        "current": json.dumps(detail, default=str),
        "proposed": "see docs/findings.md",
        "saved": 0.0,
        "basis": "unknown kind",
        "complexity": "unknown",
    }


def _index_keys(index: Any) -> list[tuple[str, Any]]:
    """Index keys as (field, direction) pairs, from a dict, pairs, or field names."""
    if isinstance(index, Mapping):
        return [(str(k), v) for k, v in index.items()]
    if isinstance(index, str):
        return [(index, 1)]
    keys: list[tuple[str, Any]] = []
    for item in index or ():
        if isinstance(item, (list, tuple)) and len(item) == 2:
            keys.append((str(item[0]), item[1]))
        else:
            keys.append((str(item), 1))
    return keys


def _index_text(index: Any) -> str:
    return json.dumps(dict(_index_keys(index)))


def _starved(finding: Mapping[str, Any]) -> bool:
    """A stall of a process that did not get the CPU: the machine's doing, not the code's."""
    detail = finding.get("detail") or {}
    return finding.get("kind") == "loop_stall" and detail.get("cause") == "starved"


def _time_by_route(routes: list[dict[str, Any]]) -> dict[str, float]:
    found: dict[str, float] = defaultdict(float)
    for row in routes:
        found[row["route"]] += row["total_seconds"]
    return found


def analyse(after: Snapshot, before: Snapshot | None = None) -> dict[str, Any]:
    """The report's data: per-route performance, caches, findings and the advice built on them."""
    if before is not None:
        samples = _delta_samples(after.samples, before.samples)
        findings = _delta_findings(after.findings, before.findings)
        window: float | None = max(after.taken_at - before.taken_at, 1e-9)
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
    starved = [f for f in findings if _starved(f)]
    bottlenecks = []
    for finding in findings:
        if _starved(finding):
            continue
        advice = _advice(finding)
        spent = route_time.get(str(finding.get("route")), 0.0)
        total = float(finding.get("total_seconds") or 0.0)
        bottlenecks.append(
            {
                **{k: finding.get(k) for k in ("kind", "route", "location", "count")},
                "total_seconds": total,
                "detail": finding.get("detail") or {},
                "route_share": total / spent if spent > 0 else None,
                "title": advice["title"],
                "current": advice["current"],
                "proposed": advice["proposed"],
                "saved_seconds": advice["saved"],
                "saving_basis": advice["basis"],
                "complexity": advice["complexity"],
            }
        )
    recommendations = sorted(bottlenecks, key=lambda b: -b["saved_seconds"])
    indexes: dict[tuple[str, str], dict[str, Any]] = {}
    for finding in findings:
        if finding.get("kind") != "missing_index":
            continue
        detail = finding.get("detail") or {}
        keys = _index_keys(detail.get("index"))
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
        "starved": {
            "stalls": sum(int(f.get("count") or 0) for f in starved),
            "seconds": sum(float(f.get("total_seconds") or 0.0) for f in starved),
            "routes": sorted({str(f.get("route")) for f in starved}),
        },
    }


# Markdown.


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def _route_name(item: Mapping[str, Any]) -> str:
    method = item.get("method")
    return f"`{method} {item.get('route')}`" if method else f"`{item.get('route')}`"


def _current_performance(doc: Mapping[str, Any]) -> list[str]:
    routes = doc["routes"]
    window = doc.get("window_seconds")
    pid = doc.get("pid")
    worker = (
        f" The findings are those of the worker that answered (pid {pid}); with several "
        "workers, the metrics cover them all."
        if pid is not None
        else ""
    )
    span = f"over {window:.1f} s ({doc['measured']})" if window else doc["measured"]
    lines = [
        f"Measured inside the service at {doc['url']} by perfmw's middleware, "
        f"{span}: each request timed from its arrival to its last body chunk, MongoDB "
        "commands counted by pymongo's command listeners. p50/p99 are interpolated from the "
        "`http_server_request_duration_seconds` histogram buckets (as PromQL's "
        f"`histogram_quantile` does), so they are accurate to a bucket.{worker}",
        "",
    ]
    if not routes:
        lines.append("No request was measured: the service answered, but no request reached it.")
        return lines
    if not window:
        lines.append(
            "The request rate is not shown: the exposition carries no process start time. "
            "Pass `--interval 30` to measure it over 30 seconds."
        )
        lines.append("")
    lines += [
        "| Route | Requests | Rate (req/s) | p50 | p99 | Queries/request | DB share | 5xx "
        "| Stalls |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in routes:
        rate = row["rate_per_second"]
        queries = row["queries_per_request"]
        lines.append(
            f"| {_route_name(row)} | {row['requests']} | "
            f"{'n/a' if rate is None else f'{rate:.1f}'} | {_ms(row['p50_seconds'])} | "
            f"{_ms(row['p99_seconds'])} | {'n/a' if queries is None else f'{queries:.2f}'} | "
            f"{_pct(row['db_share'])} | {row['errors']} | {row['stalls']} |"
        )
    starved = doc.get("starved") or {}
    if starved.get("stalls"):
        routes_text = ", ".join(f"`{r}`" for r in starved["routes"])
        lines += [
            "",
            f"The process was starved of CPU in {starved['stalls']} stalls "
            f"({_ms(starved['seconds'])} in total, during {routes_text}): the event loop was "
            "ready to run but the process did not get a CPU (an overloaded machine, CPU "
            "throttling). That is not the code's doing, so these stalls are not listed as "
            "bottlenecks; they count in the Stalls column.",
        ]
    return lines


def _bottlenecks(doc: Mapping[str, Any]) -> list[str]:
    items = doc["bottlenecks"]
    if not items:
        return ["No bottleneck found: perfmw recorded no finding in this window."]
    lines: list[str] = []
    for number, item in enumerate(items, 1):
        share = item["route_share"]
        of_route = f", {_pct(share)} of the route's time" if share is not None else ""
        count = item.get("count") or 0
        per = item["total_seconds"] / count if count else 0.0
        lines += [
            f"### {number}. {item['title']} ({item['kind']}) on `{item['route']}`",
            "",
            f"- **Location:** {_where(item)}",
            f"- **Impact:** {_ms(item['total_seconds'])} in total, {_ms(per)} per occurrence"
            f"{of_route}",
            f"- **Evidence:** {_evidence(item)}",
            "",
        ]
    return lines[:-1]


# Detail facts shown as evidence, in this order, with the words that introduce them.
_EVIDENCE_KEYS = {
    "kind": "kind",
    "operation": "operation",
    "collection": "collection",
    "repetitions": "repetitions",
    "documents": "documents",
    "bytes": "bytes",
    "missing": "missing",
    "duration_seconds": "latest",
    "sequential_seconds": "one after another",
    "concurrent_seconds": "concurrently",
    "cause": "cause",
    "stage": "plan stage",
}


def _evidence(item: Mapping[str, Any]) -> str:
    detail: Mapping[str, Any] = item.get("detail") or {}
    count = item.get("count") or 0
    kind = item.get("kind")
    noun = {"loop_stall": "stall", "blocking_call": "call"}.get(str(kind), "request")
    parts = [f"seen {count} {noun}{'' if count == 1 else 's'}, {_ms(item['total_seconds'])}"]
    for key in _EVIDENCE_KEYS:
        value = detail.get(key)
        if value is None or value == [] or (key == "kind" and kind != "blocking_call"):
            continue
        if key.endswith("_seconds") and isinstance(value, (int, float)):
            parts.append(f"{_EVIDENCE_KEYS[key]} {_ms(float(value))}")
        elif isinstance(value, list):
            parts.append(f"{_EVIDENCE_KEYS[key]} {', '.join(str(v) for v in value)}")
        else:
            parts.append(f"{_EVIDENCE_KEYS[key]} {value}")
    if detail.get("shape"):
        parts.append(f"shape {_code(detail['shape'])}")
    if detail.get("index"):
        parts.append(f"proposed index {_code(_index_text(detail['index']))}")
    stack = detail.get("stack")
    if stack:
        parts.append(f"innermost frame {_code(stack[-1])}")
    return "; ".join(parts)


def _recommendations(doc: Mapping[str, Any]) -> list[str]:
    items = doc["recommendations"]
    if not items:
        return ["No optimization to recommend: nothing was found to fix."]
    lines = ["Ordered by the time each change would save over the measured window.", ""]
    for number, item in enumerate(items, 1):
        lines += [
            f"{number}. **{item['title']}** on `{item['route']}` at {_where(item)}",
            f"   - Current pattern: {item['current']}",
            f"   - Proposed pattern: {item['proposed']}",
            f"   - Expected impact: about {_ms(item['saved_seconds'])} saved "
            f"({item['saving_basis']})"
            if item["saved_seconds"] > 0
            else f"   - Expected impact: {item['saving_basis']}",
            f"   - Complexity: {item['complexity']}",
        ]
    return lines


def _index_recommendations(doc: Mapping[str, Any]) -> list[str]:
    items = doc["indexes"]
    if not items:
        return [
            "No index to recommend: no collection scan was found. (perfmw looks for them when "
            "`explain_slow_queries` is on.)"
        ]
    lines = ["| Collection | Index | Fields | Purpose |", "|---|---|---|---|"]
    for item in items:
        uses = "; ".join(
            f"`{u['route']}` at {u['location'] or 'unknown'} ({u['count']}x)" for u in item["for"]
        )
        lines.append(
            f"| `{item['collection']}` | {_code(json.dumps(item['index']))} | "
            f"{', '.join(item['fields'])} | removes the collection scan of {uses} |"
        )
    lines += [
        "",
        "Create each with `db.<collection>.create_index([...])` (keys in the order shown: "
        "equality fields, then sort, then range).",
    ]
    return lines


def _caching(doc: Mapping[str, Any]) -> list[str]:
    caches = doc["caches"]
    if not caches:
        return [
            "No cache is watched: wrap a cachetools cache with "
            "`perfmw.watch_cache(cache, name=...)` to see its hit rate here."
        ]
    lines = [
        "| Cache | Hit rate | Hits | Misses | Evictions (capacity / expired) | Size / max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    advice = []
    for cache in caches:
        size = cache["size"]
        maximum = cache["max_size"]
        sizes = f"{size:.0f} / {maximum:.0f}" if size is not None and maximum else "n/a"
        evictions = cache["evictions"]
        lines.append(
            f"| `{cache['cache']}` | {_pct(cache['hit_rate'])} | {cache['hits']} | "
            f"{cache['misses']} | {evictions.get('capacity', 0)} / {evictions.get('expired', 0)} "
            f"| {sizes} |"
        )
        advice.append(f"- `{cache['cache']}`: {_cache_advice(cache)}")
    return [*lines, "", *advice]


def _cache_advice(cache: Mapping[str, Any]) -> str:
    rate = cache["hit_rate"]
    capacity = cache["evictions"].get("capacity", 0)
    expired = cache["evictions"].get("expired", 0)
    if rate is None:
        return "no lookup in this window."
    if rate >= 0.8:
        return f"hits {_pct(rate)} of lookups: it is doing its job."
    if capacity > cache["hits"]:
        return (
            f"hits only {_pct(rate)}, and {capacity} entries were pushed out for room: "
            "raise maxsize."
        )
    if expired > cache["hits"]:
        return f"hits only {_pct(rate)}, and {expired} entries expired first: a longer ttl helps."
    return (
        f"hits only {_pct(rate)}: the keys rarely repeat within the ttl; cache at a coarser key "
        "or drop the cache."
    )


def _verification(doc: Mapping[str, Any]) -> list[str]:
    url = doc["url"]
    lines = [
        "Re-measure under the same load before and after a change:",
        "",
        "```bash",
        f"perfmw report --url {url} --format json --out before.json",
        "# deploy the change, run the same load again",
        f"perfmw report --url {url} --format json --out after.json",
        "perfmw report --compare before.json after.json",
        "```",
    ]
    routes = sorted({str(b["route"]) for b in doc["bottlenecks"]})
    if routes:
        lines += ["", "And watch the affected routes in Prometheus:", "", "```promql"]
        for route in routes:
            lines.append(
                "histogram_quantile(0.99, sum by (le) (rate("
                f'http_server_request_duration_seconds_bucket{{http_route="{route}"}}[5m])))'
            )
        lines.append("```")
    n_plus_one = [b for b in doc["bottlenecks"] if b["kind"] == "n_plus_one"]
    if n_plus_one:
        lines += [
            "",
            "Keep an N+1 from coming back with a test: "
            "`with perfmw.testing.assert_max_queries(2): client.get(...)`.",
        ]
    return lines


_TRADE_OFFS = {
    "n_plus_one": "Batching with `$in`: one larger reply instead of many small ones; chunk "
    "very long id lists (thousands) to keep each command small.",
    "consecutive_queries": "`asyncio.gather`: the reads hold several pool connections at "
    "once and load MongoDB in bursts; errors surface from the first one that fails.",
    "slow_query": "Tuning a slow query: an index speeds reads but costs every write and RAM.",
    "missing_index": "Indexes: each one slows inserts and updates on that collection a little "
    "and takes memory; building one on a large collection takes time (build it off-peak).",
    "unbounded_read": "Pagination changes the API: clients must follow pages; a projection "
    "must keep every field clients use.",
    "loop_stall": "Threadpool offloading: the default pool has 40 threads; long blocking work "
    "there still limits throughput, it only stops blocking everyone else.",
    "blocking_call": "Switching to the async client touches every call site of the sync one; "
    "a plain `def` endpoint is the smaller change but uses a threadpool slot per request.",
    "large_response": "Compression costs CPU per response; cache headers risk stale data in "
    "clients for as long as they allow.",
}


def _trade_offs(doc: Mapping[str, Any]) -> list[str]:
    kinds = []
    for item in doc["recommendations"]:
        if item["kind"] not in kinds:
            kinds.append(item["kind"])
    lines = [f"- {_TRADE_OFFS[kind]}" for kind in kinds if kind in _TRADE_OFFS]
    if doc["caches"]:
        lines.append(
            "- Caching: a cached entry can be stale for up to its ttl; invalidate on writes."
        )
    if not lines:
        return ["No change is recommended, so there is nothing to trade off."]
    return lines


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The report as Markdown: every section of SECTIONS, in order, always."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(doc["taken_at"]))
    builders = (
        _current_performance,
        _bottlenecks,
        _recommendations,
        _index_recommendations,
        _caching,
        _verification,
        _trade_offs,
    )
    out = [f"# Performance report: {doc['url']}", "", f"Generated by perfmw at {when}.", ""]
    for title, build in zip(SECTIONS, builders, strict=True):
        out += [f"## {title}", "", *build(doc), ""]
    return "\n".join(out)


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
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise ReportError(f"{path} is not JSON: write it with --format json") from None
    if not isinstance(document, dict) or "perfmw_report" not in document:
        raise ReportError(f"{path} is not a perfmw JSON report: write it with --format json")
    return document


def render_compare(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """The before/after table of the same routes and caches, with the change in percent."""
    old = {(r["method"], r["route"]): r for r in before.get("routes", [])}
    new = {(r["method"], r["route"]): r for r in after.get("routes", [])}
    lines = [
        f"# Before / after: {before.get('url')} -> {after.get('url')}",
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
            f"| `{key[0]} {key[1]}` | {_ms(a.get('p50_seconds'))} | {_ms(b.get('p50_seconds'))} "
            f"| {_change(a.get('p50_seconds'), b.get('p50_seconds'))} "
            f"| {_ms(a.get('p99_seconds'))} | {_ms(b.get('p99_seconds'))} "
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
            f"| `{name}` | {_pct(a.get('hit_rate'))} | {_pct(b.get('hit_rate'))} | "
            f"{_change(a.get('hit_rate'), b.get('hit_rate'))} |"
        )
    found_before = len(before.get("findings", []))
    found_after = len(after.get("findings", []))
    lines += ["", f"Findings: {found_before} before, {found_after} after."]
    return "\n".join(lines) + "\n"
