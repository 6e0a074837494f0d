"""MongoDB detectors: N+1, duplicate reads, consecutive queries, slow queries, unbounded reads.

Pure functions of a finished record's `queries` (see docs/mongo.md for each rule).
"""

from __future__ import annotations

import re
from typing import Any

from ..findings import Finding
from ..record import Query, RequestRecord
from ..settings import Settings

#: A find/aggregate returning more than this many documents, or bytes, in one request...
UNBOUNDED_DOCUMENTS = 1000
UNBOUNDED_BYTES = 1024 * 1024
#: ...without a limit or without a projection is an unbounded read.
UNBOUNDED_OPERATIONS = frozenset({"find", "aggregate"})

#: Sequential independent reads are reported when running them concurrently would save this.
CONSECUTIVE_MIN_SAVING_SECONDS = 0.005
READS = frozenset({"find", "aggregate", "count", "distinct"})
#: Replies of reads at least this long are hashed to tell whether a later read filters on what
#: they returned. Two reads save the shorter one's time, so a pair with a shorter first read is
#: never worth reporting anyway; in a longer run, such a read changes the saving by less than
#: this. Most reads are shorter, and the listener's cost per command stays within its budget.
REPLY_HASH_MIN_SECONDS = CONSECUTIVE_MIN_SAVING_SECONDS
# A filter that looks up values a previous result supplied: `$in` lists, `_id`, `<thing>_id`,
# `<thing>Id`. Such a read probably depends on the one before it, so it may not run beside it.
_DEPENDENT = re.compile(r"\$in: |\$all: |[{ ](?:_id|\w+_ids?|\w+Ids?)(?:\.\w+)*: ")


def detect(record: RequestRecord, settings: Settings) -> list[Finding]:
    queries = record.queries
    found = n_plus_one(record.route, queries, settings.n_plus_one_threshold)
    found.extend(duplicate_reads(record.route, queries))
    found.extend(consecutive_queries(record.route, queries))
    found.extend(slow_queries(record.route, queries, settings.slow_query_seconds))
    found.extend(unbounded_reads(record.route, queries))
    return found


def n_plus_one(route: str, queries: list[Query], threshold: int) -> list[Finding]:
    """The same shape `threshold` times or more: one finding per (shape, loop).

    A query's loop is the application line inside a loop that led to it (`Query.loop`), else its
    own line: four loops over one repository method are four findings at four lines. The
    listener locates the first of a shape and each one from the Nth repetition on; those in
    between (no location) belong with the next located one, and a line seen once is not a loop.
    """
    by_shape: dict[str, list[Query]] = {}
    for query in queries:
        by_shape.setdefault(query.shape, []).append(query)
    found = []
    for shape, same in by_shape.items():
        if len(same) < threshold:
            continue
        groups: dict[str | None, list[Query]] = {}
        pending: list[Query] = []
        for query in same:
            if query.location is None:
                pending.append(query)
                continue
            key = query.loop[0] if query.loop else query.location
            groups.setdefault(key, []).extend((*pending, query))
            pending = []
        if pending:
            groups.setdefault(next(reversed(groups)) if groups else None, []).extend(pending)
        if len(groups) > 1:
            groups = {key: group for key, group in groups.items() if len(group) > 1} or groups
        for location, group in groups.items():
            detail: dict[str, Any] = {
                "collection": group[0].collection,
                "operation": group[0].operation,
                "shape": shape,
                "repetitions": len(group),
            }
            chain = next((q.loop for q in reversed(group) if q.loop), ())
            if len(chain) > 1:
                detail["chain"] = list(chain)  # from the loop down to the query's own line
            found.append(
                Finding(
                    "n_plus_one",
                    route,
                    location,
                    sum(q.duration_seconds for q in group),
                    detail,
                    via=next((q.via for q in group if q.via), None),
                )
            )
    return found


def duplicate_reads(route: str, queries: list[Query]) -> list[Finding]:
    """The same read (shape and values, compared by hash) sent twice or more in one request,
    with no write to its collection in between: one finding per (shape, location of the
    second read)."""
    pending: dict[int, list[Query]] = {}
    groups: list[list[Query]] = []
    for query in queries:
        if query.operation not in READS or _writes(query):
            # A write: what was read of its collection before may have changed.
            stale = [h for h, same in pending.items() if same[0].collection == query.collection]
            for hashed in stale:
                groups.append(pending.pop(hashed))
            continue
        if query.values_hash is None or query.failed:
            continue
        pending.setdefault(query.values_hash, []).append(query)
    groups.extend(pending.values())
    sites: dict[tuple[str, str | None], Finding] = {}
    for same in groups:
        if len(same) < 2:
            continue
        again = next((q for q in same[1:] if q.location), same[1])
        seconds = sum(q.duration_seconds for q in same[1:])
        site = (again.shape, again.location)
        found = sites.get(site)
        if found is not None:  # other values read twice at the same lines: one site
            found.total_seconds += seconds
            found.detail["repetitions"] = max(found.detail["repetitions"], len(same))
            continue
        sites[site] = Finding(
            "duplicate_read",
            route,
            again.location,
            seconds,
            {
                "collection": again.collection,
                "operation": again.operation,
                "shape": again.shape,
                "repetitions": len(same),
                "first_location": same[0].location,
            },
            via=again.via,
        )
    return list(sites.values())


def _writes(query: Query) -> bool:
    """An aggregate that writes its result ($out, $merge) is no read to do once."""
    return query.operation == "aggregate" and ("$out" in query.shape or "$merge" in query.shape)


def _uses_reply(query: Query, earlier: list[Query]) -> bool:
    """Whether `query`'s filter holds a value one of the `earlier` reads returned (by hash)."""
    wanted = query.filter_hashes
    if not wanted:
        return False
    return any(q.reply_hashes and not wanted.isdisjoint(q.reply_hashes) for q in earlier)


def independent_read(query: Query) -> bool:
    """A read whose filter takes no values from an earlier result (see _DEPENDENT)."""
    return query.operation in READS and not query.failed and not _DEPENDENT.search(query.shape)


def consecutive_queries(
    route: str, queries: list[Query], min_saving: float = CONSECUTIVE_MIN_SAVING_SECONDS
) -> list[Finding]:
    """Runs of independent reads on different collections, each started after the previous
    ended, where running them concurrently would save `min_saving` or more:
    saving = sum of their durations - the longest one. A read whose filter holds a value an
    earlier read of the run returned depends on it: the run ends before it, a new one begins."""
    found = []
    run: list[Query] = []
    for query in sorted(queries, key=lambda q: q.started_at):
        if not independent_read(query):
            found.extend(_consecutive_finding(route, run, min_saving))
            run = []
            continue
        if run and (
            query.started_at < run[-1].finished_at
            or any(q.collection == query.collection for q in run)
            or _uses_reply(query, run)
        ):
            found.extend(_consecutive_finding(route, run, min_saving))
            run = []
        run.append(query)
    found.extend(_consecutive_finding(route, run, min_saving))
    return found


def _consecutive_finding(route: str, run: list[Query], min_saving: float) -> list[Finding]:
    if len(run) < 2:
        return []
    durations = [q.duration_seconds for q in run]
    saving = sum(durations) - max(durations)
    if saving < min_saving:
        return []
    # The site is the second read: the first await that waited for another it did not need.
    # One line for every request, so one finding per site (the listener locates that read).
    located = run[1] if run[1].location else next((q for q in run if q.location), run[1])
    return [
        Finding(
            "consecutive_queries",
            route,
            located.location,
            saving,
            {
                "collections": [q.collection for q in run],
                "shape": " ; ".join(q.shape for q in run),
                "queries": [
                    {
                        "operation": q.operation,
                        "collection": q.collection,
                        "shape": q.shape,
                        "duration_seconds": q.duration_seconds,
                        "location": q.location,
                    }
                    for q in run
                ],
                "sequential_seconds": sum(durations),
                "concurrent_seconds": max(durations),
                "saving_seconds": saving,
            },
            via=located.via,
        )
    ]


def slow_queries(route: str, queries: list[Query], threshold: float) -> list[Finding]:
    """Queries slower than `slow_query_seconds`: one finding per (shape, location).

    A query is judged on its duration minus the time its loop was stalled meanwhile (its reply
    waited for the loop, not for the server); the finding says how much that was.
    """
    groups: dict[tuple[str, str | None], list[Query]] = {}
    for query in queries:
        if query.duration_seconds - query.stall_seconds > threshold:
            groups.setdefault((query.shape, query.location), []).append(query)
    return [
        Finding(
            "slow_query",
            route,
            location,
            sum(q.duration_seconds - q.stall_seconds for q in group),
            {
                "collection": group[0].collection,
                "operation": group[0].operation,
                "shape": shape,
                "duration_seconds": max(q.duration_seconds for q in group),
                **_behind_stalls(group),
            },
            count=len(group),
            via=group[0].via,
        )
        for (shape, location), group in groups.items()
    ]


def _behind_stalls(group: list[Query]) -> dict[str, float]:
    """How long these queries' replies waited for a stalled loop, when they did."""
    seconds = sum(q.stall_seconds for q in group)
    return {"loop_stall_seconds": seconds} if seconds > 0 else {}


def unbounded_reads(route: str, queries: list[Query]) -> list[Finding]:
    """A find/aggregate returning > 1,000 documents or > 1 MiB with no limit or no projection."""
    found = []
    for query in queries:
        if query.operation not in UNBOUNDED_OPERATIONS:
            continue
        if query.has_limit and query.has_projection:
            continue
        if query.documents <= UNBOUNDED_DOCUMENTS and query.reply_bytes <= UNBOUNDED_BYTES:
            continue
        missing = [
            name
            for name, present in (("limit", query.has_limit), ("projection", query.has_projection))
            if not present
        ]
        found.append(
            Finding(
                "unbounded_read",
                route,
                query.location,
                query.duration_seconds,
                {
                    "collection": query.collection,
                    "operation": query.operation,
                    "shape": query.shape,
                    "documents": query.documents,
                    "bytes": query.reply_bytes,
                    "missing": missing,
                },
                via=query.via,
            )
        )
    return found
