"""What each finding means in the report: its title, the pattern to replace and the fix, the
time the fix would save (an estimate, and said to be one), its complexity and trade-off.

Also the few formatting atoms the report's texts share (durations, percentages, where a finding
is); the application's own strings in them go through `_report_escape`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._report_escape import code, text


def repetitions(detail: Mapping[str, Any]) -> int:
    for key in ("repetitions", "queries", "count"):
        value = detail.get(key)
        if isinstance(value, (int, float)) and value >= 1:
            return int(value)
    return 1


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.01:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds * 1000:.1f} ms"


def where(finding: Mapping[str, Any]) -> str:
    location = finding.get("location")
    via = finding.get("via")
    through = f" via {code(via)}" if isinstance(via, str) and via else ""
    if not location:
        return f"unknown (no application frame was found){through}"
    return code(location) + through


def advice(finding: Mapping[str, Any]) -> dict[str, Any]:
    """Title, current/proposed pattern, saving estimate, complexity for one finding."""
    kind = finding.get("kind", "")
    detail: Mapping[str, Any] = finding.get("detail") or {}
    total = float(finding.get("total_seconds") or 0.0)
    collection = code(detail.get("collection", "?"))
    operation = code(detail.get("operation", "?"))
    shape = detail.get("shape")
    shape_text = f" with shape {code(shape)}" if shape else ""
    if kind == "n_plus_one":
        batched = (
            "one query for all the items (`$in` on the field that varies, or an aggregate with "
            "`$lookup`), joined in memory"
        )
        if "repetitions" not in detail:  # counted by Prometheus: no example request at hand
            return {
                "title": f"N+1 queries: {operation} on {collection}",
                "current": f"one {operation} on {collection} per item{shape_text}",
                "proposed": batched,
                "saved": total * 0.9,
                "basis": "the per-item round trips become one; estimate",
                "complexity": "low",
            }
        reps = repetitions(detail)
        return {
            "title": f"N+1 queries: {operation} on {collection} repeated {reps} times",
            "current": f"one {operation} on {collection} per item{shape_text}, {reps} per request",
            "proposed": batched,
            "saved": total * (reps - 1) / reps,
            "basis": f"{reps} round trips become one",
            "complexity": "low",
        }
    if kind == "duplicate_read":
        reps = repetitions(detail)
        first = detail.get("first_location")
        earlier = f", first at {code(first)}" if isinstance(first, str) and first else ""
        return {
            "title": f"Duplicate read: {operation} on {collection} sent {reps} times",
            "current": f"the same {operation} on {collection}{shape_text} with the same values "
            f"{reps} times in one request{earlier}",
            "proposed": "read it once and pass it down (to the code that reads it again, or "
            "as a request-scoped dependency)",
            # The finding's cost is already the avoidable part: every read but the first.
            "saved": total,
            "basis": "the time of every read but the first",
            "complexity": "low",
        }
    if kind == "consecutive_queries":
        queries = detail.get("queries")
        reads = len(queries) if isinstance(queries, list) and queries else repetitions(detail)
        collections = detail.get("collections") or [detail.get("collection", "?")]
        return {
            "title": "Sequential independent queries on " + ", ".join(map(code, collections)),
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
            "title": f"Slow {operation} on {collection}",
            "current": f"{operation} on {collection}{shape_text} slower than slow_query_seconds",
            "proposed": "an index matching the filter and sort (see Index Recommendations), a "
            "narrower filter or a projection",
            "saved": total * 0.5,
            "basis": "assumed half of its time; re-measure after the change",
            "complexity": "medium",
        }
    if kind == "missing_index":
        index = index_text(detail.get("index"))
        saved, basis = _index_saving(total, finding.get("count"), detail)
        return {
            "title": f"Collection scan on {collection}: no index for the filter",
            "current": f"{operation} on {collection}{shape_text} scans the whole "
            "collection (COLLSCAN)",
            "proposed": f"create the index {code(index)} on {collection}",
            "saved": saved,
            "basis": basis,
            "complexity": "low",
        }
    if kind == "unbounded_read":
        missing = detail.get("missing") or detail.get("problems") or []
        if isinstance(missing, str):
            missing = [missing]
        docs = detail.get("documents")
        returned = f" returning {int(docs)} documents" if isinstance(docs, (int, float)) else ""
        without = " and ".join(map(text, missing)) or "a limit or a projection"
        fraction = 0.9 if isinstance(docs, (int, float)) and docs > 1000 else 0.5
        return {
            "title": f"Unbounded read on {collection}",
            "current": f"{operation} on {collection}{returned} without {without}",
            "proposed": "paginate (`limit` + a range on the sort key, `?limit=100`) and project "
            "only the fields the client needs",
            "saved": total * fraction,
            "basis": "a page of 100 instead of the whole collection; estimate",
            "complexity": "medium (the API's clients page through results)",
        }
    if kind == "loop_stall":
        cause = str(detail.get("cause", "blocking"))
        ran, instead, effort = _STALL_ADVICE.get(cause, _STALL_ADVICE["blocking"])
        saved, basis = _stall_saving(cause, total, detail)
        return {
            "title": f"Event loop stalled ({text(cause)})",
            "current": ran,
            "proposed": instead,
            "saved": saved,
            "basis": basis,
            "complexity": effort,
        }
    if kind == "blocking_call":
        what = detail.get("kind", "blocking call")
        delayed, basis = _others_wait(total, detail, "calls")
        return {
            "title": f"Blocking call on the event loop ({text(what)})",
            "current": "a synchronous `MongoClient` called inside `async def`: the loop waits "
            "for the network"
            if what == "pymongo-sync"
            else f"a blocking {code(what)} call inside `async def`",
            "proposed": "`pymongo.AsyncMongoClient` (or motor) with `await`, or declare the "
            "endpoint with plain `def` so it runs in the threadpool",
            "saved": total if delayed is None else delayed,
            "basis": "the loop no longer waits for these calls"
            if delayed is None
            else basis + "; the calls themselves still take their time, off the loop",
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
                }.get(p, text(p))
                for p in problems
            ),
            "proposed": "; ".join(proposed) or "paginate or compress it",
            "saved": 0.0,
            "basis": "bytes on the wire and the clients' time, not the server's",
            "complexity": "low",
        }
    return {
        "title": text(kind),
        "current": code(json.dumps(detail, default=str)),
        "proposed": "see docs/findings.md",
        "saved": 0.0,
        "basis": "unknown kind",
        "complexity": "unknown",
    }


def _stall_saving(cause: str, total: float, detail: Mapping[str, Any]) -> tuple[float, str]:
    """What fixing a stall gives back: the other requests' wait for the loop (`_others_wait`).
    For a collection its own time is given back too; blocking or computing work moved off the
    loop takes its own."""
    delayed, basis = _others_wait(total, detail, "stalls")
    if delayed is None:
        return total, "the whole stall is given back to the other requests"
    if cause == "gc":
        return total + delayed, basis + ", and the collections' own time is given back"
    return delayed, basis + "; the work itself still takes its time, off the loop"


def _index_saving(total: float, count: Any, detail: Mapping[str, Any]) -> tuple[float, str]:
    """What an index saves a collection scan: the server's time on the documents it examined
    beyond those it returned (explain's executionStats, run once), per query; else 90 %."""
    found = [
        count,
        *(detail.get(k) for k in ("docs_examined", "docs_returned", "execution_seconds")),
    ]
    assumed = "an index scan reads only the matching entries; assumed 90% of its time"
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in found):
        return total * 0.9, assumed
    queries, examined, returned, server = (float(n) for n in found)
    if examined <= 0 or queries <= 0:
        return total * 0.9, assumed
    share = max(0.0, 1 - returned / examined)
    return min(total, queries * server * share), (
        f"the scan examined {examined:.0f} documents to return {returned:.0f}: an index reads "
        f"only the matching ones, saving {share:.0%} of the server's {ms(server)} per query; "
        "the round trip and the results stay"
    )


def _others_wait(total: float, detail: Mapping[str, Any], what: str) -> tuple[float | None, str]:
    """The other requests' wait for a loop that stalls or blocked calls held, and its basis.

    perfmw counts the requests that waited (`delayed_seconds`: for a stall those in flight or
    read but not started, and those unread in their connections, since they arrived; for a
    blocking call the same, the unread ones read once a second per call site and scaled to the
    calls in between); a reading can miss some (loop/sockets.py says which), never add any, and
    a scaled one is as right as the site's load is steady. So the wait is taken to be at least
    the blocked time itself, the next request's (Prometheus's findings carry no count at all):
    None when it is no more than that.
    """
    delayed = detail.get("delayed_seconds")
    if not isinstance(delayed, (int, float)) or isinstance(delayed, bool) or delayed <= total:
        return None, ""
    waiting = detail.get("requests_waiting")
    latest = f", {int(waiting)} at the latest one," if isinstance(waiting, (int, float)) else ""
    return delayed, f"the other requests waiting during the {what}{latest} waited for the loop"


# A stall's cause: what ran on the loop, what to do instead, how hard that is.
_STALL_ADVICE = {
    "blocking": (
        "a blocking call on the event loop inside `async def` (sleep, synchronous I/O, a "
        "lock): every request in flight waits for it",
        "move it off the loop: `await run_in_threadpool(fn)` / `asyncio.to_thread(fn)`, an "
        "async library, or make the endpoint a plain `def`",
        "low",
    ),
    "cpu": (
        "computation on the event loop: every request in flight waits while it runs",
        "run it in a process pool (`loop.run_in_executor(ProcessPoolExecutor(), fn)`), or cut it "
        "into steps with `await asyncio.sleep(0)` between them; a thread does not help while "
        "it holds the GIL",
        "medium",
    ),
    "gc": (
        "garbage collections of many long-lived objects, run on the event loop",
        "`gc.freeze()` once start-up has built its long-lived objects, fewer reference cycles "
        "per request, and a higher `gc.set_threshold` if young collections are frequent",
        "medium",
    ),
    # perfmw makes no finding of these (see detectors/loop.py); a finding from a perfmw that
    # did, or from a store written elsewhere, must not get the blocking advice.
    "starved": (
        "nothing of the code's: the loop was ready to run and the machine did not let it (a "
        "busy machine, another thread holding the GIL)",
        "no change to the code: give the worker more CPU (fewer processes per core, a less "
        "busy host) and look at what else runs there",
        "capacity, not code",
    ),
    "throttled": (
        "nothing of the code's: the container's CPU quota ran out and the kernel held the "
        "process off the CPU",
        "no change to the code: raise the CPU limit (or drop it and keep the request), or run "
        "fewer worker processes in the container",
        "capacity, not code",
    ),
    "saturation": (
        "many callbacks in a row, none long alone: the worker has more work than one loop "
        "thread runs in time",
        "fewer concurrent tasks per worker (a semaphore), less work per request, or more "
        "worker processes",
        "medium",
    ),
}


def index_keys(index: Any) -> list[tuple[str, Any]]:
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


def index_text(index: Any) -> str:
    return json.dumps(dict(index_keys(index)))


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


TRADE_OFFS = {
    "n_plus_one": "Batching with `$in`: one larger reply instead of many small ones; chunk "
    "very long id lists (thousands) to keep each command small.",
    "duplicate_read": "Reading once: the code that read it again sees the document as it was "
    "at the first read (perfmw does not count a read after a write to the collection as a "
    "duplicate, so a re-read for fresh data is not flagged).",
    "consecutive_queries": "`asyncio.gather`: the reads hold several pool connections at "
    "once and load MongoDB in bursts; errors surface from the first one that fails.",
    "slow_query": "Tuning a slow query: an index speeds reads but costs every write and RAM.",
    "missing_index": "Indexes: each one slows inserts and updates on that collection a little "
    "and takes memory; building one on a large collection takes time (build it off-peak).",
    "unbounded_read": "Pagination changes the API: clients must follow pages; a projection "
    "must keep every field clients use.",
    "loop_stall": "Threadpool offloading: the default pool has 40 threads; long blocking work "
    "there still limits throughput, it only stops blocking everyone else. A process pool "
    "pickles arguments and results; `gc.freeze()` keeps frozen objects for the process's life.",
    "blocking_call": "Switching to the async client touches every call site of the sync one; "
    "a plain `def` endpoint is the smaller change but uses a threadpool slot per request.",
    "large_response": "Compression costs CPU per response; cache headers risk stale data in "
    "clients for as long as they allow.",
}
