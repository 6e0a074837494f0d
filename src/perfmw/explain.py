"""Missing-index advice: `explain` a slow or repeated query shape once, off the request path.

Only reads (and findAndModify) with a filter or a sort are explained: an insert, or a command
that selects nothing, has nothing an index would serve. Updates and deletes are not explained
either: their filter is most often an `_id`, and an index made for a write's filter is one more
index every write maintains; a slow one is still a slow_query.

With `explain_slow_queries` on, the MongoDB listener hands this module a command of each shape
that is slow, or sent again after its first sighting in the process (an N+1 included). One
daemon thread explains them one at a time, at most one every `EXPLAIN_INTERVAL_SECONDS`, on its
own connection (a pooled connection of the application's sync client, or of a private sync
twin of an AsyncMongoClient). A winning plan with a COLLSCAN or an in-memory SORT is a verdict
"missing index", with the keys to create in ESR order (equality fields, then sort fields, then
range fields); such a shape is explained once more with executionStats, which runs it on the
server, for what the scan examined and returned and how long it took (the advice's estimate of
what the index saves). Each later request that sends the shape adds a `missing_index` finding to its
Perf's store; a createIndexes or dropIndexes on the collection forgets the verdict (and the
findings), so the next occurrence is explained again and, once indexed, reported no more.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

from pymongo.errors import PyMongoError

from . import _guard
from .findings import Finding
from .record import Query, RequestRecord

EXPLAIN_INTERVAL_SECONDS = 0.5  # at most two explains a second, process-wide
VERDICT_SECONDS = 600.0  # a shape is explained again after this (indexes change)
ERROR_RETRY_SECONDS = 60.0  # after the server refused to explain a shape
_QUEUE_SIZE = 64
_MAX_VERDICTS = 5000
_GUARD = _guard.guard("explain")

# Fields of a sent command that belong to its session or transport, not to the query.
_TRANSPORT = frozenset(
    {
        "lsid",
        "txnNumber",
        "$clusterTime",
        "$db",
        "$readPreference",
        "readConcern",
        "writeConcern",
        "startTransaction",
        "autocommit",
        "apiVersion",
        "apiStrict",
        "apiDeprecationErrors",
        "maxTimeMS",
        "comment",
    }
)
_EXPLAINABLE = frozenset({"find", "aggregate", "count", "distinct", "findAndModify"})
_EQUALITY = frozenset({"$eq", "$in"})


@dataclass
class Verdict:
    """What explain said about one shape: `index` is None when the plan used an index."""

    database: str
    collection: str
    index: list[list[Any]] | None
    stage: str
    expires: float
    # What the scan cost when run once (`_execution_stats`): documents examined and returned,
    # and the server's seconds; None when the server did not say.
    stats: tuple[int, int, float] | None = None


_lock = threading.Lock()
_verdicts: dict[str, Verdict] = {}
_pending: set[str] = set()
# Requests that saw a shape while its explain was queued: told when the verdict arrives.
_waiters: dict[str, list[tuple[weakref.ref[Any], str, str | None, str | None, float]]] = {}
_jobs: queue.Queue[tuple[str, str, str, dict[str, Any], Any]] = queue.Queue(_QUEUE_SIZE)
_worker: threading.Thread | None = None
_twins: dict[int, Any] = {}


MISSING, PENDING, INDEXED, NEW, REPEATED, NEVER = range(6)
_seen: set[str] = set()  # shapes sent once so far: a second sighting gets them explained
_MAX_SEEN = 10_000
# A filter with a field ("{a: ?}", not "{}"), or a sort: something an index could serve.
_SELECTS = re.compile(r"\{[^}]|\bsort=|\$sort\b")
_explainable: dict[str, bool] = {}


def explainable(shape: str) -> bool:
    """Whether an index could serve this shape: a read or findAndModify (shapes start with
    their command's name) with a filter on some field, or a sort."""
    known = _explainable.get(shape)
    if known is None:
        operation, _, rest = shape.partition(" ")
        known = operation in _EXPLAINABLE and _SELECTS.search(rest) is not None
        if len(_explainable) >= _MAX_SEEN:
            _explainable.clear()
        _explainable[shape] = known
    return known


def state(shape: str) -> int:
    """Where a shape stands: MISSING or INDEXED (a fresh verdict), PENDING (queued),
    NEW (first sighting in this process), REPEATED (seen before, to explain now) or NEVER
    (nothing an index would serve: an insert, a command without a filter)."""
    if not explainable(shape):
        return NEVER
    verdict = _verdicts.get(shape)
    if verdict is not None and verdict.expires > time.monotonic():
        return INDEXED if verdict.index is None else MISSING
    if shape in _pending:
        return PENDING
    if shape in _seen:
        return REPEATED
    if len(_seen) >= _MAX_SEEN:
        _seen.clear()
    _seen.add(shape)
    return NEW


def consider(query: Query, command: Any, frame: FrameType | None) -> None:
    """Queue an explain of this query's shape unless its verdict is known or on the way."""
    if not isinstance(command, Mapping) or not explainable(query.shape):
        return
    shape = query.shape
    now = time.monotonic()
    with _lock:
        verdict = _verdicts.get(shape)
        if (verdict is not None and verdict.expires > now) or shape in _pending:
            return
    client = _client_from(frame)
    if client is None:  # nothing to explain with: do not look again for a while
        retry = now + ERROR_RETRY_SECONDS
        with _lock:
            _verdicts[shape] = Verdict(query.database, query.collection, None, "no client", retry)
        return
    body = {key: value for key, value in command.items() if key not in _TRANSPORT}
    with _lock:
        if shape in _pending:
            return
        try:
            _jobs.put_nowait((shape, query.database, query.collection, body, client))
        except queue.Full:
            return
        _pending.add(shape)
        _start_worker()


def _async_clients() -> tuple[type, ...]:
    """(AsyncMongoClient,), or nothing before pymongo 4.10, which has none."""
    import pymongo

    found = getattr(pymongo, "AsyncMongoClient", None)
    return (found,) if isinstance(found, type) else ()


def _client_from(frame: FrameType | None) -> Any:
    """The MongoClient or AsyncMongoClient sending the command, found on the driver's stack."""
    from pymongo import MongoClient

    clients = (MongoClient, *_async_clients())
    depth = 0
    while frame is not None and depth < 40:
        if "pymongo" in frame.f_code.co_filename:
            local = frame.f_locals
            for name in ("client", "self", "_client"):
                value = local.get(name)
                if isinstance(value, clients):
                    return value
                owner = getattr(getattr(value, "database", None), "client", None)
                if isinstance(owner, clients):
                    return owner
        frame = frame.f_back
        depth += 1
    return None


def _start_worker() -> None:
    global _worker
    if _worker is None or not _worker.is_alive():
        _worker = threading.Thread(target=_work, name="perfmw-explain", daemon=True)
        _worker.start()


def _work() -> None:
    from .mongo import _internal

    _internal.set(True)  # this thread's commands are perfmw's, not the application's
    last = 0.0
    while True:
        shape, database, collection, body, client = _jobs.get()
        wait = last + EXPLAIN_INTERVAL_SECONDS - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        last = time.monotonic()
        verdict = None
        with _GUARD:
            try:
                if isinstance(client, _async_clients()):
                    client = _sync_twin(client)  # every command below goes through it
                plan = _run_explain(client, database, body)
            except PyMongoError as error:
                # The server cannot explain it (or is away): not perfmw's fault; retry later.
                retry = time.monotonic() + ERROR_RETRY_SECONDS
                verdict = Verdict(database, collection, None, f"error: {error}"[:200], retry)
            else:
                verdict = judge(plan, body, database, collection)
                if verdict.index is not None:
                    existing = _existing_indexes(client, database, collection)
                    name = covering_index(verdict.index, existing)
                    if name is not None:  # the server chose not to use it: nothing to create
                        verdict.stage = f"{verdict.stage} (index {name} exists)"
                        verdict.index = None
                    else:
                        verdict.stats = _execution_stats(client, database, body)
        with _lock:
            _pending.discard(shape)
            waiters = _waiters.pop(shape, [])
            if verdict is not None:
                if len(_verdicts) >= _MAX_VERDICTS:
                    _verdicts.pop(next(iter(_verdicts)))
                _verdicts[shape] = verdict
        if verdict is not None and verdict.index is not None:
            for perf_ref, route, location, via, seconds in waiters:
                perf = perf_ref()
                if perf is not None and not perf.closed:
                    with _GUARD:
                        _report(perf, None, route, location, via, seconds, shape, verdict)


def _run_explain(client: Any, database: str, body: dict[str, Any]) -> Mapping[str, Any]:
    explained: Mapping[str, Any] = client[database].command(
        {"explain": body, "verbosity": "queryPlanner"}
    )
    return explained


def _execution_stats(
    client: Any, database: str, body: dict[str, Any]
) -> tuple[int, int, float] | None:
    """The documents a missing index's query examined and returned, and the server's seconds,
    from running it once (`executionStats`: the advice's estimate of what an index saves).
    Asked only for a shape that lacks an index, once per verdict; None when the server cannot
    say."""
    try:
        explained = client[database].command({"explain": body, "verbosity": "executionStats"})
    except PyMongoError:
        return None
    stats = explained.get("executionStats")
    if not isinstance(stats, Mapping):
        return None
    # An aggregate's stats sit in its first stage on a real server: left out, the flat estimate.
    keys = ("totalDocsExamined", "nReturned", "executionTimeMillis")
    numbers: list[Any] = [stats.get(key) for key in keys]
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        return None
    examined, returned, millis = numbers
    return int(examined), int(returned), millis / 1000


def _existing_indexes(client: Any, database: str, collection: str) -> dict[str, list[Any]]:
    information = client[database][collection].index_information()
    return {name: list(spec.get("key", ())) for name, spec in information.items()}


def covering_index(index: list[list[Any]], existing: dict[str, list[Any]]) -> str | None:
    """The name of an existing index that starts with the proposed keys (or their mirror)."""
    wanted = [(field, direction) for field, direction in index]
    mirrored = [
        (field, -direction if direction in (1, -1) else direction) for field, direction in wanted
    ]
    for name, keys in existing.items():
        prefix = [tuple(key) for key in keys[: len(wanted)]]
        if prefix in (wanted, mirrored):
            return name
    return None


def _sync_twin(client: Any) -> Any:
    """A private sync MongoClient with an AsyncMongoClient's options, closed with it."""
    from pymongo import MongoClient

    twin = _twins.get(id(client))
    if twin is None:
        options = dict(client._init_kwargs)
        options.pop("event_listeners", None)
        options["maxPoolSize"] = 1
        # Best effort, off the request path: never wait long for a server (closing the twin at
        # exit, after the database went away, would otherwise block for 30 s).
        options["serverSelectionTimeoutMS"] = 2000
        twin = _twins[id(client)] = MongoClient(**options)
        weakref.finalize(client, _close_twin, id(client))
    return twin


def _close_twin(key: int) -> None:
    twin = _twins.pop(key, None)
    if twin is not None:
        with contextlib.suppress(Exception):
            twin.close()


# Judging a plan.


def _stages(plan: Any) -> list[str]:
    found: list[str] = []
    todo = [plan]
    while todo:
        node = todo.pop()
        if isinstance(node, Mapping):
            stage = node.get("stage")
            if isinstance(stage, str):
                found.append(stage)
            for key in ("inputStage", "queryPlan", "winningPlan"):
                if key in node:
                    todo.append(node[key])
            todo.extend(node.get("inputStages", ()) or ())
        elif isinstance(node, list):
            todo.extend(node)
    return found


def _winning_plan(explained: Mapping[str, Any]) -> Any:
    planner = explained.get("queryPlanner")
    if planner is None:  # aggregate: the plan of its first ($cursor) stage
        for stage in explained.get("stages", ()) or ():
            cursor = stage.get("$cursor") if isinstance(stage, Mapping) else None
            if isinstance(cursor, Mapping):
                planner = cursor.get("queryPlanner")
                break
    return planner.get("winningPlan") if isinstance(planner, Mapping) else None


def judge(
    explained: Mapping[str, Any], body: Mapping[str, Any], database: str, collection: str
) -> Verdict:
    """The verdict on one explained command: the ESR index to create, or None."""
    stages = _stages(_winning_plan(explained))
    expires = time.monotonic() + VERDICT_SECONDS
    problem = "COLLSCAN" if "COLLSCAN" in stages else "SORT" if "SORT" in stages else ""
    index = esr_index(*_filter_and_sort(body)) if problem else []
    if not index:
        return Verdict(
            database, collection, None, problem or (stages[-1] if stages else ""), expires
        )
    return Verdict(database, collection, index, problem, expires)


def _filter_and_sort(body: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    if "pipeline" in body:
        found: Mapping[str, Any] = {}
        sort: Mapping[str, Any] = {}
        for stage in body.get("pipeline") or ():
            if not isinstance(stage, Mapping):
                break
            if "$match" in stage and not found:
                found = stage["$match"]
            elif "$sort" in stage and not sort:
                sort = stage["$sort"]
            else:
                break
        return found, sort
    found = body.get("filter", body.get("query")) or {}
    return found, body.get("sort") or {}


def esr_index(filter_: Mapping[str, Any], sort: Mapping[str, Any]) -> list[list[Any]]:
    """Index keys by the ESR rule: equality fields, then the sort, then range fields."""
    equality: list[str] = []
    ranges: list[str] = []
    for field, value in _conditions(filter_):
        if isinstance(value, Mapping) and value and next(iter(value)).startswith("$"):
            (equality if set(value) <= _EQUALITY else ranges).append(field)
        else:
            equality.append(field)
    keys: list[list[Any]] = []
    seen: set[str] = set()
    for field in equality:
        if field not in seen:
            keys.append([field, 1])
            seen.add(field)
    for field, direction in (sort or {}).items():
        if field not in seen:
            keys.append([field, direction if direction in (1, -1) else 1])
            seen.add(field)
    for field in ranges:
        if field not in seen:
            keys.append([field, 1])
            seen.add(field)
    return keys


def _conditions(filter_: Mapping[str, Any]) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for key, value in filter_.items():
        if key == "$and" and isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    found.extend(_conditions(item))
        elif not key.startswith("$"):
            found.append((key, value))
    return found


# Reporting: a finish hook adds one finding per request in which the shape was slow or repeated.


def _report(
    perf: Any,
    record: RequestRecord | None,
    route: str,
    location: str | None,
    via: str | None,
    seconds: float,
    shape: str,
    verdict: Verdict,
) -> None:
    from .detectors import silenced

    assert verdict.index is not None
    if silenced(location, perf.settings.silenced_locations):
        return  # an accepted site, like any other finding (detectors.detect)
    detail: dict[str, Any] = {
        "collection": verdict.collection,
        "operation": shape.partition(" ")[0],  # shapes start with their command's name
        "database": verdict.database,
        "shape": shape,
        "index": [list(key) for key in verdict.index],
        "stage": verdict.stage,
    }
    if verdict.stats is not None:
        examined, returned, seconds_on_server = verdict.stats
        detail.update(
            docs_examined=examined, docs_returned=returned, execution_seconds=seconds_on_server
        )
    finding = Finding("missing_index", route, location, seconds, detail, via=via)
    perf.add_findings([finding], record)


def on_finish(perf: Any, record: RequestRecord) -> None:
    """After the detectors: one missing_index finding per (shape, location) of this request."""
    if not perf.settings.explain_slow_queries or not record.queries:
        return
    now = time.monotonic()
    groups: dict[tuple[str, str | None, str | None], float] = {}
    for query in record.queries:
        key = (query.shape, query.location, query.via)
        groups[key] = groups.get(key, 0.0) + query.duration_seconds
    for (shape, location, via), seconds in groups.items():
        with _lock:
            verdict = _verdicts.get(shape)
            if verdict is None or verdict.expires <= now:
                # Only located queries wait: the one that asked for the explain has its line.
                if shape in _pending and location is not None:
                    waiters = _waiters.setdefault(shape, [])
                    if len(waiters) < 100:
                        waiters.append((weakref.ref(perf), record.route, location, via, seconds))
                continue
        if verdict.index is not None:
            _report(perf, record, record.route, location, via, seconds, shape, verdict)


def invalidate(database: str, collection: str) -> None:
    """Indexes of a collection changed: forget its verdicts and its missing_index findings."""
    with _lock:
        stale = [
            shape
            for shape, verdict in _verdicts.items()
            if verdict.collection == collection and verdict.database == database
        ]
        for shape in stale:
            del _verdicts[shape]
    if not stale:
        return
    from .perf import live_perfs

    for perf in live_perfs():
        for shape in stale:
            perf.findings.discard("missing_index", shape)


def register() -> None:
    """Add the finish hook that reports missing indexes (once)."""
    from .perf import _finish_hooks

    if on_finish not in _finish_hooks:
        _finish_hooks.append(on_finish)
