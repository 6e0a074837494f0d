"""What the dashboard shows, as one JSON-ready document, built when the page asks for it.

Nothing here runs on a request of the application: it reads what the sinks already keep. The
metrics are the registry's exposition (every worker's, in multiprocess mode) analysed by the
report's own `analyse`, the findings are the findings endpoint's (every worker's too) with the
report's advice for each, and the stalls are this worker's last ones (`stalls.py`).
"""

from __future__ import annotations

import math
import os
import string
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from .._report_advice import advice
from ..endpoints import read_findings
from ..exporters.prometheus import exposition
from ..perf import Perf
from ..record import MACHINE_CAUSES
from ..report import SampleKey, Snapshot, analyse, parse_samples, quantile
from . import stalls

FORMAT_VERSION = 1

#: Each finding kind's heading on the page.
KIND_LABELS = {
    "n_plus_one": "N+1 queries",
    "duplicate_read": "The same read sent twice",
    "consecutive_queries": "Sequential queries that could run concurrently",
    "slow_query": "Slow queries",
    "missing_index": "Collection scans (missing indexes)",
    "unbounded_read": "Unbounded reads",
    "loop_stall": "Event-loop stalls",
    "blocking_call": "Blocking calls on the event loop",
    "large_response": "Large responses",
}


def document(perf: Perf) -> dict[str, Any]:
    """The dashboard's data for `perf`'s application, as its data endpoint answers it."""
    body, _ = exposition(perf.registry, None)
    samples = parse_samples(body.decode("utf-8", "replace"))
    findings, pids = read_findings(perf)
    now = time.time()
    analysis = analyse(Snapshot("", now, samples, findings, os.getpid(), True, pids))
    answer: dict[str, Any] = finite(
        {
            "perfmw_dashboard": FORMAT_VERSION,
            "generated_at": now,
            "pid": os.getpid(),
            "pids": pids,
            "measured": analysis["measured"],
            "requests": analysis["requests"],
            "routes": _routes(analysis["routes"], samples, findings),
            "findings": grouped(findings),
            "stalls": {
                "threshold_seconds": perf.settings.stall_threshold_seconds,
                "capacity": stalls.RECENT_STALLS,
                "points": stalls.recent(perf),
            },
            "caches": analysis["caches"],
            "pools": _pools(samples),
        }
    )
    return answer


def finite(value: Any) -> Any:
    """`value` with NaN and infinities as None: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


# Routes: the report's rows, with the stall time and the mean response size.


def _per_route(
    samples: Mapping[SampleKey, float], name: str
) -> dict[tuple[str | None, str | None], float]:
    found: dict[tuple[str | None, str | None], float] = defaultdict(float)
    for (sample, labels), value in samples.items():
        if sample == name:
            label = dict(labels)
            found[(label.get("http_request_method"), label.get("http_route"))] += value
    return found


def _routes(
    rows: list[dict[str, Any]],
    samples: Mapping[SampleKey, float],
    findings: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    stall_seconds: dict[Any, float] = defaultdict(float)
    for finding in findings:
        detail = finding.get("detail") or {}
        if finding.get("kind") == "loop_stall" and detail.get("cause") not in MACHINE_CAUSES:
            stall_seconds[finding.get("route")] += _number(finding.get("total_seconds"))
    size_sum = _per_route(samples, "http_server_response_body_size_bytes_sum")
    size_count = _per_route(samples, "http_server_response_body_size_bytes_count")
    found = []
    for row in rows:
        key = (row["method"], row["route"])
        sized = size_count.get(key)
        found.append(
            {
                **row,
                "stall_seconds": stall_seconds.get(row["route"], 0.0),
                "response_bytes": size_sum[key] / sized if sized else None,
            }
        )
    return found


# Findings, by kind, each with the report's advice.


def grouped(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Findings grouped by kind, the most costly kind first, each site with its advice."""
    groups: dict[str, dict[str, Any]] = {}
    for finding in findings:
        kind = str(finding.get("kind"))
        group = groups.setdefault(
            kind,
            {
                "kind": kind,
                "label": KIND_LABELS.get(kind, kind),
                "count": 0,
                "total_seconds": 0.0,
                "sites": [],
            },
        )
        site = _site(finding)
        group["count"] += site["count"]
        group["total_seconds"] += site["total_seconds"]
        group["sites"].append(site)
    for group in groups.values():
        group["sites"].sort(key=lambda site: -site["total_seconds"])
    return sorted(groups.values(), key=lambda group: -group["total_seconds"])


def _site(finding: dict[str, Any]) -> dict[str, Any]:
    raw = finding.get("detail")
    detail = dict(raw) if isinstance(raw, Mapping) else {}
    stack = detail.pop("stack", None)
    found = advice(finding)
    return {
        "kind": finding.get("kind"),
        "route": finding.get("route"),
        "location": finding.get("location"),
        "via": finding.get("via"),
        "count": int(_number(finding.get("count"))),
        "total_seconds": _number(finding.get("total_seconds")),
        "first_seen": finding.get("first_seen"),
        "last_seen": finding.get("last_seen"),
        "example": _example(str(finding.get("kind")), detail),
        "detail": detail,
        "stack": [str(frame) for frame in stack] if isinstance(stack, list) else [],
        "advice": {
            "title": inline(found["title"]),
            "current": inline(found["current"]),
            "proposed": inline(found["proposed"]),
            "complexity": found["complexity"],
            "saved_seconds": found["saved"],
            "basis": found["basis"],
        },
    }


def _example(kind: str, detail: Mapping[str, Any]) -> str:
    """The latest occurrence in a line: its query shape, or what a stall or response was."""
    if kind == "loop_stall":
        duration = _number(detail.get("duration_seconds"))
        return f"{duration * 1000:.0f} ms, {detail.get('cause', 'blocking')}"
    if kind == "large_response":
        return f"{int(_number(detail.get('bytes')))} bytes"
    if kind == "blocking_call":
        return str(detail.get("kind", ""))
    shape = detail.get("shape")
    return shape if isinstance(shape, str) else ""


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def inline(markdown: str) -> list[list[str]]:
    """The report's Markdown (code spans, backslash escapes, &lt; &gt; &amp;) as segments
    the page puts in the document as text: [["text", "N+1 queries: "], ["code", "find"], ...].

    Code spans are CommonMark's: a run of backticks up to the next run of the same length,
    one space stripped from each end when both ends have one.
    """
    segments: list[list[str]] = []
    text: list[str] = []
    i, end = 0, len(markdown)
    while i < end:
        char = markdown[i]
        if char == "\\" and i + 1 < end and markdown[i + 1] in string.punctuation:
            text.append(markdown[i + 1])
            i += 2
            continue
        if char == "`":
            run = i
            while run < end and markdown[run] == "`":
                run += 1
            fence = markdown[i:run]
            close = _closing(markdown, run, len(fence))
            if close is None:  # no closing run: the backticks are text
                text.append(fence)
                i = run
                continue
            content = markdown[run:close]
            if content.startswith(" ") and content.endswith(" ") and content.strip(" "):
                content = content[1:-1]
            if text:
                segments.append(["text", "".join(text)])
                text = []
            segments.append(["code", content])
            i = close + len(fence)
            continue
        for entity, character in (("&lt;", "<"), ("&gt;", ">"), ("&amp;", "&")):
            if markdown.startswith(entity, i):
                text.append(character)
                i += len(entity)
                break
        else:
            text.append(char)
            i += 1
    if text:
        segments.append(["text", "".join(text)])
    return segments


def _closing(markdown: str, start: int, length: int) -> int | None:
    """Where the run of exactly `length` backticks closing a code span begins, if any."""
    i = markdown.find("`", start)
    while i != -1:
        run = i
        while run < len(markdown) and markdown[run] == "`":
            run += 1
        if run - i == length:
            return i
        i = markdown.find("`", run)
    return None


# MongoDB connection pools: the wait to check a connection out, and the connections.


def _pools(samples: Mapping[SampleKey, float]) -> list[dict[str, Any]]:
    pools: dict[str, dict[str, Any]] = {}
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def pool(labels: Mapping[str, str]) -> dict[str, Any]:
        name = labels.get("db_client_connection_pool_name", "")
        return pools.setdefault(
            name,
            {
                "pool": name,
                "checkouts": 0,
                "wait_seconds": 0.0,
                "mean_wait_seconds": None,
                "p95_wait_seconds": None,
                "used": 0,
                "idle": 0,
            },
        )

    for (name, frozen), value in samples.items():
        labels = dict(frozen)
        if name == "db_client_connection_wait_time_seconds_count":
            pool(labels)["checkouts"] += int(value)
        elif name == "db_client_connection_wait_time_seconds_sum":
            pool(labels)["wait_seconds"] += value
        elif name == "db_client_connection_wait_time_seconds_bucket":
            buckets[pool(labels)["pool"]].append((float(labels["le"]), value))
        elif name == "db_client_connection_count":
            state = labels.get("db_client_connection_state")
            if state in ("used", "idle"):
                pool(labels)[state] += int(value)
    for entry in pools.values():
        if entry["checkouts"]:
            entry["mean_wait_seconds"] = entry["wait_seconds"] / entry["checkouts"]
            entry["p95_wait_seconds"] = quantile(0.95, buckets[entry["pool"]])
    return sorted(pools.values(), key=lambda entry: str(entry["pool"]))
