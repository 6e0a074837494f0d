"""The report as Markdown: one builder per section, every section always written.

Every string that came from the service (or from a report file) is written through
`_report_escape`: the report is safe to render, whatever the application's routes hold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from ._report_advice import TRADE_OFFS, index_text, ms, pct, where
from ._report_escape import code, fenced, text

SECTIONS = (
    "Current Performance",
    "Bottlenecks Identified",
    "Optimization Recommendations",
    "Index Recommendations",
    "Caching",
    "Verification",
    "Trade-offs",
)


def route_name(item: Mapping[str, Any], *, cell: bool = False) -> str:
    """`GET /route` as inline code (the route alone when there is no method)."""
    method = item.get("method")
    return code(f"{method} {item.get('route')}" if method else str(item.get("route")), cell=cell)


def _current_performance(doc: Mapping[str, Any]) -> list[str]:
    routes = doc["routes"]
    window = doc.get("window_seconds")
    pids = doc.get("pids") or ([doc["pid"]] if doc.get("pid") is not None else [])
    if len(pids) > 1:
        worker = (
            f" The findings merge what {len(pids)} workers answered "
            f"(pids {', '.join(str(p) for p in pids)}); the metrics cover every worker."
        )
    elif pids:
        worker = (
            f" The findings are those of the process that answered (pid {pids[0]}); several "
            "workers share theirs only with `PROMETHEUS_MULTIPROC_DIR` set (else `--probes 8` "
            "asks up to 8 of them), while the metrics cover them all."
        )
    else:
        worker = ""
    span = f"over {window:.1f} s ({doc['measured']})" if window else doc["measured"]
    source = doc.get("prometheus")
    where = f"the service at {text(doc['url'])}"
    if source:
        where = (
            f"every replica of {_matchers(source)} that Prometheus at {text(source['url'])} scrapes"
        )
    lines = [
        f"Measured inside {where} by perfmw's middleware, "
        f"{span}: each request timed from its arrival to its last body chunk, MongoDB "
        "commands counted by pymongo's command listeners. p50/p95/p99 are interpolated from the "
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
        "| Stalls | p95 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in routes:
        rate = row["rate_per_second"]
        queries = row["queries_per_request"]
        lines.append(
            f"| {route_name(row, cell=True)} | {row['requests']} | "
            f"{'n/a' if rate is None else f'{rate:.1f}'} | {ms(row['p50_seconds'])} | "
            f"{ms(row['p99_seconds'])} | {'n/a' if queries is None else f'{queries:.2f}'} | "
            f"{pct(row['db_share'])} | {row['errors']} | {row['stalls']} | "
            f"{ms(row.get('p95_seconds'))} |"
        )
    starved = doc.get("starved") or {}
    if starved.get("stalls"):
        routes_text = ", ".join(map(code, starved.get("routes") or ()))
        causes = starved.get("causes") or {}
        by_cause = ", ".join(f"{n} {text(cause)}" for cause, n in sorted(causes.items()))
        seconds = starved.get("seconds")
        total = f"{ms(seconds)} in total, " if seconds is not None else ""
        lines += [
            "",
            f"The process was starved of CPU in {starved['stalls']} stalls "
            f"({total}{by_cause + ', ' if by_cause else ''}during {routes_text}): the event "
            "loop was ready to run and was not let (a busy machine, another thread holding the "
            "GIL, or the cgroup's CPU quota running out: `throttled`), and without that time it "
            "would not have stalled. That is not the code's doing, so these stalls are not "
            "listed as bottlenecks, nor in the Stalls column.",
        ]
    return lines


def _bottlenecks(doc: Mapping[str, Any]) -> list[str]:
    items = doc["bottlenecks"]
    if not doc.get("findings_served", True):
        return [
            "Not known: the service serves no findings endpoint (its `findings_path` is off), "
            "so perfmw cannot say where the time goes; the metrics above still hold."
        ]
    if not items:
        return ["No bottleneck found: perfmw recorded no finding in this window."]
    lines: list[str] = []
    for number, item in enumerate(items, 1):
        share = item["route_share"]
        of_route = f", {pct(share)} of the route's time" if share is not None else ""
        count = item.get("count") or 0
        per = item["total_seconds"] / count if count else 0.0
        lines += [
            f"### {number}. {item['title']} ({text(item['kind'])}) on {code(item['route'])}",
            "",
            f"- **Location:** {where(item)}",
            f"- **Impact:** {ms(item['total_seconds'])} in total, {ms(per)} per occurrence"
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
    "first_location": "first read at",
    "documents": "documents",
    "bytes": "bytes",
    "missing": "missing",
    "duration_seconds": "latest",
    "delayed_seconds": "the other requests waited",
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
    parts = [f"seen {count} {noun}{'' if count == 1 else 's'}, {ms(item['total_seconds'])}"]
    for key in _EVIDENCE_KEYS:
        value = detail.get(key)
        if value is None or value == [] or (key == "kind" and kind != "blocking_call"):
            continue
        if key == "delayed_seconds" and not value:
            continue  # none was counted: nothing to say
        if key.endswith("_seconds") and isinstance(value, (int, float)):
            parts.append(f"{_EVIDENCE_KEYS[key]} {ms(float(value))}")
        elif isinstance(value, list):
            parts.append(f"{_EVIDENCE_KEYS[key]} {', '.join(map(text, value))}")
        else:
            parts.append(f"{_EVIDENCE_KEYS[key]} {text(value)}")
    if detail.get("shape"):
        parts.append(f"shape {code(detail['shape'])}")
    if detail.get("index"):
        parts.append(f"proposed index {code(index_text(detail['index']))}")
    stack = detail.get("stack")
    if stack:
        parts.append(f"innermost frame {code(stack[-1])}")
    return "; ".join(parts)


def _recommendations(doc: Mapping[str, Any]) -> list[str]:
    items = doc["recommendations"]
    if not items:
        return ["No optimization to recommend: nothing was found to fix."]
    lines = ["Ordered by the time each change would save over the measured window.", ""]
    for number, item in enumerate(items, 1):
        lines += [
            f"{number}. **{item['title']}** on {code(item['route'])} at {where(item)}",
            f"   - Current pattern: {item['current']}",
            f"   - Proposed pattern: {item['proposed']}",
            f"   - Expected impact: about {ms(item['saved_seconds'])} saved "
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
            f"{code(u['route'], cell=True)} at {text(u['location'] or 'unknown')} ({u['count']}x)"
            for u in item["for"]
        )
        lines.append(
            f"| {code(item['collection'], cell=True)} "
            f"| {code(json.dumps(item['index']), cell=True)} "
            f"| {', '.join(map(text, item['fields']))} | removes the collection scan of {uses} |"
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
            f"| {code(cache['cache'], cell=True)} | {pct(cache['hit_rate'])} | {cache['hits']} | "
            f"{cache['misses']} | {evictions.get('capacity', 0)} / {evictions.get('expired', 0)} "
            f"| {sizes} |"
        )
        advice.append(f"- {code(cache['cache'])}: {_cache_advice(cache)}")
    return [*lines, "", *advice]


def _cache_advice(cache: Mapping[str, Any]) -> str:
    rate = cache["hit_rate"]
    capacity = cache["evictions"].get("capacity", 0)
    expired = cache["evictions"].get("expired", 0)
    if rate is None:
        return "no lookup in this window."
    if rate >= 0.8:
        return f"hits {pct(rate)} of lookups: it is doing its job."
    if capacity > cache["hits"]:
        return (
            f"hits only {pct(rate)}, and {capacity} entries were pushed out for room: "
            "raise maxsize."
        )
    if expired > cache["hits"]:
        return f"hits only {pct(rate)}, and {expired} entries expired first: a longer ttl helps."
    return (
        f"hits only {pct(rate)}: the keys rarely repeat within the ttl; cache at a coarser key "
        "or drop the cache."
    )


def _matchers(source: Mapping[str, Any]) -> str:
    return code(source["selector"]) if source.get("selector") else "every job"


def _verification(doc: Mapping[str, Any]) -> list[str]:
    url = doc["url"]
    source = doc.get("prometheus")
    if source:
        pick = f" --selector '{source['selector']}'" if source.get("selector") else ""
        measure = f"perfmw report --prometheus {source['url']}{pick} --since {source['since']}"
        lines = [
            "Re-measure over the same window of load before and after a change, every replica "
            "at once:",
            "",
            *fenced(
                "bash",
                [
                    f"{measure} --format json --out before.json",
                    "# deploy the change, let the same load run for the window again",
                    f"{measure} --format json --out after.json",
                    "perfmw report --compare before.json after.json",
                ],
            ),
        ]
    else:
        lines = [
            "Re-measure under the same load before and after a change, each time over a minute "
            "of it (`--interval` reports what happened between two scrapes, not totals since "
            "start):",
            "",
            *fenced(
                "bash",
                [
                    f"perfmw report --url {url} --interval 60 --format json --out before.json",
                    "# deploy the change, run the same load again",
                    f"perfmw report --url {url} --interval 60 --format json --out after.json",
                    "perfmw report --compare before.json after.json",
                ],
            ),
        ]
    routes = sorted({str(b["route"]) for b in doc["bottlenecks"]})
    if routes:
        # The route as a PromQL string: its quotes, backslashes and line breaks escaped.
        queries = [
            "histogram_quantile(0.99, sum by (le) (rate(http_server_request_duration_seconds_"
            f"bucket{{http_route={json.dumps(route, ensure_ascii=False)}}}[5m])))"
            for route in routes
        ]
        lines += ["", "And watch the affected routes in Prometheus:", ""]
        lines += fenced("promql", queries)
    n_plus_one = [b for b in doc["bottlenecks"] if b["kind"] == "n_plus_one"]
    if n_plus_one:
        lines += [
            "",
            "Keep an N+1 from coming back with a test: "
            "`with perfmw.testing.assert_max_queries(2): client.get(...)`.",
        ]
    return lines


def _trade_offs(doc: Mapping[str, Any]) -> list[str]:
    kinds = []
    for item in doc["recommendations"]:
        if item["kind"] not in kinds:
            kinds.append(item["kind"])
    lines = [f"- {TRADE_OFFS[kind]}" for kind in kinds if kind in TRADE_OFFS]
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
    source = doc.get("prometheus")
    title = f"{doc['url']} {source['selector']}".strip() if source else doc["url"]
    out = [f"# Performance report: {text(title)}", "", f"Generated by perfmw at {when}.", ""]
    for title, build in zip(SECTIONS, builders, strict=True):
        out += [f"## {title}", "", *build(doc), ""]
    return "\n".join(out)
